"""One manager per deployment name on a Prefect server.

`o365sync serve` applies the per-tenant deployments without a work pool and runs them itself; `python -m
deployments.register --work-pool P` binds the same names to a work pool for workers. Both at once would make the last
one to write a deployment its owner, so runs would silently move between the serve process and the workers (or wait
for a runner that is gone). Each side therefore refuses, before changing anything, names the other one holds.
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


def _some(names: list[str]) -> str:
    return f"deployment {names[0]} is" if len(names) == 1 else f"deployments {names[0]} and {len(names) - 1} more are"
