"""The user-import deployments: the `user-import` flow (flows/user_import.py), unscheduled, run when a user of the
tenant connects or re-consents (app/import_trigger.py calls `start_user_import_run` with the user's id). For
workers, `python -m deployments.register` registers one for all tenants (`user-import/all-tenants`,
deployments/dispatch.py) and each run goes to the tenant's shard queue; `o365sync serve` serves a per-tenant
`user-import-<tenant>` deployment next to the tenant's other deployments.

Concurrency: the per-tenant deployment runs one at a time, the others queue (limit 1, ENQUEUE); the imports of a
tenant's users share its per-feature sync locks anyway (flows/user_import.py), which is what orders them for
workers (a limit on `all-tenants` would serialise every tenant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deployments.schedules import _who, deployment_name, email_tenants, on_demand
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments.runner import RunnerDeployment

USER_IMPORT = "user-import"


def user_import_deployment(tenant_id: str) -> str:
    """full name (`flow/deployment`) `run_deployment` starts for a user of `tenant_id`."""
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


def start_user_import_run(settings: Settings, tenant_id: str, user_id: str, idempotency_key: str) -> FlowRun:
    """Create the run of one user's import (returns at once): of `user-import/all-tenants` on the tenant's shard
    queue when it is registered (workers), else of the tenant's own deployment (`o365sync serve`)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.dispatch import job_kind_name, run_now
    from o365sync.tenants import load_tenant

    parameters = {"tenant_id": tenant_id, "user_id": user_id}
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(job_kind_name(USER_IMPORT))  # the API first: it may be slow or down
        except ObjectNotFound:
            served = client.read_deployment_by_name(user_import_deployment(tenant_id))
            return client.create_flow_run_from_deployment(
                served.id, parameters=parameters, idempotency_key=idempotency_key, tags=[tenant_id, USER_IMPORT]
            )
        tenant = load_tenant(settings, tenant_id)
        return run_now(client, USER_IMPORT, tenant, parameters=parameters, idempotency_key=idempotency_key)
