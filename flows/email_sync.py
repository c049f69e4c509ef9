"""Prefect flow: the recurring email sync of a tenant (every 15 minutes): Graph delta per folder for every
connected mailbox, the CRM snapshot refreshed when older than an hour. Parameters: the tenant id only."""

from __future__ import annotations

from datetime import timedelta

from flows.failures import tenant_flow
from flows.tenant_sync import sync_tenant

CRM_MAX_AGE = timedelta(hours=1)


@tenant_flow("email-sync")
def email_sync(tenant_id: str) -> dict[str, int]:
    return sync_tenant(tenant_id, "email-sync", crm_max_age=CRM_MAX_AGE)


if __name__ == "__main__":
    import sys

    print(email_sync(sys.argv[1]))
