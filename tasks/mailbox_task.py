"""Prefect task: sync one mailbox. Returns ids and counts only; failures become the user's sync state
(reconnect needed, or failed with a retry time), never an exception text that could quote mail."""

from __future__ import annotations

import logging

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.auth import ReconnectNeeded
from o365sync.settings import load_settings
from o365sync.store import RunCounts, open_store, record_sync_state
from tasks.mailbox_sync import sync_mailbox_now

log = logging.getLogger("o365sync.mailbox")


class MailboxSyncError(Exception):
    """A mailbox sync failed; the message names the user id and the error class only."""


def _summary(user_oid: str, status: str, counts: RunCounts) -> dict[str, int | str]:
    return {"user_oid": user_oid, "status": status, "scanned": counts.scanned, "matched": counts.matched,
            "imported": counts.imported, "discarded": counts.discarded,
            "excluded": ", ".join(f"{k}={v}" for k, v in counts.excluded)}


@task(name="sync-mailbox", persist_result=False, cache_policy=NO_CACHE)
def sync_mailbox(tenant_id: str, user_oid: str) -> dict[str, int | str]:
    logger = get_run_logger()
    settings = load_settings()
    with open_store(settings, tenant_id, write=True) as con:
        record_sync_state(con, tenant_id, user_oid, "syncing")
    try:
        counts = sync_mailbox_now(settings, tenant_id, user_oid)
    except ReconnectNeeded as exc:
        with open_store(settings, tenant_id, write=True) as con:
            record_sync_state(con, tenant_id, user_oid, "reconnect_needed", error=exc.error)
        logger.warning("mailbox user=%s needs reconnect error=%s codes=%s", user_oid, exc.error, exc.error_codes)
        return _summary(user_oid, "reconnect_needed", RunCounts())
    except Exception as exc:
        error = type(exc).__name__
        with open_store(settings, tenant_id, write=True) as con:
            record_sync_state(con, tenant_id, user_oid, "failed", error=error)
        # Not chained: the original message may quote mail content, and Prefect stores exception text.
        log.error("mailbox sync failed user=%s error=%s", user_oid, error)
        raise MailboxSyncError(f"mailbox sync failed for user {user_oid}: {error}") from None
    with open_store(settings, tenant_id, write=True) as con:
        record_sync_state(con, tenant_id, user_oid, "idle", counts)
    logger.info("mailbox user=%s scanned=%d matched=%d imported=%d discarded=%d excluded=%s", user_oid,
                counts.scanned, counts.matched, counts.imported, counts.discarded, dict(counts.excluded))
    return _summary(user_oid, "ok", counts)
