"""`$search` on a mail folder's messages (`GET /me/mailFolders/{folder}/messages?$search="…"`): the subset of KQL
the product's late-match backfill sends, with Graph's documented limits.

Documented (https://learn.microsoft.com/en-us/graph/search-query-parameter, "Using $search on message
collections"): results are sorted by the date and time the message was sent (newest first); a `$search` request
returns up to 1,000 results in all; KQL property restrictions `participants:` (the from, to, cc and bcc fields),
`from:`, `to:`, `cc:`, `bcc:`, `recipients:` (to, cc, bcc), `received:`/`sent:` (dates), `subject:`, `body:`; a
value is "an SMTP address, display name, or alias"; a bare word searches from, subject and body. Exchange's KQL
reference (In-Place eDiscovery, "participants:contoso.com") documents that a domain finds everyone at that domain.
Reported by users and answered on Microsoft Q&A, not in the reference: `$search` cannot be combined with `$filter`
or `$orderby` (documented for the retired Outlook REST API v2), nor with `$skip` (paging is by the
`$skiptoken` of the nextLink).

UNVERIFIED (choices of this simulator, marked so tests do not mistake them for Graph):
- the error codes and texts of `$search` with `$filter`/`$orderby`/`$skip`, and of KQL that cannot be parsed;
- the longest accepted `$search` value (`SEARCH_MAX_CHARS`; Graph's documented URL limit is not per option);
- a domain value matches the address's domain exactly, not its subdomains (Exchange's word breaking may also find
  "eu.acme.co.uk" for "acme.co.uk": the product must not rely on it);
- date values `YYYY-MM-DD` (and the documented `MM/DD/YYYY`) compared with the UTC date of `receivedDateTime`
  (Exchange may use the mailbox's time zone: the product filters the exact window itself);
- display-name matching is by whole word, case-insensitive (Exchange also does prefix matching with `*`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import date, datetime

from simulators.world import Mailbox, SimMessage

SEARCH_RESULT_CAP = 1000  # DOC: "A $search request returns up to 1,000 results."
SEARCH_MAX_CHARS = 2048  # UNVERIFIED: longer $search values are refused (400)
PARTICIPANT_FIELDS = {
    "participants": ("from", "to", "cc", "bcc"),
    "from": ("from",),
    "to": ("to",),
    "cc": ("cc",),
    "bcc": ("bcc",),
    "recipients": ("to", "cc", "bcc"),
}
DATE_FIELDS = {"received": "received", "sent": "sent"}
TEXT_FIELDS = ("subject", "body")
_TOKEN = re.compile(r'\s*(\(|\)|[A-Za-z]+(?::|>=|<=|>|<|=)(?:"[^"]*"|[^\s()]+)|"[^"]*"|[^\s()]+)')
_RESTRICTION = re.compile(r'([A-Za-z]+)(:|>=|<=|>|<|=)("?)(.*)\3', re.DOTALL)

Predicate = Callable[[SimMessage], bool]


class SearchSyntaxError(ValueError):
    """The `$search` value is not KQL this simulator (or Graph) understands."""


def _mailboxes(m: SimMessage, field: str) -> list[Mailbox]:
    if field == "from":
        return [m.sender] if m.sender is not None else []
    return list({"to": m.to, "cc": m.cc, "bcc": m.bcc}[field])


def _mailbox_matches(box: Mailbox, value: str) -> bool:
    """An SMTP address (exact, case-insensitive), a domain (exact), an alias (the local part) or a display-name
    word / the whole display name."""
    address = (box.address or "").strip().lower()
    name = (box.name or "").strip().lower()
    if "@" in value:
        return address == value
    local, at, domain = address.rpartition("@")
    if at and (domain == value or local == value):
        return True
    return bool(name) and (name == value or value in name.split())


def _parse_date(value: str) -> date:
    for fmt in ("%Y-%m-%d", "%m/%d/%Y"):
        try:
            return datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    raise SearchSyntaxError(f"unsupported date {value!r}")


_COMPARE: dict[str, Callable[[date, date], bool]] = {
    ":": lambda a, b: a == b,
    "=": lambda a, b: a == b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


def _term(token: str) -> Predicate:
    m = _RESTRICTION.fullmatch(token)
    if m is not None and m.group(1).lower() in (*PARTICIPANT_FIELDS, *DATE_FIELDS, *TEXT_FIELDS):
        prop, op, value = m.group(1).lower(), m.group(2), m.group(4).strip().lower()
        if not value:
            raise SearchSyntaxError(f"empty value for {prop}")
        if prop in DATE_FIELDS:
            when, compare, attr = _parse_date(value), _COMPARE[op], DATE_FIELDS[prop]
            return lambda msg: compare(getattr(msg, attr).date(), when)
        if op != ":":
            raise SearchSyntaxError(f"{prop} takes ':'")
        if prop in TEXT_FIELDS:
            return lambda msg: value in getattr(msg, prop).lower()
        fields = PARTICIPANT_FIELDS[prop]
        return lambda msg: any(_mailbox_matches(b, value) for f in fields for b in _mailboxes(msg, f))
    word = token.strip('"').lower()
    return lambda msg: (
        word in msg.subject.lower()
        or word in msg.body.lower()
        or any(_mailbox_matches(b, word) for b in _mailboxes(msg, "from"))
    )


class _Parser:
    """or := and ("OR" and)*; and := unary (["AND"] unary)*; unary := "NOT" unary | "(" or ")" | term."""

    def __init__(self, text: str):
        self.tokens = [t for t in _TOKEN.findall(text) if t.strip()]
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise SearchSyntaxError("unexpected end of query")
        self.i += 1
        return token

    def parse(self) -> Predicate:
        if not self.tokens:
            raise SearchSyntaxError("empty query")
        pred = self.or_()
        if self.peek() is not None:
            raise SearchSyntaxError(f"unexpected {self.peek()!r}")
        return pred

    def or_(self) -> Predicate:
        parts = [self.and_()]
        while self.peek() == "OR":
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else (lambda msg: any(p(msg) for p in parts))

    def and_(self) -> Predicate:
        parts = [self.unary()]
        while (token := self.peek()) is not None and token not in ("OR", ")"):
            if token == "AND":
                self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else (lambda msg: all(p(msg) for p in parts))

    def unary(self) -> Predicate:
        token = self.take()
        if token == "NOT":
            inner = self.unary()
            return lambda msg: not inner(msg)
        if token == "(":
            inner = self.or_()
            if self.take() != ")":
                raise SearchSyntaxError("missing ')'")
            return inner
        if token in (")", "OR", "AND"):
            raise SearchSyntaxError(f"unexpected {token!r}")
        return _term(token)


def parse_search(raw: str) -> Predicate:
    """The predicate of a `$search` value (`"…"`, quotes required around a query with spaces or colons)."""
    value = raw.strip()
    if len(value) > SEARCH_MAX_CHARS:
        raise SearchSyntaxError("query too long")
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        value = value[1:-1]
    elif any(c in value for c in ' :"'):
        raise SearchSyntaxError("the query must be enclosed in double quotes")
    return _Parser(value).parse()


def search_messages(messages: Iterable[SimMessage], raw: str) -> list[SimMessage]:
    """What Graph returns for `$search=raw` over `messages` (one folder): matches, newest sent first, at most
    `SEARCH_RESULT_CAP`."""
    pred = parse_search(raw)
    found = sorted((m for m in messages if pred(m)), key=lambda m: (m.sent, m.id), reverse=True)
    return found[:SEARCH_RESULT_CAP]
