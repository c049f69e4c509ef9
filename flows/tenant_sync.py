"""The body shared by the tenant flows: CRM snapshot if stale, one task per connected user and feature (email,
calendar), a summary artifact per feature and one for the CRM, then the analysts' snapshot.

Runs of the same tenant and feature queue behind a per-feature file lock (on top of the deployments' concurrency
limits), so a manual import started during a scheduled sync waits and then completes instead of failing or
doing the same work at the same time. In scheduled runs, users whose last failure set a retry time in the future
are left alone until then.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from o365sync.auth import ConnectedUser, connected_users
from o365sync.settings import Settings, load_settings
from o365sync.store import (
    crm_state_summary,
    latest_crm_snapshot_at,
    open_store,
    publish_snapshot,
    read_crm_drop_guard,
    read_crm_state,
    read_sync_states,
    tenant_sync_locks,
)
from o365sync.tenants import TenantConfig, TenantMisplaced, TenantNotFound, TenantUnreadable, load_tenant, tenant_dir
from tasks.calendar_task import sync_calendar
from tasks.crm_snapshot import snapshot_crm
from tasks.mailbox_task import sync_mailbox

COUNT_KEYS = ("scanned", "matched", "imported", "discarded")
CRM_RETRY = timedelta(hours=1)
USER_TASKS = {"email": sync_mailbox, "calendar": sync_calendar}


class SyncIncomplete(Exception):
    """Some users' syncs failed; their sync state says why and when they are retried."""


def artifact_key(prefix: str, tenant_id: str) -> str:
    return f"{prefix}-{re.sub(r'[^a-z0-9-]+', '-', tenant_id.lower())}"[:100]


def registered_tenant(settings: Settings, tenant_id: str) -> TenantConfig:
    """The tenant's configuration; not registered: one line naming the data dir searched (a worker or shell with
    another O365SYNC_DATA_DIR, or another working directory for the default `./data`, looks elsewhere)."""
    try:
        return load_tenant(settings, tenant_id)
    except (TenantUnreadable, TenantMisplaced):
        raise  # registered, but its entry or files need an operator: the message says what to do
    except TenantNotFound:
        raise TenantNotFound(
            f"tenant {tenant_id} is not registered in data dir {settings.data_dir.resolve()}: run with the "
            "O365SYNC_DATA_DIR it was added in (workers get it from `python -m deployments.register`)"
        ) from None


def tenant_title(tenant: TenantConfig) -> str:
    """How people see a tenant in the Prefect UI: its display name and id, or the id alone."""
    return f"{tenant.name} ({tenant.id})" if tenant.name else f"tenant {tenant.id}"


def run_name(kind: str) -> Callable[[], str]:
    """A `flow_run_name` for a tenant flow: "<kind>: <display name>" (the id when the tenant has no name or cannot
    be read; naming a run never fails it)."""

    def name() -> str:
        from prefect.runtime import flow_run

        tenant_id = str(flow_run.parameters.get("tenant_id", ""))
        try:
            return f"{kind}: {load_tenant(load_settings(), tenant_id).name or tenant_id}"
        except Exception:
            return f"{kind}: {tenant_id}"

    return name


def user_task_name(prefix: str, user: ConnectedUser) -> str:
    """A per-user task run's name: `<prefix>-<object id>`, then the user's display name (or UPN) for people."""
    who = user.display_name or user.upn
    return f"{prefix}-{user.oid} {who}" if who else f"{prefix}-{user.oid}"


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def _run_feature(
    tenant_id: str, feature: str, users: list, respect_backoff: bool, now: datetime, states: dict
) -> tuple[list[dict], int, int]:
    """One task per due user; (artifact rows, failed, due)."""
    due = [u for u in users if not respect_backoff or (states.get(u.oid, {}).get("next_retry_at") or now) <= now]
    task = USER_TASKS[feature]
    name = "sync-mailbox" if feature == "email" else f"sync-{feature}"
    futures = [task.with_options(task_run_name=user_task_name(name, u)).submit(tenant_id, u.oid) for u in due]
    wait(futures)
    rows, failed = [], 0
    for user, future in zip(due, futures, strict=True):
        if future.state.is_completed():
            rows.append(future.result())
        else:
            failed += 1
            rows.append({"user_oid": user.oid, "status": "failed", **dict.fromkeys(COUNT_KEYS, 0), "excluded": ""})
    rows += [
        {"user_oid": u.oid, "status": "waiting_for_retry", **dict.fromkeys(COUNT_KEYS, 0), "excluded": ""}
        for u in users
        if u not in due
    ]
    return rows, failed, len(due)


def sync_tenant(
    tenant_id: str,
    artifact_prefix: str,
    crm_max_age: timedelta,
    respect_backoff: bool = True,
    features: tuple[str, ...] = ("email",),
) -> dict[str, int]:
    """Sync `features` (those the tenant enabled) for every connected user. `respect_backoff=False` (a run an
    operator starts by hand) retries failed users now. Totals: email counts unprefixed, others `<feature>_*`."""
    logger = get_run_logger()
    settings = load_settings()
    tenant = registered_tenant(settings, tenant_id)
    tenant_id = tenant.id  # canonical (a GUID typed in upper case names the same tenant)
    enabled = [f for f in features if f in tenant.features]
    totals: dict[str, int] = {}
    failed_total = due_total = 0
    with tenant_sync_locks(tenant_dir(settings, tenant_id), enabled):
        try:  # the tenant may have been deleted (subscription end) while this run waited for the locks
            load_tenant(settings, tenant_id)
        except TenantNotFound:
            logger.warning("tenant=%s is no longer registered; nothing to sync", tenant_id)
            return {"skipped": 1}
        now = datetime.now(UTC)
        with open_store(settings, tenant_id, write=False) as con:
            snapshot_at = latest_crm_snapshot_at(con)
            crm_before = read_crm_state(con) or {}
            drop_confirmed = (read_crm_drop_guard(con) or {}).get("confirmed_at") is not None
        crm: dict = {}
        # A used-up or refused CRM, or a refresh refused by the mass-drop guard, is asked again only once per
        # CRM_RETRY (a scheduled run every 15 minutes must not spend what is left of a daily API allowance on a
        # refresh that fails again); a run started by hand, or an admin's confirmation of the drop, tries now.
        waiting = (
            respect_backoff
            and not drop_confirmed
            and crm_before.get("status") in ("quota_exhausted", "reconnect_needed", "refused")
            and now - crm_before["last_attempt_at"] < CRM_RETRY
        )
        if (snapshot_at is None or now - snapshot_at >= crm_max_age) and not (waiting and snapshot_at is not None):
            try:
                crm = snapshot_crm(tenant_id)
            except Exception as exc:  # a CRM outage must not stop syncing while an earlier snapshot exists
                if snapshot_at is None:
                    raise
                logger.warning(
                    "tenant=%s CRM snapshot failed (%s); matching against the snapshot of %s",
                    tenant_id,
                    type(exc).__name__,
                    snapshot_at.isoformat(timespec="seconds"),
                )
        users = connected_users(settings, tenant_id)
        for feature in enabled:
            with open_store(settings, tenant_id, write=False) as con:
                states = {s["user_oid"]: s for s in read_sync_states(con, tenant_id, feature)}
            rows, failed, due = _run_feature(tenant_id, feature, users, respect_backoff, now, states)
            with open_store(settings, tenant_id, write=False) as con:
                after = {s["user_oid"]: s for s in read_sync_states(con, tenant_id, feature)}
            for row in rows:
                state = after.get(row["user_oid"], {})
                row |= {
                    "stage": state.get("stage", ""),
                    "last_success": _iso(state.get("last_success_at")),
                    "failures": state.get("consecutive_failures", 0),
                    "next_retry": _iso(state.get("next_retry_at")),
                    "last_error": state.get("last_error") or "",
                }
            prefix = "" if feature == "email" else f"{feature}_"
            totals |= {f"{prefix}{k}": sum(int(r[k]) for r in rows) for k in COUNT_KEYS}
            totals |= {
                f"{prefix}failed": failed,
                f"{prefix}waiting": len(users) - due,
                f"{prefix}reconnect_needed": sum(r["status"] == "reconnect_needed" for r in rows),
            }
            if feature != "email":
                totals[f"{prefix}consent_needed"] = sum(r["status"] == "consent_needed" for r in rows)
            failed_total, due_total = failed_total + failed, due_total + due
            key = artifact_prefix if feature == "email" else f"{artifact_prefix}-{feature}"
            create_table_artifact(
                key=artifact_key(key, tenant_id),
                table=rows,
                description=f"{artifact_prefix} ({feature}) of {tenant_title(tenant)}: per-user status and counts",
            )
        totals |= {"mailboxes": len(users), "crm_refreshed": int(bool(crm))}
        totals |= {f"crm_{k}": int(v) for k, v in crm.items() if k in ("people", "accounts", "changed")}
        with open_store(settings, tenant_id, write=False) as con:
            crm_state, crm_summary = read_crm_state(con) or {}, crm_state_summary(con)
        create_table_artifact(
            key=artifact_key(f"{artifact_prefix}-crm", tenant_id),
            table=[
                {
                    "state": crm_state.get("status", "never_refreshed"),
                    "refreshed_now": crm.get("mode", "no"),
                    "last_refresh": _iso(crm_summary["taken_at"]),
                    "last_full_read": _iso(crm_summary["last_full_at"]),
                    "last_success": _iso(crm_state.get("last_success_at")),
                    "last_error": crm_state.get("last_error") or "",
                    "people": crm.get("people", ""),
                    "accounts": crm.get("accounts", ""),
                    "changed": crm.get("changed", ""),
                }
            ],
            description=f"CRM snapshot of {tenant_title(tenant)}: state, last refresh and counts",
        )
        publish_snapshot(settings, tenant_id)
    logger.info("%s tenant=%s %s", artifact_prefix, tenant_id, " ".join(f"{k}={v}" for k, v in totals.items()))
    if failed_total:
        raise SyncIncomplete(f"{failed_total} of {due_total} user syncs failed in tenant {tenant_id}")
    return totals
