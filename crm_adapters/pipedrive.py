"""Pipedrive CRM snapshot over API v2 (crm_apis.md §3): `GET /api/v2/{persons,organizations,deals}` followed
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
Records with `is_deleted: true` are left out (v2 lists may return soft-deleted persons/organizations).

Errors: 401 → `CrmAuthError` (the token was revoked or expired: reconnect). 429 → the daily token budget
(the burst window still has room — `x-ratelimit-remaining` > 0 —, `x-daily-requests-left: 0`, or an error text
naming the daily budget) raises `CrmQuotaExhausted` at once; a burst 429 waits `x-ratelimit-reset` /
`Retry-After` (capped) and retries, and after `MAX_ATTEMPTS` raises `CrmQuotaExhausted` too rather than loop.
5xx and network errors are retried with backoff. Messages carry statuses and codes only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import polars as pl

from crm_adapters.base import (
    ACCOUNTS_SCHEMA,
    OPPORTUNITIES_SCHEMA,
    PEOPLE_SCHEMA,
    CrmAuthError,
    CrmError,
    CrmQuotaExhausted,
    CrmSnapshot,
    people_frame,
    website_domain,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # per request, for 5xx / burst 429 / network errors
BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
_RETRY_STATUSES = frozenset({500, 502, 503, 504})


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


def _int_header(resp: httpx.Response, name: str) -> int | None:
    value = resp.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    return str(body.get("error") or "") if isinstance(body, dict) else ""


def _is_daily_budget(resp: httpx.Response) -> bool:
    remaining = _int_header(resp, "x-ratelimit-remaining")
    text = _error_text(resp).lower()
    return (
        (remaining is not None and remaining > 0)
        or resp.headers.get("x-daily-requests-left", "").strip() == "0"
        or "daily" in text
        or "budget" in text
    )


class _PipedriveClient:
    def __init__(self, conn: PipedriveConnection, http: httpx.Client, sleep: Callable[[float], None]):
        self.conn = conn
        self.http = http
        self.sleep = sleep
        self.root = conn.api_root()

    def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        headers = {"x-api-token": self.conn.api_token, "Accept": "application/json"}
        for attempt in range(1, MAX_ATTEMPTS + 1):
            delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1))
            try:
                resp = self.http.get(self.root + path, params=params, headers=headers)
            except httpx.TransportError as exc:
                if attempt == MAX_ATTEMPTS:
                    raise CrmError(f"pipedrive: network error {type(exc).__name__}") from exc
                log.warning("pipedrive: %s on attempt %d, retrying", type(exc).__name__, attempt)
                self.sleep(delay)
                continue
            status = resp.status_code
            if status == 401:
                raise CrmAuthError("pipedrive: HTTP 401 unauthorized", status=401, code="unauthorized")
            if status == 429:
                if _is_daily_budget(resp):
                    raise CrmQuotaExhausted("pipedrive: HTTP 429 daily_budget", status=429, code="daily_budget")
                if attempt == MAX_ATTEMPTS:
                    raise CrmQuotaExhausted("pipedrive: HTTP 429 rate_limited", status=429, code="rate_limited")
                wait = _int_header(resp, "x-ratelimit-reset") or _int_header(resp, "retry-after")
                if wait is not None:
                    delay = min(MAX_BACKOFF_S, float(max(wait, 1)))
                log.warning("pipedrive: burst limit on attempt %d, waiting %.1fs", attempt, delay)
                self.sleep(delay)
                continue
            if status in _RETRY_STATUSES:
                if attempt == MAX_ATTEMPTS:
                    raise CrmError(f"pipedrive: HTTP {status}", status=status)
                log.warning("pipedrive: HTTP %d on attempt %d, retrying", status, attempt)
                self.sleep(delay)
                continue
            if status >= 400:
                raise CrmError(f"pipedrive: HTTP {status}", status=status)
            try:
                body = resp.json()
            except ValueError as exc:
                raise CrmError(f"pipedrive: HTTP {status} non-JSON body", status=status) from exc
            if not isinstance(body, dict) or body.get("success") is False:
                raise CrmError("pipedrive: unexpected response shape", status=status)
            return body
        raise AssertionError("unreachable")  # pragma: no cover

    def pages(self, kind: str, **extra: str) -> Iterator[list[dict[str, Any]]]:
        """Yield the live (not deleted) records of each page of `/api/v2/{kind}`, following next_cursor."""
        params = {"limit": str(self.conn.page_limit), "sort_by": "id", "sort_direction": "asc", **extra}
        seen: set[str] = set()
        while True:
            body = self.get(f"/api/v2/{kind}", params)
            data = body.get("data") or []
            if not isinstance(data, list):
                raise CrmError("pipedrive: unexpected response shape")
            yield [r for r in data if isinstance(r, dict) and not r.get("is_deleted")]
            cursor = (body.get("additional_data") or {}).get("next_cursor")
            if not cursor:
                return
            if cursor in seen:
                raise CrmError("pipedrive: repeated next_cursor")
            seen.add(cursor)
            params = {**params, "cursor": str(cursor)}


def _id(value: Any) -> str | None:
    if isinstance(value, dict):  # v1-style {"value": 12, "name": ...}
        value = value.get("value")
    return None if value is None else str(value)


def _people(client: _PipedriveClient) -> pl.DataFrame:
    cols: dict[str, list[Any]] = {name: [] for name in PEOPLE_SCHEMA}
    for records in client.pages("persons"):
        for rec in records:
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
    frame = people_frame(pl.DataFrame(cols, schema=PEOPLE_SCHEMA))
    return frame.unique(subset=["crm_id", "email"], keep="first", maintain_order=True)


def _accounts(client: _PipedriveClient) -> pl.DataFrame:
    cols: dict[str, list[Any]] = {"crm_id": [], "name": [], "domain": []}
    for records in client.pages("organizations"):
        for rec in records:
            website = rec.get("website")
            cols["crm_id"].append(_id(rec.get("id")))
            cols["name"].append(rec.get("name"))
            cols["domain"].append(website_domain(website) if isinstance(website, str) else None)
    return pl.DataFrame(cols, schema=ACCOUNTS_SCHEMA)


def _opportunities(client: _PipedriveClient) -> pl.DataFrame:
    cols: dict[str, list[Any]] = {"crm_id": [], "account_id": [], "name": [], "created_at": []}
    for records in client.pages("deals", status="open"):
        for rec in records:
            if rec.get("status") != "open":
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
    return frame.with_columns(created.alias("created_at"), pl.lit(False).alias("is_closed")).select(
        [pl.col(name).cast(dtype) for name, dtype in OPPORTUNITIES_SCHEMA.items()]
    )


def fetch_snapshot(
    conn: PipedriveConnection, http: httpx.Client, *, sleep: Callable[[float], None] = time.sleep
) -> CrmSnapshot:
    """Persons (every address), organizations (domain from `website` only) and open deals; see module doc.

    Raises CrmAuthError (reconnect needed), CrmQuotaExhausted (daily budget or persistent 429) or CrmError.
    """
    client = _PipedriveClient(conn, http, sleep)
    return CrmSnapshot(
        people=_people(client),
        accounts=_accounts(client),
        opportunities=_opportunities(client),
    )
