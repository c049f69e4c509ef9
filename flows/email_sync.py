"""Prefect flow: the recurring email sync of a tenant (every 15 minutes): Graph delta per folder for every
connected mailbox, the CRM snapshot refreshed when older than an hour. Parameters: the tenant id only."""

from __future__ import annotations

from datetime import timedelta

from prefect.task_runners import ThreadPoolTaskRunner

from flows._reporting import run_name
from flows.failures import flow
from flows.tenant_sync import sync_tenant

MAILBOXES_IN_PARALLEL = 4
CRM_MAX_AGE = timedelta(hours=1)


@flow(
    name="email-sync",
    flow_run_name=run_name("email-sync"),
    persist_result=False,
    task_runner=ThreadPoolTaskRunner(max_workers=MAILBOXES_IN_PARALLEL),
)
def email_sync(tenant_id: str) -> dict[str, int]:
    return sync_tenant(tenant_id, "email-sync", crm_max_age=CRM_MAX_AGE)


if __name__ == "__main__":
    import sys

    print(email_sync(sys.argv[1]))
