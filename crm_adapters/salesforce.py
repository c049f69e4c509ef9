"""Salesforce CRM over the REST API: refresh-token grant for a session, `describe` of Contact, Lead
and Account, then SOQL `query` (full snapshot) or `queryAll` (changes since a SystemModstamp) pages followed through
`nextRecordsUrl` until `done`, streamed page by page into column lists.

Salesforce sends no `expires_in`, so the session is refreshed when a call answers 401 (once per call).
5xx, 429 and network errors are retried a few times with backoff (`rest.send_with_retry`); 403
REQUEST_LIMIT_EXCEEDED is the rolling daily cap and is raised at once as `CrmQuotaExhausted`; `invalid_grant` means
the tenant must reconnect.

Describe first (trap 14): every email-type field of Contact and Lead is read (standard Email plus custom ones such
as Secondary_Email__c; each address is a people row with the record's Id), and person accounts are used only when
Account describes `IsPersonAccount` -- selecting PersonEmail in an org without them fails with INVALID_FIELD.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import polars as pl

from crm_adapters.base import opportunities_frame, people_frame, stored_secret, website_domain
from crm_adapters.rest import (
    RETRY_STATUSES,
    RestClient,
    backoff_delay,
    json_object,
    new_cursor,
    newest,
    parse_time,
    retry_after_seconds,
    utc_seconds,
)
from o365sync.crm import (
    ACCOUNTS_SCHEMA,
    OPPORTUNITIES_SCHEMA,
    CrmAuthError,
    CrmChanges,
    CrmError,
    CrmQuotaExhausted,
    CrmSnapshot,
    connection_settings,
)

if TYPE_CHECKING:
    from o365sync.tenants import TenantConfig

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4  # per request, for 5xx / 429 / network errors
INCREMENTAL = True


@dataclass
class SalesforceConnection:
    login_url: str  # https://login.salesforce.com, test.salesforce.com or the org's My Domain
    client_id: str
    client_secret: str
    refresh_token: str
    api_version: str = "59.0"

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"SalesforceConnection(login_url={self.login_url!r}, api_version={self.api_version!r})"


def connection(tenant: TenantConfig, secrets: dict[str, str]) -> SalesforceConnection:
    """Login host, client id and API version from the tenant; client secret and refresh token from its secrets."""
    crm = connection_settings(tenant)
    return SalesforceConnection(
        login_url=crm.login_url,
        client_id=crm.client_id,
        client_secret=secrets.get("client_secret", ""),
        refresh_token=stored_secret(tenant, secrets, "refresh_token"),
        api_version=crm.api_version,
    )


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
        self.rest = RestClient("salesforce", http, self._classify, sleep=sleep, max_attempts=MAX_ATTEMPTS)
        self.refresh_token = conn.refresh_token
        self.rotated: str | None = None
        self.access_token: str | None = None
        self.instance_url = ""
        self.version = conn.api_version.lstrip("vV")

    @staticmethod
    def _classify(resp: httpx.Response, attempt: int, last: bool) -> float | None:
        if resp.status_code not in RETRY_STATUSES:
            return None
        if last:
            code = _error_code(resp)
            message = f"salesforce: HTTP {resp.status_code} {code or ''}".rstrip()
            raise CrmError(message, status=resp.status_code, code=code)
        retry_after = retry_after_seconds(resp)
        return retry_after if retry_after is not None else backoff_delay(attempt)

    def refresh(self) -> None:
        url = f"{self.conn.login_url.rstrip('/')}/services/oauth2/token"
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self.refresh_token,
            "client_id": self.conn.client_id,
            "client_secret": self.conn.client_secret,
        }
        resp = self.rest.send("POST", url, data=form, headers={"Accept": "application/json"})
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
            resp = self.rest.send("GET", url, params=params, headers=headers)
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
            return json_object("salesforce", resp)

    def query(self, soql: str, endpoint: str = "query") -> Iterator[list[dict[str, Any]]]:
        """Yield the records of each page of `soql` (`query`, or `queryAll` to include the recycle bin),
        following nextRecordsUrl until done."""
        page = self.get(f"/services/data/v{self.version}/{endpoint}", params={"q": soql})
        seen: set[str] = set()
        while True:
            yield page.get("records") or []
            if page.get("done", True):
                return
            page = self.get(
                new_cursor(seen, page.get("nextRecordsUrl"), "salesforce: done=false without a new nextRecordsUrl")
            )

    def describe(self, sobject: str) -> dict[str, str]:
        """{field name: describe type} of `sobject`, in describe order."""
        body = self.get(f"/services/data/v{self.version}/sobjects/{sobject}/describe")
        fields = body.get("fields")
        if not isinstance(fields, list):
            raise CrmError(f"salesforce: {sobject} describe without fields")
        return {f["name"]: str(f.get("type")) for f in fields if isinstance(f, dict) and isinstance(f.get("name"), str)}


# ----------------------------------------------------------------------------------------------------
# What to read: one `_Source` per sObject, used by the full snapshot and the incremental read alike.


def _email_fields(fields: dict[str, str], keep: Callable[[str], bool] = lambda _: True) -> tuple[str, ...]:
    """The email-type fields, standard Email (or PersonEmail) first."""
    found = [name for name, ftype in fields.items() if ftype == "email" and keep(name)]
    return tuple(sorted(found, key=lambda name: (name not in ("Email", "PersonEmail"), found.index(name))))


_PERSON_COLUMNS = ("crm_id", "kind", "email", "account_id", "first", "last", "name")


class _Rows:
    """Column lists of the three frames, filled record by record (the per-record path is kept to plain appends:
    at 1M records every microsecond per record is a second of CPU; names are joined in Polars)."""

    def __init__(self) -> None:
        self.people: dict[str, list[Any]] = {name: [] for name in _PERSON_COLUMNS}
        self.accounts: dict[str, list[Any]] = {name: [] for name in ACCOUNTS_SCHEMA}
        self.opportunities: dict[str, list[Any]] = {name: [] for name in OPPORTUNITIES_SCHEMA}

    def person(
        self, rec: dict[str, Any], kind: str, emails: tuple[str, ...], account_id: str | None, name: str | None = None
    ) -> None:
        """One row per address field (blanks and duplicates are dropped in `frames`); `name` None: First Last."""
        p = self.people
        for email_field in emails:
            p["crm_id"].append(rec["Id"])
            p["kind"].append(kind)
            p["email"].append(rec.get(email_field))
            p["account_id"].append(account_id)
            p["first"].append(rec.get("FirstName"))
            p["last"].append(rec.get("LastName"))
            p["name"].append(name)

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        raw = pl.DataFrame(self.people, schema={n: pl.String for n in _PERSON_COLUMNS})
        joined = pl.concat_str(["first", "last"], separator=" ", ignore_nulls=True).str.strip_chars()
        people = people_frame(raw.with_columns(pl.coalesce("name", joined).alias("name")))
        people = people.unique(subset=["crm_id", "kind", "email"], keep="first", maintain_order=True)
        accounts = pl.DataFrame(self.accounts, schema=ACCOUNTS_SCHEMA)
        opps = pl.DataFrame(
            self.opportunities, schema={**{n: pl.String for n in OPPORTUNITIES_SCHEMA}, "is_closed": pl.Boolean}
        )
        created = (
            pl.col("created_at").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us").dt.convert_time_zone("UTC")
        )
        return people, accounts, opportunities_frame(opps.with_columns(created.alias("created_at")))


@dataclass(frozen=True)
class _Source:
    sobject: str
    fields: tuple[str, ...]  # selected; always Id, IsDeleted and SystemModstamp
    scope: str | None  # WHERE of the full snapshot: `in_scope` in SOQL ("" = everything, None = nothing to read)
    in_scope: Callable[[dict[str, Any]], bool]  # applied to every record read, full or incremental
    emit: Callable[[dict[str, Any], _Rows], None]  # frame rows of one in-scope record
    changed: tuple[str, ...]  # changed_ids keys its Ids belong to


_BASE_FIELDS = ("Id", "IsDeleted", "SystemModstamp")


def _any_email(emails: tuple[str, ...]) -> str | None:
    return "(" + " OR ".join(f"{name} != null" for name in emails) + ")" if emails else None


def _sources(client: _SalesforceClient) -> list[_Source]:
    """Describe Contact, Lead and Account, then say what to select and which records are in scope."""
    contact_fields, lead_fields = client.describe("Contact"), client.describe("Lead")
    account_fields = client.describe("Account")
    contact_emails, lead_emails = _email_fields(contact_fields), _email_fields(lead_fields)
    person_accounts = "IsPersonAccount" in account_fields
    # A person account's person contact is a Contact row too (IsPersonAccount = true); the person is read once,
    # from the Account, with the Account Id (a person account is one Account plus one Contact). Contact.IsPersonAccount
    # exists exactly when person accounts are enabled; checked separately to be safe.
    contact_person_flag = "IsPersonAccount" in contact_fields
    # Person-account addresses: PersonEmail and custom person fields (`__pc`); business `__c` email fields of an
    # Account are not a person's address and are not read.
    person_emails = (
        _email_fields(account_fields, lambda n: n == "PersonEmail" or n.endswith("__pc")) if person_accounts else ()
    )

    contact_scope = _any_email(contact_emails)
    if contact_scope and contact_person_flag:
        contact_scope += " AND IsPersonAccount = false"
    lead_scope = _any_email(lead_emails)

    def contact(rec: dict[str, Any], rows: _Rows) -> None:
        rows.person(rec, "contact", contact_emails, rec.get("AccountId"))

    def lead(rec: dict[str, Any], rows: _Rows) -> None:
        rows.person(rec, "lead", lead_emails, None)

    def account(rec: dict[str, Any], rows: _Rows) -> None:
        # Every account, person accounts included, is an account row; its domain comes from Website only, so a
        # person account without a website never matches by domain.
        rows.accounts["crm_id"].append(rec["Id"])
        rows.accounts["name"].append(rec.get("Name"))
        rows.accounts["domain"].append(website_domain(rec.get("Website")))
        if rec.get("IsPersonAccount"):
            rows.person(rec, "person_account", person_emails, rec["Id"], rec.get("Name") or "")

    def opportunity(rec: dict[str, Any], rows: _Rows) -> None:
        for column, src in (
            ("crm_id", "Id"),
            ("account_id", "AccountId"),
            ("name", "Name"),
            ("is_closed", "IsClosed"),
            ("created_at", "CreatedDate"),
        ):
            rows.opportunities[column].append(rec.get(src))

    def live(rec: dict[str, Any]) -> bool:
        return not rec.get("IsDeleted")

    return [
        _Source(
            "Contact",
            (*_BASE_FIELDS, "FirstName", "LastName", "AccountId", *contact_emails)
            + (("IsPersonAccount",) if contact_person_flag else ()),
            contact_scope,
            lambda r: live(r) and not r.get("IsPersonAccount"),
            contact,
            ("people",),
        ),
        _Source(
            # Converted leads stay as rows with IsConverted = true; their person is a Contact now (trap 5).
            "Lead",
            (*_BASE_FIELDS, "FirstName", "LastName", "IsConverted", *lead_emails),
            f"IsConverted = false AND {lead_scope}" if lead_scope else None,
            lambda r: live(r) and not r.get("IsConverted"),
            lead,
            ("people",),
        ),
        _Source(
            "Account",
            (*_BASE_FIELDS, "Name", "Website") + (("IsPersonAccount", *person_emails) if person_accounts else ()),
            "",
            live,
            account,
            ("accounts", "people") if person_accounts else ("accounts",),
        ),
        _Source(
            "Opportunity",
            (*_BASE_FIELDS, "Name", "AccountId", "IsClosed", "CreatedDate"),
            "IsClosed = false",
            lambda r: live(r) and not r.get("IsClosed"),
            opportunity,
            ("opportunities",),
        ),
    ]


def _read(
    client: _SalesforceClient,
    source: _Source,
    where: str,
    rows: _Rows,
    *,
    endpoint: str = "query",
    ids: set[str] | None = None,
    order: str = "",
) -> datetime | None:
    """Read `source` (optionally filtered by `where`), emit its in-scope records into `rows`, collect every Id read
    into `ids`; returns the newest SystemModstamp read."""
    soql = f"SELECT {', '.join(source.fields)} FROM {source.sobject}"
    if where:
        soql += f" WHERE {where}"
    soql += order
    # Salesforce returns datetimes in UTC in one layout (`2024-05-02T10:11:12.000+0000`), so the
    # newest stamp is the greatest string; only that one is parsed (parsing per record: ~10 s CPU at 1M records).
    latest = ""
    for records in client.query(soql, endpoint):
        for rec in records:
            stamp = rec.get("SystemModstamp")
            if isinstance(stamp, str) and stamp > latest:
                latest = stamp
            if ids is not None and isinstance(rec.get("Id"), str):
                ids.add(rec["Id"])
            if source.in_scope(rec):
                source.emit(rec, rows)
    if not latest:
        return None
    stamp = parse_time(latest)
    if stamp is None:
        raise CrmError("salesforce: unexpected SystemModstamp format")
    return stamp


def soql_datetime(value: datetime) -> str:
    """An unquoted SOQL datetime literal in UTC, whole seconds (floored: with `>=` that only widens the window).
    A naive datetime is taken as UTC."""
    return utc_seconds(value)


_T = TypeVar("_T")


def _session(
    conn: SalesforceConnection,
    http: httpx.Client,
    sleep: Callable[[float], None],
    work: Callable[[_SalesforceClient], _T],
) -> _T:
    """Run `work` with a client; on failure the rotated refresh token (if any) rides on the exception."""
    client = _SalesforceClient(conn, http, sleep)
    try:
        return work(client)
    except CrmError as exc:
        exc.rotated_refresh_token = client.rotated
        raise


def fetch_snapshot(
    conn: SalesforceConnection, http: httpx.Client, *, sleep: Callable[[float], None] = time.sleep
) -> CrmSnapshot:
    """Contacts and unconverted leads (every email-type field), person accounts (PersonEmail and `__pc` email
    fields) when the org has them, accounts (domain from Website) and open opportunities.

    `watermark` is the newest SystemModstamp read. Records change while the snapshot is read (and out-of-scope
    records are not read at all), so start the next `fetch_changes` a little before it (an overlap; re-reading
    is harmless).

    Raises CrmAuthError (reconnect needed), CrmQuotaExhausted (daily API cap) or CrmError. If the org rotates
    refresh tokens, `rotated_refresh_token` carries the new one, which must be persisted even when a later
    step fails -- so on error it is also attached to the exception as `rotated_refresh_token`.
    """

    def work(client: _SalesforceClient) -> CrmSnapshot:
        rows = _Rows()
        watermark: datetime | None = None
        for source in _sources(client):
            if source.scope is not None:  # None: no email field to read, so nothing can be in scope
                watermark = newest(watermark, _read(client, source, source.scope, rows))
        people, accounts, opportunities = rows.frames()
        return CrmSnapshot(
            people=people,
            accounts=accounts,
            opportunities=opportunities,
            rotated_refresh_token=client.rotated,
            watermark=watermark,
        )

    return _session(conn, http, sleep, work)


def fetch_changes(
    conn: SalesforceConnection,
    http: httpx.Client,
    since: datetime,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> CrmChanges:
    """Every Contact, Lead, Account and Opportunity whose SystemModstamp is at or after `since` (`queryAll`, so deleted
    rows come too, with IsDeleted).

    One `queryAll` per object (`WHERE SystemModstamp >= since ORDER BY SystemModstamp ASC`, no scope filter), so
    soft-deleted records (IsDeleted = true), converted leads, closed opportunities and people whose address was
    removed come back too: all of their Ids are in `changed_ids`, and only the in-scope ones have rows (built
    exactly as in `fetch_snapshot`). With person accounts, Account Ids are also people Ids. `watermark` is the
    newest SystemModstamp read (None when nothing changed): pass it, minus an overlap, as the next `since`.

    Records purged from the recycle bin (hard deletes) are not visible here; a periodic `fetch_snapshot`
    reconciles them. Errors as in `fetch_snapshot`.
    """

    def work(client: _SalesforceClient) -> CrmChanges:
        rows = _Rows()
        changed: dict[str, set[str]] = {"people": set(), "accounts": set(), "opportunities": set()}
        where = f"SystemModstamp >= {soql_datetime(since)}"
        watermark: datetime | None = None
        for source in _sources(client):
            ids: set[str] = set()
            stamp = _read(
                client, source, where, rows, endpoint="queryAll", ids=ids, order=" ORDER BY SystemModstamp ASC"
            )
            watermark = newest(watermark, stamp)
            for key in source.changed:
                changed[key] |= ids
        people, accounts, opportunities = rows.frames()
        return CrmChanges(
            people=people,
            accounts=accounts,
            opportunities=opportunities,
            changed_ids=changed,
            watermark=watermark,
            rotated_refresh_token=client.rotated,
        )

    return _session(conn, http, sleep, work)
