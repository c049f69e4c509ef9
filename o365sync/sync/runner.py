"""The part every per-user sync task shares: sync state before and after, and failures turned into a state a
person can act on (`o365sync.errors.sync_failure`: reconnect needed, consent needed, action needed without a retry,
or failed with a retry time) — never an exception text that
could quote mail or meeting content (Prefect stores exception messages)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from o365sync.errors import ACTION_NEEDED, FAILED, O365SyncError, sync_failure
from o365sync.store import CATCHING_UP, RunCounts, record_sync_state
from o365sync.sync.mailbox import LIMIT_REASONS
from o365sync.tenant_context import Tenant

log = logging.getLogger("o365sync.sync")
_RESYNCED = "; resynced from shortly before the last sync (nothing lost, nothing doubled)"
# Counted reasons of a run that did not fail, told to people (status, run artifact) in the sync state's last error.
NOTES = {
    "delta_resync": "Graph expired the saved sync position" + _RESYNCED,
    "delta_resync_other_endpoint": "the saved sync position belongs to another Graph endpoint (O365SYNC_GRAPH_URL "
    "changed)" + _RESYNCED,
    "delta_resync_unusable_link": "the saved sync position is not under O365SYNC_GRAPH_URL" + _RESYNCED,
    "stopped_at_page_limit": "stopped at the page limit (O365SYNC_SYNC_MAX_PAGES); what was read is saved and the "
    "next run continues",
    "stopped_at_time_limit": "stopped at the time limit (O365SYNC_SYNC_MAX_SECONDS); what was read is saved and the "
    "next run continues",
}


class UserSyncError(O365SyncError):
    """A user's sync failed; the message names the feature, the user id and the error class only."""


def summary(user_oid: str, status: str, counts: RunCounts) -> dict[str, int | str]:
    return {
        "user_oid": user_oid,
        "status": status,
        "scanned": counts.scanned,
        "matched": counts.matched,
        "imported": counts.imported,
        "discarded": counts.discarded,
        "excluded": ", ".join(f"{k}={v}" for k, v in counts.excluded),
    }


def run_user_sync(
    tenant: Tenant,
    feature: str,
    user_oid: str,
    work: Callable[[Tenant, str], RunCounts],
    logger: logging.Logger | logging.LoggerAdapter,
) -> dict[str, int | str]:
    """`work(tenant, user_oid)` (one user's sync of `feature`) between its sync state's "syncing" and the outcome."""
    with tenant.open_store(write=True, user_oid=user_oid) as con:
        record_sync_state(con, tenant.id, user_oid, "syncing", feature=feature)
    try:
        counts = work(tenant, user_oid)
    except Exception as exc:
        stage, error = sync_failure(exc)
        with tenant.open_store(write=True, user_oid=user_oid) as con:
            record_sync_state(con, tenant.id, user_oid, stage, error=error, feature=feature)
        if stage not in (FAILED, ACTION_NEEDED):  # the user must connect again; the tenant's run goes on
            logger.warning("%s user=%s %s error=%s", feature, user_oid, stage, error)
            return summary(user_oid, stage, RunCounts())
        log.error("%s sync failed user=%s stage=%s error=%s", feature, user_oid, stage, error)
        # Not chained: the original message may quote content, and Prefect stores exception text.
        raise UserSyncError(f"{feature} sync failed for user {user_oid}: {error}") from None
    reasons = dict(counts.excluded)
    note = "; ".join(text for reason, text in NOTES.items() if reasons.get(reason)) or None
    stage = CATCHING_UP if reasons.keys() & set(LIMIT_REASONS.values()) else "idle"
    with tenant.open_store(write=True, user_oid=user_oid) as con:
        record_sync_state(con, tenant.id, user_oid, stage, counts, feature=feature, note=note)
    logger.info(
        "%s user=%s scanned=%d matched=%d imported=%d discarded=%d excluded=%s",
        feature,
        user_oid,
        counts.scanned,
        counts.matched,
        counts.imported,
        counts.discarded,
        dict(counts.excluded),
    )
    return summary(user_oid, "ok" if stage == "idle" else stage, counts)
