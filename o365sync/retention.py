"""Retention: delete activities older than the tenant's `retention_days` (default 1095 = 3 years), measured from
the activity's date (email: received, else sent; meeting: end), except conversations and meeting series linked to a
still-open opportunity — any of their emails (occurrences) matched the opportunity's account, or a person whose
account is that account. Shortening the period purges on the next run.

Every pass goes through `o365sync.erasure.erase`: the rows are selected across every user's bucket (a conversation
is exempt if any user's copy is linked), deleted one bucket at a time (one transaction each), and then every bucket
is copy-compacted, one at a time, each under the store's exclusive lock (other writers of the store wait for one
bucket's rewrite at most), then the tenant file once, and a new snapshot replaces every older one. So bytes of
deleted rows — also of rows the syncs replaced or removed — are gone from every file. Counts only. The daily
Prefect flow is flows/retention.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from o365sync.erasure import Scope, erase, retention_exempt_counts
from o365sync.settings import Settings
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
