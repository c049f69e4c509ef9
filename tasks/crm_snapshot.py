"""Prefect task: refresh the tenant's CRM snapshot (`o365sync.crm_refresh`) through the product's CRM adapters
(`crm_adapters.registry`, given to the library here: the library imports no adapter) and log its counts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from crm_adapters.registry import ADAPTERS
from o365sync import crm_refresh
from o365sync.settings import Settings, load_settings


def refresh_crm_snapshot(settings: Settings, tenant_id: str, now: datetime | None = None) -> dict[str, Any]:
    """`o365sync.crm_refresh.refresh_crm_snapshot` with every CRM kind's adapter."""
    return crm_refresh.refresh_crm_snapshot(settings, tenant_id, ADAPTERS, now)


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
