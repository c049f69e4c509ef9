"""HubSpot CRM snapshot over the CRM v3 API (crm_apis.md §2): list contacts, companies and deals with `after`
cursors (limit 100), every email (`email` + `hs_additional_emails`) and every domain (`domain` +
`hs_additional_domains`), open deals from the deal pipelines' stage metadata (`metadata.isClosed`), falling back
to `hs_is_closed == "false"` for a stage the metadata does not list. Lists are the non-archived records only, so
archived (deleted) records never enter the snapshot.

`search` pages the search API sorted by `hs_object_id` and re-windows (`hs_object_id GT last`, `after` reset)
before `after + limit` would pass HubSpot's hard 10,000-result cap.

Tokens are private-app (static) bearer tokens: a 401 is `CrmAuthError` (reconnect). 429: `Retry-After` when
sent, else the policy's window (10 s for TEN_SECONDLY_ROLLING, 1 s for SECONDLY) growing per attempt, bounded;
a DAILY 429 is `CrmQuotaExhausted` at once. 5xx and network errors are retried with backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import polars as pl

from crm_adapters.base import (
    ACCOUNTS_SCHEMA,
    OPPORTUNITIES_SCHEMA,
    CrmAuthError,
    CrmError,
    CrmQuotaExhausted,
    CrmSnapshot,
    people_frame,
    website_domain,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # per request, for 5xx / 429 / network errors
BACKOFF_S = 0.5  # 5xx / network: doubles per attempt
MAX_BACKOFF_S = 30.0
POLICY_WINDOW_S = {"TEN_SECONDLY_ROLLING": 10.0, "TEN_SECONDLY": 10.0, "SECONDLY": 1.0}
LIST_LIMIT = 100
SEARCH_LIMIT = 200
SEARCH_CAP = 10_000
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

CONTACT_PROPS = ("email", "hs_additional_emails", "firstname", "lastname", "lifecyclestage")
COMPANY_PROPS = ("name", "domain", "hs_additional_domains")
DEAL_PROPS = ("dealname", "pipeline", "dealstage", "hs_is_closed", "createdate")


@dataclass
class HubSpotConnection:
    base_url: str  # https://api.hubapi.com
    access_token: str  # private-app token

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"HubSpotConnection(base_url={self.base_url!r})"


def _error_fields(resp: httpx.Response) -> tuple[str | None, str | None]:
    """(category or errorType, policyName) of a HubSpot error body."""
    try:
        body = resp.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("category") or body.get("errorType")
    policy = body.get("policyName")
    return (code if isinstance(code, str) else None), (policy if isinstance(policy, str) else None)


class _HubSpotClient:
    def __init__(self, conn: HubSpotConnection, http: httpx.Client, sleep: Callable[[float], None]):
        self.base = conn.base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {conn.access_token}", "Accept": "application/json"}
        self.http = http
        self.sleep = sleep

    def _delay(self, resp: httpx.Response | None, policy: str | None, attempt: int) -> float:
        if resp is not None and resp.status_code == 429:
            retry_after = resp.headers.get("Retry-After", "").strip()
            if retry_after.isdigit():
                return min(MAX_BACKOFF_S, float(retry_after))
            window = POLICY_WINDOW_S.get(policy or "")
            if window is None:
                interval = resp.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds", "")
                window = int(interval) / 1000 if interval.isdigit() else 1.0
            return min(MAX_BACKOFF_S, window * 2 ** (attempt - 1))
        return min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1))

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self.base + path
        for attempt in range(1, MAX_ATTEMPTS + 1):
            resp: httpx.Response | None = None
            policy: str | None = None
            try:
                resp = self.http.request(method, url, headers=self.headers, **kwargs)
            except httpx.TransportError as exc:
                if attempt == MAX_ATTEMPTS:
                    raise CrmError(f"hubspot: network error {type(exc).__name__}") from exc
                log.warning("hubspot: %s on attempt %d, retrying", type(exc).__name__, attempt)
            else:
                status = resp.status_code
                if status < 400:
                    try:
                        body = resp.json()
                    except ValueError as exc:
                        raise CrmError(f"hubspot: HTTP {status} non-JSON body", status=status) from exc
                    if not isinstance(body, dict):
                        raise CrmError("hubspot: unexpected response shape", status=status)
                    return body
                code, policy = _error_fields(resp)
                message = f"hubspot: HTTP {status} {code or ''} {policy or ''}".rstrip()
                if status == 401:
                    raise CrmAuthError(message, status=status, code=code)
                if status == 429 and policy == "DAILY":
                    raise CrmQuotaExhausted(message, status=status, code=policy)
                if status not in _RETRY_STATUSES:
                    raise CrmError(message, status=status, code=code)
                if attempt == MAX_ATTEMPTS:
                    raise CrmError(message, status=status, code=policy or code)
                log.warning("hubspot: HTTP %d %s on attempt %d, retrying", status, policy or "", attempt)
            self.sleep(self._delay(resp, policy, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def list_all(self, object_type: str, properties: tuple[str, ...], associations: str | None = None,
                 *, limit: int = LIST_LIMIT, archived: bool = False) -> Iterator[dict[str, Any]]:
        params: dict[str, str] = {"limit": str(limit), "properties": ",".join(properties),
                                  "archived": "true" if archived else "false"}
        if associations:
            params["associations"] = associations
        seen: set[str] = set()
        while True:
            page = self.request("GET", f"/crm/v3/objects/{object_type}", params=params)
            yield from page.get("results") or []
            after = ((page.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return
            if after in seen:
                raise CrmError("hubspot: paging cursor repeated")
            seen.add(str(after))
            params["after"] = str(after)

    def search(self, object_type: str, filters: list[dict[str, Any]], properties: tuple[str, ...],
               *, limit: int = SEARCH_LIMIT, cap: int = SEARCH_CAP) -> Iterator[dict[str, Any]]:
        """Every match of AND-ed `filters`, by ascending id, re-windowed on hs_object_id before the cap."""
        last_id: int | None = None
        after = 0
        while True:
            window = list(filters)
            if last_id is not None:
                window.append({"propertyName": "hs_object_id", "operator": "GT", "value": str(last_id)})
            body: dict[str, Any] = {
                "filterGroups": [{"filters": window}] if window else [],
                "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
                "properties": list(properties),
                "limit": limit,
                "after": str(after),
            }
            page = self.request("POST", f"/crm/v3/objects/{object_type}/search", json=body)
            results = page.get("results") or []
            yield from results
            nxt = ((page.get("paging") or {}).get("next") or {}).get("after")
            if not nxt or not results:
                return
            if int(nxt) + limit > cap:  # the next page would be refused: start a new window after the last id
                last_id, after = int(results[-1]["id"]), 0
            else:
                after = int(nxt)


def _split(value: Any) -> list[str]:
    return [p for p in str(value or "").split(";") if p.strip()]


def _first_company(rec: dict[str, Any]) -> str | None:
    results = (((rec.get("associations") or {}).get("companies") or {}).get("results")) or []
    return str(results[0]["id"]) if results else None


def _people_rows(records: Iterator[dict[str, Any]]) -> pl.DataFrame:
    cols: dict[str, list[Any]] = {"crm_id": [], "kind": [], "email": [], "account_id": [], "name": []}
    for rec in records:
        props = rec.get("properties") or {}
        kind = "lead" if (props.get("lifecyclestage") or "").strip().lower() == "lead" else "contact"
        name = " ".join(p for p in (props.get("firstname"), props.get("lastname")) if p).strip() or None
        account = _first_company(rec)
        seen: set[str] = set()
        for email in [props.get("email"), *_split(props.get("hs_additional_emails"))]:
            key = (email or "").strip().lower()
            if not key or key in seen:
                continue
            seen.add(key)
            for col, value in zip(cols, (str(rec["id"]), kind, email, account, name), strict=True):
                cols[col].append(value)
    return people_frame(pl.DataFrame(cols, schema={name: pl.String for name in cols}))


def _accounts(client: _HubSpotClient, limit: int) -> pl.DataFrame:
    cols: dict[str, list[Any]] = {"crm_id": [], "name": [], "domain": []}
    for rec in client.list_all("companies", COMPANY_PROPS, limit=limit):
        props = rec.get("properties") or {}
        domains: list[str | None] = []
        for raw in [props.get("domain"), *_split(props.get("hs_additional_domains"))]:
            domain = website_domain(raw)
            if domain and domain not in domains:
                domains.append(domain)
        for domain in domains or [None]:  # a company without a domain still is an account
            cols["crm_id"].append(str(rec["id"]))
            cols["name"].append(props.get("name"))
            cols["domain"].append(domain)
    return pl.DataFrame(cols, schema=ACCOUNTS_SCHEMA)


def closed_stages(client: _HubSpotClient) -> dict[tuple[str, str], bool]:
    """{(pipeline id, stage id): is closed} from `metadata.isClosed` (a string)."""
    out: dict[tuple[str, str], bool] = {}
    for pipeline in client.request("GET", "/crm/v3/pipelines/deals").get("results") or []:
        for stage in pipeline.get("stages") or []:
            is_closed = str((stage.get("metadata") or {}).get("isClosed", "")).lower()
            if is_closed in ("true", "false"):
                out[(str(pipeline["id"]), str(stage["id"]))] = is_closed == "true"
    return out


def _opportunities(client: _HubSpotClient, limit: int) -> pl.DataFrame:
    stages = closed_stages(client)
    cols: dict[str, list[Any]] = {"crm_id": [], "account_id": [], "name": [], "created_at": []}
    for rec in client.list_all("deals", DEAL_PROPS, "companies", limit=limit):
        props = rec.get("properties") or {}
        closed = stages.get((str(props.get("pipeline")), str(props.get("dealstage"))))
        if closed is None:  # stage unknown to the metadata: HubSpot's calculated string boolean
            closed = str(props.get("hs_is_closed", "")).lower() != "false"
        if closed:
            continue
        created = props.get("createdate") or rec.get("createdAt")
        cols["crm_id"].append(str(rec["id"]))
        cols["account_id"].append(_first_company(rec))
        cols["name"].append(props.get("dealname"))
        cols["created_at"].append(datetime.fromisoformat(str(created).replace("Z", "+00:00")))
    frame = pl.DataFrame(
        cols, schema={"crm_id": pl.String, "account_id": pl.String, "name": pl.String,
                      "created_at": pl.Datetime("us", "UTC")}
    )
    return frame.with_columns(pl.lit(False).alias("is_closed")).select(
        [pl.col(name).cast(dtype) for name, dtype in OPPORTUNITIES_SCHEMA.items()]
    )


def fetch_snapshot(
    conn: HubSpotConnection,
    http: httpx.Client,
    *,
    sleep: Callable[[float], None] = time.sleep,
    page_limit: int = LIST_LIMIT,
) -> CrmSnapshot:
    """Contacts (lifecyclestage `lead` -> kind 'lead'), one people row per address; companies, one account row
    per domain; open deals. Raises CrmAuthError, CrmQuotaExhausted (DAILY) or CrmError."""
    client = _HubSpotClient(conn, http, sleep)
    people = _people_rows(client.list_all("contacts", CONTACT_PROPS, "companies", limit=page_limit))
    return CrmSnapshot(
        people=people,
        accounts=_accounts(client, page_limit),
        opportunities=_opportunities(client, page_limit),
    )


def search_people(
    conn: HubSpotConnection,
    http: httpx.Client,
    filters: list[dict[str, Any]],
    *,
    sleep: Callable[[float], None] = time.sleep,
    cap: int = SEARCH_CAP,
) -> pl.DataFrame:
    """People rows for the contacts matching AND-ed search `filters` (e.g. `lastmodifieddate GTE <ms>` for an
    incremental refresh), complete beyond the 10,000-result cap. No company links (search returns none)."""
    client = _HubSpotClient(conn, http, sleep)
    return _people_rows(client.search("contacts", filters, CONTACT_PROPS, cap=cap))


def modified_since_filter(object_type: str, since: datetime) -> dict[str, Any]:
    """`lastmodifieddate` (contacts) / `hs_lastmodifieddate` (companies, deals) GTE `since`, as ms epoch."""
    prop = "lastmodifieddate" if object_type == "contacts" else "hs_lastmodifieddate"
    return {"propertyName": prop, "operator": "GTE", "value": str(int(since.timestamp() * 1000))}
