"""One manager of the tenants' runs on a Prefect server.

`o365sync serve` applies per-tenant deployments without a work pool and runs them itself; `python -m
deployments.register --work-pool P` registers one deployment per job kind and the dispatchers that fan them out
over the tenants for workers (`deployments.dispatch`). Both at once would run every tenant twice (or, for a name
both write, make the last writer its owner, so runs would silently move between the serve process and the
workers). Each side therefore refuses, before changing anything, what the other one holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

SERVED = None
"""The work pool of a deployment `o365sync serve` manages: none."""
_BATCH = 200  # names per request (the server's default page size)


class DeploymentOwnerConflict(RuntimeError):
    pass


def current_pools(deployments: list[RunnerDeployment]) -> dict[str, str | None]:
    """{full name: work pool name (None: served)} of those of `deployments` that exist on the current Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    by_name = {d.name: d.full_name for d in deployments}
    names = list(by_name)
    out: dict[str, str | None] = {}
    with get_client(sync_client=True) as client:
        for start in range(0, len(names), _BATCH):
            batch = names[start : start + _BATCH]
            for found in client.read_deployments(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=batch)), limit=len(batch) * 2
            ):
                if found.name in by_name:
                    out[by_name[found.name]] = found.work_pool_name
    return out


def refuse_foreign(deployments: list[RunnerDeployment], work_pool_name: str | None) -> None:
    """Raise DeploymentOwnerConflict (one line) if any deployment exists managed the other way: bound to a work pool
    when `serve` (work_pool_name None) asks, or served when `register` asks."""
    pools = current_pools(deployments)
    if work_pool_name is SERVED:
        foreign = sorted(name for name, pool in pools.items() if pool is not None)
        if foreign:
            raise DeploymentOwnerConflict(
                f"{_some(foreign)} already registered for workers (work pool {pools[foreign[0]]!r}, python -m "
                f"deployments.register); serve and workers must not run the same deployments: stop the workers and "
                f"`prefect deployment delete {foreign[0]}` (each of them), or keep the workers and do not run serve"
            )
    else:
        foreign = sorted(name for name, pool in pools.items() if pool is None)
        if foreign:
            raise DeploymentOwnerConflict(
                f"{_some(foreign)} managed by `o365sync serve` (no work pool); serve and workers must not run the same "
                f"deployments: stop serve and `prefect deployment delete {foreign[0]}` (each of them) before "
                f"registering them for work pool {work_pool_name!r}"
            )


def refuse_served(served: list[str], work_pool_name: str) -> None:
    """`register`: raise DeploymentOwnerConflict (one line) when `serve` manages per-tenant deployments (`served`)."""
    if served := sorted(served):
        raise DeploymentOwnerConflict(
            f"{_some(served)} managed by `o365sync serve` (no work pool); serve and workers must not run the same "
            f"tenants: stop serve and `prefect deployment delete {served[0]}` (each of them) before registering the "
            f"dispatchers for work pool {work_pool_name!r}"
        )


def refuse_dispatchers() -> None:
    """`serve`: raise DeploymentOwnerConflict (one line) when the dispatchers are registered for workers."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from deployments.dispatch import DISPATCH

    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[DISPATCH])), limit=10)
    if pooled := sorted(f"{DISPATCH}/{d.name}" for d in found if d.work_pool_name):
        pool = next(d.work_pool_name for d in found if d.work_pool_name)
        raise DeploymentOwnerConflict(
            f"{_some(pooled)} registered for workers (work pool {pool!r}, python -m deployments.register); serve and "
            f"workers must not run the same tenants: stop the workers and `prefect deployment delete {pooled[0]}` "
            f"(each of them), or keep the workers and do not run serve"
        )


def _some(names: list[str]) -> str:
    return f"deployment {names[0]} is" if len(names) == 1 else f"deployments {names[0]} and {len(names) - 1} more are"
