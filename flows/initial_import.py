"""Prefect flow: a tenant's initial import — a fresh CRM snapshot, then every connected mailbox and calendar
brought up to date (the first sync of a mailbox backfills its whole scan window, of a calendar the next 12
months); users waiting to retry after a failure are retried now. Parameters: the tenant id only."""

from __future__ import annotations

from datetime import timedelta

from prefect.task_runners import ThreadPoolTaskRunner

from flows._reporting import run_name
from flows.failures import flow
from flows.tenant_sync import SyncIncomplete, sync_tenant

MAILBOXES_IN_PARALLEL = 4
ImportIncomplete = SyncIncomplete  # the name callers of the first version used


@flow(
    name="initial-import",
    flow_run_name=run_name("initial-import"),
    persist_result=False,
    task_runner=ThreadPoolTaskRunner(max_workers=MAILBOXES_IN_PARALLEL),
)
def initial_import(tenant_id: str) -> dict[str, int]:
    return sync_tenant(
        tenant_id, "initial-import", crm_max_age=timedelta(0), respect_backoff=False, features=("email", "calendar")
    )


if __name__ == "__main__":
    import sys

    print(initial_import(sys.argv[1]))
