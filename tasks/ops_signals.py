"""Ops signals: Prefect events an operations team's automations notify on, derived from the sync states a run
leaves behind (`o365sync.errors.sync_failure` decides the stage; `o365sync.sync_policy.after_run` the failure count).

One event when a condition *starts*, comparing a user's state (or the tenant's CRM state) before and after the run:

* `o365sync.reconnect-needed`: a user's token is gone (stage `reconnect_needed`), or the CRM connection is;
* `o365sync.consent-needed`: a user must connect again to grant a newly enabled feature's scopes;
* `o365sync.crm-quota-exhausted`: the CRM refused a refresh for its API allowance;
* `o365sync.throttled`: a user's last sync failed with Graph throttling (`GraphThrottled`) and the last success
  is at least `O365SYNC_OPS_THROTTLED_MINUTES` old (a user that never succeeded is covered by the next signal);
* `o365sync.sync-failed`: a user's sync has failed `O365SYNC_OPS_FAILED_RUNS` times in a row (stage `failed` or
  `action_needed`).

A condition that persists emits nothing more (reconnect-needed users are synced, and fail, every 15 minutes); once it
clears and starts again, it emits again. The event's resource is the tenant (`o365sync.tenant.<id>`, named by its
display name), the user or CRM is a related resource, and the payload holds ids, counts, stage names, error class
names and times only — never mail or meeting content (the error text the store keeps is the class name plus a
fixed sentence; only the class name goes into the event).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from o365sync.auth import ConnectedUser
from o365sync.errors import ACTION_NEEDED, FAILED
from o365sync.settings import Settings
from o365sync.store import open_store, read_crm_state
from o365sync.tenants import TenantConfig

RECONNECT_NEEDED = "o365sync.reconnect-needed"
CONSENT_NEEDED = "o365sync.consent-needed"
CRM_QUOTA_EXHAUSTED = "o365sync.crm-quota-exhausted"
THROTTLED = "o365sync.throttled"
SYNC_FAILED = "o365sync.sync-failed"
SIGNALS: dict[str, str] = {
    RECONNECT_NEEDED: "reconnect needed",
    CONSENT_NEEDED: "consent needed",
    CRM_QUOTA_EXHAUSTED: "CRM quota exhausted",
    THROTTLED: "throttled",
    SYNC_FAILED: "sync failed repeatedly",
}
"""Event name -> what a person reads."""
TENANT_RESOURCE_PREFIX = "o365sync.tenant."
THROTTLED_ERROR = "GraphThrottled"


@dataclass(frozen=True)
class Signal:
    event: str
    payload: dict[str, Any]
    user_oid: str | None = None  # None: about the tenant's CRM


def _error_class(state: Mapping[str, Any]) -> str:
    return (state.get("last_error") or "").split(":", 1)[0].strip()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _throttled_for(state: Mapping[str, Any]) -> timedelta | None:
    """How long the user has gone without a success while their last run was throttled; None if not throttled."""
    if not state or _error_class(state) != THROTTLED_ERROR:
        return None
    last_success, last_run = state.get("last_success_at"), state.get("last_run_at")
    if last_success is None or last_run is None:
        return None
    return last_run - last_success


def user_signals(
    feature: str,
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
    throttled_minutes: float,
    failed_runs: int,
) -> list[Signal]:
    """The signals of one feature's run: `before`/`after` are {user oid: sync state} read before and after it."""
    out: list[Signal] = []
    limit = timedelta(minutes=throttled_minutes)
    for oid, now in after.items():
        was = before.get(oid, {})
        stage, failures = now.get("stage"), int(now.get("consecutive_failures") or 0)
        payload = {
            "feature": feature,
            "user_oid": oid,
            "stage": stage,
            "consecutive_failures": failures,
            "error": _error_class(now) or None,
            "last_success": _iso(now.get("last_success_at")),
        }
        for event, target in ((RECONNECT_NEEDED, "reconnect_needed"), (CONSENT_NEEDED, "consent_needed")):
            if stage == target and was.get("stage") != target:
                out.append(Signal(event, payload, oid))
        throttled, throttled_before = _throttled_for(now), _throttled_for(was)
        if throttled is not None and throttled >= limit and (throttled_before is None or throttled_before < limit):
            out.append(Signal(THROTTLED, payload | {"throttled_minutes": int(throttled.total_seconds() // 60)}, oid))
        if stage in (FAILED, ACTION_NEEDED) and int(was.get("consecutive_failures") or 0) < failed_runs <= failures:
            out.append(Signal(SYNC_FAILED, payload, oid))
    return out


def crm_signals(before: Mapping[str, Any], after: Mapping[str, Any], crm_kind: str) -> list[Signal]:
    """The signals of a CRM refresh: `before`/`after` are the tenant's CRM state (`store.read_crm_state`)."""
    status, was = after.get("status"), before.get("status")
    payload = {
        "crm": crm_kind,
        "crm_state": status,
        "error": _error_class(after) or None,
        "last_success": _iso(after.get("last_success_at")),
    }
    events = {"quota_exhausted": CRM_QUOTA_EXHAUSTED, "reconnect_needed": RECONNECT_NEEDED}
    return [Signal(events[status], payload)] if status in events and status != was else []


def tenant_resource(tenant: TenantConfig) -> dict[str, str]:
    return {
        "prefect.resource.id": f"{TENANT_RESOURCE_PREFIX}{tenant.id}",
        "prefect.resource.name": tenant.name or tenant.id,
    }


def read_crm_state_of(settings: Settings, tenant_id: str) -> dict[str, Any]:
    """The tenant's CRM state ({} before the first refresh)."""
    with open_store(settings, tenant_id, write=False) as con:
        return read_crm_state(con) or {}


def emit_signals(tenant: TenantConfig, users: Iterable[ConnectedUser], signals: list[Signal]) -> int:
    """Send the signals as Prefect events (see the module docstring); returns how many were sent."""
    from prefect.events import emit_event

    names = {u.oid: u.display_name for u in users}
    for s in signals:
        if s.user_oid is None:
            related = {
                "prefect.resource.id": f"o365sync.crm.{tenant.id}",
                "prefect.resource.role": "crm",
                "prefect.resource.name": str(s.payload.get("crm") or "crm"),
            }
        else:
            related = {
                "prefect.resource.id": f"o365sync.user.{tenant.id}.{s.user_oid}",
                "prefect.resource.role": "user",
                "prefect.resource.name": names.get(s.user_oid) or s.user_oid,
            }
        payload = {"tenant_id": tenant.id, "tenant": tenant.name or tenant.id, **s.payload}
        if s.user_oid is not None:
            payload["user"] = names.get(s.user_oid) or s.user_oid
        emit_event(event=s.event, resource=tenant_resource(tenant), related=[related], payload=payload)
    return len(signals)
