"""The CRM snapshot model every CRM adapter produces and the refresh stores: a `CrmSnapshot` (or `CrmChanges`) of
three Polars frames with fixed schemas, the `CrmAdapter` Protocol the adapters in `crm_adapters/` implement, the
errors they raise, and the rules that make any adapter's records safe to store and match (`normalise_email`,
`conform_records`). The library defines this; the adapters import it (never the other way round: the refresh gets
the adapter registry from its caller). Exception messages carry HTTP statuses and error codes only (no bodies, no
tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import polars as pl

from o365sync.errors import O365SyncError

if TYPE_CHECKING:
    from o365sync.tenants import CrmConnection, TenantConfig

PEOPLE_SCHEMA = pl.Schema(
    {"crm_id": pl.String, "kind": pl.String, "email": pl.String, "account_id": pl.String, "name": pl.String}
)
ACCOUNTS_SCHEMA = pl.Schema({"crm_id": pl.String, "name": pl.String, "domain": pl.String})
OPPORTUNITIES_SCHEMA = pl.Schema(
    {
        "crm_id": pl.String(),
        "account_id": pl.String(),
        "name": pl.String(),
        "is_closed": pl.Boolean(),
        "created_at": pl.Datetime("us", "UTC"),
    }
)


class CrmError(O365SyncError):
    """A CRM call failed in a way the adapter could not recover from (message: status and error code)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        # set by adapters when the refresh token rotated before the failure: persist it anyway
        self.rotated_refresh_token: str | None = None


class CrmAuthError(CrmError):
    """The stored refresh token is dead (revoked/expired/rotated away): the tenant must reconnect the CRM."""

    retriable = False
    action = "an admin must reconnect the CRM"


class CrmQuotaExhausted(CrmError):
    """The CRM's API allowance is used up (Salesforce 403 REQUEST_LIMIT_EXCEEDED). Do not retry in a loop."""

    action = "wait for the CRM's API quota to reset (the refresh is tried again hourly)"


class CrmFileError(CrmError):
    """A CRM file (CSV/Parquet) cannot be used as it is: the message names the file, line/row, column and problem
    (never a cell's value); fixing the file and the next refresh clear it."""

    retriable = False
    action = "fix the CRM file where the error says; the next refresh reads it again"


class CrmDropRefused(CrmError):
    """A refresh would remove more than half of the stored people or accounts; nothing was written. `removals`:
    {"people" | "accounts": (would remove, stored now)}."""

    retriable = False
    action = "an admin must confirm the drop (o365sync crm confirm-drop) or fix the CRM"

    def __init__(self, message: str, removals: dict[str, tuple[int, int]]):
        super().__init__(message)
        self.removals = removals


@dataclass
class CrmSnapshot:
    """Everything in scope, read in full: replaces the stored snapshot (and so reconciles hard deletes)."""

    people: pl.DataFrame  # PEOPLE_SCHEMA: contacts, person accounts and unconverted leads, one row per address
    accounts: pl.DataFrame  # ACCOUNTS_SCHEMA: one row per domain (registrable), domain may be null
    opportunities: pl.DataFrame  # OPPORTUNITIES_SCHEMA: open ones only
    rotated_refresh_token: str | None = None  # persist it: the old one may already be invalid
    watermark: datetime | None = None  # newest modification time read (CRM clock); incremental refreshes start here


@dataclass
class CrmChanges:
    """What changed since a point in time. Every record read as changed or deleted is in `changed_ids` (keys
    "people", "accounts", "opportunities"); its stored rows are replaced by its rows in the frames. A record that
    left the scope (deleted, archived, converted lead, closed deal, no address left) has an id and no rows, so
    applying the changes removes it."""

    people: pl.DataFrame
    accounts: pl.DataFrame
    opportunities: pl.DataFrame
    changed_ids: dict[str, set[str]] = field(
        default_factory=lambda: {"people": set(), "accounts": set(), "opportunities": set()}
    )
    watermark: datetime | None = None  # newest modification/deletion time read; None when nothing changed
    rotated_refresh_token: str | None = None


class CrmAdapter(Protocol):
    """One CRM kind: a module of `crm_adapters/` listed in `crm_adapters.registry.ADAPTERS` (its module-level names
    are the members). The refresh (`o365sync.crm_refresh`) knows adapters only through this, given the registry by
    its caller (the library imports no adapter)."""

    INCREMENTAL: bool  # fetch_changes reads only what changed; False: every refresh reads in full (files)

    def connection(self, tenant: TenantConfig, secrets: dict[str, str]) -> Any:
        """The adapter's connection from the tenant's configuration and its unsealed CRM secrets; CrmError naming
        the fix when something it needs is not configured or not stored."""
        ...

    def fetch_snapshot(self, conn: Any, http: httpx.Client) -> CrmSnapshot:
        """Everything in scope, read in full."""
        ...

    def fetch_changes(self, conn: Any, http: httpx.Client, since: datetime) -> CrmChanges | CrmSnapshot:
        """What changed at or after `since` (a CrmSnapshot from an adapter that is not INCREMENTAL)."""
        ...


def connection_settings(tenant: TenantConfig) -> CrmConnection:
    """The tenant's non-secret CRM settings, or CrmError when none are configured."""
    if tenant.crm is None:
        raise CrmError(f"tenant {tenant.id}: {tenant.crm_kind} connection is not configured")
    return tenant.crm


MAX_NAME_CHARS = 1_000  # longer display names are cut (Salesforce allows 255, HubSpot text properties 65,536)
MAX_ADDRESS_CHARS = 254  # RFC 5321: no deliverable address is longer
EARLIEST_CREATED = datetime(1900, 1, 1, tzinfo=UTC)  # outside this range a created date is a placeholder or junk
LATEST_CREATED = datetime(2100, 1, 1, tzinfo=UTC)  # (and years < 1 or > 9999 break every datetime library)


def normalise_email(expr: pl.Expr) -> pl.Expr:
    """Trimmed and lower-cased; blank becomes null. Nothing else changes (plus-addressing matters)."""
    cleaned = expr.str.strip_chars().str.to_lowercase()
    return pl.when(cleaned != "").then(cleaned)  # keeps the input's name; otherwise null


def conform_records(
    people: pl.DataFrame, accounts: pl.DataFrame, opportunities: pl.DataFrame
) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """Any adapter's frames made safe to store, and counts of what was changed: names cut to MAX_NAME_CHARS,
    people rows whose address is longer than MAX_ADDRESS_CHARS dropped (they cannot match), created dates outside
    EARLIEST_CREATED..LATEST_CREATED ignored (null: that deal does not move the scan window). None of this refuses
    a refresh; the file adapter refuses such files itself, with the line to fix."""
    long_name = pl.col("name").str.len_chars() > MAX_NAME_CHARS
    long_address = pl.col("email").str.len_chars() > MAX_ADDRESS_CHARS
    created = pl.col("created_at")
    odd_date = (created < EARLIEST_CREATED) | (created >= LATEST_CREATED)
    odd_dates = f"opportunity created dates before {EARLIEST_CREATED.year} or from {LATEST_CREATED.year} on ignored"
    counts = {
        f"names cut to {MAX_NAME_CHARS:,} characters": sum(
            f.select(long_name.sum()).item() for f in (people, accounts, opportunities)
        ),
        f"people rows with an address over {MAX_ADDRESS_CHARS} characters skipped": people.select(
            long_address.sum()
        ).item(),
        odd_dates: opportunities.select(odd_date.sum()).item(),
    }
    cut = pl.col("name").str.slice(0, MAX_NAME_CHARS)
    frames = {
        "people": people.filter(~long_address.fill_null(False)).with_columns(cut),
        "accounts": accounts.with_columns(cut),
        "opportunities": opportunities.with_columns(
            cut, pl.when(odd_date).then(None).otherwise(created).alias("created_at")
        ),
    }
    return frames, {label: n for label, n in counts.items() if n}
