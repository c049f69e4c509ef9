"""Header-first mail listing and per-folder delta (typed msgspec pages → Arrow columns) and plain-text body fetch
via `$batch`.

Pages stream: each Graph page becomes one `HeaderPage`/`DeltaPage` of two Arrow tables and is dropped once the caller
moves on (memory: one page). Addresses are kept exactly as received; normalisation belongs to matching.

Delta (`iter_delta_pages`, Graph message delta): one round per folder. The first round sends `$select`, the sensitivity
`$expand` (and the scan-back `$filter`); Graph encodes them into its tokens, so later rounds GET the stored deltaLink
verbatim. The page size is only `Prefer: odata.maxpagesize` (never `$top`). Only the LAST page of a round carries
`delta_link`; it is the one durable cursor, to be stored after the rows of the round are committed. nextLinks are
never exposed and must never be persisted: they go stale once later pages are fetched, so an interrupted round
restarts from the stored deltaLink (or from scratch). `DeltaTokenExpired` (410, or
syncStateNotFound/resyncRequired/SyncStateInvalid in any case) means the stored deltaLink is dead: start a new round
with `delta_link=None` and the scan-back `since`.

Rules for what Graph sends (each has a test in tests/test_mail_parsing.py):
- Partial items: a delta "updated" item carries only `id`, the changed properties and `parentFolderId`. A row whose
  JSON lacks any of `HEADER_FIELDS` (other than `id`, `from` and `sender`) has `is_partial` true,
  NULL in every column whose field was absent (a missing `receivedDateTime` included), and no participant rows at
  all: for a partial row "no participants" means "unknown", for a full row it means "none". Callers merge partial
  rows as patches and never overwrite stored values with their NULLs.
- `sensitivity`: Graph v1.0 `message` has no `sensitivity` property (only `event` has; `$select=sensitivity` is a
  400 RequestBroker--ParseUri), so it is not in `HEADER_FIELDS`. Listing and delta send `SENSITIVITY_EXPAND`
  (`$expand=singleValueExtendedProperties($filter=id eq 'Integer 0x0036')`, MAPI PidTagSensitivity) and the column
  is decoded from the entry whose id is `Integer 0x36` (case-insensitive, any leading zeros: Graph normalises the
  id it echoes): value "0" normal, "1" personal, "2" private, "3" confidential (a JSON number is read the same).
  NULL when the key is absent, null or an empty list (a message that never had the property), when no entry has
  that id, or when the value is anything else. It never makes a row partial. Entries with other ids are ignored.
  Documented (Graph docs): the `$expand` form on a single message and the string value
  (singleValueLegacyExtendedProperty), and that message delta supports `$expand` (kept in its tokens like every
  query option of the first request). Seen in a Microsoft Q&A answer, not in the reference: the expansion on a
  message listing, a listed message without the property coming back without the key, and the echoed id
  normalised ("Binary 0x0E0A" → "Binary 0xe0a").
  UNVERIFIED: the exact echo for 0x0036 ("Integer 0x36" assumed; any spelling is accepted), that this particular
  expansion works on delta, and whether a delta "updated" item carries the property when the sensitivity changed
  (partial rows' sensitivity is not used to patch stored rows).
- `@removed` items (deleted, or moved out of the folder) only go to `DeltaPage.removed` (their ids, in page order),
  never to the tables.
- `@odata.type` is kept in `odata_type` (e.g. "#microsoft.graph.eventMessageRequest" for a meeting request; delta
  items also say "#microsoft.graph.message"); NULL when absent, as for plain messages in a listing.
- `from`/`sender` missing, null, `{}` or with `emailAddress` null/`{}`: not partial by itself (drafts and some
  system items have no sender); `from_name`/`from_address` NULL, no participant row.
- A recipient (from/sender/to/cc) becomes a participant row if its address is a non-blank string, or, with a
  NULL address, if it has a non-blank display name and no address (a name-only participant: the caller resolves it
  by name or drops it, o365sync/participants.py). `emailAddress` {} or null, a blank name without an address, or a
  null list entry gives no row. Recipient lists that are null or absent give no rows.
- Addresses are kept verbatim (case, stray whitespace, unicode/IDN, X500/EX-style "/O=EXCHANGELABS/OU=…/CN=…" which
  have no "@"): matching lower-cases and strips them, and an X500 address never matches a CRM email.
- Bcc is never requested, parsed, matched or stored (`bccRecipients` is not in `HEADER_FIELDS`; if Graph sent it
  anyway it is skipped like any unknown field).
- Unknown extra fields are ignored (never even turned into Python objects).
- Timestamps: ISO 8601 UTC; 7 fractional digits (Graph's .NET precision) are rounded to microseconds; a value that
  cannot be parsed becomes NULL rather than failing the page.
- Duplicate ids (within a page or across pages, which delta does replay) are all kept in the page tables, in wire
  order; the caller dedupes (last one wins for full rows, partial rows patch).
- A page whose JSON does not have the expected shape (e.g. a number where an address string belongs, an item
  without `id`) raises `GraphError(0, "MalformedPage")`; nothing of the page is returned.
- Text Python cannot hold (a lone surrogate escape such as `"Deal \\ud83d"`, bytes that are not UTF-8) does not fail
  the page: it becomes U+FFFD and the page's `odd` counts the items so repaired (`o365sync.graph.decode_page`).
- Bodies (`fetch_bodies`) of any size (1 MB and more) are decoded once, linearly; nothing is concatenated per item.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import msgspec
import pyarrow as pa
from msgspec import UNSET, UnsetType

from o365sync.graph import (
    SENSITIVITY_EXPAND,
    DeltaTokenExpired,
    GraphClient,
    GraphPagingError,
    decode_page,
    error_for,
    page_links,
)

__all__ = [
    "HEADER_FIELDS",
    "MESSAGES_SCHEMA",
    "PARTICIPANTS_SCHEMA",
    "SENSITIVITY_EXPAND",
    "SENSITIVITY_VALUES",
    "DeltaPage",
    "DeltaTokenExpired",
    "HeaderPage",
    "MessageHeader",
    "fetch_bodies",
    "graph_datetime",
    "iter_delta_pages",
    "iter_header_pages",
    "parse_page",
]

HEADER_FIELDS = (
    "id",
    "internetMessageId",
    "conversationId",
    "subject",
    "from",
    "sender",
    "toRecipients",
    "ccRecipients",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "isDraft",
    "parentFolderId",
    "webLink",
)
# PidTagSensitivity (PtypInteger32) → the `sensitivity` column
SENSITIVITY_VALUES = {0: "normal", 1: "personal", 2: "private", 3: "confidential"}
_SENSITIVITY_ID = re.compile(r"\s*integer\s+0x0*36\s*", re.IGNORECASE)
_TS = pa.timestamp("us", tz="UTC")
MESSAGES_SCHEMA = pa.schema(
    [
        ("graph_id", pa.string()),
        ("folder", pa.string()),
        ("internet_message_id", pa.string()),
        ("conversation_id", pa.string()),
        ("subject", pa.string()),
        ("from_name", pa.string()),
        ("from_address", pa.string()),
        ("received_at", _TS),
        ("sent_at", _TS),
        ("has_attachments", pa.bool_()),
        ("is_draft", pa.bool_()),
        ("web_link", pa.string()),
        ("parent_folder_id", pa.string()),
        ("odata_type", pa.string()),
        ("sensitivity", pa.string()),
        ("is_partial", pa.bool_()),
    ]
)
PARTICIPANTS_SCHEMA = pa.schema(
    [
        ("graph_id", pa.string()),
        ("role", pa.string()),
        ("name", pa.string()),
        ("address", pa.string()),
    ]
)
BODY_BATCH_HEADERS = {"Prefer": 'outlook.body-content-type="text"'}


class EmailAddress(msgspec.Struct):
    name: str | None = None
    address: str | None = None


class Recipient(msgspec.Struct):
    email_address: EmailAddress | None = msgspec.field(default=None, name="emailAddress")


class ExtendedProperty(msgspec.Struct):
    """One `singleValueExtendedProperties` entry (the value is a string on the wire; a number is tolerated)."""

    id: str | None = None
    value: str | int | None = None


class MessageHeader(msgspec.Struct):
    """Only the `HEADER_FIELDS` (plus `@odata.type`/`@removed` and the expanded extended properties); everything
    else on the wire is skipped without building Python objects. `UNSET` = the field was absent from the JSON
    (partial delta item), None = null."""

    id: str
    odata_type: str | None | UnsetType = msgspec.field(default=UNSET, name="@odata.type")
    removed: Any = msgspec.field(default=UNSET, name="@removed")
    internet_message_id: str | None | UnsetType = msgspec.field(default=UNSET, name="internetMessageId")
    conversation_id: str | None | UnsetType = msgspec.field(default=UNSET, name="conversationId")
    subject: str | None | UnsetType = UNSET
    from_: Recipient | None | UnsetType = msgspec.field(default=UNSET, name="from")
    sender: Recipient | None | UnsetType = UNSET
    to_recipients: list[Recipient | None] | None | UnsetType = msgspec.field(default=UNSET, name="toRecipients")
    cc_recipients: list[Recipient | None] | None | UnsetType = msgspec.field(default=UNSET, name="ccRecipients")
    received: str | None | UnsetType = msgspec.field(default=UNSET, name="receivedDateTime")  # cast in Arrow
    sent: str | None | UnsetType = msgspec.field(default=UNSET, name="sentDateTime")
    has_attachments: bool | None | UnsetType = msgspec.field(default=UNSET, name="hasAttachments")
    is_draft: bool | None | UnsetType = msgspec.field(default=UNSET, name="isDraft")
    parent_folder_id: str | None | UnsetType = msgspec.field(default=UNSET, name="parentFolderId")
    web_link: str | None | UnsetType = msgspec.field(default=UNSET, name="webLink")
    extended: list[ExtendedProperty | None] | None | UnsetType = msgspec.field(
        default=UNSET, name="singleValueExtendedProperties"
    )


class _PageWire(msgspec.Struct):
    value: list[MessageHeader] = []
    next_link: str | None = msgspec.field(default=None, name="@odata.nextLink")
    delta_link: str | None = msgspec.field(default=None, name="@odata.deltaLink")


class _Body(msgspec.Struct):
    content_type: str | None = msgspec.field(default=None, name="contentType")
    content: str | None = None


class _BodyOnly(msgspec.Struct):
    body: _Body | None = None


_decode_page = msgspec.json.Decoder(_PageWire).decode


@dataclass(frozen=True, slots=True)
class HeaderPage:
    messages: pa.Table  # MESSAGES_SCHEMA, one row per message
    participants: pa.Table  # PARTICIPANTS_SCHEMA, one row per (message, role, recipient)
    odd: int = 0  # items whose text had to be repaired (U+FFFD)


@dataclass(frozen=True, slots=True)
class DeltaPage:
    messages: pa.Table  # MESSAGES_SCHEMA, one row per created/updated item (is_partial marks patches)
    participants: pa.Table  # PARTICIPANTS_SCHEMA, full rows only
    removed: list[str]  # ids reported `@removed` (deleted or moved out of the folder)
    delta_link: str | None  # set on the last page of a round only: the durable cursor
    odd: int = 0  # items whose text had to be repaired (U+FFFD)


def graph_datetime(when: datetime) -> str:
    """An unquoted `$filter` DateTimeOffset literal, UTC, whole seconds (floored: `ge` stays a superset)."""
    if when.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _to_datetime(value: str) -> datetime | None:
    try:
        when = msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _timestamps(values: list[str | None]) -> pa.Array:
    """ISO-8601 UTC strings → timestamp[us, UTC]; Arrow's parser first, msgspec's (7-digit fractions, odd values →
    NULL) if it balks."""
    try:
        return pa.array(values, pa.string()).cast(_TS)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([_to_datetime(v) if isinstance(v, str) else None for v in values], _TS)


def _sensitivity(extended: list[ExtendedProperty | None]) -> str | None:
    """The `sensitivity` column from the expanded extended properties (see the module docstring)."""
    for prop in extended:
        if prop is not None and prop.id is not None and _SENSITIVITY_ID.fullmatch(prop.id):
            value = prop.value
            if isinstance(value, str):
                value = value.strip()
                if not value.isdecimal() or not value.isascii():
                    return None
            return SENSITIVITY_VALUES.get(int(value)) if value is not None else None
    return None


def _present(values: list[Any], u: Any = UNSET) -> list[Any]:
    return [None if v is u else v for v in values]


def _page_tables(folder: str, headers: list[MessageHeader]) -> tuple[pa.Table, pa.Table, list[str]]:
    removed = [m.id for m in headers if m.removed is not UNSET]
    if removed:
        headers = [m for m in headers if m.removed is UNSET]
    u = UNSET
    partial = [
        m.internet_message_id is u
        or m.conversation_id is u
        or m.subject is u
        or m.to_recipients is u
        or m.cc_recipients is u
        or m.received is u
        or m.sent is u
        or m.has_attachments is u
        or m.is_draft is u
        or m.parent_folder_id is u
        or m.web_link is u
        for m in headers
    ]  # = the item lacks a HEADER_FIELDS key other than id/from/sender
    patchy = True in partial
    ids = [m.id for m in headers]
    froms = [m.from_.email_address if type(m.from_) is Recipient else None for m in headers]
    p_ids: list[str] = []
    p_roles: list[str] = []
    p_names: list[str | None] = []
    p_addrs: list[str | None] = []
    add_id, add_role, add_name, add_addr = p_ids.append, p_roles.append, p_names.append, p_addrs.append
    for m, is_part in zip(headers, partial, strict=True):
        if is_part:
            continue  # unknown participants: the caller keeps what it has
        gid = m.id
        for role, recipients in (
            ("from", (m.from_,)),
            ("sender", (m.sender,)),
            ("to", m.to_recipients),
            ("cc", m.cc_recipients),
        ):
            if recipients:
                for r in recipients:
                    if type(r) is not Recipient or (ea := r.email_address) is None:
                        continue
                    addr, name = ea.address, ea.name
                    if addr is not None and addr and not addr.isspace():
                        add_id(gid)
                        add_role(role)
                        add_name(name)
                        add_addr(addr)
                    elif name is not None and name and not name.isspace():  # a name only: for o365sync/participants.py
                        add_id(gid)
                        add_role(role)
                        add_name(name)
                        add_addr(None)

    def col(values: list[Any]) -> list[Any]:
        return _present(values) if patchy else values

    string = pa.string()
    messages = pa.Table.from_arrays(
        [
            pa.array(ids, string),
            pa.array([folder] * len(ids), string),
            pa.array(col([m.internet_message_id for m in headers]), string),
            pa.array(col([m.conversation_id for m in headers]), string),
            pa.array(col([m.subject for m in headers]), string),
            pa.array([f.name if f is not None else None for f in froms], string),
            pa.array([f.address if f is not None else None for f in froms], string),
            _timestamps(col([m.received for m in headers])),
            _timestamps(col([m.sent for m in headers])),
            pa.array(col([m.has_attachments for m in headers]), pa.bool_()),
            pa.array(col([m.is_draft for m in headers]), pa.bool_()),
            pa.array(col([m.web_link for m in headers]), string),
            pa.array(col([m.parent_folder_id for m in headers]), string),
            pa.array(_present([m.odata_type for m in headers]), string),
            pa.array([_sensitivity(x) if (x := m.extended) else None for m in headers], string),
            pa.array(partial, pa.bool_()),
        ],
        schema=MESSAGES_SCHEMA,
    )
    participants = pa.Table.from_arrays(
        [
            pa.array(p_ids, string),
            pa.array(p_roles, string),
            pa.array(p_names, string),
            pa.array(p_addrs, string),
        ],
        schema=PARTICIPANTS_SCHEMA,
    )
    return messages, participants, removed


def parse_page(raw: bytes, folder: str) -> DeltaPage:
    """One raw Graph page (list or delta) → tables. `delta_link` is set only when the page ends a delta round
    (a deltaLink and no nextLink). Raises `GraphError(0, "MalformedPage")` if the JSON is not a message page."""
    wire, odd = decode_page(raw, _decode_page, _PageWire, MessageHeader)
    messages, participants, removed = _page_tables(folder, wire.value)
    return DeltaPage(messages, participants, removed, wire.delta_link if wire.next_link is None else None, len(odd))


def iter_header_pages(client: GraphClient, folder: str, since: datetime, page_size: int) -> Iterator[HeaderPage]:
    """Headers of `folder` (well-known name or id) received at or after `since`, oldest first, page by page.

    Oldest first so the highest receivedDateTime seen is a sound resume point, and mail that arrives while we
    page lands at the end instead of shifting the pages still to come."""
    if not 1 <= page_size <= 1000:
        raise ValueError("page_size must be 1..1000")
    params = {
        "$select": ",".join(HEADER_FIELDS),
        "$expand": SENSITIVITY_EXPAND,
        "$filter": f"receivedDateTime ge {graph_datetime(since)}",
        "$orderby": "receivedDateTime asc",
        "$top": str(page_size),
    }
    path = f"me/mailFolders/{quote(folder, safe='')}/messages"
    for raw in client.iter_pages(path, params):
        page = parse_page(raw, folder)
        del raw
        yield HeaderPage(page.messages, page.participants, page.odd)


def iter_delta_pages(
    client: GraphClient, folder: str, *, delta_link: str | None, since: datetime | None, page_size: int
) -> Iterator[DeltaPage]:
    """One delta round of `folder` (well-known name or id), page by page; the last page carries the new deltaLink.

    With `delta_link` (the one stored from the previous round) the round starts there, verbatim: `since` is then
    ignored, because the first round's `$select`/`$expand`/`$filter` live inside the token. Without it, a new round
    starts with `$select=HEADER_FIELDS`, `$expand=SENSITIVITY_EXPAND` and, when `since` is given,
    `$filter=receivedDateTime ge since` (Graph then caps the round at 5,000 messages). Raises `DeltaTokenExpired`
    when the token is dead (the caller restarts with `delta_link=None`), and `GraphPagingError("MissingDeltaLink")`
    after the last page if Graph ended the round without a deltaLink. Do not persist anything from the middle of a
    round: only the final `delta_link`."""
    last: str | None = None
    for raw in client.iter_pages(*_delta_request(folder, delta_link, since, page_size)):
        page = parse_page(raw, folder)
        del raw
        last = page.delta_link
        yield page
        del page
    if last is None:
        raise GraphPagingError(0, "MissingDeltaLink")


def baseline_delta_link(client: GraphClient, folder: str, *, since: datetime, page_size: int) -> str:
    """A new delta round of `folder` from `since`, run to its end for its deltaLink alone: the items are not
    decoded (up to 5,000 per folder, which the list backfill covers anyway), only each page's links. The request is
    `iter_delta_pages`' own, so the token carries the same `$select`/`$expand`/`$filter`. Raises
    `GraphPagingError("MissingDeltaLink")` when Graph ends the round without one."""
    last: str | None = None
    for raw in client.iter_pages(*_delta_request(folder, None, since, page_size)):
        links = page_links(raw)
        last = links.delta_link if links.next_link is None else None
    if last is None:
        raise GraphPagingError(0, "MissingDeltaLink")
    return last


def _delta_request(
    folder: str, delta_link: str | None, since: datetime | None, page_size: int
) -> tuple[str, dict[str, str] | None, dict[str, str]]:
    """(start, params, headers) of a delta round: the stored link verbatim, or a new round's request."""
    if not 1 <= page_size <= 1000:
        raise ValueError("page_size must be 1..1000")
    headers = {"Prefer": f"odata.maxpagesize={page_size}"}
    if delta_link is not None:
        return delta_link, None, headers
    params = {"$select": ",".join(HEADER_FIELDS), "$expand": SENSITIVITY_EXPAND}
    if since is not None:
        params["$filter"] = f"receivedDateTime ge {graph_datetime(since)}"
    return f"me/mailFolders/{quote(folder, safe='')}/messages/delta", params, headers


def fetch_bodies(client: GraphClient, ids: list[str]) -> Iterator[tuple[str, str]]:
    """(graph_id, plain-text body) for `ids` via `$batch`; messages deleted meanwhile (404) are skipped.
    Only `body` is selected: attachments are never downloaded."""
    requests = [
        {
            "id": str(i),
            "method": "GET",
            "url": f"/me/messages/{quote(gid, safe='')}?$select=body",
            "headers": BODY_BATCH_HEADERS,
        }
        for i, gid in enumerate(ids)
    ]
    for rid, status, body in client.batch(requests):
        if status == 404:
            continue
        if status >= 400:
            raise error_for(status, body)
        yield ids[int(rid)], _body_text(body)


def _body_text(body: Any) -> str:
    parsed = msgspec.convert(body, _BodyOnly) if isinstance(body, dict) else _BodyOnly()
    return (parsed.body.content or "") if parsed.body is not None else ""
