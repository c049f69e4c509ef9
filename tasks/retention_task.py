"""Prefect tasks of the daily retention flow: the retention pass and the offboarding deletions that are due."""

from __future__ import annotations

from prefect import task

from o365sync.offboarding import complete_due_offboardings
from o365sync.retention import retention_now
from o365sync.settings import load_settings


@task(name="retention-purge")
def purge(tenant_id: str) -> dict[str, int]:
    return retention_now(load_settings(), tenant_id)


@task(name="complete-offboardings")
def offboardings(tenant_id: str) -> dict[str, int]:
    done = complete_due_offboardings(load_settings(), tenant_id)
    return {"users_erased": len(done), "user_rows_deleted": sum(d["deleted_rows"] for d in done)}
