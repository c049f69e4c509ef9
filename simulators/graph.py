"""Microsoft Graph mail simulator: `/me`, mail folders, message listing/paging, single messages and `$batch`,
with Outlook's per-mailbox concurrency limit, scope checks, the exact Graph error shape and fault injection.

Behaviour follows Microsoft's Graph documentation (messages, delta, throttling, errors) and observed behaviour.
Deliberate simplifications:
- the `$batch` envelope itself takes no mailbox slot, is not counted in the request budget and never consumes an
  injected fault; its inner requests do (they are the Outlook requests), at most 4 inner requests of one batch run
  at a time;
- `$skip` in nextLinks is the plain offset into the filtered, ordered folder (the client must not care);
- ids: `SimMessage.id` is the immutable id, served only with `Prefer: IdType="ImmutableId"` on that request;
  otherwise the mutable id (`SimMessage.mutable_id()`, changes on every move). Both are accepted on
  `/me/messages/{id}`; a mutable id from before a move is 404, as in Graph.

`$search` on message listings (KQL participants/from/to/cc/received, 1,000 results at most, no `$filter`/
`$orderby`/`$skip` beside it) lives in simulators/graph_search.py.

Calendar, online meetings and Teams live in simulators/graph_calendar.py (`GraphSimulator.calendar`).

Per-folder message delta with opaque server-side tokens: see `_delta`. Choices where real Graph is not
verified (only observed in reports, inferred, or open) are marked "UNVERIFIED" in comments.

Sensitivity: `message` has no `sensitivity` property in Graph v1.0 (only `event` has), so `$select=sensitivity` is
the 400 `RequestBroker--ParseUri` "Could not find a property named 'sensitivity' on type 'microsoft.graph.message'."
like any unknown name. It is MAPI PidTagSensitivity (0x0036, PtypInteger32), served only through
`$expand=singleValueExtendedProperties($filter=id eq 'Integer 0x0036')` (list, delta, single message, inner `$batch`
requests; see `_parse_expand` and `_sensitivity_ext`); every other `$expand` is refused as before.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import random
import re
import secrets
import threading
import time
import uuid
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import msgspec

from simulators import server
from simulators.graph_search import SearchSyntaxError, search_messages
from simulators.server import OnServer, Request, Response, SimServer
from simulators.tls import SimulatorTLS
from simulators.tokens import AccessClaims, TokenAuthority, TokenError
from simulators.world import MESSAGE_TYPE, Mailbox, SimMessage, Tombstone, World

WELL_KNOWN_FOLDERS = {
    "inbox": "Inbox",
    "sentitems": "Sent Items",
    "drafts": "Drafts",
    "junkemail": "Junk Email",
    "deleteditems": "Deleted Items",
    "archive": "Archive",
}
MAIL_READ_SCOPES = frozenset({"Mail.Read", "Mail.ReadWrite"})
MAIL_BASIC_SCOPES = MAIL_READ_SCOPES | {"Mail.ReadBasic"}
BODY_PROPS = frozenset({"body", "bodyPreview", "uniqueBody"})
# Properties returned without $select, in Graph's order; uniqueBody only via $select.
DEFAULT_PROPS = (
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "bodyPreview",
    "importance",
    "parentFolderId",
    "conversationId",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
    "isRead",
    "isDraft",
    "webLink",
    "inferenceClassification",
    "body",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
    "flag",
)
# `sensitivity` is not a `message` property (only `event` has one): selecting it is a 400.
SELECTABLE = {p.lower(): p for p in (*DEFAULT_PROPS, "id", "uniqueBody")}
# The one supported `$expand`: MAPI PidTagSensitivity (0x0036) as a single-value extended property. The id is
# matched case-insensitively and with any number of leading zeros ("Integer 0x36", "integer 0X0036"); Graph answers
# with the id normalised to "Integer 0x36" (lower-case hex, leading zeros dropped, as a Microsoft Q&A answer shows
# for "Binary 0x0E0A" -> "Binary 0xe0a"; UNVERIFIED for 0x0036 itself) and the value as a decimal string (DOC).
# UNVERIFIED: real Graph accepts any well-formed extended-property id here (and answers without the property when a
# message lacks it); the simulator refuses every other $expand like before (400 "Query option ... not supported").
EXT_PROPS = "singleValueExtendedProperties"
SENSITIVITY_EXT_ID = "Integer 0x36"
SENSITIVITY_EXT_VALUES = {"personal": "1", "private": "2", "confidential": "3"}  # "normal": see _sensitivity_ext
_EXPAND_RE = re.compile(
    r"\s*singleValueExtendedProperties\s*\(\s*\$filter\s*=\s*id\s+eq\s+"
    r"'\s*(\w+)\s+0x([0-9a-f]{1,8})\s*'\s*\)\s*",
    re.IGNORECASE,
)
# SimMessage field -> the Graph properties an update of it changes (for partial delta items); a sensitivity change
# shows up as the expanded extended property, when the round was started with that $expand
FIELD_PROPS = {
    "subject": ("subject",),
    "body": ("body", "bodyPreview", "uniqueBody"),
    "is_read": ("isRead",),
    "is_draft": ("isDraft",),
    "sensitivity": (),
    "odata_type": (),
    "has_attachments": ("hasAttachments",),
    "to": ("toRecipients",),
    "cc": ("ccRecipients",),
    "bcc": ("bccRecipients",),
    "sender": ("sender", "from"),
}
BATCH_LIMIT = 20
BATCH_INNER_CONCURRENCY = 4
INNER_POOL_THREADS = 256  # lanes of concurrent $batch requests (3 per batch: the batch's own thread is the 4th)
_SUPPORTED_OPTIONS = {"$select", "$filter", "$top", "$skip", "$orderby", "$count", "$expand", "$search", "$skiptoken"}
_DELTA_OPTIONS = {"$select", "$filter", "$top", "$orderby", "$expand", "$skiptoken", "$deltatoken"}
DELTA_DEFAULT_PAGE = 10  # observed; Graph documents no default for delta
DELTA_FILTER_CAP = 5000  # with $filter a delta round returns at most 5,000 messages (DOC)
_DELTA_FILTER_ERROR = (
    "The '$filter' parameter value is not supported for 'Messages' resource; only a value of "
    "'receivedDateTime ge value' is supported."
)
_FILTER_RE = re.compile(
    r"\s*receivedDateTime\s+(ge|gt)\s+(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2}))\s*",
    re.IGNORECASE,
)
_QUOTED_FILTER_RE = re.compile(r"\s*receivedDateTime\s+(ge|gt|le|lt|eq)\s+'[^']*'\s*", re.IGNORECASE)
# `internetMessageId eq '<id>'` on a listing (Graph: a string literal, `''` for a quote inside it).
_IMID_FILTER_RE = re.compile(r"\s*internetMessageId\s+eq\s+'((?:[^']|'')*)'\s*", re.IGNORECASE)
_ORDERBY_RE = re.compile(r"\s*(\w+)(?:\s+(asc|desc))?\s*", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
HALF_EMOJI = "\ud83d"  # the high half of U+1F600..: what a client that cut an emoji in two leaves behind


def _encode(obj: Any) -> bytes:
    """JSON; text UTF-8 cannot carry (a lone surrogate) as the `\\udXXX` escape Graph's JSON writer emits."""
    try:
        return msgspec.json.encode(obj)
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


class GraphFail(Exception):
    """Raised inside handlers; becomes a Graph error response."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, code, message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass(frozen=True)
class LoggedRequest(server.LoggedRequest):
    oid: str | None = None
    inner: bool = False  # an inner request of a $batch


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: str | None
    code: str | None
    path_contains: str | None = None


@dataclass
class _Ctx:
    request_id: str
    client_request_id: str
    claims: AccessClaims | None = None


@dataclass
class _FolderIndex:
    stamp: tuple[int, int]
    desc: list[SimMessage]  # receivedDateTime desc, id desc on ties
    neg_us: list[int]  # -received (µs since epoch), ascending, aligned with `desc`


@dataclass
class _Mailbox:
    stamp: tuple[int, int, int] = (0, 0, 0)
    by_id: dict[str, SimMessage] = field(default_factory=dict)  # immutable id -> message
    by_mutable: dict[str, SimMessage] | None = None  # built on the first lookup by a mutable id


@dataclass
class _DeltaState:
    """One sync-state lineage: every token minted from one initial delta request shares it."""

    oid: str
    folder: str
    select: tuple[str, ...] | None
    flt: tuple[str, int] | None
    expand: bool = False  # the sensitivity extended property was $expand-ed (kept in the token, like $select)
    generation: int = 0  # rounds served so far (quoted in the SyncStateNotFound message)
    evicted: str | None = None  # error code to answer once evicted


@dataclass
class _Round:
    """A delta round, planned when it starts: items are (kind, message or tombstone, changed SimMessage fields)
    with kind "full" | "partial" | "removed"; rendered (current state) when their page is served."""

    state: _DeltaState
    since_seq: int | None  # None: the initial round
    end_seq: int  # World.change_seq when the round started; the round's deltaLink continues from here
    items: list[tuple[str, Any, frozenset[str]]]


@dataclass(frozen=True)
class SentResponse:
    """A response sent to a mailbox: when (TokenAuthority clock), status, Retry-After seconds, request key."""

    at: float
    status: int
    retry_after: float | None
    key: tuple


@dataclass(frozen=True)
class RetryViolation:
    """A request that arrived before the Retry-After of an earlier 429/503 had passed.

    `same_request`: that earlier throttled response was for the same request (method, path, query): a retry that
    came too soon. Otherwise any other request of the mailbox that arrived after the throttled response was sent
    (plus `retry_grace_s`) but before its Retry-After ran out."""

    oid: str
    key: tuple
    arrived: float
    throttled_at: float
    retry_after: float
    same_request: bool


def _us(dt: datetime) -> int:
    return (dt - _EPOCH) // _ONE_US


_ONE_US = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH


def _iso(dt: datetime) -> str:
    if dt.tzinfo is UTC and not dt.microsecond:
        return dt.isoformat()[:-6] + "Z"  # fast path; the world's datetimes are whole-second UTC
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_URLSAFE_ID = re.compile(r"[A-Za-z0-9_=-]*")


def _quote_id(item_id: str) -> str:
    return item_id.replace("=", "%3D") if _URLSAFE_ID.fullmatch(item_id) else quote(item_id, safe="")


def _recipient(m: Mailbox | None) -> dict | None:
    if m is None:
        return None  # no from/sender at all
    if m.name is not None and m.address is not None:
        return {"emailAddress": {"name": m.name, "address": m.address}}
    # odd items: name-only recipients and an empty emailAddress (UNVERIFIED: keys omitted rather than null)
    ea = {k: v for k, v in (("name", m.name), ("address", m.address)) if v is not None}
    return {"emailAddress": ea}


def _opaque(*parts: str) -> str:
    return base64.urlsafe_b64encode(hashlib.blake2b("|".join(parts).encode(), digest_size=24).digest()).decode()


def _received_filter(raw: str) -> tuple[str, int] | None:
    """("ge" | "gt", microseconds since the epoch) of a `receivedDateTime ge|gt <ISO time>` filter; None for any
    other filter."""
    m = _FILTER_RE.fullmatch(raw)
    if m is None:
        return None
    try:
        return m.group(1).lower(), _us(datetime.fromisoformat(m.group(2).upper().replace("Z", "+00:00")))
    except ValueError:
        return None


def _select(raw: str | None, selectable: dict[str, str], entity: str) -> tuple[str, ...] | None:
    """A `$select` list as the properties' canonical names, in order, once each (None: no `$select`); `selectable`
    maps lower-cased names to canonical ones; any other name is the 400 Graph answers for `microsoft.graph.<entity>`."""
    if raw is None:
        return None
    out: list[str] = []
    for item in raw.split(","):
        name = item.strip()
        canon = selectable.get(name.lower())
        if canon is None:
            raise GraphFail(
                400,
                "RequestBroker--ParseUri",
                f"Could not find a property named '{name}' on type 'microsoft.graph.{entity}'.",
            )
        if canon not in out:
            out.append(canon)
    return tuple(out)


@functools.lru_cache(maxsize=256)  # the same few `$select` lists on every request (a 400 is raised, not cached)
def _message_select(raw: str | None) -> tuple[str, ...] | None:
    return _select(raw, SELECTABLE, "message")


@functools.lru_cache(maxsize=256)  # an inner `$batch` request's query is the same for every message of a batch
def _query_options(query: str) -> dict[str, str]:
    """First value of each parameter of a query string (a shared dict: copy it before changing it)."""
    return {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _prefer(headers: dict[str, str]) -> dict[str, str]:
    """The `Prefer` header's preferences, lower-case names (a shared dict: read it, never change it)."""
    return _parse_prefer(headers.get("prefer", ""))


@functools.lru_cache(maxsize=256)  # a client sends the same few Prefer values again and again
def _parse_prefer(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in raw.split(","):
        key, _, value = item.strip().partition("=")
        if key:
            out[key.strip().lower()] = value.strip().strip('"')
    return out


class GraphSimulator(OnServer):
    """Serve a `World`'s mailboxes as Microsoft Graph v1.0 on loopback HTTPS."""

    def __init__(
        self,
        world: World,
        tls: SimulatorTLS,
        tokens: TokenAuthority,
        port: int = 0,
        max_in_flight: int = 4,
        latency_s: float = 0.0,
        throttle_retry_after: str = "0.2",
        seed: int = 0,
        *,
        budget_requests: int | None = 10_000,
        budget_window_s: float = 600.0,
        fault_share: float = 0.0,
        fault_statuses: tuple[int, ...] = (429, 503, 504),
        fault_retry_after: tuple[float, float] = (0.05, 2.0),
        fault_seed: int = 0,
        partial_updates: bool = True,
        duplicate_share: float = 0.0,
        empty_page_share: float = 0.0,
        delta_max_page_size: int = 1000,
        filter_later_rounds: bool = True,
        retry_grace_s: float = 0.05,
        endless_next_links: bool = False,
        lone_surrogate_ids: frozenset[str] = frozenset(),
    ):
        """Knobs (all plain attributes too; `reset()` restores the constructor values, latency 0):
        - `max_in_flight`: Outlook's MailboxConcurrency (429 ApplicationThrottled, Retry-After
          `throttle_retry_after`);
        - `budget_requests` per `budget_window_s` per mailbox, sliding window on `tokens.clock` (None: off):
          429 ApplicationThrottled with Retry-After = whole seconds until the window has room;
        - `fault_share` of mailbox requests fail with a status from `fault_statuses` (own RNG, `fault_seed`):
          429 with Retry-After (integer or fractional, within `fault_retry_after` seconds), 503 with or without
          Retry-After, 504 without;
        - delta: `partial_updates` (updated items as id + changed properties + parentFolderId; False: full items),
          `duplicate_share` (that share of a round's items is sent again at the end of the round),
          `empty_page_share` (that share of non-final pages come back empty with a nextLink),
          `delta_max_page_size` (cap on `Prefer: odata.maxpagesize`), `filter_later_rounds` (the first request's
          `$filter` also limits the created/updated items of later rounds — UNVERIFIED, the safe assumption:
          updates of mail older than the filter are then never reported; False: it only limits the first round);
        - `retry_grace_s`: see `retry_violations`;
        - faults of a misbehaving server: `endless_next_links` (the last page of a message listing, a message delta
          round or a calendarView (delta) round carries a fresh nextLink to an empty page instead of ending, forever);
          `lone_surrogate_ids` (messages whose subject and sender name, and events — a series: every instance —
          whose subject end in `HALF_EMOJI`, sent as the JSON escape "\\ud83d": valid JSON, not valid Unicode)."""
        self.world = world
        self.tokens = tokens
        self.max_in_flight = max_in_flight
        self.latency_s = latency_s  # per mailbox request, slept while holding the mailbox slot
        self.throttle_retry_after = throttle_retry_after
        self.budget_requests = budget_requests
        self.budget_window_s = budget_window_s
        self.fault_share = fault_share
        self.fault_statuses = fault_statuses
        self.fault_retry_after = fault_retry_after
        self.fault_seed = fault_seed
        self.partial_updates = partial_updates
        self.duplicate_share = duplicate_share
        self.empty_page_share = empty_page_share
        self.delta_max_page_size = delta_max_page_size
        self.filter_later_rounds = filter_later_rounds
        self.retry_grace_s = retry_grace_s
        self.endless_next_links = endless_next_links
        self.lone_surrogate_ids = frozenset(lone_surrogate_ids)
        self._knobs = {
            k: getattr(self, k)
            for k in (
                "max_in_flight",
                "throttle_retry_after",
                "budget_requests",
                "budget_window_s",
                "fault_share",
                "fault_statuses",
                "fault_retry_after",
                "fault_seed",
                "partial_updates",
                "duplicate_share",
                "empty_page_share",
                "delta_max_page_size",
                "filter_later_rounds",
                "retry_grace_s",
                "endless_next_links",
                "lone_surrogate_ids",
            )
        }
        self.requests: list[LoggedRequest] = []
        self.searches: list[tuple[str, str | None, str, int]] = []  # $search pages served: (oid, folder, kql, offset)
        self.peak_in_flight: dict[str, int] = {}
        self.sent: dict[str, list[SentResponse]] = {}  # oid -> every response, in order
        self._violations: dict[str, list[RetryViolation]] = {}
        self._blocked: dict[str, tuple[float, float, float]] = {}  # oid -> (until, throttled at, retry-after)
        self._blocked_key: dict[tuple, tuple[float, float, float]] = {}  # (oid, key) -> same
        self._budget: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # see _inner_pool
        self._rng = random.Random(seed)
        self._fault_rng = random.Random(fault_seed)
        self._folders: dict[tuple[str, str], _FolderIndex] = {}
        self._mailboxes: dict[str, _Mailbox] = {}
        self._folder_ids: dict[tuple[str, str], str] = {}
        self._base: dict[str, dict] = {}  # message id -> all body-independent properties
        self._frags: dict[tuple, dict[str, bytes]] = {}  # (select, body type, id type, typed) -> id -> JSON
        self._applied_seq = world.change_seq  # world changes up to here have been dropped from the caches
        # token -> ("page", round, position) | ("delta", sync state, change_seq the next round starts from)
        self._delta_tokens: dict[str, tuple[str, Any, int]] = {}
        self._delta_states: list[_DeltaState] = []
        mail = (
            ("GET", r"/v1\.0/me/messages/delta", self._mailbox_delta),
            ("GET", r"/v1\.0/me/mailFolders/([^/]+)/messages/delta", self._delta),
            ("GET", r"/v1\.0/me/mailFolders(?:\(|%28)(?:'|%27)([^/]+?)(?:'|%27)(?:\)|%29)/messages/delta", self._delta),
            ("GET", r"/v1\.0/me", self._get_me),
            ("GET", r"/v1\.0/me/mailFolders/([^/]+)", self._get_folder),
            ("GET", r"/v1\.0/me/mailFolders/([^/]+)/messages", self._list_messages),
            ("GET", r"/v1\.0/me/messages", self._list_messages),
            ("GET", r"/v1\.0/me/messages/([^/]+)", self._get_message),
        )
        from simulators.graph_calendar import CalendarEndpoints  # calendar + Teams (imports this module)

        self.calendar = CalendarEndpoints(self)
        mail = (*mail, *self.calendar.routes())
        self._routes = [(m, re.compile(p, re.IGNORECASE), self._endpoint(h)) for m, p, h in mail]
        self._any_route = re.compile(
            "|".join(f"(?P<r{i}>{re.escape(m)} (?:{p}))" for i, (m, p, _) in enumerate(mail)), re.IGNORECASE
        )
        routes: list[tuple[str, str, Callable[[Request], Response]]] = [
            (m, "(?i)" + p, self._endpoint(h)) for m, p, h in mail
        ]
        routes.append(("POST", r"(?i)/v1\.0/\$batch", self._batch))
        self.server = SimServer(tls, routes, port=port, name="graph-sim")

    # ---------------------------------------------------------------- lifecycle / test hooks
    @property
    def base_url(self) -> str:
        return f"{self.server.base_url}/v1.0"

    def inject(
        self,
        oid: str,
        status: int,
        count: int = 1,
        retry_after: str | None = None,
        code: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """The next `count` mailbox requests of `oid` (inner $batch requests included) answer `status`;
        with `path_contains`, only requests whose path contains it (case-insensitive) are hit."""
        with self._lock:
            self._faults.setdefault(oid, []).append(
                _Fault(status, count, retry_after, code, path_contains.lower() if path_contains else None)
            )

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()
            self.searches.clear()
            self.peak_in_flight.clear()
            self.sent.clear()
            self._violations.clear()
            self._blocked.clear()
            self._blocked_key.clear()

    def reset(self) -> None:
        """Forget pending faults, the request log, peaks, budgets and the response log; knobs back to their
        constructor values, no latency (tests share one running simulator). Delta tokens stay valid."""
        with self._lock:
            self._faults.clear()
            self._budget.clear()
            for k, v in self._knobs.items():
                setattr(self, k, v)
            self._fault_rng = random.Random(self.fault_seed)
        self.latency_s = 0.0
        self.calendar.reset()
        self.reset_stats()

    def evict_delta_tokens(self, oid: str, folder: str | None = None, code: str = "SyncStateNotFound") -> int:
        """Evict the sync state behind every deltaLink/nextLink of `oid` (one well-known `folder`, or all): the
        next use answers 410 Gone `SyncStateNotFound` (or, with `code="resyncRequired"`, 400 resyncRequired).
        Returns how many sync states were evicted; a new initial round starts a fresh one."""
        with self._lock:
            hit = [
                st
                for st in self._delta_states
                if st.oid == oid and st.evicted is None and (folder is None or st.folder == folder.lower())
            ]
            for st in hit:
                st.evicted = code
            return len(hit)

    def retry_violations(self, oid: str, mailbox_wide: bool = False) -> list[RetryViolation]:
        """Requests of `oid` that came sooner than an earlier 429/503's Retry-After allowed.

        Default: only retries of the very request that was throttled (same method, path and query). With
        `mailbox_wide`, also any other request of the mailbox that arrived more than `retry_grace_s` after a
        throttled response was sent and before its Retry-After ran out (Retry-After applies to the mailbox;
        the grace allows for requests already on the wire). Times are `tokens.clock()`."""
        with self._lock:
            return [v for v in self._violations.get(oid, []) if mailbox_wide or v.same_request]

    def mutable_id(self, m: SimMessage) -> str:
        return m.mutable_id()

    def folder_id(self, oid: str, folder: str) -> str:
        key = (oid, folder.lower())
        fid = self._folder_ids.get(key)
        if fid is None:
            fid = self._folder_ids[key] = _opaque("folder", *key)
        return fid

    # ---------------------------------------------------------------- request plumbing
    def _error(
        self, ctx: _Ctx, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> Response:
        body = {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": ctx.request_id,
                    "client-request-id": ctx.client_request_id,
                },
            }
        }
        return Response(status, body, dict(headers or {}))

    def _authenticate(self, req: Request) -> AccessClaims:
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("Access token is empty.")
        return self.tokens.verify_access_token(token.strip())

    def _unauthorized(self, ctx: _Ctx, exc: TokenError) -> Response:
        www = (
            'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
            'client_id="00000003-0000-0000-c000-000000000000"'
        )
        return self._error(ctx, 401, "InvalidAuthenticationToken", str(exc), {"WWW-Authenticate": www})

    def _take_fault(self, oid: str, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(oid) or []
            fault = next((f for f in queue if f.path_contains is None or f.path_contains in path.lower()), None)
            if fault is None:
                return None
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.remove(fault)
            return fault

    def _fault_response(self, ctx: _Ctx, fault: _Fault) -> Response:
        default = {
            429: ("TooManyRequests", "Please retry again later."),
            503: ("serviceNotAvailable", "The service is temporarily unavailable."),
            504: ("UnknownError", "Gateway Timeout"),
            500: ("generalException", "An unspecified error has occurred."),
        }
        code, message = default.get(fault.status, ("generalException", "Injected fault."))
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        return self._error(ctx, fault.status, fault.code or code, message, headers)

    def _admit(self, oid: str) -> bool:
        with self._lock:
            n = self._in_flight.get(oid, 0)
            if n >= self.max_in_flight:
                return False
            self._in_flight[oid] = n + 1
            if n + 1 > self.peak_in_flight.get(oid, 0):
                self.peak_in_flight[oid] = n + 1
            return True

    def _release(self, oid: str) -> None:
        with self._lock:
            self._in_flight[oid] -= 1

    def _log(self, req: Request, status: int, oid: str | None, inner: bool) -> None:
        with self._lock:
            self.requests.append(LoggedRequest(req.method, req.path, status, oid, inner))

    def _new_ctx(self, req: Request) -> _Ctx:
        rid = str(uuid.uuid4())
        return _Ctx(rid, req.headers.get("client-request-id") or rid)

    def _random_fault(self) -> _Fault | None:
        if self.fault_share <= 0 or not self.fault_statuses:
            return None
        with self._lock:
            rng = self._fault_rng
            if rng.random() >= self.fault_share:
                return None
            status = rng.choice(self.fault_statuses)
            lo, hi = self.fault_retry_after
            if rng.random() < 0.5:
                retry_after: str | None = str(rng.randint(1, max(1, int(hi))))
            else:
                retry_after = f"{rng.uniform(lo, hi):.3f}"
            if status == 504 or (status == 503 and rng.random() < 0.5):
                retry_after = None
        return _Fault(status, 1, retry_after, None)

    def _over_budget(self, oid: str, now: float) -> float | None:
        """Count this request in the mailbox's sliding window; seconds until it has room if it is full (the
        rejected request is not counted — UNVERIFIED: Graph says throttled requests count against the quota,
        which would make an honest client's retry fail again)."""
        if self.budget_requests is None:
            return None
        with self._lock:
            window = self._budget.setdefault(oid, deque())
            while window and window[0] <= now - self.budget_window_s:
                window.popleft()
            if len(window) >= self.budget_requests:
                return window[0] + self.budget_window_s - now
            window.append(now)
            return None

    @staticmethod
    def _request_key(req: Request) -> tuple:
        return (req.method, req.path.lower(), tuple(sorted(req.query.items())))

    def _arrive(self, oid: str, key: tuple, now: float) -> None:
        with self._lock:
            same = self._blocked_key.get((oid, key))
            if same is not None and now < same[0]:
                self._violations.setdefault(oid, []).append(RetryViolation(oid, key, now, same[1], same[2], True))
                return
            other = self._blocked.get(oid)
            if other is not None and other[1] + self.retry_grace_s <= now < other[0]:
                self._violations.setdefault(oid, []).append(RetryViolation(oid, key, now, other[1], other[2], False))

    def _sent(self, oid: str, key: tuple, resp: Response) -> None:
        now = self.tokens.clock()
        raw = resp.headers.get("Retry-After")
        try:
            retry_after = float(raw) if raw is not None else None
        except ValueError:
            retry_after = None
        with self._lock:
            self.sent.setdefault(oid, []).append(SentResponse(now, resp.status, retry_after, key))
            if retry_after is not None and resp.status in (429, 503):
                block = (now + retry_after, now, retry_after)
                self._blocked_key[(oid, key)] = block
                if block[0] > self._blocked.get(oid, (0.0,))[0]:
                    self._blocked[oid] = block

    def _endpoint(self, fn: Callable[[Request, _Ctx], Response]) -> Callable[..., Response]:
        """Auth → request budget → injected/random fault → mailbox concurrency slot → handler; Graph error shape;
        ids; request log; response times and Retry-After per mailbox."""

        def handle(req: Request, inner: bool = False) -> Response:
            ctx = self._new_ctx(req)
            oid = None
            key: tuple = ()
            try:
                ctx.claims = self._authenticate(req)
            except TokenError as exc:
                resp = self._unauthorized(ctx, exc)
            else:
                oid = ctx.claims.oid
                now = self.tokens.clock()
                key = self._request_key(req)
                self._arrive(oid, key, now)
                wait = self._over_budget(oid, now)
                fault = None if wait is not None else (self._take_fault(oid, req.path) or self._random_fault())
                if wait is not None:
                    resp = self._error(
                        ctx,
                        429,
                        "ApplicationThrottled",  # UNVERIFIED message text
                        "Application is over its MailboxRequestRate limit.",
                        {"Retry-After": str(max(1, math.ceil(wait)))},
                    )
                elif fault is not None:
                    resp = self._fault_response(ctx, fault)
                elif not self._admit(oid):
                    resp = self._error(
                        ctx,
                        429,
                        "ApplicationThrottled",
                        "Application is over its MailboxConcurrency limit.",
                        {"Retry-After": self.throttle_retry_after},
                    )
                else:
                    try:
                        if self.latency_s:
                            time.sleep(self.latency_s)
                        self._sync_world()
                        resp = fn(req, ctx)
                    except GraphFail as exc:
                        resp = self._error(ctx, exc.status, exc.code, exc.message, exc.headers)
                    finally:
                        self._release(oid)
            resp.headers.setdefault("Content-Type", "application/json")
            resp.headers["request-id"] = ctx.request_id
            resp.headers["client-request-id"] = ctx.client_request_id
            if oid is not None:
                self._sent(oid, key, resp)
            self._log(req, resp.status, oid, inner)
            return resp

        return handle

    # ---------------------------------------------------------------- data
    def _sync_world(self) -> None:
        """Drop cached properties/fragments of every message the world changed since the last look."""
        w = self.world
        if w.change_seq == self._applied_seq:
            return
        with w.lock, self._cache_lock:
            for gid in w.change_log[self._applied_seq : w.change_seq]:
                self._base.pop(gid, None)
                for cache in self._frags.values():
                    cache.pop(gid, None)
            self._applied_seq = w.change_seq

    def _stamp(self, oid: str, msgs: list[SimMessage]) -> tuple[int, int, int]:
        return id(msgs), len(msgs), self.world.mailbox_seq.get(oid, 0)

    def _mailbox(self, oid: str) -> _Mailbox:
        msgs = self.world.mailboxes.get(oid)
        if msgs is None:
            raise GraphFail(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            )
        stamp = self._stamp(oid, msgs)
        box = self._mailboxes.get(oid)
        if box is None or box.stamp != stamp:
            with self.world.lock:
                box = _Mailbox(self._stamp(oid, msgs), {m.id: m for m in msgs})
            self._mailboxes[oid] = box
        return box

    def _lookup(self, oid: str, item_id: str) -> SimMessage | None:
        """By immutable id, else by the current mutable id (ids from before a move are not found)."""
        box = self._mailbox(oid)
        msg = box.by_id.get(item_id)
        if msg is None:
            if box.by_mutable is None:
                with self.world.lock:
                    box.by_mutable = {m.mutable_id(): m for m in box.by_id.values()}
            msg = box.by_mutable.get(item_id)
        return msg

    def _folder_index(self, oid: str, folder: str | None) -> _FolderIndex:
        msgs = self.world.mailboxes.get(oid, [])
        stamp = self._stamp(oid, msgs)
        key = (oid, folder or "*")
        idx = self._folders.get(key)
        if idx is None or idx.stamp != stamp:
            with self.world.lock, self._cache_lock:
                stamp = self._stamp(oid, msgs)
                chosen = [m for m in msgs if folder is None or m.folder == folder]
                chosen.sort(key=lambda m: (m.received, m.id), reverse=True)
                idx = _FolderIndex(stamp, chosen, [-_us(m.received) for m in chosen])
                self._folders[key] = idx
        return idx

    def _resolve_folder(self, oid: str, raw: str) -> str:
        name = unquote(raw).lower()
        if name in WELL_KNOWN_FOLDERS:
            return name
        for known in WELL_KNOWN_FOLDERS:
            if unquote(raw) == self.folder_id(oid, known):
                return known
        raise GraphFail(404, "ErrorItemNotFound", "The specified object was not found in the store.")

    def _base_props(self, m: SimMessage) -> dict:
        props = self._base.get(m.id)
        if props is None:
            digest = hashlib.blake2b(f"{m.id}|{m.version}".encode(), digest_size=18).digest()
            change_key = base64.urlsafe_b64encode(digest).decode()
            received, sent = _iso(m.received), _iso(m.sent)
            sender = _recipient(m.sender)
            props = {
                "@odata.etag": f'W/"{change_key}"',
                "id": m.id,
                "createdDateTime": received,
                "lastModifiedDateTime": _iso(m.modified) if m.modified else received,
                "changeKey": change_key,
                "categories": [],
                "receivedDateTime": received,
                "sentDateTime": sent,
                "hasAttachments": m.has_attachments,
                "internetMessageId": m.internet_message_id,
                "subject": m.subject,
                "bodyPreview": m.body[:255],
                "importance": "normal",
                "parentFolderId": self.folder_id(m.owner_oid, m.folder),
                "conversationId": m.conversation_id,
                "isDeliveryReceiptRequested": False,
                "isReadReceiptRequested": False,
                "isRead": m.is_read,
                "isDraft": m.is_draft,
                "webLink": f"https://outlook.office365.com/owa/?ItemID={_quote_id(m.id)}"
                "&exvsurl=1&viewmodel=ReadMessageItem",
                "inferenceClassification": "focused",
                "sender": sender,
                "from": sender,
                "toRecipients": [_recipient(r) for r in m.to],
                "ccRecipients": [_recipient(r) for r in m.cc],
                "bccRecipients": [_recipient(r) for r in m.bcc],
                "replyTo": [],
                "flag": {"flagStatus": "notFlagged"},
                EXT_PROPS: self._sensitivity_ext(m),
            }
            self._base[m.id] = props
        return props

    def _sensitivity_ext(self, m: SimMessage) -> list[dict] | None:
        """The expanded PidTagSensitivity, or None when the message does not have the property.

        personal/private/confidential → "1"/"2"/"3". "normal" from world generation → no property (mail that never
        had a sensitivity set: the key is left out, as Graph does for a message without the expanded property).
        "normal" set by `World.update_message` → "0": an explicit change back to Normal writes the property as 0
        (UNVERIFIED that Outlook writes 0 rather than deleting it; whether received mail commonly carries an explicit
        0 is also open — a client must treat "0" and an absent property alike)."""
        value = SENSITIVITY_EXT_VALUES.get(m.sensitivity)
        if value is None:
            if not any("sensitivity" in names for _, names in self.world.field_changes.get(m.id, ())):
                return None
            value = "0"
        return [{"id": SENSITIVITY_EXT_ID, "value": value}]

    @staticmethod
    def _body(m: SimMessage, body_type: str) -> dict:
        if body_type == "text":
            return {"contentType": "text", "content": m.body}
        text = html.escape(m.body).replace("\n", "<br>\r\n")
        content = (
            '<html><head>\r\n<meta http-equiv="Content-Type" content="text/html; charset=utf-8">'
            f"</head><body><div>{text}</div></body></html>"
        )
        return {"contentType": "html", "content": content}

    def _props(
        self, m: SimMessage, props: tuple[str, ...], body_type: str, immutable: bool, typed: bool, expand: bool = False
    ) -> dict:
        base = self._base_props(m)
        out: dict[str, Any] = {}
        if typed or m.odata_type != MESSAGE_TYPE:  # lists name derived types only; delta items always
            out["@odata.type"] = m.odata_type
        out["@odata.etag"] = base["@odata.etag"]
        out["id"] = m.id if immutable else m.mutable_id()
        for p in props:
            if p in ("body", "uniqueBody"):
                out[p] = self._body(m, body_type)
            elif p != "id":
                out[p] = base[p]
        if expand and base[EXT_PROPS] is not None:  # a message without the property: key left out
            out[EXT_PROPS] = base[EXT_PROPS]
        if m.id in self.lone_surrogate_ids:
            if isinstance(out.get("subject"), str):
                out["subject"] += HALF_EMOJI
            for role in ("from", "sender"):
                if (who := out.get(role)) and who.get("emailAddress"):
                    address = who["emailAddress"]
                    out[role] = {"emailAddress": {**address, "name": f"{address.get('name') or ''}{HALF_EMOJI}"}}
        return out

    def _fragment(
        self,
        m: SimMessage,
        select: tuple[str, ...] | None,
        body_type: str,
        immutable: bool = True,
        typed: bool = False,
        expand: bool = False,
    ) -> bytes:
        key = (select, body_type, immutable, typed, expand)
        cache = self._frags.get(key)
        if cache is None:
            cache = self._frags.setdefault(key, {})
        frag = None if m.id in self.lone_surrogate_ids else cache.get(m.id)  # a fault knob's output is not cached
        if frag is None:
            props = select if select is not None else DEFAULT_PROPS
            frag = _encode(self._props(m, props, body_type, immutable, typed, expand))
            if m.id not in self.lone_surrogate_ids:
                cache[m.id] = frag
        return frag

    # ---------------------------------------------------------------- query options
    @staticmethod
    def _check_options(req: Request) -> None:
        for k in req.query:
            if k.startswith("$") and k.lower() not in _SUPPORTED_OPTIONS:
                raise GraphFail(400, "BadRequest", f"Query option '{k}' is not supported.")

    @staticmethod
    def _parse_select(req: Request) -> tuple[str, ...] | None:
        return _message_select(req.query.get("$select"))

    @staticmethod
    def _parse_expand(req: Request) -> bool:
        """True for the PidTagSensitivity expansion; no `$expand`: False; any other value: the 400 an unsupported
        query option gets (as before this expansion was supported)."""
        key, raw = next(((k, v) for k, v in req.query.items() if k.lower() == "$expand"), (None, None))
        if key is None or raw is None:
            return False
        m = _EXPAND_RE.fullmatch(raw)
        if m is None or m.group(1).lower() != "integer" or int(m.group(2), 16) != 0x0036:
            raise GraphFail(400, "BadRequest", f"Query option '{key}' is not supported.")
        return True

    @staticmethod
    def _check_mail_scopes(ctx: _Ctx, select: tuple[str, ...] | None, expand: bool = False) -> None:
        """Mail.ReadBasic reads neither bodies nor extended properties (its documented description); asking for
        either without Mail.Read is a 403 here (UNVERIFIED: Graph might instead leave them out)."""
        scopes = ctx.claims.scopes if ctx.claims else frozenset()
        needs_body = expand or select is None or any(p in BODY_PROPS for p in select)
        allowed = MAIL_READ_SCOPES if needs_body else MAIL_BASIC_SCOPES
        if not scopes & allowed:
            raise GraphFail(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")

    @staticmethod
    def _body_type(req: Request, headers: dict[str, str]) -> str:
        value = _prefer(req.headers).get("outlook.body-content-type", "").lower()
        if value in ("text", "html"):
            headers["Preference-Applied"] = f'outlook.body-content-type="{value}"'
            return value
        return "html"

    @staticmethod
    def _immutable(req: Request) -> bool:
        return _prefer(req.headers).get("idtype", "").lower() == "immutableid"

    @staticmethod
    def _parse_filter(raw: str | None, delta: bool = False) -> tuple[str, int] | None:
        """A listing's (or, with `delta`, a message delta's) `$filter`: only `receivedDateTime ge|gt <time>`."""
        if raw is None:
            return None
        if received := _received_filter(raw):
            return received
        if delta:
            raise GraphFail(400, "ErrorInvalidUrlQuery", _DELTA_FILTER_ERROR)
        if _QUOTED_FILTER_RE.fullmatch(raw):
            raise GraphFail(
                400,
                "BadRequest",
                "A binary operator with incompatible types was detected. Found "
                "operand types 'Edm.DateTimeOffset' and 'Edm.String' for operator kind 'GreaterThan"
                "OrEqual'.",
            )
        raise GraphFail(400, "ErrorInvalidUrlQueryFilter", "The query filter contains one or more invalid nodes.")

    @staticmethod
    def _parse_int(req: Request, name: str, default: int, lo: int, hi: int) -> int:
        raw = req.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise GraphFail(
                400,
                "ErrorInvalidUrlQuery" if name == "$top" else "BadRequest",
                f"The value of query option '{name}' is invalid; expected {lo}..{hi}.",
            )
        return value

    @staticmethod
    def _parse_orderby(raw: str | None, has_filter: bool) -> bool:
        """True for descending (the default)."""
        if raw is None:
            return True
        m = _ORDERBY_RE.fullmatch(raw)
        if m is None or "," in raw:
            raise GraphFail(400, "ErrorInvalidUrlQuery", "The $orderby expression is not supported.")
        prop = m.group(1)
        if prop.lower() != "receiveddatetime":
            if has_filter:
                raise GraphFail(
                    400, "InefficientFilter", "The restriction or sort order is too complex for this operation."
                )
            raise GraphFail(400, "ErrorInvalidUrlQuery", f"Ordering by '{prop}' is not supported.")
        return (m.group(2) or "asc").lower() == "desc"

    # ---------------------------------------------------------------- handlers
    def _get_me(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None
        if not ctx.claims.scopes & {"User.Read", "User.ReadBasic.All", "User.Read.All"}:
            raise GraphFail(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
        try:
            user = self.world.user(ctx.claims.oid)
        except StopIteration:
            raise GraphFail(404, "Request_ResourceNotFound", "Resource does not exist.") from None
        return Response(
            200,
            {
                "@odata.context": f"{req.base_url}/v1.0/$metadata#users/$entity",
                "id": user.oid,
                "displayName": user.display_name,
                "userPrincipalName": user.upn,
                "mail": user.upn,
            },
        )

    def _get_folder(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None and req.match is not None
        oid = ctx.claims.oid
        self._check_mail_scopes(ctx, ("id",))
        self._mailbox(oid)
        folder = self._resolve_folder(oid, req.match.group(1))
        idx = self._folder_index(oid, folder)
        unread = sum(1 for m in idx.desc if not m.is_read)
        return Response(
            200,
            {
                "@odata.context": f"{req.base_url}/v1.0/$metadata#users('{oid}')/mailFolders/$entity",
                "id": self.folder_id(oid, folder),
                "displayName": WELL_KNOWN_FOLDERS[folder],
                "parentFolderId": self.folder_id(oid, "msgfolderroot"),
                "childFolderCount": 0,
                "unreadItemCount": unread,
                "totalItemCount": len(idx.desc),
                "isHidden": False,
            },
        )

    def _list_messages(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None
        oid = ctx.claims.oid
        self._check_options(req)
        select = self._parse_select(req)
        expand = self._parse_expand(req)
        self._check_mail_scopes(ctx, select, expand)
        if "$search" in req.query or "$skiptoken" in req.query:
            return self._search_messages(req, ctx, select, expand)
        imid = _IMID_FILTER_RE.fullmatch(req.query.get("$filter") or "")
        flt = None if imid else self._parse_filter(req.query.get("$filter"))
        desc = self._parse_orderby(req.query.get("$orderby"), flt is not None or imid is not None)
        top = self._parse_int(req, "$top", 10, 1, 1000)
        skip = self._parse_int(req, "$skip", 0, 0, 10**9)
        self._mailbox(oid)
        folder = None
        if req.match is not None and req.match.groups():
            folder = self._resolve_folder(oid, req.match.group(1))
        idx = self._folder_index(oid, folder)
        if imid is not None:  # equality on internetMessageId: every copy in the folder (or mailbox), case-exact
            wanted = imid.group(1).replace("''", "'")
            same = [m for m in idx.desc if m.internet_message_id == wanted]
            idx = _FolderIndex(idx.stamp, same, [-_us(m.received) for m in same])
        n = len(idx.desc)
        if flt is not None:
            op, when = flt
            n = bisect_right(idx.neg_us, -when) if op == "ge" else bisect_left(idx.neg_us, -when)
        headers: dict[str, str] = {}
        body_type = self._body_type(req, headers)
        if desc:
            chosen = idx.desc[skip : min(skip + top, n)]
        else:
            lo, hi = max(0, n - skip - top), max(0, n - skip)
            chosen = idx.desc[lo:hi][::-1]
        immutable = self._immutable(req)
        frags = b",".join(self._fragment(m, select, body_type, immutable, expand=expand) for m in chosen)
        where = f"mailFolders('{folder}')/messages" if folder else "messages"
        sel = f"({','.join(select)})" if select else ""
        context = f"{req.base_url}/v1.0/$metadata#users('{oid}')/{where}{sel}"
        out = b'{"@odata.context":' + _encode(context) + b',"value":[' + frags + b"]"
        if skip + top < n or self.endless_next_links:
            query = {k: v for k, v in req.query.items() if k.lower() != "$skip"}
            query["$skip"] = str(skip + top)
            link = f"{req.base_url}{req.path}?{urlencode(query)}"
            out += b',"@odata.nextLink":' + _encode(link)
        headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
        return Response(200, out + b"}", headers)

    def _search_messages(self, req: Request, ctx: _Ctx, select: tuple[str, ...] | None, expand: bool) -> Response:
        """`$search` (KQL) over one folder or the mailbox: see simulators/graph_search.py for what is documented and
        what is this simulator's choice. Pages of `$top` (default 10) with an opaque `$skiptoken` nextLink; at most
        `SEARCH_RESULT_CAP` results in all, newest sent first."""
        assert ctx.claims is not None
        oid = ctx.claims.oid
        raw = req.query.get("$search")
        if raw is None:
            raise GraphFail(400, "BadRequest", "Query option '$skiptoken' is only supported with '$search'.")
        for option in ("$filter", "$orderby", "$skip"):  # UNVERIFIED codes and texts
            if option in req.query:
                raise GraphFail(
                    400, "ErrorInvalidUrlQuery", f"The query parameter '{option}' is not supported with '$search'."
                )
        try:
            found = search_messages([], raw)  # parse (and refuse) before touching the mailbox
        except SearchSyntaxError as exc:
            raise GraphFail(400, "BadRequest", f"Syntax error in the $search query: {exc}.") from None
        top = self._parse_int(req, "$top", 10, 1, 1000)
        offset = self._skiptoken_offset(req.query.get("$skiptoken"), raw)
        self._mailbox(oid)
        folder = None
        if req.match is not None and req.match.groups():
            folder = self._resolve_folder(oid, req.match.group(1))
        with self.world.lock:
            found = search_messages(self._folder_index(oid, folder).desc, raw)
            self.searches.append((oid, folder, raw, offset))
        chosen = found[offset : offset + top]
        headers: dict[str, str] = {}
        body_type = self._body_type(req, headers)
        immutable = self._immutable(req)
        frags = b",".join(self._fragment(m, select, body_type, immutable, expand=expand) for m in chosen)
        where = f"mailFolders('{folder}')/messages" if folder else "messages"
        context = f"{req.base_url}/v1.0/$metadata#users('{oid}')/{where}"
        out = b'{"@odata.context":' + _encode(context) + b',"value":[' + frags + b"]"
        if offset + top < len(found):
            query = {k: v for k, v in req.query.items() if k.lower() != "$skiptoken"}
            query["$skiptoken"] = self._skiptoken(raw, offset + top)
            out += b',"@odata.nextLink":' + _encode(f"{req.base_url}{req.path}?{urlencode(query)}")
        headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
        return Response(200, out + b"}", headers)

    @staticmethod
    def _skiptoken(raw: str, offset: int) -> str:
        return base64.urlsafe_b64encode(f"{offset}|{_opaque(raw)}".encode()).decode()

    def _skiptoken_offset(self, token: str | None, raw: str) -> int:
        if token is None:
            return 0
        try:
            offset, _, digest = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
            if digest == _opaque(raw):
                return int(offset)
        except (ValueError, UnicodeDecodeError):
            pass
        raise GraphFail(400, "BadRequest", "The $skiptoken is not valid for this query.")  # UNVERIFIED text

    def _get_message(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None and req.match is not None
        self._check_options(req)
        select = self._parse_select(req)
        expand = self._parse_expand(req)
        self._check_mail_scopes(ctx, select, expand)
        msg = self._lookup(ctx.claims.oid, unquote(req.match.group(1)))
        if msg is None:
            raise GraphFail(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        headers: dict[str, str] = {}
        body_type = self._body_type(req, headers)
        context = f"{req.base_url}/v1.0/$metadata#users('{ctx.claims.oid}')/messages/$entity"
        frag = self._fragment(msg, select, body_type, self._immutable(req), expand=expand)
        headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
        return Response(200, b'{"@odata.context":' + _encode(context) + b"," + frag[1:], headers)

    # ---------------------------------------------------------------- delta
    def _mailbox_delta(self, req: Request, ctx: _Ctx) -> Response:
        raise GraphFail(
            400,
            "BadRequest",
            "Unsupported request: Change tracking is not supported against 'microsoft.graph.message'.",
        )

    @staticmethod
    def _gone(state: _DeltaState | None) -> GraphFail:
        code = state.evicted if state is not None and state.evicted else "SyncStateNotFound"
        # UNVERIFIED status for this code (https://learn.microsoft.com/en-us/graph/errors lists it, without a status)
        if code.lower() == "resyncrequired":
            return GraphFail(400, code, "The delta token is no longer valid, and the app must reset the sync state.")
        g = state.generation if state is not None else 0
        return GraphFail(
            410,
            code,
            f"The sync state generation is not found; generation={g};[highest={g + 8}][{g + 8}][{g + 6}][{g + 7}].",
        )

    def _page_size(self, req: Request, headers: dict[str, str]) -> int:
        """`Prefer: odata.maxpagesize=N`, read on every request (UNVERIFIED whether Graph keeps the first
        request's value in its tokens; clients should send it on every page), capped at `delta_max_page_size`
        (UNVERIFIED: the real maximum is an open point)."""
        raw = _prefer(req.headers).get("odata.maxpagesize")
        try:
            size = int(raw) if raw is not None else 0
        except ValueError:
            size = 0
        if size <= 0:
            return DELTA_DEFAULT_PAGE
        size = min(size, self.delta_max_page_size)
        applied = headers.get("Preference-Applied")
        headers["Preference-Applied"] = (
            f"{applied}, odata.maxpagesize={size}" if applied else f"odata.maxpagesize={size}"
        )
        return size

    @staticmethod
    def _passes(m: SimMessage, flt: tuple[str, int] | None) -> bool:
        if flt is None:
            return True
        us = _us(m.received)
        return us >= flt[1] if flt[0] == "ge" else us > flt[1]

    def _delta(self, req: Request, ctx: _Ctx) -> Response:
        """`GET /me/mailFolders/{folder}/messages/delta` (also the `mailFolders('{id}')` form used in links).

        First request: query options (`$select`, `$filter`, the sensitivity `$expand`) are checked and frozen into
        a server-side sync state; every link is an absolute URL with an opaque token (`$skiptoken` mid-round,
        `$deltatoken` at the end). Re-sent query options on token requests are ignored. A token request re-served
        (a client retry) returns the same page.
        Initial round: every message now in the folder (matching `$filter`), newest first; with `$filter` only the
        newest 5,000 (UNVERIFIED which 5,000 Graph keeps). Later rounds, in change order: messages created or moved
        in since the token (full, `$select` honoured) and updated ones (partial: "@odata.type", "@odata.etag",
        "id", the changed selected properties, "parentFolderId", and `singleValueExtendedProperties` only if the
        sensitivity changed and the round has the `$expand`; full with `partial_updates=False`) — both only
        if they match the token's `$filter` unless `filter_later_rounds` is off — and
        `{"@odata.type":…,"id":…,"@removed":{"reason":"deleted"|"changed"}}` for deletions and moves out.
        Partial items can name messages the client never got in full (e.g. beyond the 5,000 cap)."""
        assert ctx.claims is not None and req.match is not None
        oid = ctx.claims.oid
        self._mailbox(oid)
        query = {k.lower(): v for k, v in req.query.items()}
        headers: dict[str, str] = {}
        body_type = self._body_type(req, headers)
        size = self._page_size(req, headers)
        immutable = self._immutable(req)
        folder = self._resolve_folder(oid, req.match.group(1))
        if "$skiptoken" in query or "$deltatoken" in query:
            token = query.get("$skiptoken") or query.get("$deltatoken") or ""
            with self._lock:
                entry = self._delta_tokens.get(token)
            if entry is None:
                raise self._gone(None)
            kind, obj, num = entry
            state: _DeltaState = obj.state if kind == "page" else obj
            if state.oid != oid or state.folder != folder or state.evicted:
                raise self._gone(state)
            self._check_mail_scopes(ctx, state.select, state.expand)
            rnd, pos = (obj, num) if kind == "page" else (self._plan_round(state, num), 0)
        else:
            for k in req.query:
                if k.startswith("$") and k.lower() not in _DELTA_OPTIONS:
                    raise GraphFail(400, "BadRequest", f"Query option '{k}' is not supported.")
            select = self._parse_select(req)
            expand = self._parse_expand(req)
            self._check_mail_scopes(ctx, select, expand)
            flt = self._parse_filter(req.query.get("$filter"), delta=True)
            orderby = req.query.get("$orderby")
            if orderby is not None and not re.fullmatch(r"\s*receivedDateTime\s+desc\s*", orderby, re.IGNORECASE):
                raise GraphFail(400, "ErrorInvalidUrlQuery", "The $orderby expression is not supported.")
            # $top: ignored (most reports; UNVERIFIED — one report has it cap the round, one a 400)
            state = _DeltaState(oid, folder, select, flt, expand)
            with self._lock:
                self._delta_states.append(state)
            rnd, pos = self._plan_round(state, None), 0
        return self._delta_page(req, rnd, pos, size, body_type, immutable, headers)

    def _plan_round(self, state: _DeltaState, since: int | None) -> _Round:
        w = self.world
        items: list[tuple[str, Any, frozenset[str]]]
        with w.lock:
            end = w.change_seq
            if since is None:
                idx = self._folder_index(state.oid, state.folder)
                n = len(idx.desc)
                if state.flt is not None:
                    op, when = state.flt
                    n = bisect_right(idx.neg_us, -when) if op == "ge" else bisect_left(idx.neg_us, -when)
                    n = min(n, DELTA_FILTER_CAP)
                items = [("full", m, frozenset()) for m in idx.desc[:n]]
            else:
                box = self._mailbox(state.oid)
                events: list[tuple[int, str, Any, frozenset[str]]] = []
                flt = state.flt if self.filter_later_rounds else None
                for gid in dict.fromkeys(w.change_log[since:end]):
                    m = box.by_id.get(gid)
                    if m is None or m.folder != state.folder or not self._passes(m, flt):
                        continue
                    if m.arrived_seq > since or not self.partial_updates:
                        events.append((m.version, "full", m, frozenset()))
                    else:
                        events.append((m.version, "partial", m, w.changed_fields(m.id, since)))
                for t in w.tombstones.get((state.oid, state.folder), ()):
                    if since < t.seq <= end:
                        events.append((t.seq, "removed", t, frozenset()))
                events.sort(key=lambda e: e[0])
                items = [(kind, obj, fields) for _, kind, obj, fields in events]
            state.generation += 1
        if self.duplicate_share and items:
            with self._lock:  # replays: the same item again, at the end of the round
                dups = [it for it in items if it[0] != "removed" and self._rng.random() < self.duplicate_share]
                self._rng.shuffle(dups)
            items += dups
        return _Round(state, since, end, items)

    def _delta_item(
        self, kind: str, obj: Any, fields: frozenset[str], state: _DeltaState, body_type: str, immutable: bool
    ) -> bytes:
        if kind == "removed":
            t: Tombstone = obj
            return _encode(
                {
                    "@odata.type": MESSAGE_TYPE,
                    "id": t.id if immutable else t.mutable_id,
                    "@removed": {"reason": t.reason},
                }
            )
        if kind == "full":
            return self._fragment(obj, state.select, body_type, immutable, typed=True, expand=state.expand)
        changed = {p for f in fields for p in FIELD_PROPS.get(f, ())}
        props = state.select if state.select is not None else DEFAULT_PROPS
        keep = (*(p for p in props if p in changed and p != "parentFolderId"), "parentFolderId")
        # the extended property only when the sensitivity changed (UNVERIFIED: how real Graph reports a changed
        # extended property in an "updated" item is not documented; we assume like a changed property)
        return _encode(
            self._props(obj, keep, body_type, immutable, typed=True, expand=state.expand and "sensitivity" in fields)
        )

    def _delta_page(
        self, req: Request, rnd: _Round, pos: int, size: int, body_type: str, immutable: bool, headers: dict[str, str]
    ) -> Response:
        items = rnd.items
        empty = False
        if pos < len(items) and self.empty_page_share:
            with self._lock:
                empty = self._rng.random() < self.empty_page_share
        chosen = [] if empty else items[pos : pos + size]
        nxt = pos + len(chosen)
        frags = b",".join(self._delta_item(k, o, f, rnd.state, body_type, immutable) for k, o, f in chosen)
        folder_id = self.folder_id(rnd.state.oid, rnd.state.folder)
        base = f"{req.base_url}/v1.0/me/mailFolders('{folder_id}')/messages/delta"
        token = secrets.token_urlsafe(24)
        if nxt < len(items) or self.endless_next_links:
            entry: tuple[str, Any, int] = ("page", rnd, nxt)
            link = b'"@odata.nextLink":' + _encode(f"{base}?$skiptoken={token}")
        else:
            entry = ("delta", rnd.state, rnd.end_seq)
            link = b'"@odata.deltaLink":' + _encode(f"{base}?$deltatoken={token}")
        with self._lock:
            self._delta_tokens[token] = entry
        context = f"{req.base_url}/v1.0/$metadata#Collection(message)"
        out = b'{"@odata.context":' + _encode(context) + b"," + link + b',"value":[' + frags + b"]}"
        headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
        return Response(200, out, headers)

    # ---------------------------------------------------------------- $batch
    def _route(self, method: str, path: str) -> tuple[Callable[..., Response], re.Match[str]] | None:
        """The first route (in `_routes` order) for `method` whose pattern matches all of `path`.

        One search of `_any_route` (every route as "METHOD path", tried in that order) names the candidate instead
        of up to 20 matches; the candidate is confirmed on its own, and anything odd (a method holding a space)
        falls back to trying each route."""
        hit = self._any_route.fullmatch(f"{method} {path}")
        if hit is not None and hit.lastgroup is not None:
            m, pattern, handler = self._routes[int(hit.lastgroup[1:])]
            if m == method and (match := pattern.fullmatch(path)):
                return handler, match
        for m, pattern, handler in self._routes:
            if m == method and (match := pattern.fullmatch(path)):
                return handler, match
        return None

    def _run_inner(self, outer: Request, item: dict) -> tuple[int, dict[str, str], bytes]:
        method = str(item.get("method", "GET")).upper()
        parts = urlsplit(str(item.get("url", "")))
        path = "/v1.0/" + parts.path.lstrip("/")
        if path.lower().startswith("/v1.0/v1.0/"):
            path = path[5:]
        headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        headers["authorization"] = outer.headers.get("authorization", "")
        body = item.get("body")
        req = Request(
            method,
            path,
            dict(_query_options(parts.query)),
            headers,
            _encode(body) if body is not None else b"",
            base_url=outer.base_url,
        )
        routed = self._route(method, path)
        if routed is None:
            ctx = self._new_ctx(req)
            resp = self._error(ctx, 400, "BadRequest", "Invalid request URL in batch.")
            resp.headers.update({"request-id": ctx.request_id, "Content-Type": "application/json"})
            self._log(req, 400, None, True)
        else:
            handler, req.match = routed
            try:
                resp = handler(req, inner=True)
            except Exception as exc:  # a simulator bug must be visible in the inner response
                resp = Response(500, {"error": {"code": "generalException", "message": repr(exc)}})
        data, _ = resp.encoded()
        return resp.status, resp.headers, data

    def _run_parallel(self, outer: Request, items: list[dict]) -> dict[str, tuple[int, dict[str, str], bytes]]:
        """Run a batch's inner requests at most `BATCH_INNER_CONCURRENCY` at a time, in order of the payload: as
        many lanes, each taking the next request not yet started; one lane is this thread, the others run on the
        simulator's shared pool (a pool per batch cost more CPU than the requests). An inner request that raises
        does not stop the others; the first such error (payload order) is raised once all have run."""
        lanes = min(BATCH_INNER_CONCURRENCY, len(items))
        todo = iter(enumerate(items))
        take = threading.Lock()
        outcome: list[tuple[int, dict[str, str], bytes] | BaseException | None] = [None] * len(items)

        def lane() -> None:
            while True:
                with take:
                    nxt = next(todo, None)
                if nxt is None:
                    return
                i, item = nxt
                try:
                    outcome[i] = self._run_inner(outer, item)
                except BaseException as exc:  # re-raised below, once the other requests have run
                    outcome[i] = exc

        helpers = [self._inner_pool().submit(lane) for _ in range(lanes - 1)]
        lane()
        for helper in helpers:
            helper.result()
        results: dict[str, tuple[int, dict[str, str], bytes]] = {}
        for item, out in zip(items, outcome, strict=True):
            if isinstance(out, BaseException):
                raise out
            assert out is not None
            results[str(item["id"])] = out
        return results

    def _inner_pool(self) -> ThreadPoolExecutor:
        """Threads for the lanes of concurrent batches, started on demand and kept (`INNER_POOL_THREADS` at most:
        enough for dozens of batches at once, far more than any client here sends)."""
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(INNER_POOL_THREADS, thread_name_prefix="graph-sim-batch")
                pool = self._pool
        return pool

    def stop(self) -> None:
        super().stop()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _batch(self, req: Request) -> Response:
        ctx = self._new_ctx(req)
        ids = {"request-id": ctx.request_id, "client-request-id": ctx.client_request_id}
        try:
            claims = self._authenticate(req)
        except TokenError as exc:
            resp = self._unauthorized(ctx, exc)
            resp.headers.update(ids)
            self._log(req, 401, None, False)
            return resp
        try:
            items = self._validate_batch(req)
        except GraphFail as exc:
            resp = self._error(ctx, exc.status, exc.code, exc.message)
            resp.headers.update(ids)
            self._log(req, exc.status, claims.oid, False)
            return resp
        results: dict[str, tuple[int, dict[str, str], bytes]] = {}
        if any(item.get("dependsOn") for item in items):
            done: set[str] = set()
            while len(done) < len(items):  # dependencies were checked acyclic: one at a time, in order
                for item in items:
                    rid = str(item["id"])
                    deps = [str(d) for d in item.get("dependsOn") or []]
                    if rid in done or not all(d in done for d in deps):
                        continue
                    if any(results[d][0] >= 400 for d in deps):
                        err = self._error(
                            self._new_ctx(req), 424, "FailedDependency", "Request failed due to a failed dependency."
                        )
                        results[rid] = (424, {"Content-Type": "application/json"}, err.encoded()[0])
                    else:
                        results[rid] = self._run_inner(req, item)
                    done.add(rid)
        else:
            results = self._run_parallel(req, items)
        order = list(results)
        with self._lock:
            self._rng.shuffle(order)
        parts = []
        for rid in order:
            status, headers, data = results[rid]
            head = {"id": rid, "status": status, "headers": headers}
            parts.append(_encode(head)[:-1] + b',"body":' + (data or b"null") + b"}")
        self._log(req, 200, claims.oid, False)
        return Response(200, b'{"responses":[' + b",".join(parts) + b"]}", {"Content-Type": "application/json", **ids})

    @staticmethod
    def _validate_batch(req: Request) -> list[dict]:
        payload = req.json_or_none()
        items = payload.get("requests") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
            raise GraphFail(400, "BadRequest", "Invalid batch payload format.")
        if len(items) > BATCH_LIMIT:
            raise GraphFail(400, "BadRequest", f"Number of batch requests exceeds the limit of {BATCH_LIMIT}.")
        ids = [str(i.get("id", "")) for i in items]
        if "" in ids or len(set(ids)) != len(ids):
            raise GraphFail(400, "BadRequest", "Batch request ids must be present and unique.")
        for item in items:
            if not item.get("url") or not item.get("method"):
                raise GraphFail(400, "BadRequest", "Each batch request needs a method and a url.")
            deps = item.get("dependsOn") or []
            if not isinstance(deps, list) or any(str(d) not in ids or str(d) == str(item["id"]) for d in deps):
                raise GraphFail(400, "BadRequest", "dependsOn refers to an unknown request id.")
        # reject cycles: every request must become runnable
        done: set[str] = set()
        progress = True
        while progress and len(done) < len(items):
            progress = False
            for item in items:
                rid = str(item["id"])
                if rid not in done and all(str(d) in done for d in item.get("dependsOn") or []):
                    done.add(rid)
                    progress = True
        if len(done) < len(items):
            raise GraphFail(400, "BadRequest", "dependsOn contains a cycle.")
        return items
