"""Prefect task: sync one mailbox. Returns ids and counts only; failures become the user's sync state. The timeout
ends a task before the next 15-minute slot; the run's own paging limits normally stop it cleanly well before."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.settings import load_settings
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.sync.runner import run_user_sync


@task(name="sync-mailbox", persist_result=False, cache_policy=NO_CACHE)
def sync_mailbox(tenant_id: str, user_oid: str) -> dict[str, int | str]:
    settings = load_settings()
    return run_user_sync(
        settings,
        "email",
        tenant_id,
        user_oid,
        lambda: sync_mailbox_now(settings, tenant_id, user_oid),
        get_run_logger(),
    )
