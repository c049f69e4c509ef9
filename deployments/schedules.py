"""Per-tenant Prefect deployments for `o365sync serve`, generated from the tenant registry (YAML cannot loop over
tenants); workers get one deployment per job kind and the dispatchers of `deployments.dispatch` instead.

For every registered tenant with the "email" feature:

* `email-sync-<tenant>`: the `email-sync` flow every 15 minutes, parameters `{"tenant_id": <id>}` only. The interval
  anchor is spread deterministically over the 15 minutes per tenant, so tenants do not all start at the same second
  (`schedule_offset_s`; the hourly and daily runs below start between a tenant's email slots).
  A deployment concurrency limit of 1 with collision strategy CANCEL_NEW means a run that becomes due while the
  tenant's previous sync is still running is cancelled before it starts (the Prefect server enforces it, not the
  client).
* `initial-import-<tenant>`: the `initial-import` flow, unscheduled, run on demand (UI "Run" or
  `prefect deployment run initial-import/initial-import-<tenant>`); concurrent requests queue (limit 1, ENQUEUE).
* `calendar-sync-<tenant>` (tenants with "calendar"): the `calendar-sync` flow every hour, spread the same way,
  CANCEL_NEW.
* `teams-refresh-<tenant>` (tenants with "teams"): the users' teams and channels, daily, CANCEL_NEW.
* `retention-<tenant>`: the daily retention run (purges what is past the tenant's retention period, completes
  offboarding deletions whose grace period passed, compacts the store), CANCEL_NEW.

Flows are imported lazily (and can be passed in), so this module imports without Prefect's flow modules.
Entrypoints are module paths (`flows.email_sync.email_sync`): the package is installed, so served runs and process
workers load the flow from any working directory.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from o365sync.settings import Settings
from o365sync.tenants import TenantConfig, list_tenants

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

EMAIL_SYNC = "email-sync"
INITIAL_IMPORT = "initial-import"
CALENDAR_SYNC = "calendar-sync"
TEAMS_REFRESH = "teams-refresh"
RETENTION = "retention"
KINDS = (EMAIL_SYNC, INITIAL_IMPORT, CALENDAR_SYNC, TEAMS_REFRESH, RETENTION)
"""The flows with per-tenant deployments (deployment `<kind>-<tenant>`)."""
SYNC_INTERVAL_S = 900
CALENDAR_INTERVAL_S = 3600
TEAMS_INTERVAL_S = 86400
SCHEDULE_SLUG = "every-15-min"  # a stable slug lets re-registration update the schedule in place
CALENDAR_SLUG, TEAMS_SLUG, RETENTION_SLUG = "hourly", "daily", "daily-retention"
# Interval schedules fire at anchor + k * interval; a fixed past anchor plus a per-tenant offset is stable across
# restarts and machines (Python's hash() is salted per process, so a digest is used).
_ANCHOR_BASE = datetime(2026, 1, 1, tzinfo=UTC)
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Where in the quarter hour each kind starts, after the tenant's email slot. Every interval is a multiple of 15
# minutes, so without a phase the hourly and daily runs would start on the same second as an email sync.
PHASE_S = {EMAIL_SYNC: 0, TEAMS_REFRESH: 225, CALENDAR_SYNC: 450, RETENTION: 675}


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def schedule_offset_s(tenant_id: str, kind: str = EMAIL_SYNC, interval_s: int = SYNC_INTERVAL_S) -> int:
    """Seconds into each `interval_s` at which this tenant's `kind` starts (deterministic).

    The email slot is spread over the quarter hour by a digest of the id. Longer runs pick one of the interval's
    quarter hours by another digest (spreading tenants over the hour or day) and start at the kind's phase after
    the email slot, so a tenant's calendar, Teams and retention runs never start on the same second as its email
    sync or as each other."""
    if interval_s % SYNC_INTERVAL_S:
        raise ValueError(f"interval {interval_s} s is not a multiple of {SYNC_INTERVAL_S} s")
    email = _digest(tenant_id) % SYNC_INTERVAL_S
    quarter = _digest(f"{kind}:{tenant_id}") % (interval_s // SYNC_INTERVAL_S) if kind != EMAIL_SYNC else 0
    return quarter * SYNC_INTERVAL_S + (email + PHASE_S[kind]) % SYNC_INTERVAL_S


def schedule_anchor(tenant_id: str, kind: str = EMAIL_SYNC, interval_s: int = SYNC_INTERVAL_S) -> datetime:
    """The interval schedule's anchor: runs start at anchor + k * interval."""
    return _ANCHOR_BASE + timedelta(seconds=schedule_offset_s(tenant_id, kind, interval_s))


def deployment_name(kind: str, tenant_id: str) -> str:
    """`<kind>-<tenant_id>` when the id is a registry-valid id (letters, digits, '.', '_', '-'), otherwise a
    sanitised slug plus a digest of the raw id, so distinct ids never collide and no name holds a character
    Prefect bans ('/', '%', '&', '<', '>'). Never ends in `.py` (Prefect would strip it to the file stem)."""
    if _SAFE.fullmatch(tenant_id) and not tenant_id.endswith(".py"):
        return f"{kind}-{tenant_id}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tenant_id).strip("-.")[:48] or "tenant"
    return f"{kind}-{slug}-{hashlib.sha256(tenant_id.encode()).hexdigest()[:8]}"


def every(interval_s: int) -> str:
    """ "every 15 min", "hourly", "daily", "every 2 h" ..."""
    named = {3600: "hourly", 86400: "daily"}
    if interval_s in named:
        return named[interval_s]
    return f"every {interval_s // 3600} h" if interval_s % 3600 == 0 else f"every {interval_s // 60} min"


def _who(t: TenantConfig) -> str:
    return f"{t.name} ({t.id})" if t.name else f"tenant {t.id}"


def _tags(tenant_id: str, kind: str) -> list[str]:
    return [tag for tag in (tenant_id, kind) if tag.strip()]


def _email_sync_flow() -> Flow[..., Any]:
    from flows.email_sync import email_sync

    return email_sync


def _initial_import_flow() -> Flow[..., Any]:
    from flows.initial_import import initial_import

    return initial_import


def _calendar_sync_flow() -> Flow[..., Any]:
    from flows.calendar_sync import calendar_sync

    return calendar_sync


def _teams_refresh_flow() -> Flow[..., Any]:
    from flows.teams import teams_refresh

    return teams_refresh


def _retention_flow() -> Flow[..., Any]:
    from flows.retention import retention

    return retention


def _tenant_deployment(flow: Flow[..., Any], kind: str, t: TenantConfig, **options: Any) -> RunnerDeployment:
    """The `<kind>-<tenant>` deployment of `flow` for tenant `t` (parameter tenant_id, the tenant's tags, imported by
    module path); `options` go to `Flow.to_deployment` (description, schedules, concurrency limit)."""
    from prefect.deployments.runner import EntrypointType

    deployment = flow.to_deployment(
        name=deployment_name(kind, t.id),
        parameters={"tenant_id": t.id},
        tags=_tags(t.id, kind),
        entrypoint_type=EntrypointType.MODULE_PATH,
        **options,
    )
    return cast("RunnerDeployment", deployment)  # called outside an event loop: the deployment, not a coroutine


def on_demand(flow: Flow[..., Any], kind: str, t: TenantConfig, description: str) -> RunnerDeployment:
    """An unscheduled `<kind>-<tenant>` deployment of `flow` for tenant `t`: one run per tenant at a time, the others
    queue on the server (limit 1, ENQUEUE)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    enqueue = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    return _tenant_deployment(flow, kind, t, description=description, concurrency_limit=enqueue)


def email_tenants(settings: Settings) -> list[TenantConfig]:
    return [t for t in list_tenants(settings) if "email" in t.features]


def build_deployments(
    settings: Settings,
    *,
    email_flow: Flow[..., Any] | None = None,
    import_flow: Flow[..., Any] | None = None,
    tenants: list[TenantConfig] | None = None,
    calendar_flow: Flow[..., Any] | None = None,
    teams_flow: Flow[..., Any] | None = None,
    retention_flow: Flow[..., Any] | None = None,
) -> list[RunnerDeployment]:
    """The deployments of every email-enabled tenant (see the module docstring), in registry order.

    Flows default to the product's (`flows.email_sync.email_sync`, `flows.initial_import.initial_import`,
    `flows.calendar_sync.calendar_sync`, `flows.teams.teams_refresh`).
    Building contacts no Prefect API; `prefect.serve(*deployments)` or `deployment.apply()` registers them."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Interval

    tenants = email_tenants(settings) if tenants is None else [t for t in tenants if "email" in t.features]
    if not tenants:
        return []
    email_flow = email_flow or _email_sync_flow()
    import_flow = import_flow or _initial_import_flow()
    out: list[RunnerDeployment] = []
    cancel_new = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)

    def recurring(
        flow: Flow[..., Any], kind: str, interval: int, slug: str, what: str, t: TenantConfig
    ) -> RunnerDeployment:
        return _tenant_deployment(
            flow,
            kind,
            t,
            description=f"{what} of {_who(t)} {every(interval)}; an overlapping run is cancelled before it starts.",
            schedules=[
                Interval(interval, anchor_date=schedule_anchor(t.id, kind, interval), timezone="UTC", slug=slug)
            ],
            concurrency_limit=cancel_new,
        )

    for t in tenants:
        out.append(recurring(email_flow, EMAIL_SYNC, SYNC_INTERVAL_S, SCHEDULE_SLUG, "Email sync", t))
        out.append(on_demand(import_flow, INITIAL_IMPORT, t, f"Initial import of {_who(t)}; run on demand."))
        others = [
            (
                "calendar",
                CALENDAR_SYNC,
                CALENDAR_INTERVAL_S,
                CALENDAR_SLUG,
                calendar_flow,
                _calendar_sync_flow,
                "Calendar sync (next 12 months)",
            ),
            (
                "teams",
                TEAMS_REFRESH,
                TEAMS_INTERVAL_S,
                TEAMS_SLUG,
                teams_flow,
                _teams_refresh_flow,
                "Teams and channels of the users",
            ),
            (
                None,
                RETENTION,
                TEAMS_INTERVAL_S,
                RETENTION_SLUG,
                retention_flow,
                _retention_flow,
                "Retention, due offboarding deletions and compaction",
            ),
        ]
        for feature, kind, interval, slug, given, default, what in others:
            if feature is None or feature in t.features:
                out.append(recurring(given or default(), kind, interval, slug, what, t))
    return out
