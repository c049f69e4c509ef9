"""Prefect flows: a user leaves (`offboard-user`), a subscription ends (`end-subscription`). The policy, its state
file and the audit are `o365sync/offboarding.py`; parameters are ids, logs and artifacts ids and counts only."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from flows._reporting import artifact_key, report_totals, tenant_title
from flows.failures import tenant_flow
from o365sync.offboarding import end_subscription_now, offboard_user_now
from o365sync.settings import load_settings
from o365sync.tenant_context import resolve_tenant


@tenant_flow("offboard-user")
def offboard_user(tenant_id: str, user_oid: str) -> dict:
    """A user was removed: tokens gone now; data deleted (after the grace period) or retained, per policy."""
    logger = get_run_logger()
    tenant = resolve_tenant(load_settings(), tenant_id)
    out = offboard_user_now(tenant.settings, tenant.id, user_oid)
    row = {
        "user_oid": user_oid,
        "policy": out["policy"],
        "delete_after": out["delete_after"] or "",
        "deleted": "yes" if out["deleted_at"] else "no",
        "deleted_rows": out["deleted_rows"],
    }
    create_table_artifact(
        key=artifact_key("offboard-user", tenant.id),
        table=[row],
        description=f"offboard-user of {tenant_title(tenant)}: policy and counts",
    )
    logger.info(
        "offboard-user tenant=%s user=%s policy=%s deleted_rows=%s",
        tenant.id,
        user_oid,
        out["policy"],
        out["deleted_rows"],
    )
    return {"deleted_rows": out["deleted_rows"], "deleted": int(bool(out["deleted_at"]))}


@tenant_flow("end-subscription")
def end_subscription(tenant_id: str) -> dict:
    """The subscription ended: every file of the tenant is deleted; the audit log keeps one entry."""
    tenant = resolve_tenant(load_settings(), tenant_id)  # its name is read before its files are gone
    totals = end_subscription_now(tenant.settings, tenant.id)
    report_totals("end-subscription", tenant, totals)
    return totals
