"""What a dispatcher creates for one window of one job kind (pure: no Prefect, no clock, no files).

With one deployment per job kind (docs/benchmarks.md, "Deployment shape"), nothing on the server knows the tenants:
the `dispatch` flow of each scheduled kind (`deployments.dispatch`) reads the tenant registry at each run and
creates one run per tenant that has the kind's feature. This module decides which runs, for which window, on which
queue, at what time and under which idempotency key:

* **Windows** are the kind's intervals counted from a fixed anchor (`schedules._ANCHOR_BASE`): every 15 minutes for
  email, every hour for calendar, every day for Teams and retention; the same grid the per-tenant schedules used.
* **The next window, ahead of time.** A dispatcher run is scheduled LEAD_S before a window starts and dispatches
  that window (computed from its *scheduled* time, so a late dispatcher still dispatches the right window). Bulk
  creation of 1,000 runs takes minutes on a loaded box: dispatching early keeps it out of the runs' start lag.
* **Spread.** A tenant's run starts at window start + `schedule_offset_s(tenant, kind, interval)`, the per-tenant
  spread the per-tenant schedules had: tenants do not all start on the same second.
* **Idempotency.** The key `"<kind>:<tenant>:<window start>"` is the same however often a window is dispatched, so
  a repeated or overlapping dispatch creates nothing new (the server returns the existing run). The dispatcher
  also reads the window's existing runs first and leaves those tenants out, since the server's bulk endpoint
  costs nearly as much for a run it finds as for one it creates (measured: docs/benchmarks.md).
* **No pile-up.** A tenant whose run of an earlier window than the previous one is still not final (stuck, or its
  shard's worker is down) is skipped: at most two windows' runs of one kind wait per tenant, and they queue behind
  the tenant's sync locks. (The previous window's run may rightly still be waiting for its own start time when the
  next window is dispatched ahead.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from deployments.schedules import (
    _ANCHOR_BASE,
    CALENDAR_INTERVAL_S,
    CALENDAR_SYNC,
    EMAIL_SYNC,
    INITIAL_IMPORT,
    RETENTION,
    SYNC_INTERVAL_S,
    TEAMS_INTERVAL_S,
    TEAMS_REFRESH,
    schedule_offset_s,
)
from deployments.shards import shard_queue
from deployments.user_import import USER_IMPORT
from o365sync.tenants import TenantConfig

LEAD_S = 300
"""A dispatcher run is scheduled this long before the window it dispatches (1,000 tenants take ~2 minutes here)."""
DISPATCH_QUEUE = "dispatch"
"""The work queue of the dispatchers; every shard worker polls it besides its shard's queue (`deployments.worker`)."""
BULK_MAX = 100
"""Runs per `POST /deployments/{id}/create_flow_run/bulk` (the server's limit)."""


@dataclass(frozen=True)
class JobKind:
    """A flow with one deployment for all tenants. `feature`: the tenant feature it needs besides email (every
    deployment was always for email tenants only); `interval_s`: None when it runs on demand only."""

    name: str
    interval_s: int | None
    feature: str | None = None

    def applies_to(self, tenant: TenantConfig) -> bool:
        return "email" in tenant.features and (self.feature is None or self.feature in tenant.features)


JOB_KINDS = {
    k.name: k
    for k in (
        JobKind(EMAIL_SYNC, SYNC_INTERVAL_S),
        JobKind(CALENDAR_SYNC, CALENDAR_INTERVAL_S, "calendar"),
        JobKind(TEAMS_REFRESH, TEAMS_INTERVAL_S, "teams"),
        JobKind(RETENTION, TEAMS_INTERVAL_S),
        JobKind(INITIAL_IMPORT, None),
        JobKind(USER_IMPORT, None),
    )
}
SCHEDULED = tuple(name for name, k in JOB_KINDS.items() if k.interval_s)
"""The kinds a dispatcher fans out on an interval (the others are started on demand)."""


@dataclass(frozen=True)
class PlannedRun:
    tenant_id: str
    name: str
    work_queue_name: str | None  # None: the work pool's default queue (a tenant without a shard)
    idempotency_key: str
    scheduled_at: datetime


def window_of(at: datetime, interval_s: int) -> datetime:
    """The start of the `interval_s` window that contains `at` (windows counted from the fixed anchor). `at` may be
    a subclass of datetime (Prefect's runtime gives pendulum's, whose differences do not divide by a timedelta)."""
    at = at.astimezone(UTC)
    at = datetime(at.year, at.month, at.day, at.hour, at.minute, at.second, at.microsecond, tzinfo=UTC)
    elapsed = (at - _ANCHOR_BASE) // timedelta(seconds=interval_s)
    return _ANCHOR_BASE + elapsed * timedelta(seconds=interval_s)


def dispatched_window(scheduled_at: datetime, interval_s: int) -> datetime:
    """The window a dispatcher run scheduled at `scheduled_at` (LEAD_S before a window) dispatches."""
    return window_of(scheduled_at + timedelta(seconds=LEAD_S), interval_s)


def dispatcher_anchor() -> datetime:
    """The anchor of every dispatcher's interval schedule: LEAD_S before the windows' anchor."""
    return _ANCHOR_BASE - timedelta(seconds=LEAD_S)


def idempotency_key(kind: str, tenant_id: str, window: datetime) -> str:
    return f"{kind}:{tenant_id}:{window.strftime('%Y-%m-%dT%H:%MZ')}"


def run_title(kind: str, tenant: TenantConfig) -> str:
    """The run's name as the flow names it when it starts (`flows._reporting.run_name`): shown while it waits."""
    return f"{kind}: {tenant.name or tenant.id}"


def plan_window(
    kind: str, tenants: Iterable[TenantConfig], window: datetime, skip: Iterable[str] = ()
) -> list[PlannedRun]:
    """One run per tenant the kind applies to, minus the `skip` ids (tenants with a stuck run or already
    dispatched), earliest start first: a dispatch that overruns its lead delays only runs already due."""
    job = JOB_KINDS[kind]
    if job.interval_s is None:
        raise ValueError(f"{kind} runs on demand: it has no windows")
    skipped = set(skip)
    runs = [
        PlannedRun(
            tenant_id=t.id,
            name=run_title(kind, t),
            work_queue_name=shard_queue(t.shard),
            idempotency_key=idempotency_key(kind, t.id, window),
            scheduled_at=window + timedelta(seconds=schedule_offset_s(t.id, kind, job.interval_s)),
        )
        for t in tenants
        if job.applies_to(t) and t.id not in skipped
    ]
    return sorted(runs, key=lambda r: r.scheduled_at)


def stuck_before(window: datetime, interval_s: int) -> datetime:
    """A tenant's run of this kind scheduled at or before this time (Prefect's `before_` is inclusive) and not final
    is stuck when `window` is dispatched: it is from an earlier window than the previous one (module docstring)."""
    return window - timedelta(seconds=interval_s) - timedelta(microseconds=1)


def batches(runs: list[PlannedRun], size: int = BULK_MAX) -> list[list[PlannedRun]]:
    return [runs[i : i + size] for i in range(0, len(runs), size)]
