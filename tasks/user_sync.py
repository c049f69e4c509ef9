"""The part every per-user sync task shares: sync state before and after, and failures turned into a state a
person can act on (reconnect needed, consent needed, or failed with a retry time) — never an exception text that
could quote mail or meeting content (Prefect stores exception messages)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from o365sync.auth import ReconnectNeeded
from o365sync.settings import Settings
from o365sync.store import RunCounts, open_store, record_sync_state

log = logging.getLogger("o365sync.sync")


class UserSyncError(Exception):
    """A user's sync failed; the message names the feature, the user id and the error class only."""


def summary(user_oid: str, status: str, counts: RunCounts) -> dict[str, int | str]:
    return {"user_oid": user_oid, "status": status, "scanned": counts.scanned, "matched": counts.matched,
            "imported": counts.imported, "discarded": counts.discarded,
            "excluded": ", ".join(f"{k}={v}" for k, v in counts.excluded)}


def run_user_sync(settings: Settings, feature: str, tenant_id: str, user_oid: str, work: Callable[[], RunCounts],
                  logger: logging.Logger | logging.LoggerAdapter, consent_error: type[Exception] | None = None
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
            logger.warning("%s user=%s must reconnect to grant the scopes of newly enabled features", feature,
                           user_oid)
            return summary(user_oid, "consent_needed", RunCounts())
        error = type(exc).__name__
        with open_store(settings, tenant_id, write=True) as con:
            record_sync_state(con, tenant_id, user_oid, "failed", error=error, feature=feature)
        log.error("%s sync failed user=%s error=%s", feature, user_oid, error)
        # Not chained: the original message may quote content, and Prefect stores exception text.
        raise UserSyncError(f"{feature} sync failed for user {user_oid}: {error}") from None
    with open_store(settings, tenant_id, write=True) as con:
        record_sync_state(con, tenant_id, user_oid, "idle", counts, feature=feature)
    logger.info("%s user=%s scanned=%d matched=%d imported=%d discarded=%d excluded=%s", feature, user_oid,
                counts.scanned, counts.matched, counts.imported, counts.discarded, dict(counts.excluded))
    return summary(user_oid, "ok", counts)
