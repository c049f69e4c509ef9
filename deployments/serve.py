"""Run the tenants' deployments on their schedules in this process: `o365sync serve`.

One `prefect.serve(...)` process polls the Prefect API for due runs of the per-tenant deployments built in
`deployments.schedules` and starts each run as a subprocess (at most `limit` at once). Schedules need a real Prefect
server (the ephemeral API has no scheduler), so the API comes from `deployments.prefect_server.ensure_prefect_api`.
On Ctrl-C / SIGTERM the runner pauses the served schedules (so no runs pile up while nothing executes them) and the
local server, if started here, is stopped; the next `serve` re-activates the schedules.

`serve` keeps one deployment per tenant and kind: on one box with few tenants that is simple and the scheduler
copes. For several machines, many tenants or process isolation, register one deployment per job kind and the
dispatchers with a work pool instead (`python -m deployments.register --work-pool <pool>`, deployments/dispatch.py)
and run a worker per shard (`python -m deployments.worker`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from deployments.ownership import SERVED, refuse_dispatchers, refuse_foreign
from deployments.prefect_server import PrefectApi, ensure_prefect_api
from deployments.schedules import build_deployments, email_tenants, every
from deployments.user_import import user_import_deployments
from o365sync.settings import Settings

if TYPE_CHECKING:
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_LIMIT = 4
"""Flow runs executing at once in the serve process (each is a subprocess, ~100-200 MB)."""


class NothingToServe(RuntimeError):
    pass


def _interval_schedule(deployment: RunnerDeployment) -> IntervalSchedule | None:
    """The deployment's interval schedule (the only kind ours have), None when it is unscheduled."""
    from prefect.client.schemas.schedules import IntervalSchedule

    schedule = deployment.schedules[0].schedule if deployment.schedules else None
    return schedule if isinstance(schedule, IntervalSchedule) else None


def next_starts(deployment: RunnerDeployment, now: datetime, count: int = 3) -> list[datetime]:
    """The next `count` start times of the deployment's interval schedule after `now` (none when unscheduled)."""
    schedule = _interval_schedule(deployment)
    if schedule is None:
        return []
    interval_s = schedule.interval.total_seconds()
    anchor_s = datetime.fromisoformat(schedule.anchor_date.isoformat()).timestamp()
    first_s = now.timestamp() + (anchor_s - now.timestamp()) % interval_s  # first anchor + k * interval >= now
    return [datetime.fromtimestamp(first_s + k * interval_s, UTC) for k in range(count)]


def describe(deployments: list[RunnerDeployment], now: datetime | None = None) -> list[tuple[str, str, str]]:
    """(tenant id, deployment full name, schedule) rows for printing: each deployment's own interval and its
    next start times (UTC; the date only when not today)."""
    now = now or datetime.now(UTC)
    rows = []
    for d in deployments:
        tenant = str(d.parameters.get("tenant_id", ""))
        schedule = _interval_schedule(d)
        if schedule is not None:
            starts = next_starts(d, now)
            times = ", ".join(t.strftime("%H:%M:%S" if t.date() == now.date() else "%b %d %H:%M:%S") for t in starts)
            when = f"{every(int(schedule.interval.total_seconds()))}, next {times} UTC"
        else:
            when = "on demand"
        rows.append((tenant, d.full_name, when))
    return rows


def serve_tenants(
    settings: Settings,
    *,
    limit: int = DEFAULT_LIMIT,
    port: int | None = None,
    echo: Callable[[str], None] = print,
    on_ready: Callable[[PrefectApi, list[RunnerDeployment]], None] | None = None,
) -> None:
    """Build the deployments, ensure a Prefect API and serve them until interrupted (blocking).

    Raises NothingToServe (before starting anything) when no registered tenant has the email feature, and
    DeploymentOwnerConflict (before serving) when workers manage one of the deployments on this server."""
    if not email_tenants(settings):
        raise NothingToServe("No tenant with the email feature is registered (o365sync tenant add).")
    deployments = build_deployments(settings) + user_import_deployments(settings)
    from prefect import serve

    with ensure_prefect_api(settings, port=port, echo=echo) as api:
        refuse_dispatchers()
        refuse_foreign(deployments, SERVED)
        if on_ready:
            on_ready(api, deployments)
        serve(*deployments, limit=limit)
