"""A Salesforce org per world tenant, served over loopback HTTPS: OAuth refresh-token grant (optional
rotation), the versions list, and `query`/`queryAll` with a SOQL subset, query-locator paging and
Salesforce-shaped errors (JSON arrays).

Also `GET /sobjects/{T}/describe`, so adapters find custom email fields and person-account fields before
selecting them (an unknown field is 400 INVALID_FIELD, as in Salesforce).

Knobs for tests: `expire_sessions()`, `daily_limit`, `inject(status, count)`, `revoke_refresh_token()`,
`invalidate_locators()`, and `requests` (a log without secrets). Org changes, each stamping SystemModstamp with
`world.now` (tests advance it): `update()`, `soft_delete()`, `add_contact()`, `add_account()`, `convert_lead()`,
`close_opportunity()`, `enable_person_accounts()` + `add_person_account()`, `add_custom_field()`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from simulators import server
from simulators.server import Handler, Request, Response, SimServer, wrapped_routes
from simulators.tls import SimulatorTLS
from simulators.world import World

# ----------------------------------------------------------------------------------------------------
# Object model

# Field types as `describe` reports them. Literals: string-like types take quoted strings, the others not.
_DT, _DATE, _BOOL, _STR = "datetime", "date", "boolean", "string"
_ID, _REF, _EMAIL, _URL, _PICK = "id", "reference", "email", "url", "picklist"
_STRING_TYPES = frozenset({_STR, _ID, _REF, _EMAIL, _URL, _PICK, "phone", "textarea"})

SOBJECTS: dict[str, dict[str, str]] = {
    "Contact": {
        "Id": _ID,
        "FirstName": _STR,
        "LastName": _STR,
        "Email": _EMAIL,
        "AccountId": _REF,
        "IsDeleted": _BOOL,
        "CreatedDate": _DT,
        "SystemModstamp": _DT,
    },
    "Lead": {
        "Id": _ID,
        "FirstName": _STR,
        "LastName": _STR,
        "Email": _EMAIL,
        "Company": _STR,
        "IsConverted": _BOOL,
        "ConvertedContactId": _REF,
        "ConvertedAccountId": _REF,
        "IsDeleted": _BOOL,
        "CreatedDate": _DT,
        "SystemModstamp": _DT,
    },
    "Account": {
        "Id": _ID,
        "Name": _STR,
        "Website": _URL,
        "IsDeleted": _BOOL,
        "CreatedDate": _DT,
        "SystemModstamp": _DT,
    },
    "Opportunity": {
        "Id": _ID,
        "Name": _STR,
        "AccountId": _REF,
        "StageName": _PICK,
        "IsClosed": _BOOL,
        "IsWon": _BOOL,
        "CreatedDate": _DT,
        "CloseDate": _DATE,
        "IsDeleted": _BOOL,
        "SystemModstamp": _DT,
    },
}
# Only in orgs with person accounts enabled: selecting them elsewhere is INVALID_FIELD.
PERSON_ACCOUNT_FIELDS: dict[str, dict[str, str]] = {
    "Account": {"IsPersonAccount": _BOOL, "PersonEmail": _EMAIL, "PersonContactId": _REF},
    "Contact": {"IsPersonAccount": _BOOL},
}
_ID_PREFIX = {"Account": "001", "Contact": "003", "Opportunity": "006", "Lead": "00Q"}

API_VERSIONS = (
    ("Winter '24", "59.0"),
    ("Spring '24", "60.0"),
    ("Summer '24", "61.0"),
    ("Winter '25", "62.0"),
)
DEFAULT_DAILY_MAX = 15000


class SoqlError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _sf_datetime(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def _wire(value: Any) -> Any:
    if isinstance(value, datetime):
        return _sf_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def _stable(text: str, modulo: int) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % modulo


def _org_rows(world: World, tid: str) -> dict[str, list[dict[str, Any]]]:
    """The org's records with Salesforce field names and Python values, derived deterministically."""
    crm, now = world.crm[tid], world.now

    def stamps(record_id: str) -> tuple[datetime, datetime]:
        created = now - timedelta(days=30 + _stable(record_id, 400), minutes=_stable(record_id + "m", 1440))
        return created, min(now, created + timedelta(days=_stable(record_id + "s", 30)))

    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in SOBJECTS}

    def add(sobject: str, record_id: str, **fields: Any) -> None:
        """A live record: its fields plus the system fields, with derived creation and modification times."""
        created, mod = stamps(record_id)
        system = {"IsDeleted": False, "CreatedDate": created, "SystemModstamp": mod}
        rows[sobject].append({"Id": record_id, **fields, **system})

    for c in crm.contacts:
        add("Contact", c.id, FirstName=c.first_name, LastName=c.last_name, Email=c.email, AccountId=c.account_id)
    for lead in crm.leads:
        add(
            "Lead",
            lead.id,
            FirstName=lead.first_name,
            LastName=lead.last_name,
            Email=lead.email,
            Company=lead.company,
            IsConverted=lead.is_converted,
            ConvertedContactId=lead.converted_contact_id,
            ConvertedAccountId=None,
        )
    for a in crm.accounts:
        add("Account", a.id, Name=a.name, Website=a.website)
    for o in crm.opportunities:
        won = o.is_closed and _stable(o.id, 2) == 0
        stage = ("Closed Won" if won else "Closed Lost") if o.is_closed else "Prospecting"
        close = (o.created + timedelta(days=45)).date()
        rows["Opportunity"].append(
            {
                "Id": o.id,
                "Name": o.name,
                "AccountId": o.account_id,
                "StageName": stage,
                "IsClosed": o.is_closed,
                "IsWon": won,
                "CreatedDate": o.created,
                "CloseDate": close,
                "IsDeleted": False,
                "SystemModstamp": min(now, o.created + timedelta(days=1)),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# SOQL subset

_TOKEN_RE = re.compile(
    r"""\s*(?:
      (?P<str>'(?:[^'\\]|\\.)*')
    | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:?\d{2}))
    | (?P<date>\d{4}-\d{2}-\d{2})(?![\dT])
    | (?P<num>-?\d+(?:\.\d+)?)(?![\w.])
    | (?P<op>!=|<>|<=|>=|=|<|>)
    | (?P<punct>[(),])
    | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {
    "SELECT",
    "FROM",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "IN",
    "ORDER",
    "BY",
    "ASC",
    "DESC",
    "NULLS",
    "FIRST",
    "LAST",
    "LIMIT",
    "TRUE",
    "FALSE",
    "NULL",
}


@dataclass
class _Tok:
    kind: str  # str dt date num op punct ident kw end
    text: str
    value: Any = None


def _tokenize(soql: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(soql):
        if not soql[pos:].strip():
            break
        m = _TOKEN_RE.match(soql, pos)
        if not m or m.end() == pos:
            rest = soql[pos:].strip()
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{rest.split()[0] if rest else rest}'")
        pos = m.end()
        kind = m.lastgroup or ""
        text = m.group(kind)
        if kind == "str":
            toks.append(_Tok("str", text, re.sub(r"\\(.)", r"\1", text[1:-1])))
        elif kind == "dt":
            iso = text.replace("Z", "+00:00")
            if re.search(r"[+-]\d{4}$", iso):
                iso = iso[:-2] + ":" + iso[-2:]
            toks.append(_Tok("dt", text, datetime.fromisoformat(iso).astimezone(UTC)))
        elif kind == "date":
            toks.append(_Tok("date", text, date.fromisoformat(text)))
        elif kind == "num":
            toks.append(_Tok("num", text, float(text) if "." in text else int(text)))
        elif kind == "ident" and text.upper() in _KEYWORDS:
            toks.append(_Tok("kw", text.upper()))
        else:
            toks.append(_Tok(kind, text))
    if pos < len(soql) and soql[pos:].strip():  # pragma: no cover - loop consumes everything
        raise SoqlError("MALFORMED_QUERY", "unexpected token")
    toks.append(_Tok("end", "<EOF>"))
    return toks


Predicate = Callable[[dict[str, Any]], bool]


@dataclass
class SoqlQuery:
    sobject: str
    fields: list[str]
    where: Predicate | None
    order_by: list[tuple[str, bool, bool]]  # (field, descending, nulls_first)
    limit: int | None


def _fold(v: Any) -> Any:
    return v.casefold() if isinstance(v, str) else v


def _compare(op: str, left: Any, right: Any) -> bool:
    if op in ("=", "!=", "<>"):
        equal = left is None and right is None if left is None or right is None else _fold(left) == _fold(right)
        return equal if op == "=" else not equal
    if left is None or right is None:
        return False
    a, b = _fold(left), _fold(right)
    try:
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    except TypeError:
        return False


class _Parser:
    def __init__(self, soql: str, schema: dict[str, dict[str, str]]):
        self.toks = _tokenize(soql)
        self.i = 0
        self.sobject = ""
        self.schema = schema
        self.by_lower = {obj.lower(): obj for obj in schema}

    # -- token helpers
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def is_kw(self, *words: str) -> bool:
        tok = self.peek()
        return tok.kind == "kw" and tok.text in words

    def expect_kw(self, word: str) -> None:
        tok = self.next()
        if tok.kind != "kw" or tok.text != word:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok.text}'")

    def ident(self) -> str:
        tok = self.next()
        if tok.kind != "ident":
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok.text}'")
        return tok.text

    def field(self, name: str) -> str:
        canonical = next((f for f in self.schema[self.sobject] if f.lower() == name.lower()), None)
        if canonical is None:
            raise SoqlError(
                "INVALID_FIELD",
                f"No such column '{name}' on entity '{self.sobject}'. If you are attempting to use a custom "
                "field, be sure to append the '__c' after the custom field name. Please reference your "
                "WSDL or the describe call for the appropriate names.",
            )
        return canonical

    # -- grammar
    def parse(self) -> SoqlQuery:
        self.expect_kw("SELECT")
        raw_fields = [self.ident()]
        while self.peek().kind == "punct" and self.peek().text == ",":
            self.next()
            raw_fields.append(self.ident())
        self.expect_kw("FROM")
        obj = self.ident()
        sobject = self.by_lower.get(obj.lower())
        if sobject is None:
            raise SoqlError(
                "INVALID_TYPE",
                f"sObject type '{obj}' is not supported. If you are attempting to use a "
                "custom object, be sure to append the '__c' after the entity name. Please reference "
                "your WSDL or the describe call for the appropriate names.",
            )
        self.sobject = sobject
        fields: list[str] = []
        for name in raw_fields:
            canonical = self.field(name)
            if canonical in fields:
                raise SoqlError("MALFORMED_QUERY", f"duplicate field selected: {canonical}")
            fields.append(canonical)
        where = None
        if self.is_kw("WHERE"):
            self.next()
            where = self.or_expr()
        order_by: list[tuple[str, bool, bool]] = []
        if self.is_kw("ORDER"):
            self.next()
            self.expect_kw("BY")
            while True:
                name = self.field(self.ident())
                desc = False
                if self.is_kw("ASC", "DESC"):
                    desc = self.next().text == "DESC"
                nulls_first = not desc
                if self.is_kw("NULLS"):
                    self.next()
                    if not self.is_kw("FIRST", "LAST"):
                        raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{self.peek().text}'")
                    nulls_first = self.next().text == "FIRST"
                order_by.append((name, desc, nulls_first))
                if self.peek().kind == "punct" and self.peek().text == ",":
                    self.next()
                    continue
                break
        limit = None
        if self.is_kw("LIMIT"):
            self.next()
            tok = self.next()
            if tok.kind != "num" or not isinstance(tok.value, int) or tok.value < 0:
                raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok.text}'")
            limit = tok.value
        if self.peek().kind != "end":
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{self.peek().text}'")
        return SoqlQuery(sobject, fields, where, order_by, limit)

    def or_expr(self) -> Predicate:
        return self.chain("OR", self.and_expr, any)

    def and_expr(self) -> Predicate:
        return self.chain("AND", self.unary, all)

    def chain(self, keyword: str, operand: Callable[[], Predicate], combine: Callable[[Any], bool]) -> Predicate:
        """operand (keyword operand)*, true when `combine` (any / all) of the operands is."""
        parts = [operand()]
        while self.is_kw(keyword):
            self.next()
            parts.append(operand())
        return parts[0] if len(parts) == 1 else (lambda r: combine(p(r) for p in parts))

    def unary(self) -> Predicate:
        if self.is_kw("NOT"):
            self.next()
            inner = self.unary()
            return lambda r: not inner(r)
        tok = self.peek()
        if tok.kind == "punct" and tok.text == "(":
            self.next()
            inner = self.or_expr()
            close = self.next()
            if close.kind != "punct" or close.text != ")":
                raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{close.text}'")
            return inner
        return self.comparison()

    def literal(self, field: str) -> Any:
        tok = self.next()
        ftype = self.schema[self.sobject][field]
        if tok.kind == "kw" and tok.text == "NULL":
            return None
        if tok.kind == "kw" and tok.text in ("TRUE", "FALSE"):
            value: Any = tok.text == "TRUE"
            ok = ftype == _BOOL
        elif tok.kind in ("str", "dt", "date", "num"):
            value = tok.value
            ok = (ftype in _STRING_TYPES) if tok.kind == "str" else {"dt": _DT, "date": _DATE}.get(tok.kind) == ftype
        else:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok.text}'")
        if not ok:
            quotes = "should be enclosed in quotes" if ftype in _STRING_TYPES else "should not be enclosed in quotes"
            raise SoqlError(
                "INVALID_QUERY_FILTER_OPERATOR",
                f"value of filter criterion for field '{field}' must be of type {ftype} and {quotes}",
            )
        return value

    def comparison(self) -> Predicate:
        field = self.field(self.ident())
        negate = False
        if self.is_kw("NOT"):
            self.next()
            negate = True
            if not self.is_kw("IN"):
                raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{self.peek().text}'")
        if self.is_kw("IN"):
            self.next()
            tok = self.next()
            if tok.kind != "punct" or tok.text != "(":
                raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok.text}'")
            values = [self.literal(field)]
            while self.peek().kind == "punct" and self.peek().text == ",":
                self.next()
                values.append(self.literal(field))
            close = self.next()
            if close.kind != "punct" or close.text != ")":
                raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{close.text}'")

            def in_list(r: dict[str, Any]) -> bool:
                return any(_compare("=", r[field], v) for v in values) != negate

            return in_list
        tok = self.next()
        if tok.kind != "op":
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok.text}'")
        op = tok.text
        value = self.literal(field)
        return lambda r: _compare(op, r[field], value)


def parse_soql(soql: str, schema: dict[str, dict[str, str]] | None = None) -> SoqlQuery:
    """Parse against `schema` ({sObject: {field: describe type}}; default: the standard fields)."""
    if not soql or not soql.strip():
        raise SoqlError("MALFORMED_QUERY", "unexpected token: '<EOF>'")
    return _Parser(soql, SOBJECTS if schema is None else schema).parse()


def run_soql(query: SoqlQuery, rows: list[dict[str, Any]], include_deleted: bool) -> list[dict[str, Any]]:
    hits = [r for r in rows if (include_deleted or not r["IsDeleted"]) and (query.where is None or query.where(r))]
    for name, desc, nulls_first in reversed(query.order_by):
        present = [r for r in hits if r[name] is not None]
        missing = [r for r in hits if r[name] is None]
        present.sort(key=lambda r, n=name: _fold(r[n]), reverse=desc)
        hits = missing + present if nulls_first else present + missing
    if query.limit is not None:
        hits = hits[: query.limit]
    return hits


# ----------------------------------------------------------------------------------------------------
# Server


@dataclass(frozen=True)
class LoggedRequest(server.LoggedRequest):
    org_tid: str | None = None
    soql: str | None = None
    grant_type: str | None = None
    batch_size: int | None = None


@dataclass
class _Locator:
    tid: str
    version: str
    records: list[dict[str, Any]]
    batch: int


def _err(status: int, code: str, message: str) -> Response:
    return Response(status, [{"message": message, "errorCode": code}])


def _oauth_err(error: str, description: str) -> Response:
    return Response(400, {"error": error, "error_description": description})


class SalesforceSimulator(SimServer):
    def __init__(
        self,
        world: World,
        tls: SimulatorTLS,
        port: int = 0,
        batch_size: int = 2000,
        client_id: str = "sf-client",
        client_secret: str = "sf-secret",
        rotate_refresh_tokens: bool = False,
    ):
        self.world = world
        self.batch_size = batch_size
        self.client_id = client_id
        self.client_secret = client_secret
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.daily_limit: int | None = None
        self.requests: list[LoggedRequest] = []
        self._lock = threading.RLock()
        self._rows = {t.tid: _org_rows(world, t.tid) for t in world.tenants}
        # per org: {sObject: {field: type}}; knobs add person-account and custom fields
        self._schema = {tid: {obj: dict(fields) for obj, fields in SOBJECTS.items()} for tid in self._rows}
        self._id_seq = 0
        self._org_id = {tid: "00D" + hashlib.sha1(tid.encode()).hexdigest()[:12].upper() for tid in self._rows}
        self._user_id = {
            tid: "005" + hashlib.sha1(f"user{tid}".encode()).hexdigest()[:12].upper() for tid in self._rows
        }
        self._initial_rt: dict[str, str] = {}
        self._refresh: dict[str, str] = {}  # refresh token -> tid
        self._access: dict[str, str] = {}  # access token -> tid
        self._usage: dict[str, int] = dict.fromkeys(self._rows, 0)
        self._locators: dict[str, _Locator] = {}
        self._faults: list[list[Any]] = []  # [status, remaining, path prefix | None, Retry-After | None]
        self._expire_countdown: int | None = None
        for tid in self._rows:
            rt = self._new_refresh_token(tid)
            self._initial_rt[tid] = rt
        v = r"v(?P<v>\d+\.\d)"
        routes = [
            ("POST", r"/services/oauth2/token", self._token),
            ("GET", r"/services/data/?", self._versions),
            ("GET", rf"/services/data/{v}/(?P<kind>query|queryAll)/?", self._query),
            (
                "GET",
                rf"/services/data/{v}/(?P<kind>query|queryAll)/(?P<loc>[A-Za-z0-9]+)-(?P<off>\d+)",
                self._query_more,
            ),
            ("GET", rf"/services/data/{v}/limits/?", self._limits),
            ("GET", rf"/services/data/{v}/sobjects/(?P<obj>[A-Za-z0-9_]+)/describe/?", self._describe),
        ]
        served = wrapped_routes(routes, self._wrap, self._not_found)
        super().__init__(tls, served, port=port, name="salesforce-sim")

    # -- test knobs
    def refresh_token_for(self, tid: str) -> str:
        return self._initial_rt[tid]

    def org_id(self, tid: str) -> str:
        return self._org_id[tid]

    def revoke_refresh_token(self, refresh_token: str) -> None:
        with self._lock:
            self._refresh.pop(refresh_token, None)

    def expire_sessions(self, after_calls: int = 0) -> None:
        """Invalidate all access tokens issued so far: now, or after `after_calls` more data calls."""
        with self._lock:
            if after_calls <= 0:
                self._access.clear()
                self._expire_countdown = None
            else:
                self._expire_countdown = after_calls

    def inject(self, status: int, count: int = 1, path: str | None = None, retry_after: str | None = None) -> None:
        """The next `count` requests (optionally only those whose path starts with `path`) answer `status`
        (with a `Retry-After` header when given)."""
        with self._lock:
            self._faults.append([status, count, path, retry_after])

    def soft_delete(self, tid: str, record_id: str) -> None:
        """Move a record to the recycle bin: `query` hides it, `queryAll` shows it with IsDeleted = true and a new
        SystemModstamp. Deleting an Account cascades to its contacts and opportunities, as in Salesforce."""
        with self._lock:
            sobject, row = self._find(tid, record_id)
            victims = [row]
            if sobject == "Account":
                victims += [
                    r
                    for obj in ("Contact", "Opportunity")
                    for r in self._rows[tid][obj]
                    if r["AccountId"] == record_id and not r["IsDeleted"]
                ]
            for r in victims:
                r["IsDeleted"] = True
                r["SystemModstamp"] = self.world.now

    def update(self, tid: str, record_id: str, **fields: Any) -> None:
        """Set fields (names as in `describe`, case-insensitive) of a record; SystemModstamp becomes world.now.
        Changing a person account's PersonEmail also changes its person contact's Email."""
        with self._lock:
            sobject, row = self._find(tid, record_id)
            schema = self._schema[tid][sobject]
            changes: dict[str, Any] = {}
            for name, value in fields.items():
                canonical = next((f for f in schema if f.lower() == name.lower()), None)
                if canonical is None or canonical in ("Id", "IsDeleted", "SystemModstamp", "CreatedDate"):
                    raise KeyError(f"{sobject}.{name}")
                changes[canonical] = value
            row.update(changes, SystemModstamp=self.world.now)
            if sobject == "Account" and row.get("IsPersonAccount") and "PersonEmail" in changes:
                self.update(tid, row["PersonContactId"], Email=row["PersonEmail"])

    def add_contact(
        self,
        tid: str,
        first_name: str,
        last_name: str,
        email: str | None,
        account_id: str | None = None,
        **fields: Any,
    ) -> str:
        """A new Contact created (and modified) at world.now; returns its Id."""
        with self._lock:
            row = self._new_row(
                tid, "Contact", FirstName=first_name, LastName=last_name, Email=email, AccountId=account_id
            )
            if fields:
                self.update(tid, row["Id"], **fields)
            return row["Id"]

    def add_account(self, tid: str, name: str, website: str | None = None) -> str:
        with self._lock:
            return self._new_row(tid, "Account", Name=name, Website=website)["Id"]

    def convert_lead(self, tid: str, lead_id: str, account_id: str | None = None) -> str:
        """Convert a lead the way Salesforce does: a new Contact with the lead's name and Email on
        `account_id` (or on a new Account named after the lead's Company); the Lead row stays, with IsConverted,
        ConvertedContactId and ConvertedAccountId set. Custom lead fields are not mapped. Returns the contact Id."""
        with self._lock:
            sobject, lead = self._find(tid, lead_id)
            if sobject != "Lead" or lead["IsConverted"] or lead["IsDeleted"]:
                raise ValueError(f"{lead_id} is not an unconverted lead")
            if account_id is None:
                account_id = self.add_account(tid, lead["Company"] or f"{lead['LastName']} Company")
            contact_id = self.add_contact(tid, lead["FirstName"], lead["LastName"], lead["Email"], account_id)
            lead.update(
                IsConverted=True,
                ConvertedContactId=contact_id,
                ConvertedAccountId=account_id,
                SystemModstamp=self.world.now,
            )
            return contact_id

    def close_opportunity(self, tid: str, opportunity_id: str, won: bool = False) -> None:
        with self._lock:
            sobject, opp = self._find(tid, opportunity_id)
            if sobject != "Opportunity":
                raise ValueError(f"{opportunity_id} is not an opportunity")
            opp.update(
                IsClosed=True,
                IsWon=won,
                StageName="Closed Won" if won else "Closed Lost",
                CloseDate=self.world.now.date(),
                SystemModstamp=self.world.now,
            )

    def enable_person_accounts(self, tid: str) -> None:
        """Turn on person accounts for the org: Account gains IsPersonAccount, PersonEmail and PersonContactId,
        Contact gains IsPersonAccount (all false/null on existing rows). Records are not touched otherwise."""
        with self._lock:
            for sobject, extra in PERSON_ACCOUNT_FIELDS.items():
                self._add_fields(tid, sobject, extra, IsPersonAccount=False)

    def add_person_account(
        self, tid: str, first_name: str, last_name: str, email: str | None, website: str | None = None
    ) -> str:
        """A person account (needs `enable_person_accounts`) and its person contact, which shares the name and
        address (Contact.IsPersonAccount = true, AccountId = the account). Returns the Account Id."""
        with self._lock:
            if "IsPersonAccount" not in self._schema[tid]["Account"]:
                raise ValueError("person accounts are not enabled for this org")
            account = self._new_row(
                tid,
                "Account",
                Name=f"{first_name} {last_name}",
                Website=website,
                IsPersonAccount=True,
                PersonEmail=email,
            )
            contact = self._new_row(
                tid,
                "Contact",
                FirstName=first_name,
                LastName=last_name,
                Email=email,
                AccountId=account["Id"],
                IsPersonAccount=True,
            )
            account["PersonContactId"] = contact["Id"]
            return account["Id"]

    def add_custom_field(self, tid: str, sobject: str, name: str, field_type: str = _EMAIL) -> None:
        """Add a custom field (`X__c`, or `X__pc` for person-account fields on Account) with null values, e.g.
        `add_custom_field(tid, "Contact", "Secondary_Email__c")` (type "email" by default)."""
        if not (name.endswith("__c") or name.endswith("__pc")):
            raise ValueError("custom field names end with __c (or __pc on person accounts)")
        with self._lock:
            self._add_fields(tid, sobject, {name: field_type})

    def describe_fields(self, tid: str, sobject: str) -> dict[str, str]:
        return dict(self._schema[tid][sobject])

    def record(self, tid: str, record_id: str) -> dict[str, Any]:
        """A copy of the record's current row (Python values), deleted or not."""
        with self._lock:
            return dict(self._find(tid, record_id)[1])

    def invalidate_locators(self) -> None:
        with self._lock:
            self._locators.clear()

    def api_usage(self, tid: str) -> int:
        return self._usage[tid]

    # -- plumbing
    def _find(self, tid: str, record_id: str) -> tuple[str, dict[str, Any]]:
        for sobject, rows in self._rows[tid].items():
            for r in rows:
                if r["Id"] == record_id:
                    return sobject, r
        raise KeyError(record_id)

    def _new_row(self, tid: str, sobject: str, **values: Any) -> dict[str, Any]:
        self._id_seq += 1
        digest = hashlib.sha1(f"{tid}/{sobject}/{self._id_seq}".encode()).hexdigest()[:6].upper()
        row: dict[str, Any] = dict.fromkeys(self._schema[tid][sobject])
        row.update(IsDeleted=False, CreatedDate=self.world.now, SystemModstamp=self.world.now)
        if sobject == "Lead":
            row["IsConverted"] = False
        if sobject == "Opportunity":
            row.update(IsClosed=False, IsWon=False)
        if "IsPersonAccount" in row:
            row["IsPersonAccount"] = False
        row.update(values, Id=f"{_ID_PREFIX[sobject]}SIM{digest}{self._id_seq:03d}")
        self._rows[tid][sobject].append(row)
        return row

    def _add_fields(self, tid: str, sobject: str, fields: dict[str, str], **defaults: Any) -> None:
        schema = self._schema[tid][sobject]
        for name, ftype in fields.items():
            if name in schema:
                continue
            schema[name] = ftype
            for r in self._rows[tid][sobject]:
                r[name] = defaults.get(name)

    def _new_refresh_token(self, tid: str) -> str:
        rt = "5Aep861" + secrets.token_urlsafe(48)
        self._refresh[rt] = tid
        return rt

    def _limit_header(self, tid: str | None) -> str:
        used = self._usage.get(tid, 0) if tid else 0
        return f"api-usage={used}/{self.daily_limit if self.daily_limit is not None else DEFAULT_DAILY_MAX}"

    def _wrap(self, handler: Callable[[Request], tuple[Response, LoggedRequest]]) -> Handler:
        def wrapped(req: Request) -> Response:
            with self._lock:
                fault = next((f for f in self._faults if f[2] is None or req.path.startswith(f[2])), None)
                if fault is not None:
                    fault[1] -= 1
                    if fault[1] <= 0:
                        self._faults.remove(fault)
                    resp, entry = (
                        self._fault_response(fault[0]),
                        LoggedRequest(req.method, req.path, fault[0]),
                    )
                    if fault[3] is not None:
                        resp.headers["Retry-After"] = fault[3]
                else:
                    resp, entry = handler(req)
                self.requests.append(entry)
                resp.headers.setdefault("Sforce-Limit-Info", self._limit_header(entry.org_tid))
                return resp

        return wrapped

    @staticmethod
    def _fault_response(status: int) -> Response:
        if status == 401:
            return _err(401, "INVALID_SESSION_ID", "Session expired or invalid")
        if status == 403:
            return _err(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        if status == 503:
            return _err(503, "SERVER_UNAVAILABLE", "Server temporarily unavailable, please try again later.")
        return _err(
            status,
            "UNKNOWN_EXCEPTION",
            "An unexpected error occurred. Please include this ErrorId if "
            "you contact support: 1234567890-12345 (-1234567890)",
        )

    def _authenticate(self, req: Request) -> tuple[str | None, Response | None]:
        """(tid, None) for a valid bearer token on a data call (counted in the daily usage), else an error."""
        auth = req.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if self._expire_countdown is not None:
            if self._expire_countdown == 0:
                self._access.clear()
                self._expire_countdown = None
            else:
                self._expire_countdown -= 1
        tid = self._access.get(token)
        if tid is None:
            return None, _err(401, "INVALID_SESSION_ID", "Session expired or invalid")
        if self.daily_limit is not None and self._usage[tid] >= self.daily_limit:
            return tid, _err(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        self._usage[tid] += 1
        return tid, None

    # -- handlers
    def _token(self, req: Request) -> tuple[Response, LoggedRequest]:
        form = req.form()
        grant = form.get("grant_type")
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        basic = req.headers.get("authorization", "")
        if basic[:6].lower() == "basic ":
            try:
                client_id, _, client_secret = base64.b64decode(basic[6:].strip()).decode().partition(":")
            except ValueError:
                client_id = client_secret = None

        def log(status: int, tid: str | None = None) -> LoggedRequest:
            return LoggedRequest("POST", req.path, status, org_tid=tid, grant_type=grant)

        if grant != "refresh_token":
            return _oauth_err("unsupported_grant_type", "grant type not supported"), log(400)
        if client_id != self.client_id or not hmac.compare_digest(client_secret or "", self.client_secret):
            return _oauth_err("invalid_client", "invalid client credentials"), log(400)
        tid = self._refresh.get(form.get("refresh_token") or "")
        if tid is None:
            return _oauth_err("invalid_grant", "expired access/refresh token"), log(400)
        access = f"{self._org_id[tid]}!AQ" + secrets.token_urlsafe(64)
        self._access[access] = tid
        issued_at = str(int(time.time() * 1000))
        ident = f"{self.base_url}/id/{self._org_id[tid]}/{self._user_id[tid]}"
        signature = base64.b64encode(
            hmac.new(self.client_secret.encode(), (ident + issued_at).encode(), hashlib.sha256).digest()
        ).decode()
        body: dict[str, Any] = {
            "access_token": access,
            "signature": signature,
            "scope": "refresh_token api",
            "instance_url": self.base_url,
            "id": ident,
            "token_type": "Bearer",
            "issued_at": issued_at,
        }
        if self.rotate_refresh_tokens:
            self._refresh.pop(form["refresh_token"], None)
            body["refresh_token"] = self._new_refresh_token(tid)
        return Response(200, body, {"Cache-Control": "no-cache,no-store"}), log(200, tid)

    def _versions(self, req: Request) -> tuple[Response, LoggedRequest]:
        body = [{"label": label, "url": f"/services/data/v{v}", "version": v} for label, v in API_VERSIONS]
        return Response(200, body), LoggedRequest(req.method, req.path, 200)

    def _limits(self, req: Request) -> tuple[Response, LoggedRequest]:
        tid, error = self._authenticate(req)
        if error is not None:
            return error, LoggedRequest(req.method, req.path, error.status, org_tid=tid)
        assert tid is not None
        cap = self.daily_limit if self.daily_limit is not None else DEFAULT_DAILY_MAX
        body = {"DailyApiRequests": {"Max": cap, "Remaining": max(0, cap - self._usage[tid])}}
        return Response(200, body), LoggedRequest(req.method, req.path, 200, org_tid=tid)

    def _describe(self, req: Request) -> tuple[Response, LoggedRequest]:
        """`GET /sobjects/{T}/describe`: the org's fields of T, each with name, type, label, custom, nillable."""
        assert req.match is not None
        tid, error = self._authenticate(req)
        if error is not None:
            return error, LoggedRequest(req.method, req.path, error.status, org_tid=tid)
        assert tid is not None
        schema = self._schema[tid]
        sobject = next((o for o in schema if o.lower() == req.match["obj"].lower()), None)
        if sobject is None:
            resp = _err(404, "NOT_FOUND", "The requested resource does not exist")
            return resp, LoggedRequest(req.method, req.path, 404, org_tid=tid)
        fields = [
            {
                "name": name,
                "type": ftype,
                "label": re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name.split("__")[0].replace("_", " ")),
                "custom": "__" in name,
                "nillable": ftype != _BOOL and name != "Id",
            }
            for name, ftype in schema[sobject].items()
        ]
        body = {"name": sobject, "label": sobject, "custom": False, "queryable": True, "fields": fields}
        return Response(200, body), LoggedRequest(req.method, req.path, 200, org_tid=tid)

    def _batch(self, req: Request) -> int:
        options = req.headers.get("sforce-query-options", "")
        m = re.search(r"batchSize\s*=\s*(\d+)", options, re.IGNORECASE)
        if m:
            return max(200, min(2000, int(m.group(1))))
        return max(1, self.batch_size)

    def _page(self, loc_id: str, loc: _Locator, offset: int) -> dict[str, Any]:
        records = loc.records[offset : offset + loc.batch]
        done = offset + loc.batch >= len(loc.records)
        page: dict[str, Any] = {"totalSize": len(loc.records), "done": done, "records": records}
        if done:
            self._locators.pop(loc_id, None)
        else:
            page["nextRecordsUrl"] = f"/services/data/v{loc.version}/query/{loc_id}-{offset + loc.batch}"
        return page

    def _query(self, req: Request) -> tuple[Response, LoggedRequest]:
        assert req.match is not None
        version, kind = req.match["v"], req.match["kind"]
        soql = req.query.get("q")
        batch = self._batch(req)

        def log(status: int, tid: str | None) -> LoggedRequest:
            return LoggedRequest(req.method, req.path, status, org_tid=tid, soql=soql, batch_size=batch)

        tid, error = self._authenticate(req)
        if error is not None:
            return error, log(error.status, tid)
        assert tid is not None
        try:
            query = parse_soql(soql or "", self._schema[tid])
        except SoqlError as exc:
            return _err(400, exc.code, exc.message), log(400, tid)
        hits = run_soql(query, self._rows[tid][query.sobject], include_deleted=kind == "queryAll")
        records = [
            {
                "attributes": {
                    "type": query.sobject,
                    "url": f"/services/data/v{version}/sobjects/{query.sobject}/{r['Id']}",
                },
                **{f: _wire(r[f]) for f in query.fields},
            }
            for r in hits
        ]
        loc_id = "01g" + secrets.token_hex(8).upper()[:15]
        loc = _Locator(tid, version, records, batch)
        self._locators[loc_id] = loc
        return Response(200, self._page(loc_id, loc, 0)), log(200, tid)

    def _query_more(self, req: Request) -> tuple[Response, LoggedRequest]:
        assert req.match is not None
        tid, error = self._authenticate(req)
        if error is not None:
            return error, LoggedRequest(req.method, req.path, error.status, org_tid=tid)
        loc_id, offset = req.match["loc"], int(req.match["off"])
        loc = self._locators.get(loc_id)
        if loc is None or loc.tid != tid or offset % loc.batch or offset >= len(loc.records):
            resp = _err(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            return resp, LoggedRequest(req.method, req.path, 400, org_tid=tid)
        return Response(200, self._page(loc_id, loc, offset)), LoggedRequest(req.method, req.path, 200, org_tid=tid)

    def _not_found(self, req: Request) -> tuple[Response, LoggedRequest]:
        resp = _err(404, "NOT_FOUND", "The requested resource does not exist")
        return resp, LoggedRequest(req.method, req.path, 404)
