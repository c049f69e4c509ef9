"""The decisions and the report of one tenant sync run, without Prefect: whether the CRM snapshot must be refreshed,
which users are due, and the rows and totals the run shows people (ids, states and counts only)."""

from __future__ import annotations

from datetime import datetime, timedelta

from o365sync.store import (
    crm_state_summary,
    fan_out_late_matches,
    late_match_terms_recorded,
    late_match_users,
    latest_crm_snapshot_at,
    read_crm_drop_guard,
    read_crm_state,
    read_sync_states,
)
from o365sync.sync_policy import due_on_schedule
from o365sync.tenant_context import Tenant

COUNT_KEYS = ("scanned", "matched", "imported", "discarded")
CRM_RETRY = timedelta(hours=1)


def crm_refresh_due(
    tenant: Tenant, crm_max_age: timedelta, respect_backoff: bool, now: datetime
) -> tuple[bool, datetime | None]:
    """(refresh now?, time of the latest snapshot or None). Due when there is no snapshot or it is older than
    `crm_max_age` — except that a used-up or refused CRM, or a refresh refused by the mass-drop guard, is asked again
    only once per CRM_RETRY while a snapshot exists (a scheduled run every 15 minutes must not spend what is left of
    a daily API allowance on a refresh that fails again); a run started by hand, or an admin's confirmation of the
    drop, tries now."""
    with tenant.open_store(write=False) as con:
        snapshot_at = latest_crm_snapshot_at(con)
        crm_before = read_crm_state(con) or {}
        drop_confirmed = (read_crm_drop_guard(con) or {}).get("confirmed_at") is not None
    waiting = (
        respect_backoff
        and not drop_confirmed
        and crm_before.get("status") in ("quota_exhausted", "reconnect_needed", "refused")
        and now - crm_before["last_attempt_at"] < CRM_RETRY
    )
    stale = snapshot_at is None or now - snapshot_at >= crm_max_age
    return stale and not (waiting and snapshot_at is not None), snapshot_at


def sync_states(tenant: Tenant, feature: str) -> dict[str, dict]:
    """{user oid: sync state} of one feature."""
    with tenant.open_store(write=False) as con:
        return {s["user_oid"]: s for s in read_sync_states(con, tenant.id, feature)}


def due_users(users: list, states: dict[str, dict], respect_backoff: bool, now: datetime) -> list:
    """The users to sync now: all of them, or (respecting backoff) those `due_on_schedule`."""
    return [u for u in users if not respect_backoff or _due(states.get(u.oid, {}), now)]


def _due(state: dict, now: datetime) -> bool:
    return due_on_schedule(state.get("stage"), state.get("next_retry_at"), now)


def idle_row(user_oid: str, status: str) -> dict:
    """The report row of a user whose sync did not return counts (failed, or waiting for its retry time)."""
    return {"user_oid": user_oid, "status": status, **dict.fromkeys(COUNT_KEYS, 0), "excluded": ""}


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def with_sync_state(rows: list[dict], states: dict[str, dict]) -> list[dict]:
    """Each user's report row completed with their sync state after the run (stage, last success, retry)."""
    for row in rows:
        state = states.get(row["user_oid"], {})
        row |= {
            "stage": state.get("stage", ""),
            "last_success": _iso(state.get("last_success_at")),
            "failures": state.get("consecutive_failures", 0),
            "next_retry": _iso(state.get("next_retry_at")),
            "last_error": state.get("last_error") or "",
        }
    return rows


def feature_totals(feature: str, rows: list[dict], failed: int, waiting: int) -> dict[str, int]:
    """A feature's run totals: email counts unprefixed, other features' as `<feature>_*`."""
    prefix = "" if feature == "email" else f"{feature}_"
    totals = {f"{prefix}{k}": sum(int(r[k]) for r in rows) for k in COUNT_KEYS}
    totals |= {
        f"{prefix}failed": failed,
        f"{prefix}waiting": waiting,
        f"{prefix}reconnect_needed": sum(r["status"] == "reconnect_needed" for r in rows),
    }
    if feature != "email":
        totals[f"{prefix}consent_needed"] = sum(r["status"] == "consent_needed" for r in rows)
    return totals


def crm_report_row(tenant: Tenant, refreshed: dict) -> dict:
    """The CRM snapshot's state after the run (`refreshed`: what this run's refresh returned, {} if none)."""
    with tenant.open_store(write=False) as con:
        crm_state, crm_summary = read_crm_state(con) or {}, crm_state_summary(con)
    return {
        "state": crm_state.get("status", "never_refreshed"),
        "refreshed_now": refreshed.get("mode", "no"),
        "last_refresh": _iso(crm_summary["taken_at"]),
        "last_full_read": _iso(crm_summary["last_full_at"]),
        "last_success": _iso(crm_state.get("last_success_at")),
        "last_error": crm_state.get("last_error") or "",
        "people": refreshed.get("people", ""),
        "accounts": refreshed.get("accounts", ""),
        "changed": refreshed.get("changed", ""),
    }


# per-mailbox row key -> run total; terms_done counts (mailbox, address or domain) pairs whose search finished
LATE_MATCH_TOTALS = {
    "searches": "late_match_searches",
    "terms_done": "late_match_terms_done",
    "imported": "late_match_imported",
    "discarded": "late_match_discarded",
}


def late_match_waiting(tenant: Tenant) -> list[str]:
    """The mailboxes with queued late-match work (first queueing the terms of a CRM refresh that died before it
    had queued them in every mailbox)."""
    with tenant.open_store(write=False) as con:
        if not late_match_terms_recorded(con, tenant.id):
            return late_match_users(con, tenant.id)
    with tenant.open_store(write=True) as con:
        fan_out_late_matches(con, tenant.id)
    with tenant.open_store(write=False) as con:
        return late_match_users(con, tenant.id)


def late_match_totals(rows: list[dict]) -> dict[str, int]:
    """A run's late-match totals: searches made, addresses/domains finished, messages imported and discarded (found
    by a search but matching nothing, or excluded), mailboxes failed."""
    totals = {name: sum(int(r.get(key, 0)) for r in rows) for key, name in LATE_MATCH_TOTALS.items()}
    return totals | {"late_match_failed": sum(str(r["status"]).startswith("failed") for r in rows)}
