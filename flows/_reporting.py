"""What every flow shows people in the Prefect UI: run and task names, artifact keys and descriptions."""

from __future__ import annotations

import re
from collections.abc import Callable

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from o365sync.auth import ConnectedUser
from o365sync.settings import load_settings
from o365sync.tenant_context import Tenant
from o365sync.tenants import load_tenant


def artifact_key(prefix: str, tenant_id: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes, at most 100) for one tenant's table."""
    return f"{prefix}-{re.sub(r'[^a-z0-9-]+', '-', tenant_id.lower())}"[:100]


def tenant_title(tenant: Tenant) -> str:
    """How people see a tenant in the Prefect UI: its display name and id, or the id alone."""
    return f"{tenant.config.name} ({tenant.id})" if tenant.config.name else f"tenant {tenant.id}"


def run_name(kind: str) -> Callable[[], str]:
    """A `flow_run_name` for a tenant flow: "<kind>: <display name>" (the id when the tenant has no name or cannot
    be read; naming a run never fails it)."""

    def name() -> str:
        from prefect.runtime import flow_run

        tenant_id = str(flow_run.parameters.get("tenant_id", ""))
        try:
            return f"{kind}: {load_tenant(load_settings(), tenant_id).name or tenant_id}"
        except Exception:
            return f"{kind}: {tenant_id}"

    return name


def user_task_name(prefix: str, user: ConnectedUser) -> str:
    """A per-user task run's name: `<prefix>-<object id>`, then the user's display name (or UPN) for people."""
    who = user.display_name or user.upn
    return f"{prefix}-{user.oid} {who}" if who else f"{prefix}-{user.oid}"


def counts_line(totals: dict) -> str:
    """A run's totals as `key=value` pairs for its log line (ids and counts only)."""
    return " ".join(f"{k}={v}" for k, v in totals.items())


def report_totals(
    kind: str, tenant: Tenant, totals: dict, table: list[dict] | None = None, what: str = "counts"
) -> None:
    """A tenant run's table artifact (`table`, else the totals as one row; described "<kind> of <tenant>: <what>")
    and its log line of totals."""
    create_table_artifact(
        key=artifact_key(kind, tenant.id),
        table=table if table is not None else [totals],
        description=f"{kind} of {tenant_title(tenant)}: {what}",
    )
    get_run_logger().info("%s tenant=%s %s", kind, tenant.id, counts_line(totals))


def publish_dashboard(tenant: Tenant) -> None:
    """The tenant's at-a-glance dashboard (`tasks/ops_dashboard.py`) as the markdown artifact `dashboard-<tenant>`."""
    from datetime import UTC, datetime

    from prefect.artifacts import create_markdown_artifact

    from tasks.ops_dashboard import read_dashboard

    create_markdown_artifact(
        key=artifact_key("dashboard", tenant.id),
        markdown=read_dashboard(tenant.settings, tenant.config, datetime.now(UTC)),
        description=f"Dashboard of {tenant_title(tenant)}: per-user stage, lag, counts and what to do",
    )
