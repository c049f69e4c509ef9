"""Prefect flow: the recurring calendar sync of a tenant (hourly): calendarView delta over the next 12 months for
every connected user who has calendar import on, the CRM snapshot refreshed when older than an hour.
Parameters: the tenant id only."""

from __future__ import annotations

from datetime import timedelta

from prefect.task_runners import ThreadPoolTaskRunner

from flows._reporting import run_name
from flows.failures import flow
from flows.tenant_sync import sync_tenant

USERS_IN_PARALLEL = 4
CRM_MAX_AGE = timedelta(hours=1)


@flow(
    name="calendar-sync",
    flow_run_name=run_name("calendar-sync"),
    persist_result=False,
    task_runner=ThreadPoolTaskRunner(max_workers=USERS_IN_PARALLEL),
)
def calendar_sync(tenant_id: str) -> dict[str, int]:
    return sync_tenant(tenant_id, "calendar-sync", crm_max_age=CRM_MAX_AGE, features=("calendar",))


if __name__ == "__main__":
    import sys

    print(calendar_sync(sys.argv[1]))
