"""The per-tenant `user-import-<tenant>` deployment: the `user-import` flow (flows/user_import.py), unscheduled, run
when a user of the tenant connects or re-consents (app/import_trigger.py calls `run_deployment` with the user's id).
`o365sync serve` serves it and `python -m deployments.register` registers it next to the tenant's other deployments.

Concurrency: one run per tenant at a time, the others queue (limit 1, ENQUEUE): the imports of a tenant's users
share its per-feature sync locks anyway (flows/user_import.py), so a queued run waits on the server instead of in a
runner slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deployments.schedules import _who, deployment_name, email_tenants, on_demand
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

USER_IMPORT = "user-import"


def user_import_deployment(tenant_id: str) -> str:
    """The full name (`flow/deployment`) `run_deployment` starts for a user of `tenant_id`."""
    return f"{USER_IMPORT}/{deployment_name(USER_IMPORT, tenant_id)}"


def user_import_deployments(
    settings: Settings, *, flow: Flow[..., Any] | None = None, tenants: list[TenantConfig] | None = None
) -> list[RunnerDeployment]:
    """One `user-import-<tenant>` deployment per email-enabled tenant (parameter `tenant_id` set; `user_id` given
    by each run)."""
    if flow is None:
        from flows.user_import import user_import

        flow = user_import
    tenants = email_tenants(settings) if tenants is None else [t for t in tenants if "email" in t.features]
    return [
        on_demand(
            flow,
            USER_IMPORT,
            t,
            f"Import of one user of {_who(t)} when they connect; run on demand (parameter user_id).",
        )
        for t in tenants
    ]
