"""One deployment per job kind, fanned out over the tenants by dispatchers (for workers; `o365sync serve` keeps its
per-tenant deployments). Chosen with the measurements in docs/benchmarks.md, "Deployment shape".

* `<kind>/all-tenants` for each kind of `dispatch_plan.JOB_KINDS` (email-sync, calendar-sync, teams-refresh,
  retention, initial-import, user-import): unscheduled, parameter `tenant_id` (user-import also `user_id`) given
  by each run, no concurrency limit (it would serialise every tenant; runs of one tenant and feature queue behind
  its sync locks instead).
* `dispatch/<kind>` for each scheduled kind: the `dispatch` flow on an interval schedule (email every 15 minutes,
  calendar hourly, Teams and retention daily; never RRule), LEAD_S before each window, on the work queue
  `dispatch` that every shard worker also polls (`deployments.worker`). Each run reads the tenant registry and
  bulk-creates (100 per call) the window's runs of `<kind>/all-tenants` as `dispatch_plan.plan_window` says: on
  each tenant's shard queue, Scheduled at window start + the tenant's offset, idempotency key per tenant and
  window. A tenant added to the registry is in the next window; a removed one is not dispatched.

`python -m deployments.register` registers all of them (`register_deployments`). `run_now` starts one tenant's run
of a kind at once (an initial import, a user's import, a sync by hand).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from deployments.dispatch_plan import (
    DISPATCH_QUEUE,
    JOB_KINDS,
    SCHEDULED,
    USER_IMPORT,
    PlannedRun,
    batches,
    dispatched_window,
    dispatcher_anchor,
    idempotency_key,
    plan_window,
    stuck_before,
    window_of,
)
from deployments.schedules import (
    _calendar_sync_flow,
    _email_sync_flow,
    _initial_import_flow,
    _retention_flow,
    _teams_refresh_flow,
    every,
)
from deployments.shards import shard_queue
from flows.failures import flow
from o365sync.settings import Settings, load_settings
from o365sync.tenants import TenantConfig, list_tenants

if TYPE_CHECKING:
    from uuid import UUID

    from prefect import Flow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments.runner import RunnerDeployment

ALL_TENANTS = "all-tenants"
DISPATCH = "dispatch"
NOT_FINAL = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


def job_kind_name(kind: str) -> str:
    """The full name (`flow/deployment`) of the kind's deployment for all tenants."""
    return f"{kind}/{ALL_TENANTS}"


def _user_import_flow() -> Flow[..., Any]:
    from flows.user_import import user_import

    return user_import


_FLOWS = {
    "email-sync": _email_sync_flow,
    "calendar-sync": _calendar_sync_flow,
    "teams-refresh": _teams_refresh_flow,
    "retention": _retention_flow,
    "initial-import": _initial_import_flow,
    USER_IMPORT: _user_import_flow,
}


def job_kind_deployments() -> list[RunnerDeployment]:
    """The unscheduled `<kind>/all-tenants` deployments (no Prefect API contacted)."""
    from prefect.deployments.runner import EntrypointType

    out = []
    for kind, job in JOB_KINDS.items():
        when = f"dispatched {every(job.interval_s)} by dispatch/{kind}" if job.interval_s else "started on demand"
        d = _FLOWS[kind]().to_deployment(
            name=ALL_TENANTS,
            description=f"{kind} of one tenant (parameter tenant_id) on its shard's queue; {when}.",
            tags=[kind],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        out.append(cast("RunnerDeployment", d))  # called outside an event loop: the deployment, not a coroutine
    return out


def dispatcher_deployments() -> list[RunnerDeployment]:
    """`dispatch/<kind>` per scheduled kind: an interval schedule LEAD_S before each window, on DISPATCH_QUEUE."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Interval

    out = []
    for kind in SCHEDULED:
        interval = JOB_KINDS[kind].interval_s
        assert interval is not None
        d = cast(
            "RunnerDeployment",  # called outside an event loop: the deployment, not a coroutine
            dispatch.to_deployment(
                name=kind,
                description=f"Creates the {kind} runs of every tenant with the feature, {every(interval)}, a few "
                "minutes before each window (deployments/dispatch.py).",
                parameters={"kind": kind},
                schedules=[
                    Interval(interval, anchor_date=dispatcher_anchor(), timezone="UTC", slug=f"dispatch-{kind}")
                ],
                tags=[DISPATCH, kind],
                entrypoint_type=EntrypointType.MODULE_PATH,
            ),
        )
        d.work_queue_name = DISPATCH_QUEUE
        out.append(d)
    return out


def _run_create(run: PlannedRun, kind: str) -> dict[str, Any]:
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.states import Scheduled, to_state_create

    return DeploymentFlowRunCreate(
        name=run.name,
        parameters={"tenant_id": run.tenant_id},
        tags=[run.tenant_id, kind],
        idempotency_key=run.idempotency_key,
        work_queue_name=run.work_queue_name,
        state=to_state_create(Scheduled(scheduled_time=run.scheduled_at)),
    ).model_dump(mode="json", exclude_unset=True)


def bulk_create(client: SyncPrefectClient, deployment_id: UUID, runs: list[PlannedRun], kind: str) -> list[str]:
    """Create `runs` (at most BULK_MAX) in one call; the errors of those the server refused."""
    response = client._client.post(
        f"/deployments/{deployment_id}/create_flow_run/bulk", json=[_run_create(r, kind) for r in runs]
    )
    return [r.get("error") or "refused" for r in response.json()["results"] if r["status"] != "CREATED"]


def _page(client: SyncPrefectClient, **filters: Any) -> list[FlowRun]:
    out: list[FlowRun] = []
    while batch := client.read_flow_runs(limit=200, offset=len(out), **filters):
        out += batch
    return out


def _runs_of(client: SyncPrefectClient, deployment_id: UUID, **flow_run_filters: Any) -> list[FlowRun]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    return _page(
        client,
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(**flow_run_filters),
    )


def stuck_tenants(client: SyncPrefectClient, deployment_id: UUID, before: datetime) -> set[str]:
    """Tenants with a run of the deployment scheduled at or before `before` that is not final (one query, paged)."""
    from prefect.client.schemas.filters import (
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = _runs_of(
        client,
        deployment_id,
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in NOT_FINAL])),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=before),
    )
    return {str(r.parameters.get("tenant_id")) for r in runs}


def dispatched_tenants(client: SyncPrefectClient, deployment_id: UUID, kind: str, window: datetime) -> set[str]:
    """Tenants whose run of this window exists already (its idempotency key; one query, paged)."""
    from prefect.client.schemas.filters import FlowRunFilterExpectedStartTime

    interval = JOB_KINDS[kind].interval_s
    assert interval is not None
    end = window + timedelta(seconds=interval)
    runs = _runs_of(
        client, deployment_id, expected_start_time=FlowRunFilterExpectedStartTime(after_=window, before_=end)
    )
    return {
        tenant
        for r in runs
        if r.idempotency_key == idempotency_key(kind, tenant := str(r.parameters.get("tenant_id")), window)
    }


def dispatch_window(
    settings: Settings, kind: str, window: datetime, *, tenants: list[TenantConfig] | None = None
) -> dict[str, int]:
    """Create the window's runs of `<kind>/all-tenants` (module docstring); counts: tenants with the feature, runs
    created, runs that existed already (the window was dispatched before), tenants skipped (a run of theirs is
    stuck), runs the server refused."""
    from prefect import get_client

    job = JOB_KINDS[kind]
    assert job.interval_s is not None, f"{kind} is not dispatched"
    tenants = list_tenants(settings) if tenants is None else tenants
    due = [t for t in tenants if job.applies_to(t)]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(job_kind_name(kind))
        existing = dispatched_tenants(client, deployment.id, kind, window)
        stuck = stuck_tenants(client, deployment.id, stuck_before(window, job.interval_s)) - existing
        runs = plan_window(kind, due, window, skip=stuck | existing)
        refused = [e for batch in batches(runs) for e in bulk_create(client, deployment.id, batch, kind)]
    return {
        "tenants": len(due),
        "created": len(runs) - len(refused),
        "existing": len({t.id for t in due} & existing),
        "skipped": len({t.id for t in due} & stuck),
        "refused": len(refused),
    }


@flow(name=DISPATCH, flow_run_name="dispatch {kind}", persist_result=False)
def dispatch(kind: str, window: str | None = None) -> dict[str, int]:
    """Create the runs of `kind` for the window LEAD_S after this run's scheduled time (on the dispatcher's
    schedule: the next window; a run started by hand: the window in progress LEAD_S from now), or for the window
    containing `window` (an ISO time)."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    interval = JOB_KINDS[kind].interval_s
    if interval is None:
        raise ValueError(f"{kind} runs on demand; the dispatched kinds are {', '.join(SCHEDULED)}")
    at = datetime.fromisoformat(window) if window else flow_run.scheduled_start_time
    start = window_of(at, interval) if window else dispatched_window(at, interval)
    counts = dispatch_window(load_settings(), kind, start)
    get_run_logger().info(
        "dispatch %s window %s: %s", kind, start.isoformat(), ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return counts


def run_now(
    client: SyncPrefectClient,
    kind: str,
    tenant: TenantConfig,
    *,
    parameters: dict[str, Any] | None = None,
    **options: Any,
) -> FlowRun:
    """One run of `<kind>/all-tenants` for `tenant` now, on its shard's queue (`options`: name, state,
    idempotency_key... of `create_flow_run_from_deployment`)."""
    deployment = client.read_deployment_by_name(job_kind_name(kind))
    return client.create_flow_run_from_deployment(
        deployment.id,
        parameters={"tenant_id": tenant.id, **(parameters or {})},
        work_queue_name=shard_queue(tenant.shard),
        tags=[tenant.id, kind],
        **options,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.dispatch --kind email-sync --tenant contoso`: one run of the tenant now, on its
    shard's queue (what `prefect deployment run` cannot do: it has no work-queue option)."""
    import argparse
    import sys

    from o365sync.prefect_env import configure_prefect_env

    kinds = sorted(k for k in JOB_KINDS if k != USER_IMPORT)  # a user's import starts when the user connects
    parser = argparse.ArgumentParser(prog="python -m deployments.dispatch", description=main.__doc__)
    parser.add_argument("--kind", required=True, choices=kinds, help="the job kind")
    parser.add_argument("--tenant", required=True, help="the tenant id (o365sync tenant list)")
    args = parser.parse_args(argv)
    configure_prefect_env()
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.prefect_server import require_api_url
    from o365sync.tenants import TenantNotFound, load_tenant

    if not require_api_url("runs need"):
        return 1
    try:
        tenant = load_tenant(load_settings(), args.tenant)
        with get_client(sync_client=True) as client:
            run = run_now(client, args.kind, tenant, name=f"{args.kind}: {tenant.name or tenant.id}")
    except TenantNotFound as exc:
        print(exc, file=sys.stderr)
        return 1
    except ObjectNotFound:
        print(f"{job_kind_name(args.kind)} is not registered: python -m deployments.register", file=sys.stderr)
        return 1
    print(f"created run {run.name} ({run.id}) on work queue {run.work_queue_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
