"""HubSpot CRM snapshot and changes over the CRM v3 API: list contacts, companies and deals with
`after` cursors (limit 100), every email (`email` + `hs_additional_emails`) and every domain (`domain` +
`hs_additional_domains`), open deals from the deal pipelines' stage metadata (`metadata.isClosed`), falling back
to `hs_is_closed == "false"` for a stage the metadata does not list. Lists are the non-archived records only, so
archived (deleted) records never enter the snapshot. The snapshot's `watermark` is the newest last-modified time
read (contacts `lastmodifieddate`, companies/deals `hs_lastmodifieddate`, else `updatedAt`).

`fetch_changes(since)` reads what changed since a point in time: contacts, companies and deals through the search
API (`lastmodifieddate` / `hs_lastmodifieddate` GTE since), records archived since then through the list
endpoint with `archived=true` (`archivedAt` >= since), and the company of each changed contact and deal through
the v4 associations batch read (search results carry no associations). Rows are built by the same functions as
the full snapshot. Every record read goes into `changed_ids`; archived records, closed deals and contacts left
without an address have no rows. Search indexing lags behind writes, so callers pass `since` = the stored
watermark minus an overlap of a few minutes (how long the lag lasts is not documented); re-reading a record is harmless.
Hard deletes, merges (the merged-away id is not reported as archived; not verified against HubSpot) and records purged
from the recycle bin after 90 days are caught only by the periodic full snapshot.

`search` pages the search API sorted by `hs_object_id` and re-windows (`hs_object_id GT last`, `after` reset)
before `after + limit` would pass HubSpot's hard 10,000-result cap.

Tokens are private-app (static) bearer tokens: a 401 is `CrmAuthError` (reconnect). 429: `Retry-After` when
sent, else the policy's window (10 s for TEN_SECONDLY_ROLLING, 1 s for SECONDLY) growing per attempt, bounded;
a DAILY 429 is `CrmQuotaExhausted` at once. 5xx and network errors are retried with backoff
(`rest.send_with_retry`).
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
    RETRY_STATUSES,
    RestClient,
    as_utc,
    backoff_delay,
    new_cursor,
    newest,
    parse_time,
    retry_after_seconds,
)
from o365sync.crm import CrmAuthError, CrmChanges, CrmError, CrmQuotaExhausted, CrmSnapshot, connection_settings

if TYPE_CHECKING:
    from o365sync.tenants import TenantConfig

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # per request, for 5xx / 429 / network errors
INCREMENTAL = True
POLICY_WINDOW_S = {"TEN_SECONDLY_ROLLING": 10.0, "TEN_SECONDLY": 10.0, "SECONDLY": 1.0}
LIST_LIMIT = 100
SEARCH_LIMIT = 200
SEARCH_CAP = 10_000
ASSOC_BATCH = 1_000  # v4 associations batch read: inputs per call

MODIFIED_PROP = {"contacts": "lastmodifieddate", "companies": "hs_lastmodifieddate", "deals": "hs_lastmodifieddate"}
CONTACT_PROPS = ("email", "hs_additional_emails", "firstname", "lastname", "lifecyclestage", "lastmodifieddate")
COMPANY_PROPS = ("name", "domain", "hs_additional_domains", "hs_lastmodifieddate")
DEAL_PROPS = ("dealname", "pipeline", "dealstage", "hs_is_closed", "createdate", "hs_lastmodifieddate")
# HUBSPOT_DEFINED association type ids of the primary company link (v4) and the v3 list's type name for it;
# an unlabeled link is 279 (contact) / 341 (deal), "<type>_to_company_unlabeled" in v3. [U: ids from HubSpot's
# association type table as used by integrations, not from the stored reference]
PRIMARY_COMPANY = {"contacts": (1, "contact_to_company"), "deals": (5, "deal_to_company")}


@dataclass
class HubSpotConnection:
    base_url: str  # https://api.hubapi.com
    access_token: str  # private-app token

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"HubSpotConnection(base_url={self.base_url!r})"


def connection(tenant: TenantConfig, secrets: dict[str, str]) -> HubSpotConnection:
    """API base URL from the tenant, the private-app token from its secrets."""
    crm = connection_settings(tenant)
    return HubSpotConnection(base_url=crm.login_url, access_token=stored_secret(tenant, secrets, "access_token"))


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


def _classify(resp: httpx.Response, attempt: int, last: bool) -> float | None:
    """`send_with_retry` rule: None for a usable answer, seconds to wait, or a raised CrmError."""
    status = resp.status_code
    if status < 400:
        return None
    code, policy = _error_fields(resp)
    message = f"hubspot: HTTP {status} {code or ''} {policy or ''}".rstrip()
    if status == 401:
        raise CrmAuthError(message, status=status, code=code)
    if status == 429 and policy == "DAILY":
        raise CrmQuotaExhausted(message, status=status, code=policy)
    if status not in RETRY_STATUSES:
        raise CrmError(message, status=status, code=code)
    if last:
        raise CrmError(message, status=status, code=policy or code)
    if status == 429:
        retry_after = retry_after_seconds(resp)
        if retry_after is not None:
            return retry_after
        window = POLICY_WINDOW_S.get(policy or "")
        if window is None:
            interval = resp.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds", "")
            window = int(interval) / 1000 if interval.isdigit() else 1.0
        return min(MAX_BACKOFF_S, window * 2 ** (attempt - 1))
    return backoff_delay(attempt)


class _HubSpotClient:
    def __init__(self, conn: HubSpotConnection, http: httpx.Client, sleep: Callable[[float], None]):
        self.base = conn.base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {conn.access_token}", "Accept": "application/json"}
        self.rest = RestClient("hubspot", http, _classify, sleep=sleep, max_attempts=MAX_ATTEMPTS)

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self.rest.json(method, self.base + path, headers=self.headers, **kwargs)

    def list_all(
        self,
        object_type: str,
        properties: tuple[str, ...],
        associations: str | None = None,
        *,
        limit: int = LIST_LIMIT,
        archived: bool = False,
    ) -> Iterator[dict[str, Any]]:
        params: dict[str, str] = {
            "limit": str(limit),
            "properties": ",".join(properties),
            "archived": "true" if archived else "false",
        }
        if associations:
            params["associations"] = associations
        seen: set[str] = set()
        while True:
            page = self.request("GET", f"/crm/v3/objects/{object_type}", params=params)
            yield from page.get("results") or []
            after = ((page.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return
            params["after"] = new_cursor(seen, after, "hubspot: paging cursor repeated")

    def search(
        self,
        object_type: str,
        filters: list[dict[str, Any]],
        properties: tuple[str, ...],
        *,
        limit: int = SEARCH_LIMIT,
        cap: int = SEARCH_CAP,
    ) -> Iterator[dict[str, Any]]:
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

    def companies_of(self, object_type: str, ids: list[str]) -> dict[str, str]:
        """{id: its primary company} through `POST /crm/v4/associations/{type}/companies/batch/read`, at most
        `ASSOC_BATCH` ids per call. Ids without a company come back as 207 errors (OBJECT_NOT_FOUND /
        NO_ASSOCIATIONS_FOUND) and are left out; any other error fails the read. Only each id's first page of
        links is read (a page holds hundreds; more than that per contact or deal is not expected)."""
        primary_type, _ = PRIMARY_COMPANY[object_type]
        out: dict[str, str] = {}
        for start in range(0, len(ids), ASSOC_BATCH):
            chunk = ids[start : start + ASSOC_BATCH]
            body = self.request(
                "POST",
                f"/crm/v4/associations/{object_type}/companies/batch/read",
                json={"inputs": [{"id": i} for i in chunk]},
            )
            for err in body.get("errors") or []:
                if not isinstance(err, dict) or err.get("category") != "OBJECT_NOT_FOUND":
                    code = err.get("category") if isinstance(err, dict) else None
                    raise CrmError(f"hubspot: association read error {code or ''}".rstrip(), code=code)
            for res in body.get("results") or []:
                targets = [t for t in res.get("to") or [] if t.get("toObjectId") is not None]
                if not targets:
                    continue
                chosen = next(
                    (
                        t
                        for t in targets
                        if any(
                            a.get("typeId") == primary_type or a.get("label") == "Primary"
                            for a in t.get("associationTypes") or []
                        )
                    ),
                    targets[0],
                )
                out[str((res.get("from") or {}).get("id"))] = str(chosen["toObjectId"])
        return out


# -- shared row building (full snapshot and changes) ---------------------------------------------------------


def _split(value: Any) -> list[str]:
    return [p for p in str(value or "").split(";") if p.strip()]


def _modified_at(object_type: str, rec: dict[str, Any]) -> datetime | None:
    props = rec.get("properties") or {}
    return parse_time(props.get(MODIFIED_PROP[object_type])) or parse_time(rec.get("updatedAt"))


def _watermark(object_type: str, records: Iterable[dict[str, Any]]) -> datetime | None:
    return newest(*(_modified_at(object_type, r) for r in records))


def _list_company(rec: dict[str, Any], object_type: str) -> str | None:
    """The company of a list record (`associations=companies`): the primary link when marked, else the first."""
    results = (((rec.get("associations") or {}).get("companies") or {}).get("results")) or []
    _, primary = PRIMARY_COMPANY[object_type]
    for link in results:
        if link.get("type") == primary:
            return str(link["id"])
    return str(results[0]["id"]) if results else None


def _people_rows(records: Iterable[tuple[dict[str, Any], str | None]]) -> pl.DataFrame:
    """One row per distinct address of each (contact, its company) pair; kind 'lead' for lifecyclestage lead."""
    cols: dict[str, list[Any]] = {"crm_id": [], "kind": [], "email": [], "account_id": [], "name": []}
    for rec, account in records:
        props = rec.get("properties") or {}
        kind = "lead" if (props.get("lifecyclestage") or "").strip().lower() == "lead" else "contact"
        name = " ".join(p for p in (props.get("firstname"), props.get("lastname")) if p).strip() or None
        seen: set[str] = set()
        for email in [props.get("email"), *_split(props.get("hs_additional_emails"))]:
            key = (email or "").strip().lower()
            if not key or key in seen:
                continue
            seen.add(key)
            for col, value in zip(cols, (str(rec["id"]), kind, email, account, name), strict=True):
                cols[col].append(value)
    return people_frame(pl.DataFrame(cols, schema={name: pl.String for name in cols}))


def _account_rows(records: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """One row per registrable domain of each company (a company without a domain: one row, domain null)."""
    cols: dict[str, list[Any]] = {"crm_id": [], "name": [], "domain": []}
    for rec in records:
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
    return accounts_frame(pl.DataFrame(cols, schema={name: pl.String for name in cols}))


def closed_stages(client: _HubSpotClient) -> dict[tuple[str, str], bool]:
    """{(pipeline id, stage id): is closed} from `metadata.isClosed` (a string)."""
    out: dict[tuple[str, str], bool] = {}
    for pipeline in client.request("GET", "/crm/v3/pipelines/deals").get("results") or []:
        for stage in pipeline.get("stages") or []:
            is_closed = str((stage.get("metadata") or {}).get("isClosed", "")).lower()
            if is_closed in ("true", "false"):
                out[(str(pipeline["id"]), str(stage["id"]))] = is_closed == "true"
    return out


def _is_closed(props: dict[str, Any], stages: dict[tuple[str, str], bool]) -> bool:
    closed = stages.get((str(props.get("pipeline")), str(props.get("dealstage"))))
    if closed is None:  # stage unknown to the metadata: HubSpot's calculated string boolean
        closed = str(props.get("hs_is_closed", "")).lower() != "false"
    return closed


def _opportunity_rows(
    records: Iterable[tuple[dict[str, Any], str | None]], stages: dict[tuple[str, str], bool]
) -> pl.DataFrame:
    """Open deals of the (deal, its company) pairs."""
    cols: dict[str, list[Any]] = {"crm_id": [], "account_id": [], "name": [], "created_at": []}
    for rec, account in records:
        props = rec.get("properties") or {}
        if _is_closed(props, stages):
            continue
        created = props.get("createdate") or rec.get("createdAt")
        cols["crm_id"].append(str(rec["id"]))
        cols["account_id"].append(account)
        cols["name"].append(props.get("dealname"))
        cols["created_at"].append(datetime.fromisoformat(str(created).replace("Z", "+00:00")))
    frame = pl.DataFrame(
        cols,
        schema={
            "crm_id": pl.String,
            "account_id": pl.String,
            "name": pl.String,
            "created_at": pl.Datetime("us", "UTC"),
        },
    )
    return opportunities_frame(frame.with_columns(pl.lit(False).alias("is_closed")))


# -- public entry points -------------------------------------------------------------------------------------


def fetch_snapshot(
    conn: HubSpotConnection,
    http: httpx.Client,
    *,
    sleep: Callable[[float], None] = time.sleep,
    page_limit: int = LIST_LIMIT,
) -> CrmSnapshot:
    """Contacts (lifecyclestage `lead` -> kind 'lead'), one people row per address; companies, one account row
    per domain; open deals; `watermark` = newest last-modified time read. Raises CrmAuthError,
    CrmQuotaExhausted (DAILY) or CrmError."""
    client = _HubSpotClient(conn, http, sleep)
    contacts = list(client.list_all("contacts", CONTACT_PROPS, "companies", limit=page_limit))
    companies = list(client.list_all("companies", COMPANY_PROPS, limit=page_limit))
    stages = closed_stages(client)
    deals = list(client.list_all("deals", DEAL_PROPS, "companies", limit=page_limit))
    return CrmSnapshot(
        people=_people_rows((r, _list_company(r, "contacts")) for r in contacts),
        accounts=_account_rows(companies),
        opportunities=_opportunity_rows(((r, _list_company(r, "deals")) for r in deals), stages),
        watermark=newest(
            _watermark("contacts", contacts), _watermark("companies", companies), _watermark("deals", deals)
        ),
    )


def _archived_since(
    client: _HubSpotClient, object_type: str, since: datetime, page_limit: int
) -> dict[str, datetime | None]:
    """{id: archivedAt} of the records archived at or after `since` (list endpoint, `archived=true`). A record
    without `archivedAt`/`updatedAt` is kept (removing an absent record is harmless)."""
    out: dict[str, datetime | None] = {}
    for rec in client.list_all(object_type, (MODIFIED_PROP[object_type],), limit=page_limit, archived=True):
        when = parse_time(rec.get("archivedAt")) or parse_time(rec.get("updatedAt"))
        if when is None or when >= since:
            out[str(rec["id"])] = when
    return out


def fetch_changes(
    conn: HubSpotConnection,
    http: httpx.Client,
    since: datetime,
    *,
    sleep: Callable[[float], None] = time.sleep,
    page_limit: int = LIST_LIMIT,
) -> CrmChanges:
    """Contacts, companies and deals modified or archived at or after `since` (see the module docstring).

    `watermark` = the newest last-modified / archivedAt time read (None when nothing was read). Raises
    CrmAuthError, CrmQuotaExhausted (DAILY) or CrmError."""
    since = as_utc(since)
    client = _HubSpotClient(conn, http, sleep)
    read: dict[str, list[dict[str, Any]]] = {}
    archived: dict[str, dict[str, datetime | None]] = {}
    props = {"contacts": CONTACT_PROPS, "companies": COMPANY_PROPS, "deals": DEAL_PROPS}
    for otype in ("contacts", "companies", "deals"):
        read[otype] = list(client.search(otype, [modified_since_filter(otype, since)], props[otype]))
    for otype in ("contacts", "companies", "deals"):  # after the searches: a record archived meanwhile is caught
        archived[otype] = _archived_since(client, otype, since, page_limit)
        read[otype] = [r for r in read[otype] if str(r["id"]) not in archived[otype]]  # the archive wins
    stages = closed_stages(client)
    contact_companies = client.companies_of("contacts", [str(r["id"]) for r in read["contacts"]])
    deal_companies = client.companies_of("deals", [str(r["id"]) for r in read["deals"]])
    changed = {
        key: {str(r["id"]) for r in read[otype]} | set(archived[otype])
        for key, otype in (("people", "contacts"), ("accounts", "companies"), ("opportunities", "deals"))
    }
    return CrmChanges(
        people=_people_rows((r, contact_companies.get(str(r["id"]))) for r in read["contacts"]),
        accounts=_account_rows(read["companies"]),
        opportunities=_opportunity_rows(((r, deal_companies.get(str(r["id"]))) for r in read["deals"]), stages),
        changed_ids=changed,
        watermark=newest(
            *(_watermark(o, read[o]) for o in read), *(t for gone in archived.values() for t in gone.values())
        ),
    )


def search_people(
    conn: HubSpotConnection,
    http: httpx.Client,
    filters: list[dict[str, Any]],
    *,
    sleep: Callable[[float], None] = time.sleep,
    cap: int = SEARCH_CAP,
) -> pl.DataFrame:
    """People rows for the contacts matching AND-ed search `filters` (e.g. `lastmodifieddate GTE <ms>`),
    complete beyond the 10,000-result cap, with their companies from the v4 associations batch read."""
    client = _HubSpotClient(conn, http, sleep)
    contacts = list(client.search("contacts", filters, CONTACT_PROPS, cap=cap))
    companies = client.companies_of("contacts", [str(r["id"]) for r in contacts])
    return _people_rows((r, companies.get(str(r["id"]))) for r in contacts)


def modified_since_filter(object_type: str, since: datetime) -> dict[str, Any]:
    """`lastmodifieddate` (contacts) / `hs_lastmodifieddate` (companies, deals) GTE `since`, as ms epoch."""
    return {"propertyName": MODIFIED_PROP[object_type], "operator": "GTE", "value": str(int(since.timestamp() * 1000))}
