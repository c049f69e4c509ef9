"""Prefect flow: the recurring calendar sync of a tenant (hourly): calendarView delta over the next 12 months for
every connected user who has calendar import on, the CRM snapshot refreshed when older than an hour.
Parameters: the tenant id only."""

from __future__ import annotations

from datetime import timedelta

from flows.failures import tenant_flow
from flows.tenant_sync import sync_tenant

CRM_MAX_AGE = timedelta(hours=1)


@tenant_flow("calendar-sync")
def calendar_sync(tenant_id: str) -> dict[str, int]:
    return sync_tenant(tenant_id, "calendar-sync", crm_max_age=CRM_MAX_AGE, features=("calendar",))


if __name__ == "__main__":
    import sys

    print(calendar_sync(sys.argv[1]))
