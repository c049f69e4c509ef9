"""Prefect task: one mailbox's late-match backfill (`o365sync.sync.late_match`): search it for the CRM addresses
and domains a refresh added, import what matches. Returns ids and counts only. A failure leaves the work queued for
the next run (nothing of it is lost) and is reported as the row's status with the error class, never its text."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.settings import load_settings
from o365sync.sync.late_match import late_match_mailbox
from o365sync.tenant_context import resolve_tenant


@task(name="late-match", persist_result=False, cache_policy=NO_CACHE)
def late_match(tenant_id: str, user_oid: str) -> dict[str, int | str]:
    tenant = resolve_tenant(load_settings(), tenant_id)
    try:
        outcome = late_match_mailbox(tenant, user_oid)
    except Exception as exc:  # the queued work stays; the next run picks it up
        get_run_logger().warning("late-match user=%s failed error=%s", user_oid, type(exc).__name__)
        return {"user_oid": user_oid, "status": f"failed: {type(exc).__name__}"}
    row: dict[str, int | str] = {
        "user_oid": user_oid,
        "status": "ok" if outcome.stopped is None else f"stopped: {outcome.stopped}",
        "searches": outcome.searches,
        "terms_done": outcome.terms_done,
        "terms_open": outcome.terms_open,
        "terms_capped": outcome.terms_capped,
        "scanned": outcome.counts.scanned,
        "imported": outcome.counts.imported,
        "discarded": outcome.counts.discarded,
    }
    get_run_logger().info("late-match %s", " ".join(f"{k}={v}" for k, v in row.items()))
    return row
