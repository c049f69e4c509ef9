"""The part every per-user sync task shares: sync state before and after, and failures turned into a state a
person can act on (reconnect needed, consent needed, or failed with a retry time) — never an exception text that
could quote mail or meeting content (Prefect stores exception messages)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from o365sync.auth import ReconnectNeeded
from o365sync.errors import O365SyncError
from o365sync.graph import LinkNotFollowable
from o365sync.settings import Settings
from o365sync.store import CATCHING_UP, RunCounts, open_store, record_sync_state
from o365sync.sync.mailbox import LIMIT_REASONS

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
# Failures whose class name alone would not tell a person what to do.
EXPLAINED: dict[type[BaseException], str] = {
    LinkNotFollowable: "Graph sent a link to another endpoint than O365SYNC_GRAPH_URL; it was not followed (the "
    "token is never sent elsewhere): point O365SYNC_GRAPH_URL at the endpoint Graph's links name",
}


def describe_failure(exc: BaseException) -> str:
    """The exception class, and for the classes in `EXPLAINED` its cause and fix (fixed text, never content)."""
    name = type(exc).__name__
    explained = next((text for cls, text in EXPLAINED.items() if isinstance(exc, cls)), None)
    return f"{name}: {explained}" if explained else name


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
    settings: Settings,
    feature: str,
    tenant_id: str,
    user_oid: str,
    work: Callable[[], RunCounts],
    logger: logging.Logger | logging.LoggerAdapter,
    consent_error: type[Exception] | None = None,
) -> dict[str, int | str]:
    with open_store(settings, tenant_id, write=True) as con:
        record_sync_state(con, tenant_id, user_oid, "syncing", feature=feature)
    try:
        counts = work()
    except ReconnectNeeded as exc:
        with open_store(settings, tenant_id, write=True) as con:
            record_sync_state(con, tenant_id, user_oid, "reconnect_needed", error=exc.error, feature=feature)
        logger.warning("%s user=%s needs reconnect error=%s codes=%s", feature, user_oid, exc.error, exc.error_codes)
        return summary(user_oid, "reconnect_needed", RunCounts())
    except Exception as exc:
        if consent_error is not None and isinstance(exc, consent_error):
            with open_store(settings, tenant_id, write=True) as con:
                record_sync_state(con, tenant_id, user_oid, "consent_needed", error="consent_needed", feature=feature)
            logger.warning("%s user=%s must reconnect to grant the scopes of newly enabled features", feature, user_oid)
            return summary(user_oid, "consent_needed", RunCounts())
        error = describe_failure(exc)
        with open_store(settings, tenant_id, write=True) as con:
            record_sync_state(con, tenant_id, user_oid, "failed", error=error, feature=feature)
        log.error("%s sync failed user=%s error=%s", feature, user_oid, error)
        # Not chained: the original message may quote content, and Prefect stores exception text.
        raise UserSyncError(f"{feature} sync failed for user {user_oid}: {error}") from None
    reasons = dict(counts.excluded)
    note = "; ".join(text for reason, text in NOTES.items() if reasons.get(reason)) or None
    stage = CATCHING_UP if reasons.keys() & set(LIMIT_REASONS.values()) else "idle"
    with open_store(settings, tenant_id, write=True) as con:
        record_sync_state(con, tenant_id, user_oid, stage, counts, feature=feature, note=note)
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
