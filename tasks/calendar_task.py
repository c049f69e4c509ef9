"""Prefect task: sync one user's calendar. Returns ids and counts only; failures become the user's calendar sync
state (consent needed when the tenant enabled calendar import after the user connected)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.settings import load_settings
from o365sync.store import RunCounts
from o365sync.sync.calendar import sync_calendar_now
from o365sync.sync.mailbox import ODD_TEXT
from o365sync.sync.runner import run_user_sync
from o365sync.tenant_context import Tenant, resolve_tenant


def calendar_run_counts(tenant: Tenant, user_oid: str) -> RunCounts:
    c = sync_calendar_now(tenant, user_oid)
    reasons = (
        ("private", c.private),
        ("internal", c.internal),
        ("removed", c.removed),
        ("baseline", int(c.baseline)),
        (ODD_TEXT, c.odd_text),
        (c.resync or "", int(c.resync is not None)),
        (c.stopped or "", int(c.stopped is not None)),
    )
    return RunCounts(
        scanned=c.scanned,
        matched=c.kept,
        imported=c.kept + c.internal,
        discarded=c.discarded,
        excluded=tuple(sorted((k, v) for k, v in reasons if v)),
    )


@task(name="sync-calendar", persist_result=False, cache_policy=NO_CACHE)
def sync_calendar(tenant_id: str, user_oid: str) -> dict[str, int | str]:
    tenant = resolve_tenant(load_settings(), tenant_id)  # here, not in the flow: task parameters stay ids
    return run_user_sync(tenant, "calendar", user_oid, calendar_run_counts, get_run_logger())
