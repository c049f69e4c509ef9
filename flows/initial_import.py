"""Prefect flow: a tenant's initial import — a fresh CRM snapshot, then every connected mailbox and calendar
brought up to date (the first sync of a mailbox backfills its whole scan window, of a calendar the next 12
months); users waiting to retry after a failure are retried now. Parameters: the tenant id only."""

from __future__ import annotations

from datetime import timedelta

from flows.failures import tenant_flow
from flows.tenant_sync import SyncIncomplete, sync_tenant

ImportIncomplete = SyncIncomplete  # the name callers of the first version used


@tenant_flow("initial-import")
def initial_import(tenant_id: str) -> dict[str, int]:
    return sync_tenant(
        tenant_id, "initial-import", crm_max_age=timedelta(0), respect_backoff=False, features=("email", "calendar")
    )


if __name__ == "__main__":
    import sys

    print(initial_import(sys.argv[1]))
