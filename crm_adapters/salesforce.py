"""Salesforce CRM snapshot over the REST API (crm_apis.md §1): refresh-token grant for a session, then SOQL
`query` pages followed through `nextRecordsUrl` until `done`, streamed page by page into column lists.

Salesforce sends no `expires_in`, so the session is refreshed when a call answers 401 (once per call).
5xx, 429 and network errors are retried a few times with backoff; 403 REQUEST_LIMIT_EXCEEDED is the rolling
daily cap and is raised at once as `CrmQuotaExhausted`; `invalid_grant` means the tenant must reconnect.
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
    CrmAuthError,
    CrmError,
    CrmQuotaExhausted,
    CrmSnapshot,
    people_frame,
    website_domain,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4  # per request, for 5xx / 429 / network errors
BACKOFF_S = 0.5  # doubles per attempt; Retry-After wins when given (capped)
MAX_BACKOFF_S = 30.0
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

CONTACTS_SOQL = "SELECT Id, FirstName, LastName, Email, AccountId FROM Contact WHERE Email != null"
# Converted leads survive as rows with IsConverted = true; their person is a Contact now (trap 5).
LEADS_SOQL = "SELECT Id, FirstName, LastName, Email FROM Lead WHERE IsConverted = false AND Email != null"
ACCOUNTS_SOQL = "SELECT Id, Name, Website FROM Account"
OPEN_OPPORTUNITIES_SOQL = (
    "SELECT Id, Name, AccountId, IsClosed, CreatedDate FROM Opportunity WHERE IsClosed = false"
)


@dataclass
class SalesforceConnection:
    login_url: str  # https://login.salesforce.com, test.salesforce.com or the org's My Domain
    client_id: str
    client_secret: str
    refresh_token: str
    api_version: str = "59.0"

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"SalesforceConnection(login_url={self.login_url!r}, api_version={self.api_version!r})"


def _error_code(resp: httpx.Response) -> str | None:
    """errorCode of a Salesforce array body, or `error` of an OAuth body."""
    try:
        body = resp.json()
    except ValueError:
        return None
    if isinstance(body, list) and body and isinstance(body[0], dict):
        code = body[0].get("errorCode")
        return code if isinstance(code, str) else None
    if isinstance(body, dict):
        code = body.get("error") or body.get("errorCode")
        return code if isinstance(code, str) else None
    return None


class _SalesforceClient:
    def __init__(self, conn: SalesforceConnection, http: httpx.Client, sleep: Callable[[float], None]):
        self.conn = conn
        self.http = http
        self.sleep = sleep
        self.refresh_token = conn.refresh_token
        self.rotated: str | None = None
        self.access_token: str | None = None
        self.instance_url = ""
        self.version = conn.api_version.lstrip("vV")

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One logical request, retried on 5xx/429/network errors with exponential backoff."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1))
            try:
                resp = self.http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt == MAX_ATTEMPTS:
                    raise CrmError(f"salesforce: network error {type(exc).__name__}") from exc
                log.warning("salesforce: %s on attempt %d, retrying", type(exc).__name__, attempt)
            else:
                if resp.status_code not in _RETRY_STATUSES:
                    return resp
                code = _error_code(resp)
                if attempt == MAX_ATTEMPTS:
                    raise CrmError(
                        f"salesforce: HTTP {resp.status_code} {code or ''}".rstrip(),
                        status=resp.status_code,
                        code=code,
                    )
                retry_after = resp.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    delay = min(MAX_BACKOFF_S, float(retry_after))
                log.warning("salesforce: HTTP %d on attempt %d, retrying", resp.status_code, attempt)
            self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def refresh(self) -> None:
        url = f"{self.conn.login_url.rstrip('/')}/services/oauth2/token"
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self.refresh_token,
            "client_id": self.conn.client_id,
            "client_secret": self.conn.client_secret,
        }
        resp = self._send("POST", url, data=form, headers={"Accept": "application/json"})
        if resp.status_code != 200:
            code = _error_code(resp)
            message = f"salesforce token refresh: HTTP {resp.status_code} {code or ''}".rstrip()
            if code == "invalid_grant":
                raise CrmAuthError(message, status=resp.status_code, code=code)
            raise CrmError(message, status=resp.status_code, code=code)
        try:
            body = resp.json()
            access_token, instance_url = body["access_token"], body["instance_url"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CrmError("salesforce token refresh: malformed token response") from exc
        self.access_token = str(access_token)
        self.instance_url = str(instance_url).rstrip("/")
        new_rt = body.get("refresh_token")
        if new_rt and new_rt != self.refresh_token:  # rotation: the old refresh token is now invalid
            self.refresh_token = self.rotated = str(new_rt)
            log.info("salesforce: refresh token rotated")

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET `{instance_url}{path}`; a 401 refreshes the session once and retries."""
        if not path.startswith("/"):
            raise CrmError("salesforce: unexpected non-relative resource URL")
        if self.access_token is None:
            self.refresh()
        refreshed = False
        while True:
            url = self.instance_url + path  # re-read: a refresh may move the instance
            headers = {"Authorization": f"Bearer {self.access_token}", "Accept": "application/json"}
            resp = self._send("GET", url, params=params, headers=headers)
            if resp.status_code == 401 and not refreshed:
                log.info("salesforce: session expired (%s), refreshing", _error_code(resp))
                self.refresh()
                refreshed = True
                continue
            if resp.status_code >= 400:
                code = _error_code(resp)
                message = f"salesforce: HTTP {resp.status_code} {code or ''}".rstrip()
                if resp.status_code == 403 and code == "REQUEST_LIMIT_EXCEEDED":
                    raise CrmQuotaExhausted(message, status=403, code=code)
                if resp.status_code == 401:
                    raise CrmAuthError(message + " after token refresh", status=401, code=code)
                raise CrmError(message, status=resp.status_code, code=code)
            usage = resp.headers.get("Sforce-Limit-Info")
            if usage:
                log.debug("salesforce: %s", usage)
            try:
                body = resp.json()
            except ValueError as exc:
                raise CrmError(f"salesforce: HTTP {resp.status_code} non-JSON body") from exc
            if not isinstance(body, dict):
                raise CrmError("salesforce: unexpected response shape")
            return body

    def query(self, soql: str) -> Iterator[list[dict[str, Any]]]:
        """Yield the records of each page of `soql`, following nextRecordsUrl until done."""
        page = self.get(f"/services/data/v{self.version}/query", params={"q": soql})
        seen: set[str] = set()
        while True:
            yield page.get("records") or []
            if page.get("done", True):
                return
            next_url = page.get("nextRecordsUrl")
            if not next_url or next_url in seen:
                raise CrmError("salesforce: done=false without a new nextRecordsUrl")
            seen.add(next_url)
            page = self.get(next_url)


def _columns(client: _SalesforceClient, soql: str, fields: dict[str, str]) -> dict[str, list[Any]]:
    """Stream every page of `soql` into one list per output column ({output column: Salesforce field})."""
    cols: dict[str, list[Any]] = {out: [] for out in fields}
    for records in client.query(soql):
        for rec in records:
            for out, src in fields.items():
                cols[out].append(rec.get(src))
    return cols


def _people(client: _SalesforceClient, soql: str, kind: str, with_account: bool) -> pl.DataFrame:
    fields = {"crm_id": "Id", "first": "FirstName", "last": "LastName", "email": "Email"}
    if with_account:
        fields["account_id"] = "AccountId"
    cols = _columns(client, soql, fields)
    frame = pl.DataFrame(cols, schema={name: pl.String for name in cols})
    name = pl.concat_str(["first", "last"], separator=" ", ignore_nulls=True).str.strip_chars()
    account = pl.col("account_id") if with_account else pl.lit(None, pl.String)
    return people_frame(
        frame.with_columns(
            pl.lit(kind, pl.String).alias("kind"), account.alias("account_id"), name.alias("name")
        )
    )


def _accounts(client: _SalesforceClient) -> pl.DataFrame:
    cols: dict[str, list[Any]] = {"crm_id": [], "name": [], "domain": []}
    for records in client.query(ACCOUNTS_SOQL):
        for rec in records:
            cols["crm_id"].append(rec.get("Id"))
            cols["name"].append(rec.get("Name"))
            cols["domain"].append(website_domain(rec.get("Website")))
    return pl.DataFrame(cols, schema=ACCOUNTS_SCHEMA)


def _opportunities(client: _SalesforceClient) -> pl.DataFrame:
    fields = {
        "crm_id": "Id",
        "account_id": "AccountId",
        "name": "Name",
        "is_closed": "IsClosed",
        "created_at": "CreatedDate",
    }
    cols = _columns(client, OPEN_OPPORTUNITIES_SOQL, fields)
    frame = pl.DataFrame(cols, schema={**{k: pl.String for k in fields}, "is_closed": pl.Boolean})
    created = (
        pl.col("created_at")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us")
        .dt.convert_time_zone("UTC")
    )
    return frame.with_columns(created.alias("created_at")).select(
        [pl.col(name).cast(dtype) for name, dtype in OPPORTUNITIES_SCHEMA.items()]
    )


def fetch_snapshot(
    conn: SalesforceConnection, http: httpx.Client, *, sleep: Callable[[float], None] = time.sleep
) -> CrmSnapshot:
    """Contacts and unconverted leads with an email, accounts (domain from Website) and open opportunities.

    Raises CrmAuthError (reconnect needed), CrmQuotaExhausted (daily API cap) or CrmError. If the org rotates
    refresh tokens, `rotated_refresh_token` carries the new one, which must be persisted even when a later
    step fails -- so on error it is also attached to the exception as `rotated_refresh_token`.
    """
    client = _SalesforceClient(conn, http, sleep)
    try:
        contacts = _people(client, CONTACTS_SOQL, "contact", with_account=True)
        leads = _people(client, LEADS_SOQL, "lead", with_account=False)
        accounts = _accounts(client)
        opportunities = _opportunities(client)
    except CrmError as exc:
        exc.rotated_refresh_token = client.rotated
        raise
    return CrmSnapshot(
        people=pl.concat([contacts, leads], how="vertical"),
        accounts=accounts,
        opportunities=opportunities,
        rotated_refresh_token=client.rotated,
    )
