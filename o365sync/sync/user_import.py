"""One user's import, started when they connect (or re-consent) instead of at the tenant's next slot: the CRM
snapshot refreshed if it is missing or older than an hour, then the user's mailbox and calendar (the features the
tenant enabled) brought up to date — the first sync of each is the initial import of its whole window — and the
analysts' snapshot published. No Prefect here: the `user-import` flow (flows/user_import.py) runs it with Prefect
tasks as the steps, the web server without a Prefect server runs it in a thread with the plain library steps.

Never two syncs of one mailbox at once: the import holds the tenant's per-feature sync locks
(`o365sync.store.tenant_sync_locks`) that every tenant flow, resync, move and erasure takes, so it waits for a
running sync of the same tenant and feature to end (and that sync may have done this user already: the import then
only finds what is new). Progress: each feature's sync state (`read_sync_progress`) counts what is written while it
runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from o365sync.auth import connected_users
from o365sync.errors import O365SyncError
from o365sync.settings import Settings
from o365sync.store import SyncProgress, open_store, publish_snapshot, read_sync_progress
from o365sync.sync.tenant import crm_refresh_due
from o365sync.tenant_context import Tenant, resolve_tenant

IMPORT_FEATURES = ("email", "calendar")
CRM_MAX_AGE = timedelta(hours=1)  # as the recurring syncs: a snapshot younger than this is matched against as is


class UserImportIncomplete(O365SyncError):
    """A feature of the user's import failed; the user's sync state says why and when it is retried."""


def import_user_now(
    settings: Settings,
    tenant_id: str,
    user_oid: str,
    *,
    sync_feature: Callable[[str], dict],
    refresh_crm: Callable[[], dict],
    log: logging.Logger | logging.LoggerAdapter,
) -> dict[str, int]:
    """Import one user now (see the module). `sync_feature(feature)` syncs the user's feature and returns its
    report row (`o365sync.sync.runner.run_user_sync` does: it records the sync state); `refresh_crm()` refreshes
    the tenant's CRM snapshot. Returns counts; raises UserImportIncomplete when a feature failed (the others
    still ran), TenantNotFound when the tenant is not registered."""
    registered = resolve_tenant(settings, tenant_id)
    tenant_id = registered.id  # canonical
    features = [f for f in IMPORT_FEATURES if f in registered.config.features]
    with registered.sync_locks(features) as tenant:  # resolved again: it may have moved or ended meanwhile
        if tenant is None:
            log.warning(
                "user-import tenant=%s user=%s: tenant no longer registered; nothing imported", tenant_id, user_oid
            )
            return {"skipped": 1}
        if user_oid not in {u.oid for u in connected_users(settings, tenant_id)}:
            log.warning(
                "user-import tenant=%s user=%s: user not connected (offboarded?); nothing imported", tenant_id, user_oid
            )
            return {"skipped": 1}
        totals = {"crm_refreshed": int(bool(_refresh_crm_if_due(tenant, refresh_crm, log)))}
        failed = []
        for feature in features:
            prefix = "" if feature == "email" else f"{feature}_"
            try:
                row = sync_feature(feature)
            except Exception as exc:  # its sync state holds the reason; the next feature still runs
                log.error("user-import user=%s %s failed: %s", user_oid, feature, type(exc).__name__)
                failed.append(feature)
                continue
            totals |= {f"{prefix}{k}": int(row[k]) for k in ("scanned", "matched", "imported", "discarded")}
        publish_snapshot(settings, tenant_id)
    totals["failed"] = len(failed)
    log.info("user-import tenant=%s user=%s %s", tenant_id, user_oid, " ".join(f"{k}={v}" for k, v in totals.items()))
    if failed:
        raise UserImportIncomplete(f"user import of {user_oid} in tenant {tenant_id} failed for {', '.join(failed)}")
    return totals


def _refresh_crm_if_due(
    tenant: Tenant, refresh_crm: Callable[[], dict], log: logging.Logger | logging.LoggerAdapter
) -> dict:
    """The refresh's counts, or {} when the snapshot is fresh enough (or the CRM is backing off), or when the
    refresh failed while an earlier snapshot exists (matched against that one, as the tenant syncs do)."""
    due, snapshot_at = crm_refresh_due(tenant, CRM_MAX_AGE, True, datetime.now(UTC))
    if not due:
        return {}
    try:
        return refresh_crm()
    except Exception as exc:
        if snapshot_at is None:
            raise
        log.warning(
            "user-import tenant=%s CRM snapshot failed (%s); matching against the last one",
            tenant.id,
            type(exc).__name__,
        )
        return {}


def sync_progress(settings: Settings, tenant_id: str, user_oid: str | None = None) -> list[SyncProgress]:
    """Where every user's (or one user's) syncs stand, per feature, counts only: what a console page and
    `o365sync status` show ("importing: 12,400 messages scanned, 310 imported")."""
    with open_store(settings, tenant_id, write=False) as con:
        return read_sync_progress(con, tenant_id, user_oid)
