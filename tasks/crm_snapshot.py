"""Prefect task: snapshot the tenant's CRM into its store and compute the mail scan window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from crm_adapters.base import CrmError, CrmSnapshot
from o365sync.http import make_http_client
from o365sync.settings import Settings, load_settings
from o365sync.store import open_store, replace_crm_snapshot
from o365sync.tenants import TenantConfig, load_crm_secrets, load_tenant, save_crm_secrets

MIN_SCAN_DAYS = 7


def scan_start_for(opportunities: pl.DataFrame, now: datetime) -> datetime:
    """min(oldest open opportunity's created date, now - 7 days)."""
    floor = now - timedelta(days=MIN_SCAN_DAYS)
    open_created = opportunities.filter(~pl.col("is_closed"))["created_at"].min()
    return min(floor, open_created) if open_created is not None else floor


def fetch_crm_snapshot(settings: Settings, tenant: TenantConfig) -> CrmSnapshot:
    secrets = load_crm_secrets(settings, tenant.id)
    if tenant.crm_kind == "salesforce":
        from crm_adapters.salesforce import SalesforceConnection, fetch_snapshot

        if tenant.crm is None or "refresh_token" not in secrets:
            raise CrmError(f"tenant {tenant.id}: Salesforce connection is not configured")
        conn = SalesforceConnection(login_url=tenant.crm.login_url, client_id=tenant.crm.client_id,
                                    client_secret=secrets.get("client_secret", ""),
                                    refresh_token=secrets["refresh_token"], api_version=tenant.crm.api_version)
        try:
            with make_http_client(settings) as http:
                snapshot = fetch_snapshot(conn, http)
        except CrmError as exc:
            if exc.rotated_refresh_token:  # the old token is already dead: keep the new one even on failure
                save_crm_secrets(settings, tenant.id, {**secrets, "refresh_token": exc.rotated_refresh_token})
            raise
        if snapshot.rotated_refresh_token:
            save_crm_secrets(settings, tenant.id, {**secrets, "refresh_token": snapshot.rotated_refresh_token})
        return snapshot
    if tenant.crm is None:
        raise CrmError(f"tenant {tenant.id}: {tenant.crm_kind} connection is not configured")
    if tenant.crm_kind == "files":
        from crm_adapters.files import FilesConnection
        from crm_adapters.files import fetch_snapshot as fetch_files

        if not tenant.crm.directory:
            raise CrmError(f"tenant {tenant.id}: the CRM files directory is not configured")
        return fetch_files(FilesConnection(directory=Path(tenant.crm.directory)))
    if tenant.crm_kind == "hubspot":
        from crm_adapters.hubspot import HubSpotConnection
        from crm_adapters.hubspot import fetch_snapshot as fetch_hubspot

        with make_http_client(settings) as http:
            return fetch_hubspot(HubSpotConnection(base_url=tenant.crm.login_url,
                                                   access_token=_secret(secrets, "access_token", tenant)), http)
    if tenant.crm_kind == "pipedrive":
        from crm_adapters.pipedrive import PipedriveConnection
        from crm_adapters.pipedrive import fetch_snapshot as fetch_pipedrive

        with make_http_client(settings) as http:
            return fetch_pipedrive(PipedriveConnection(base_url=tenant.crm.login_url,
                                                       api_token=_secret(secrets, "api_token", tenant)), http)
    raise CrmError(f"tenant {tenant.id}: unsupported CRM kind {tenant.crm_kind}")


def _secret(secrets: dict[str, str], name: str, tenant: TenantConfig) -> str:
    if not secrets.get(name):
        raise CrmError(f"tenant {tenant.id}: the {tenant.crm_kind} {name} is not stored (o365sync tenant add)")
    return secrets[name]


def refresh_crm_snapshot(settings: Settings, tenant_id: str) -> dict[str, int | str]:
    tenant = load_tenant(settings, tenant_id)
    snap = fetch_crm_snapshot(settings, tenant)
    scan_start = scan_start_for(snap.opportunities, datetime.now(UTC))
    with open_store(settings, tenant_id, write=True) as con:
        replace_crm_snapshot(con, snap.people, snap.accounts, snap.opportunities, tenant.crm_kind, scan_start)
    return {"people": snap.people.height, "accounts": snap.accounts.height,
            "open_opportunities": snap.opportunities.filter(~pl.col("is_closed")).height,
            "scan_start": scan_start.isoformat()}


@task(name="crm-snapshot", persist_result=False, cache_policy=NO_CACHE)
def snapshot_crm(tenant_id: str) -> dict[str, int | str]:
    counts = refresh_crm_snapshot(load_settings(), tenant_id)
    get_run_logger().info("crm snapshot tenant=%s people=%s accounts=%s open_opportunities=%s scan_start=%s",
                          tenant_id, counts["people"], counts["accounts"], counts["open_opportunities"],
                          counts["scan_start"])
    return counts
