"""Prefect task: sync one mailbox. Returns ids and counts only; failures become the user's sync state. The timeout
ends a task before the next 15-minute slot; the run's own paging limits normally stop it cleanly well before."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.settings import load_settings
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.sync.runner import run_user_sync
from o365sync.tenant_context import resolve_tenant


@task(name="sync-mailbox", persist_result=False, cache_policy=NO_CACHE)
def sync_mailbox(tenant_id: str, user_oid: str) -> dict[str, int | str]:
    tenant = resolve_tenant(load_settings(), tenant_id)  # here, not in the flow: task parameters stay ids
    return run_user_sync(tenant, "email", user_oid, sync_mailbox_now, get_run_logger())
