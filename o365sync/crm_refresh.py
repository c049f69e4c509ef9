"""Refresh the tenant's CRM snapshot in its store and recompute the mail scan window (the Prefect task
`tasks/crm_snapshot.py` calls `refresh_crm_snapshot`).

The first refresh, a change of CRM, and then one refresh every `crm_reconcile_hours` read the CRM in full and
replace the snapshot (that is what removes records the CRM hard-deleted or purged, and persons Pipedrive drops
from its lists). In between, refreshes ask only for what changed since the stored watermark minus
`crm_refresh_overlap_minutes` (clock skew, equal timestamps, search indexing lag) and upsert it; soft deletes
the CRM reports (Salesforce queryAll + IsDeleted, HubSpot archived, Pipedrive is_deleted / deleted deals)
leave the snapshot right then. CSV/Parquet files are always read in full.

Whatever the adapter returns passes `conform_records` (names cut, unusable addresses and dates left out, counted).
A refresh that would remove more than half of the stored people or accounts is refused (nothing written, the
previous snapshot stays in use) until an admin runs `o365sync crm confirm-drop`, which lets the next refresh
remove up to as many; a first snapshot, or the first of a newly configured CRM, is never refused.
Every refresh after the first compares the CRM's match keys (addresses, account domains) before and after, and in
the same transaction queues the added ones for the late-match backfill (`o365sync/backfill.py`).
The outcome is kept as the tenant's CRM state (ok / reconnect_needed / quota_exhausted / invalid_file / refused /
failed) with the error or, when ok, what was adjusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import polars as pl

from o365sync.backfill import queue_added_terms, stored_match_keys
from o365sync.crm import (
    CrmAdapter,
    CrmAuthError,
    CrmChanges,
    CrmDropRefused,
    CrmError,
    CrmFileError,
    CrmQuotaExhausted,
    CrmSnapshot,
    conform_records,
    connection_settings,
)
from o365sync.http import make_http_client
from o365sync.settings import Settings
from o365sync.store import (
    apply_crm_changes,
    crm_removals,
    crm_state_summary,
    open_store,
    read_crm_drop_guard,
    record_crm_drop_refusal,
    record_crm_state,
    replace_crm_snapshot,
    transaction,
)
from o365sync.store.late_match import fan_out_late_matches
from o365sync.tenants import TenantConfig, load_crm_secrets, load_tenant, save_crm_secrets

MIN_SCAN_DAYS = 7


def scan_start_for(oldest_open_opportunity: datetime | None, now: datetime) -> datetime:
    """min(oldest open opportunity's created date, now - 7 days)."""
    floor = now - timedelta(days=MIN_SCAN_DAYS)
    return min(floor, oldest_open_opportunity) if oldest_open_opportunity is not None else floor


Adapters = Mapping[str, CrmAdapter]  # CRM kind -> adapter: `crm_adapters.registry.ADAPTERS`, given by the caller


def fetch_crm(
    settings: Settings, tenant: TenantConfig, since: datetime | None, adapters: Adapters
) -> CrmSnapshot | CrmChanges:
    """A full snapshot (`since` None) or the changes since `since`, from the tenant's CRM adapter. A refresh token
    the CRM rotated is stored at once, even when the read then fails (the old one is already dead)."""
    secrets = load_crm_secrets(settings, tenant.id)
    connection_settings(tenant)
    adapter = adapters.get(tenant.crm_kind)
    if adapter is None:
        raise CrmError(f"tenant {tenant.id}: unsupported CRM kind {tenant.crm_kind}")
    conn = adapter.connection(tenant, secrets)
    try:
        with make_http_client(settings) as http:
            result = adapter.fetch_snapshot(conn, http) if since is None else adapter.fetch_changes(conn, http, since)
    except CrmError as exc:
        if exc.rotated_refresh_token:
            save_crm_secrets(settings, tenant.id, {**secrets, "refresh_token": exc.rotated_refresh_token})
        raise
    if result.rotated_refresh_token:
        save_crm_secrets(settings, tenant.id, {**secrets, "refresh_token": result.rotated_refresh_token})
    return result


def refresh_since(
    settings: Settings, tenant: TenantConfig, summary: dict, now: datetime, adapters: Adapters
) -> datetime | None:
    """Where an incremental refresh starts, or None when this refresh must read the CRM in full."""
    adapter = adapters.get(tenant.crm_kind)
    if (
        adapter is None
        or not adapter.INCREMENTAL
        or summary["crm_kind"] != tenant.crm_kind
        or summary["watermark"] is None
        or summary["last_full_at"] is None
        or now - summary["last_full_at"] >= timedelta(hours=settings.crm_reconcile_hours)
    ):
        return None
    return summary["watermark"] - timedelta(minutes=settings.crm_refresh_overlap_minutes)


STATUS_OF_ERROR = (
    (CrmAuthError, "reconnect_needed"),
    (CrmQuotaExhausted, "quota_exhausted"),
    (CrmFileError, "invalid_file"),
    (CrmDropRefused, "refused"),
)


def crm_error_status(exc: CrmError) -> str:
    """The CRM state a failed refresh leaves (what `o365sync status` shows and the scheduler acts on)."""
    return next((status for error, status in STATUS_OF_ERROR if isinstance(exc, error)), "failed")


def refuse_mass_drop(
    con: duckdb.DuckDBPyConnection,
    tenant_id: str,
    frames: dict[str, pl.DataFrame],
    changed_ids: dict[str, set[str]] | None,
) -> None:
    """Raise CrmDropRefused when writing would remove more than half of the stored people or accounts, unless the
    admin confirmed a refused refresh that removed at least as many."""
    removals = crm_removals(con, frames, changed_ids)
    too_many = {key: (removed, stored) for key, (removed, stored) in removals.items() if removed * 2 > stored}
    guard = read_crm_drop_guard(con)
    if not too_many or (
        guard is not None
        and guard["confirmed_at"] is not None
        and all(removed <= guard[f"{key}_removed"] for key, (removed, _) in too_many.items())
    ):
        return
    what = " and ".join(f"{removed:,} of {stored:,} {key}" for key, (removed, stored) in too_many.items())
    raise CrmDropRefused(
        f"would remove {what}; the previous snapshot stays in use. If that is right: "
        f"o365sync crm confirm-drop --tenant {tenant_id}",
        removals,
    )


def refresh_crm_snapshot(
    settings: Settings, tenant_id: str, adapters: Adapters, now: datetime | None = None
) -> dict[str, Any]:
    """Full or incremental refresh (see the module docstring) through `adapters` (`crm_adapters.registry.ADAPTERS`);
    returns counts, mode, the new scan start and (after a first snapshot) `late_match_terms`, the keys it added.
    A CRM failure is recorded as the tenant's CRM state (codes only) and re-raised; the stored snapshot stays."""
    tenant = load_tenant(settings, tenant_id)
    now = now or datetime.now(UTC)
    with open_store(settings, tenant_id, write=False) as con:
        summary = crm_state_summary(con)
        before = stored_match_keys(con, tenant.domains) if summary["crm_kind"] is not None else None
    since = refresh_since(settings, tenant, summary, now, adapters)
    try:
        result = fetch_crm(settings, tenant, since, adapters)
    except CrmError as exc:
        with open_store(settings, tenant_id, write=True) as con:
            _record_failure(con, exc)
        raise

    def start(oldest_open: datetime | None) -> datetime:  # never reach back past what retention would delete
        return max(scan_start_for(oldest_open, now), now - timedelta(days=tenant.retention_days))

    frames, adjusted = conform_records(result.people, result.accounts, result.opportunities)
    changed_ids = result.changed_ids if isinstance(result, CrmChanges) else None
    with open_store(settings, tenant_id, write=True) as con:
        try:
            if summary["crm_kind"] == tenant.crm_kind:  # not the first snapshot of this CRM
                refuse_mass_drop(con, tenant_id, frames, changed_ids)
        except CrmDropRefused as exc:
            with transaction(con):  # its counts (for confirm-drop) and the state people see, together
                record_crm_drop_refusal(con, exc.removals)
                _record_failure(con, exc)
            raise
        added: dict[str, int] = {}

        def queue_late_matches(con: duckdb.DuckDBPyConnection) -> None:  # in the snapshot's transaction
            if before is not None:  # a first snapshot adds nothing late: the first import matches against it
                added["late_match_terms"] = queue_added_terms(con, tenant.id, before, tenant.domains, now)

        if changed_ids is not None:
            counts = apply_crm_changes(
                con, frames, changed_ids, tenant.crm_kind, start, result.watermark, queue_late_matches
            )
            counts["changed"] = sum(len(ids) for ids in changed_ids.values())
        else:
            people, accounts, opportunities = frames["people"], frames["accounts"], frames["opportunities"]
            counts = replace_crm_snapshot(
                con, people, accounts, opportunities, tenant.crm_kind, start, result.watermark, queue_late_matches
            )
        counts |= added
        record_crm_state(con, "ok", "; ".join(f"{what}: {n:,}" for what, n in adjusted.items()) or None)
        fan_out_late_matches(con, tenant.id)  # the added terms, into every mailbox's late-match work
    return {**counts, "scan_start": counts["scan_start"].isoformat()}


def _record_failure(con: duckdb.DuckDBPyConnection, exc: CrmError) -> None:
    record_crm_state(con, crm_error_status(exc), f"{type(exc).__name__}: {exc}"[:300])
