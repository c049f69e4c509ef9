"""The body shared by the tenant flows: refresh the CRM snapshot if stale, sync each connected user per feature
(email, calendar), search the mailboxes for what the CRM gained since they were synced (late matches), report (a
table per feature, one for the late matches and one for the CRM), then publish the analysts' snapshot.

Runs of the same tenant and feature queue behind a per-feature file lock (on top of the deployments' concurrency
limits), so a manual import started during a scheduled sync waits and then completes instead of failing or
doing the same work at the same time. In scheduled runs, users whose last failure set a retry time in the future
are left alone until then. The decisions and report rows are library code (`o365sync/sync/tenant.py`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from flows._reporting import artifact_key, counts_line, publish_dashboard, tenant_title, user_task_name
from o365sync.auth import connected_users
from o365sync.errors import O365SyncError
from o365sync.settings import load_settings
from o365sync.store import publish_snapshot
from o365sync.sync.tenant import (
    crm_refresh_due,
    crm_report_row,
    due_users,
    feature_totals,
    idle_row,
    late_match_totals,
    late_match_waiting,
    sync_states,
    with_sync_state,
)
from o365sync.tenant_context import Tenant, resolve_tenant
from tasks.calendar_task import sync_calendar
from tasks.crm_snapshot import snapshot_crm
from tasks.late_match_task import late_match
from tasks.mailbox_task import sync_mailbox
from tasks.ops_signals import Signal, crm_signals, emit_signals, read_crm_state_of, user_signals

USER_TASKS = {"email": sync_mailbox, "calendar": sync_calendar}


class SyncIncomplete(O365SyncError):
    """Some users' syncs failed; their sync state says why and when they are retried."""


def _sync_users(tenant_id: str, feature: str, due: list) -> tuple[list[dict], int]:
    """One task per due user; (report rows, failed)."""
    task = USER_TASKS[feature]
    futures = [task.with_options(task_run_name=user_task_name(task.name, u)).submit(tenant_id, u.oid) for u in due]
    wait(futures)
    rows, failed = [], 0
    for user, future in zip(due, futures, strict=True):
        if future.state.is_completed():
            rows.append(future.result())
        else:
            failed += 1
            rows.append(idle_row(user.oid, "failed"))
    return rows, failed


def _refresh_crm_if_stale(tenant: Tenant, crm_max_age: timedelta, respect_backoff: bool, now: datetime) -> dict:
    """The CRM refresh's counts, or {} when the snapshot is fresh enough or the refresh failed while an earlier
    snapshot exists (a CRM outage must not stop syncing)."""
    due, snapshot_at = crm_refresh_due(tenant, crm_max_age, respect_backoff, now)
    if not due:
        return {}
    try:
        return snapshot_crm(tenant.id)
    except Exception as exc:
        if snapshot_at is None:
            raise
        get_run_logger().warning(
            "tenant=%s CRM snapshot failed (%s); matching against the snapshot of %s",
            tenant.id,
            type(exc).__name__,
            snapshot_at.isoformat(timespec="seconds"),
        )
        return {}


def _late_matches(tenant: Tenant, artifact_prefix: str, users: list) -> dict[str, int]:
    """After the mail sync: the late-match backfill of every mailbox with queued work whose sync went through (a
    mailbox still catching up, or failing, waits for a later run); its table artifact and totals (counts only)."""
    waiting = set(late_match_waiting(tenant))
    due = [u for u in users if u.oid in waiting]
    if not due:
        return {}
    futures = [
        late_match.with_options(task_run_name=user_task_name("late-match", u)).submit(tenant.id, u.oid) for u in due
    ]
    wait(futures)
    rows = [
        f.result() if f.state.is_completed() else {"user_oid": u.oid, "status": "failed"}
        for u, f in zip(due, futures, strict=True)
    ]
    create_table_artifact(
        key=artifact_key(f"{artifact_prefix}-late-match", tenant.id),
        table=rows,
        description=f"Late matches of {tenant_title(tenant)}: CRM additions searched for in mail already synced "
        "(counts only)",
    )
    return late_match_totals(rows)


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
    registered = resolve_tenant(load_settings(), tenant_id)
    enabled = [f for f in features if f in registered.config.features]
    totals: dict[str, int] = {}
    failed_total = due_total = 0
    with registered.sync_locks(enabled) as tenant:  # resolved again: it may have moved or ended meanwhile
        if tenant is None:
            logger.warning("tenant=%s is no longer registered; nothing to sync", registered.id)
            return {"skipped": 1}
        now = datetime.now(UTC)
        settings = tenant.settings
        crm_before = read_crm_state_of(settings, tenant.id)
        signals: list[Signal] = []
        sync_ok: dict[str, bool] = {}
        crm = _refresh_crm_if_stale(tenant, crm_max_age, respect_backoff, now)
        users = connected_users(settings, tenant.id)
        for feature in enabled:
            before = sync_states(tenant, feature)
            due = due_users(users, before, respect_backoff, now)
            rows, failed = _sync_users(tenant.id, feature, due)
            if feature == "email":
                sync_ok = {r["user_oid"]: r["status"] == "ok" for r in rows}
            rows += [idle_row(u.oid, "waiting_for_retry") for u in users if u not in due]
            after = sync_states(tenant, feature)
            with_sync_state(rows, after)
            signals += user_signals(feature, before, after, settings.ops_throttled_minutes, settings.ops_failed_runs)
            totals |= feature_totals(feature, rows, failed, waiting=len(users) - len(due))
            failed_total, due_total = failed_total + failed, due_total + len(due)
            key = artifact_prefix if feature == "email" else f"{artifact_prefix}-{feature}"
            create_table_artifact(
                key=artifact_key(key, tenant.id),
                table=rows,
                description=f"{artifact_prefix} ({feature}) of {tenant_title(tenant)}: per-user status and counts",
            )
        if "email" in enabled:
            totals |= _late_matches(tenant, artifact_prefix, [u for u in users if sync_ok.get(u.oid)])
        totals |= {"mailboxes": len(users), "crm_refreshed": int(bool(crm))}
        totals |= {f"crm_{k}": int(v) for k, v in crm.items() if k in ("people", "accounts", "changed")}
        create_table_artifact(
            key=artifact_key(f"{artifact_prefix}-crm", tenant.id),
            table=[crm_report_row(tenant, crm)],
            description=f"CRM snapshot of {tenant_title(tenant)}: state, last refresh and counts",
        )
        signals += crm_signals(crm_before, read_crm_state_of(settings, tenant.id), tenant.config.crm_kind)
        emit_signals(tenant.config, users, signals)
        publish_dashboard(tenant)
        publish_snapshot(settings, tenant.id)
    logger.info("%s tenant=%s %s", artifact_prefix, tenant.id, counts_line(totals))
    if failed_total:
        raise SyncIncomplete(f"{failed_total} of {due_total} user syncs failed in tenant {tenant.id}")
    return totals
