"""Prefect flow `retention` (daily; parameter: the tenant id): delete activities older than the tenant's
`retention_days` (default 1095 = 3 years), measured from the activity's date (email: received, else sent;
meeting: end), except conversations and meeting series linked to a still-open opportunity — any of their emails
(occurrences) matched the opportunity's account, or a person whose account is that account. Shortening the period
purges on the next run. Then the offboarded users whose grace period has passed are erased.

Every run ends with a copy-compaction and a new snapshot (`o365sync.erasure.erase`), so bytes of deleted rows —
also rows the syncs replaced or removed — are gone from every file within a day. Artifacts and logs: counts only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.failures import flow
from flows.offboarding import complete_due_offboardings
from flows.tenant_sync import artifact_key, registered_tenant, run_name, tenant_title
from o365sync.erasure import Scope, erase, retention_exempt_counts
from o365sync.settings import Settings, load_settings
from o365sync.store import open_store
from o365sync.tenants import load_tenant


def retention_now(
    settings: Settings, tenant_id: str, now: datetime | None = None, actor: str = "flow:retention"
) -> dict[str, int]:
    """One retention pass (the flow's body); counts only."""
    tenant = load_tenant(settings, tenant_id)
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=tenant.retention_days)
    with open_store(settings, tenant_id, write=False) as con:
        older = retention_exempt_counts(con, tenant_id, cutoff)
    result = erase(settings, tenant_id, Scope.retention(cutoff), actor=actor, reason="retention", now=now)
    emails, meetings = result.rows.get("emails", 0), result.rows.get("meetings", 0)
    return {
        "retention_days": tenant.retention_days,
        "emails_deleted": emails,
        "meetings_deleted": meetings,
        "emails_exempt": older["emails_older"] - emails,
        "meetings_exempt": older["meetings_older"] - meetings,
        "rows_deleted": result.deleted,
        "bytes_before": result.bytes_before,
        "bytes_after": result.bytes_after,
    }


@task(name="retention-purge")
def purge(tenant_id: str) -> dict[str, int]:
    return retention_now(load_settings(), tenant_id)


@task(name="complete-offboardings")
def offboardings(tenant_id: str) -> dict[str, int]:
    done = complete_due_offboardings(load_settings(), tenant_id)
    return {"users_erased": len(done), "user_rows_deleted": sum(d["deleted_rows"] for d in done)}


@flow(name="retention", flow_run_name=run_name("retention"), persist_result=False)
def retention(tenant_id: str) -> dict[str, int]:
    logger = get_run_logger()
    tenant = registered_tenant(load_settings(), tenant_id)
    totals = offboardings(tenant_id) | purge(tenant_id)
    create_table_artifact(
        key=artifact_key("retention", tenant_id),
        table=[totals],
        description=f"retention of {tenant_title(tenant)}: counts",
    )
    logger.info("retention tenant=%s %s", tenant_id, " ".join(f"{k}={v}" for k, v in totals.items()))
    return totals


if __name__ == "__main__":
    import sys

    print(retention(sys.argv[1]))
