"""Pipedrive CRM snapshot over API v2: `GET /api/v2/{persons,organizations,deals}` followed
through `additional_data.next_cursor`, authenticated with the company API token in the `x-api-token` header
(never in the URL, so it cannot leak into logs or exception texts).

What the snapshot holds:
- people: every person, one row per address in `emails[]` (primary or not), trimmed and lower-cased, kind
  `contact` (Pipedrive leads have no email of their own). `account_id` is the person's `org_id`.
- accounts: every organization. Domain rule: Pipedrive organizations have no domain field, so the domain is
  taken only from the organization's `website` when the account exposes one (`base.website_domain`), else null.
  It is never inferred from linked persons' email domains: those include free-mail and personal addresses,
  partners and resellers filed under the wrong organization, and one stray person would make every mail from
  that domain match the organization. People still match through their own addresses.
- opportunities: deals with `status=open` (`add_time` as created date, `org_id` as account).
Records with `is_deleted: true` are left out (v2 lists may return soft-deleted persons/organizations). The
snapshot's `watermark` is the newest `update_time` read.

Changes (`fetch_changes(since)`): the same three lists with `updated_since=<since>` (>=, whole seconds, rounded
down), `sort_by=update_time&sort_direction=asc` (oldest change first), deals with
`status=open,won,lost,deleted` so that deals that were won, lost or deleted are read and leave the scope. Every
record read is in `changed_ids`; rows come from the same builders as the snapshot, so deleted persons and
organizations (`is_deleted: true`), non-open deals and persons left without an address have no rows. The
watermark is the newest `update_time` read. Deletes of persons and organizations are seen only while the CRM
keeps soft-deleted records in the v2 lists with `is_deleted: true` (what the simulator does by default). When the
CRM drops them from the lists instead — v2 persons/organizations have no deleted filter (not verified against Pipedrive)
—, and for records purged 30 days after deletion, only the periodic full reconciliation (a full snapshot, run by
the caller) removes them.

Errors: 401 → `CrmAuthError` (the token was revoked or expired: reconnect). 429 → the daily token budget
(the burst window still has room — `x-ratelimit-remaining` > 0 —, `x-daily-requests-left: 0`, or an error text
naming the daily budget) raises `CrmQuotaExhausted` at once; a burst 429 waits `x-ratelimit-reset` /
`Retry-After` (capped) and retries, and after `MAX_ATTEMPTS` raises `CrmQuotaExhausted` too rather than loop.
5xx and network errors are retried with backoff (`rest.send_with_retry`). Messages carry statuses and codes only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
import polars as pl

from crm_adapters.base import accounts_frame, opportunities_frame, people_frame, stored_secret, website_domain
from crm_adapters.rest import (
    MAX_BACKOFF_S,
    RestClient,
    backoff_delay,
    int_header,
    json_object,
    new_cursor,
    newest_time,
    utc_seconds,
)
from o365sync.crm import CrmAuthError, CrmChanges, CrmError, CrmQuotaExhausted, CrmSnapshot, connection_settings

if TYPE_CHECKING:
    from o365sync.tenants import TenantConfig

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # per request, for 5xx / burst 429 / network errors
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
DEAL_STATUSES_ALL = "open,won,lost,deleted"
INCREMENTAL = True


@dataclass
class PipedriveConnection:
    base_url: str  # https://{company}.pipedrive.com (a trailing /api/v2 or /v1 is ignored)
    api_token: str
    page_limit: int = 500  # v2 maximum

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"PipedriveConnection(base_url={self.base_url!r})"

    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        for suffix in ("/api/v2", "/api/v1", "/v1"):
            root = root.removesuffix(suffix)
        return root


def connection(tenant: TenantConfig, secrets: dict[str, str]) -> PipedriveConnection:
    """Company API base URL from the tenant, the API token from its secrets."""
    crm = connection_settings(tenant)
    return PipedriveConnection(base_url=crm.login_url, api_token=stored_secret(tenant, secrets, "api_token"))


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    return str(body.get("error") or "") if isinstance(body, dict) else ""


def _is_daily_budget(resp: httpx.Response) -> bool:
    remaining = int_header(resp, "x-ratelimit-remaining")
    text = _error_text(resp).lower()
    return (
        (remaining is not None and remaining > 0)
        or resp.headers.get("x-daily-requests-left", "").strip() == "0"
        or "daily" in text
        or "budget" in text
    )


def _classify(resp: httpx.Response, attempt: int, last: bool) -> float | None:
    """`send_with_retry` rule: None for a usable answer, seconds to wait, or a raised CrmError."""
    status = resp.status_code
    if status == 401:
        raise CrmAuthError("pipedrive: HTTP 401 unauthorized", status=401, code="unauthorized")
    if status == 429:
        if _is_daily_budget(resp):
            raise CrmQuotaExhausted("pipedrive: HTTP 429 daily_budget", status=429, code="daily_budget")
        if last:
            raise CrmQuotaExhausted("pipedrive: HTTP 429 rate_limited", status=429, code="rate_limited")
        wait = int_header(resp, "x-ratelimit-reset") or int_header(resp, "retry-after")
        if wait is not None:
            return min(MAX_BACKOFF_S, float(max(wait, 1)))
        return backoff_delay(attempt)
    if status in _RETRY_STATUSES:
        if last:
            raise CrmError(f"pipedrive: HTTP {status}", status=status)
        return backoff_delay(attempt)
    if status >= 400:
        raise CrmError(f"pipedrive: HTTP {status}", status=status)
    return None


class _PipedriveClient:
    def __init__(self, conn: PipedriveConnection, http: httpx.Client, sleep: Callable[[float], None]):
        self.conn = conn
        self.rest = RestClient("pipedrive", http, _classify, sleep=sleep, max_attempts=MAX_ATTEMPTS)
        self.root = conn.api_root()

    def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        headers = {"x-api-token": self.conn.api_token, "Accept": "application/json"}
        resp = self.rest.send("GET", self.root + path, params=params, headers=headers)
        body = json_object("pipedrive", resp)
        if body.get("success") is False:
            raise CrmError("pipedrive: unexpected response shape", status=resp.status_code)
        return body

    def pages(self, kind: str, **extra: str) -> Iterator[list[dict[str, Any]]]:
        """Yield the records of each page of `/api/v2/{kind}` (deleted ones too), following next_cursor."""
        params = {"limit": str(self.conn.page_limit), "sort_by": "id", "sort_direction": "asc", **extra}
        seen: set[str] = set()
        while True:
            body = self.get(f"/api/v2/{kind}", params)
            data = body.get("data") or []
            if not isinstance(data, list):
                raise CrmError("pipedrive: unexpected response shape")
            yield [r for r in data if isinstance(r, dict) and r.get("id") is not None]
            cursor = (body.get("additional_data") or {}).get("next_cursor")
            if not cursor:
                return
            params = {**params, "cursor": new_cursor(seen, cursor, "pipedrive: repeated next_cursor")}


def _id(value: Any) -> str | None:
    if isinstance(value, dict):  # v1-style {"value": 12, "name": ...}
        value = value.get("value")
    return None if value is None else str(value)


def _live(rec: dict[str, Any]) -> bool:
    return not rec.get("is_deleted")


def _people_rows(records: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """One row per distinct address of each live person."""
    cols: dict[str, list[Any]] = {"crm_id": [], "kind": [], "email": [], "account_id": [], "name": []}
    for rec in records:
        if not _live(rec):
            continue
        items = rec.get("emails") or rec.get("email") or []
        for item in items if isinstance(items, list) else []:
            value = item.get("value") if isinstance(item, dict) else item
            if not isinstance(value, str):
                continue
            cols["crm_id"].append(_id(rec.get("id")))
            cols["kind"].append("contact")
            cols["email"].append(value)
            cols["account_id"].append(_id(rec.get("org_id")))
            cols["name"].append(rec.get("name"))
    frame = people_frame(pl.DataFrame(cols, schema={name: pl.String for name in cols}))
    return frame.unique(subset=["crm_id", "email"], keep="first", maintain_order=True)


def _account_rows(records: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """One row per live organization, domain from `website` only."""
    cols: dict[str, list[Any]] = {"crm_id": [], "name": [], "domain": []}
    for rec in records:
        if not _live(rec):
            continue
        website = rec.get("website")
        cols["crm_id"].append(_id(rec.get("id")))
        cols["name"].append(rec.get("name"))
        cols["domain"].append(website_domain(website) if isinstance(website, str) else None)
    return accounts_frame(pl.DataFrame(cols, schema={name: pl.String for name in cols}))


def _opportunity_rows(records: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """One row per live deal with `status == "open"`."""
    cols: dict[str, list[Any]] = {"crm_id": [], "account_id": [], "name": [], "created_at": []}
    for rec in records:
        if not _live(rec) or rec.get("status") != "open":
            continue
        cols["crm_id"].append(_id(rec.get("id")))
        cols["account_id"].append(_id(rec.get("org_id")))
        cols["name"].append(rec.get("title"))
        cols["created_at"].append(rec.get("add_time"))
    frame = pl.DataFrame(cols, schema={k: pl.String for k in cols})
    created = (
        pl.col("created_at")
        .str.replace(r"Z$", "+00:00")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us")
        .dt.convert_time_zone("UTC")
    )
    return opportunities_frame(frame.with_columns(created.alias("created_at"), pl.lit(False).alias("is_closed")))


def _watermark(*groups: list[dict[str, Any]]) -> datetime | None:
    return newest_time(r.get("update_time") for records in groups for r in records)


def _read(client: _PipedriveClient, kind: str, **extra: str) -> list[dict[str, Any]]:
    return [rec for records in client.pages(kind, **extra) for rec in records]


def fetch_snapshot(
    conn: PipedriveConnection, http: httpx.Client, *, sleep: Callable[[float], None] = time.sleep
) -> CrmSnapshot:
    """Persons (every address), organizations (domain from `website` only) and open deals; see module doc.

    Raises CrmAuthError (reconnect needed), CrmQuotaExhausted (daily budget or persistent 429) or CrmError.
    """
    client = _PipedriveClient(conn, http, sleep)
    persons = _read(client, "persons")
    organizations = _read(client, "organizations")
    deals = _read(client, "deals", status="open")
    return CrmSnapshot(
        people=_people_rows(persons),
        accounts=_account_rows(organizations),
        opportunities=_opportunity_rows(deals),
        watermark=_watermark(persons, organizations, deals),
    )


def fetch_changes(
    conn: PipedriveConnection,
    http: httpx.Client,
    since: datetime,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> CrmChanges:
    """Persons, organizations and deals updated at or after `since` (`updated_since`, sorted by update_time
    ascending), deleted and closed ones included; see the module docstring for what needs a full snapshot.

    Raises CrmAuthError, CrmQuotaExhausted (daily budget or persistent 429) or CrmError.
    """
    window = {
        "updated_since": utc_seconds(since),
        "sort_by": "update_time",
        "sort_direction": "asc",
    }
    client = _PipedriveClient(conn, http, sleep)
    persons = _read(client, "persons", **window)
    organizations = _read(client, "organizations", **window)
    deals = _read(client, "deals", status=DEAL_STATUSES_ALL, **window)
    return CrmChanges(
        people=_people_rows(persons),
        accounts=_account_rows(organizations),
        opportunities=_opportunity_rows(deals),
        changed_ids={
            "people": {str(_id(r.get("id"))) for r in persons},
            "accounts": {str(_id(r.get("id"))) for r in organizations},
            "opportunities": {str(_id(r.get("id"))) for r in deals},
        },
        watermark=_watermark(persons, organizations, deals),
    )
