"""Worker shards: each worker (one per machine) runs the tenants of one shard, whose files are on its machine.

One process work pool has a work queue per shard, `shard-<name>`; every run of a tenant goes to its shard's
queue (the dispatchers of `deployments.dispatch` create each run there), and a shard's worker polls only that
queue and the dispatchers' (`python -m deployments.worker --shard a`):

    prefect worker start --pool o365sync --work-queue shard-a --work-queue dispatch

A shard is a storage location of O365SYNC_REGIONS (`{"a": "/srv/o365sync/a", ...}`), mounted on the machine of
the shard's worker; the tenant's config records its shard (`TenantConfig.shard`, equal to its region). A tenant
without a shard runs from the pool's default queue (any worker that polls every queue).

`assign_shard` (`o365sync tenant assign <id> --shard <name>`) moves a tenant between shards while its syncs queue:

1. checks the request (unknown shard, same shard: one line, nothing changed);
2. holds the tenant's runs: takes its not-yet-started runs off the queue (the dispatchers' and manual ones, e.g. an
   initial import: they are re-created afterwards; with `o365sync serve`'s per-tenant deployments, those are paused,
   which deletes their scheduled runs), and waits for its pending and running runs to end;
3. moves its files with the residency move (`o365sync.residency.move_tenant`: under the tenant's sync locks and
   its store's exclusive lock, copy, switch region and shard in one write, remove the old copy). A run that still
   arrives (e.g. started by hand on the old shard) waits on those locks and then follows the switch to the new
   location, so nothing is lost or written twice;
4. re-creates the held runs on the new shard's queue, with their scheduled times and idempotency keys (and any run
   a dispatcher created on the old queue meanwhile); the dispatchers read the new shard at their next window.
   Per-tenant deployments that were running are resumed. If the move is refused, the same step puts everything
   back as it was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployments.polling import wait_while
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig, load_tenant

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.responses import DeploymentResponse

QUEUE_PREFIX = "shard-"
DRAIN_TIMEOUT_S = 900.0
"""How long `assign` waits for the tenant's running syncs (a sync normally takes seconds to minutes)."""
POLL_S = 1.0


class ShardRefused(ValueError):
    """The assignment is not possible; nothing was changed (one line)."""


def shard_queue(shard: str | None) -> str | None:
    """The work queue of a shard (None: the work pool's default queue)."""
    return None if shard is None else f"{QUEUE_PREFIX}{shard}"


def known_shards(settings: Settings) -> list[str]:
    return sorted(settings.regions)


def check_assignment(settings: Settings, tenant: TenantConfig, shard: str) -> None:
    """Raise ShardRefused (one line) for an unknown shard or the tenant's current one."""
    shards = known_shards(settings)
    if shard not in shards:
        raise ShardRefused(
            f"unknown shard {shard!r}: a shard is a storage location of O365SYNC_REGIONS on its worker's machine "
            f"(configured: {', '.join(shards) or 'none'}); nothing was changed"
        )
    if tenant.shard == shard:
        raise ShardRefused(f"tenant {tenant.id} is already on shard {shard}; nothing was changed")


def tenant_deployments(client: SyncPrefectClient, tenant_id: str) -> list[DeploymentResponse]:
    """The per-tenant deployments of `tenant_id` on the current Prefect API (tagged with the id, its parameter)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[tenant_id])))
    return [d for d in found if d.parameters.get("tenant_id") == tenant_id]


@dataclass
class _Held:
    pool: str | None
    paused_before: dict[str, bool] = field(default_factory=dict)  # per-tenant deployment id -> was paused
    waiting: list[_Waiting] = field(default_factory=list)


@dataclass(frozen=True)
class _Waiting:
    """A run of the tenant that had not started, taken off its queue to be re-created on the tenant's new one."""

    deployment_id: Any
    parameters: dict[str, Any]
    name: str
    tags: list[str]
    idempotency_key: str | None
    scheduled_time: Any
    pooled: bool  # its deployment has a work pool (a served deployment has no queues)


def _tenant_runs(client: SyncPrefectClient, tenant_id: str, states: list[str]) -> list[Any]:
    """The tenant's flow runs in `states` (runs carry the tenant's id as tag and parameter, in both shapes)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tenant_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in states])),
        ),
    )
    return [r for r in runs if r.parameters.get("tenant_id") == tenant_id and r.deployment_id is not None]


def _take_waiting(client: SyncPrefectClient, tenant_id: str, unless_on: str | None = None) -> list[_Waiting]:
    """Delete the tenant's not-yet-started runs (except those already on queue `unless_on`) and return those to
    re-create: manual and dispatched ones; the per-tenant schedules' own runs regenerate when resumed."""
    taken = []
    for run in _tenant_runs(client, tenant_id, ["SCHEDULED"]):
        if unless_on is not None and run.work_queue_name == unless_on:
            continue
        awaiting = run.state is not None and run.state.name == "AwaitingConcurrencySlot"
        if not run.auto_scheduled or awaiting:
            details = run.state.state_details if run.state is not None else None
            taken.append(
                _Waiting(
                    deployment_id=run.deployment_id,
                    parameters=dict(run.parameters),
                    name=run.name,
                    tags=list(run.tags),
                    idempotency_key=run.idempotency_key,
                    scheduled_time=details.scheduled_time if details is not None else None,
                    pooled=run.work_queue_name is not None and run.work_pool_name is not None,
                )
            )
        client.delete_flow_run(run.id)
    return taken


@contextlib.contextmanager
def hold_tenant_runs(
    settings: Settings,
    tenant_id: str,
    *,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    say: Callable[[str], None] = print,
) -> Iterator[_Held]:
    """Steps 2 and 4 of the module docstring around the block (the block moves the files)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployments = tenant_deployments(client, tenant_id)  # per-tenant ones: `o365sync serve`'s shape
        pools = {d.work_pool_name for d in deployments}
        held = _Held(pool=next(iter(pools)) if len(pools) == 1 else None)
        if len(pools) > 1:
            raise ShardRefused(
                f"tenant {tenant_id}'s deployments are in several work pools ({', '.join(sorted(map(str, pools)))}); "
                "nothing was changed"
            )
        for d in deployments:
            held.paused_before[str(d.id)] = bool(d.paused)
            if not d.paused:
                client.pause_deployment(d.id)
        try:
            held.waiting = _take_waiting(client, tenant_id)
            wait_while(
                lambda: _tenant_runs(client, tenant_id, ["PENDING", "RUNNING", "CANCELLING"]),
                time.monotonic() + drain_timeout_s,
                lambda active: ShardRefused(
                    f"tenant {tenant_id} still has {len(active)} run(s) in progress after {drain_timeout_s:.0f} s "
                    f"(e.g. {active[0].name}); nothing was moved. Try again when they end, or cancel them"
                ),
                POLL_S,
            )
            say(f"tenant {tenant_id}: {len(held.waiting)} waiting run(s) held, no run in progress")
            yield held
        finally:
            _release(settings, client, tenant_id, held)


def _release(settings: Settings, client: SyncPrefectClient, tenant_id: str, held: _Held) -> None:
    """Resume the per-tenant deployments that were running, and re-create the held runs, and any a dispatcher
    created on the old queue meanwhile, on the queue the tenant's config now says (its shard's)."""
    from prefect.states import Scheduled

    for deployment_id, was_paused in held.paused_before.items():
        if not was_paused:
            client.resume_deployment(deployment_id)
    queue = shard_queue(load_tenant(settings, tenant_id).shard)
    for run in held.waiting + _take_waiting(client, tenant_id, unless_on=queue):
        client.create_flow_run_from_deployment(
            run.deployment_id,
            parameters=run.parameters,
            name=run.name,
            tags=run.tags,
            idempotency_key=run.idempotency_key,
            state=Scheduled(scheduled_time=run.scheduled_time) if run.scheduled_time else None,
            work_queue_name=queue if run.pooled else None,
        )


def assign_shard(
    settings: Settings,
    tenant_id: str,
    shard: str,
    *,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    say: Callable[[str], None] = print,
) -> dict[str, int | str]:
    """Move `tenant_id` to `shard` (module docstring). Raises ShardRefused / MoveRefused / TenantNotFound (one line)
    before changing anything. Without a configured Prefect API (`o365sync serve` reads the shards at start) only
    the files and the config move."""
    from deployments.prefect_server import configured_api_url, healthy
    from o365sync.residency import move_tenant

    tenant = load_tenant(settings, tenant_id)
    check_assignment(settings, tenant, shard)
    url = configured_api_url()
    if url is None:
        return move_tenant(settings, tenant.id, shard, shard=shard)
    if not healthy(url, timeout=10.0):
        raise ShardRefused(f"the Prefect API {url} does not answer; nothing was changed")
    with hold_tenant_runs(settings, tenant.id, drain_timeout_s=drain_timeout_s, say=say):
        return move_tenant(settings, tenant.id, shard, shard=shard)
