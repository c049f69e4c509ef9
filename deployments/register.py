"""Register the deployments for workers with a Prefect server, instead of `o365sync serve`:

    PREFECT_API_URL=http://<server>:4200/api uv run python -m deployments.register --work-pool o365sync
    python -m deployments.worker --pool o365sync --shard a

It registers, once, one deployment per job kind (`<kind>/all-tenants`, unscheduled) and the dispatchers
(`dispatch/<kind>`, interval schedules) of `deployments.dispatch`. The dispatchers read the tenant registry at
each window: a tenant added later is dispatched at the next window without a restart or re-registration, a
removed one is simply not dispatched, and each run goes to its tenant's shard queue `shard-<name>`
(`deployments.shards`). Re-running it is harmless (it updates the same deployments); it also deletes the per-tenant
deployments (`<kind>-<tenant>`, tagged with the tenant and kind) an earlier version registered in the pool, so an
upgrade leaves no stale schedules.
Each deployment carries what its runs need to find the tenants wherever the worker
was started (job variables of a process worker): the settings of this shell and its `.env` as O365SYNC_*
variables (paths made absolute; secrets left out, Prefect stores job variables), the Prefect privacy settings of
`o365sync.prefect_env.PRIVACY_DEFAULTS`, and, when this directory has a `.env`, this directory as the runs' working
directory so they read the same `.env` (secrets included). Workers on other machines need the same paths.
Per-tenant deployments `o365sync serve` manages on the same server are refused (`deployments.ownership`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, cast, get_args
from uuid import UUID

from pydantic import SecretStr

from o365sync.prefect_env import PRIVACY_DEFAULTS, configure_prefect_env, prefect_home_for
from o365sync.settings import Settings
from o365sync.tenants import list_tenants


def _absolute(value: object) -> object:
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    return value


def worker_job_variables(settings: Settings, cwd: Path | None = None) -> dict:
    """Job variables (process work pool) that give a run this shell's settings: `env` and maybe `working_dir`."""
    cwd = cwd or Path.cwd()
    fields = Settings.model_fields
    secret = {n for n, f in fields.items() if SecretStr in (f.annotation, *get_args(f.annotation))}
    env = dict(PRIVACY_DEFAULTS)
    for name in sorted((settings.model_fields_set | {"data_dir"}) - secret):
        value = _absolute(getattr(settings, name))
        if value is not None:
            env[f"O365SYNC_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    # Prefect's home of the run (where Prefect would write its local storage) inside the data dir, as `serve` does.
    env["PREFECT_HOME"] = str(prefect_home_for(settings.data_dir))
    out: dict = {"env": env}
    if (cwd / ".env").is_file():
        out["working_dir"] = str(cwd.resolve())
    return out


def register_deployments(
    settings: Settings, work_pool_name: str, *, dispatchers_paused: bool = False
) -> dict[str, UUID]:
    """Create or update the job-kind deployments and the dispatchers on the current Prefect API for the workers of
    `work_pool_name` (with `worker_job_variables`), then delete the pool's per-tenant deployments of the earlier
    shape. Returns full name -> id. Raises DeploymentOwnerConflict, before writing anything, when `o365sync serve`
    manages per-tenant deployments of these tenants on this server (both would run them). `dispatchers_paused`: register
    the dispatchers paused (tests that dispatch by hand)."""
    from deployments.dispatch import dispatcher_deployments, job_kind_deployments
    from deployments.ownership import refuse_served

    ours = {t.id for t in list_tenants(settings)}
    refuse_served(
        [
            f"{kind}/{d.name}"
            for kind, d in _per_tenant(None)
            if d.work_pool_name is None and d.parameters["tenant_id"] in ours
        ],
        work_pool_name,
    )
    ensure_work_pool(work_pool_name)
    job_variables = worker_job_variables(settings)
    out = {}
    dispatchers = dispatcher_deployments()
    for d in dispatchers:
        d.paused = dispatchers_paused
    for d in job_kind_deployments() + dispatchers:
        d.job_variables = job_variables
        out[d.full_name] = cast(UUID, d.apply(work_pool_name=work_pool_name))  # outside an event loop: the id
    ensure_shard_queues(settings, work_pool_name)
    for name in prune_deployments(work_pool_name):
        print(f"removed {name} (per-tenant deployments are replaced by the dispatchers)")
    return out


def ensure_work_pool(name: str) -> None:
    """Create the process work pool `name` unless it exists."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                    )
                )


def ensure_shard_queues(settings: Settings, work_pool_name: str) -> None:
    """The work queue of every configured shard (O365SYNC_REGIONS), so the UI and `prefect work-queue ls` show them
    before the first dispatch (the dispatchers would create them with the first runs)."""
    from prefect import get_client
    from prefect.exceptions import ObjectAlreadyExists

    from deployments.shards import known_shards, shard_queue

    with get_client(sync_client=True) as client:
        for shard in known_shards(settings):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_queue(name=str(shard_queue(shard)), work_pool_name=work_pool_name)


def _per_tenant(work_pool_names: list[str] | None) -> list[tuple[str, Any]]:
    """(kind, deployment) of the per-tenant deployments (`<kind>-<tenant>`, tagged with the tenant, as
    `deployments.schedules` and `deployments.user_import` build them) on the current API, in the given work pools
    (None: anywhere)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

    from deployments.schedules import KINDS, deployment_name
    from deployments.user_import import USER_IMPORT

    pools = WorkPoolFilter(name=WorkPoolFilterName(any_=work_pool_names)) if work_pool_names is not None else None
    found = []
    with get_client(sync_client=True) as client:
        kinds = FlowFilter(name=FlowFilterName(any_=[*KINDS, USER_IMPORT]))
        flows = {f.id: f.name for f in client.read_flows(flow_filter=kinds)}
        offset = 0
        while batch := client.read_deployments(work_pool_filter=pools, limit=200, offset=offset):
            offset += len(batch)
            for d in batch:
                kind, tenant = flows.get(d.flow_id), d.parameters.get("tenant_id")
                if kind and isinstance(tenant, str) and d.name == deployment_name(kind, tenant) and tenant in d.tags:
                    found.append((kind, d))
    return found


def prune_deployments(work_pool_name: str) -> list[str]:
    """Delete the per-tenant deployments of `work_pool_name` (with their scheduled runs); returns their names."""
    from prefect import get_client

    found = _per_tenant([work_pool_name])
    with get_client(sync_client=True) as client:
        for _, d in found:
            client.delete_deployment(d.id)
    return [f"{kind}/{d.name}" for kind, d in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-pool", required=True, help="work pool the workers poll (e.g. o365sync)")
    args = parser.parse_args(argv)
    configure_prefect_env()
    from deployments.prefect_server import require_api_url
    from o365sync.settings import load_settings

    if not require_api_url("workers need"):
        return 1
    from deployments.ownership import DeploymentOwnerConflict
    from deployments.schedules import email_tenants

    try:
        registered = register_deployments(load_settings(), args.work_pool)
    except DeploymentOwnerConflict as exc:
        print(exc, file=sys.stderr)
        return 1
    for name in registered:
        print(f"registered {name} on work pool {args.work_pool}")
    if not email_tenants(load_settings()):
        print(
            "No tenant with the email feature is registered yet (o365sync tenant add): the dispatchers pick "
            "tenants up at each window."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
