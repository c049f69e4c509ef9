"""Prefect task: refresh the tenant's CRM snapshot (`o365sync.crm_refresh`) and log its counts."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.crm_refresh import refresh_crm_snapshot
from o365sync.settings import load_settings


@task(name="crm-snapshot", persist_result=False, cache_policy=NO_CACHE)
def snapshot_crm(tenant_id: str) -> dict[str, Any]:
    counts = refresh_crm_snapshot(load_settings(), tenant_id)
    get_run_logger().info(
        "crm refresh tenant=%s mode=%s people=%s accounts=%s open_opportunities=%s changed=%s scan_start=%s",
        tenant_id,
        counts["mode"],
        counts["people"],
        counts["accounts"],
        counts["open_opportunities"],
        counts.get("changed", ""),
        counts["scan_start"],
    )
    return counts
