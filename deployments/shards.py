"""Worker shards: each worker (one per machine) runs the tenants of one shard, whose files are on its machine.

One process work pool has a work queue per shard, `shard-<name>`; every deployment of a tenant targets its shard's
queue (`python -m deployments.register`), and a shard's worker polls only that queue:

    prefect worker start --pool o365sync --work-queue shard-a

A shard is a storage location of O365SYNC_REGIONS (`{"a": "/srv/o365sync/a", ...}`), mounted on the machine of
the shard's worker; the tenant's config records its shard (`TenantConfig.shard`, equal to its region). A tenant
without a shard runs from the pool's default queue (any worker that polls every queue).

`assign_shard` (`o365sync tenant assign <id> --shard <name>`) moves a tenant between shards while its syncs queue:

1. checks the request (unknown shard, same shard: one line, nothing changed);
2. holds the tenant's runs: pauses its deployments (Prefect deletes their not-yet-started scheduled runs, so no new
   run starts), takes its other not-yet-started runs off the queue (manual ones, e.g. an initial import: they are
   re-created afterwards), and waits for its pending and running runs to end;
3. moves its files with the residency move (`o365sync.residency.move_tenant`: under the tenant's sync locks and
   its store's exclusive lock, copy, switch region and shard in one write, remove the old copy). A run that still
   arrives (e.g. started by hand on the old shard) waits on those locks and then follows the switch to the new
   location, so nothing is lost or written twice;
4. re-registers the tenant's deployments on the new shard's queue (their schedules regenerate there), resumes the
   ones that were running, and re-creates the held manual runs on the new queue. If the move is refused, the same
   step puts everything back as it was.
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
    paused_before: dict[str, bool] = field(default_factory=dict)  # deployment name -> was paused
    manual: list[tuple[Any, dict[str, Any], str]] = field(default_factory=list)  # (deployment id, params, name)


def _active_runs(client: SyncPrefectClient, deployment_ids: list[Any], states: list[str]) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    if not deployment_ids:
        return []
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids)),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in states]))
        ),
    )


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
        deployments = tenant_deployments(client, tenant_id)
        pools = {d.work_pool_name for d in deployments}
        held = _Held(pool=next(iter(pools)) if len(pools) == 1 else None)
        if len(pools) > 1:
            raise ShardRefused(
                f"tenant {tenant_id}'s deployments are in several work pools ({', '.join(sorted(map(str, pools)))}); "
                "nothing was changed"
            )
        for d in deployments:
            held.paused_before[d.name] = bool(d.paused)
            if not d.paused:
                client.pause_deployment(d.id)
        ids = [d.id for d in deployments]
        try:
            for run in _active_runs(client, ids, ["SCHEDULED"]):  # manual runs (paused deletes the scheduled ones)
                if not run.auto_scheduled or (run.state is not None and run.state.name == "AwaitingConcurrencySlot"):
                    held.manual.append((run.deployment_id, dict(run.parameters), run.name))
                client.delete_flow_run(run.id)
            wait_while(
                lambda: _active_runs(client, ids, ["PENDING", "RUNNING", "CANCELLING"]),
                time.monotonic() + drain_timeout_s,
                lambda active: ShardRefused(
                    f"tenant {tenant_id} still has {len(active)} run(s) in progress after {drain_timeout_s:.0f} s "
                    f"(e.g. {active[0].name}); nothing was moved. Try again when they end, or cancel them"
                ),
                POLL_S,
            )
            if deployments:
                say(f"tenant {tenant_id}: {len(deployments)} deployments paused, no run in progress")
            yield held
        finally:
            _release(settings, client, tenant_id, deployments, held)


def _release(
    settings: Settings, client: SyncPrefectClient, tenant_id: str, deployments: list[DeploymentResponse], held: _Held
) -> None:
    """Register the tenant's deployments again where its config now says (its shard's queue), as paused as they
    were before the hold, and re-create the held manual runs."""
    from deployments.register import register_deployments

    if not deployments or held.pool is None:
        return
    register_deployments(  # the same names: the same deployment ids, now on the shard's queue
        settings, held.pool, tenants=[load_tenant(settings, tenant_id)], paused=held.paused_before, prune=False
    )
    for deployment_id, parameters, name in held.manual:
        client.create_flow_run_from_deployment(deployment_id, parameters=parameters, name=name)


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
