"""Prefect flow `retention` (daily; parameter: the tenant id): delete activities older than the tenant's
`retention_days` (default 1095 = 3 years), measured from the activity's date (email: received, else sent;
meeting: end), except conversations and meeting series linked to a still-open opportunity — any of their emails
(occurrences) matched the opportunity's account, or a person whose account is that account. Shortening the period
purges on the next run. Then the offboarded users whose grace period has passed are erased.

Every run ends with a copy-compaction and a new snapshot (`o365sync/retention.py`, `o365sync.erasure.erase`), so
bytes of deleted rows —
also rows the syncs replaced or removed — are gone from every file within a day. Artifacts and logs: counts only.
"""

from __future__ import annotations

from flows._reporting import report_totals
from flows.failures import tenant_flow
from o365sync.settings import load_settings
from o365sync.tenant_context import resolve_tenant
from tasks.retention_task import offboardings, purge


@tenant_flow("retention")
def retention(tenant_id: str) -> dict[str, int]:
    tenant = resolve_tenant(load_settings(), tenant_id)
    totals = offboardings(tenant.id) | purge(tenant.id)
    report_totals("retention", tenant, totals)
    return totals


if __name__ == "__main__":
    import sys

    print(retention(sys.argv[1]))
