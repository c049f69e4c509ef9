"""A small Microsoft Graph client on httpx: least privilege in code, per-mailbox concurrency cap and request budget,
Retry-After, backoff, one token refresh on 401, opaque nextLink paging and `$batch` with per-inner-request retries.

One `GraphClient` serves one mailbox (one user token): Outlook allows 4 concurrent requests per app and mailbox
(Outlook limits), so the client holds a slot of its `MailboxSlots` per request in flight and a `$batch` holds
`min(4, inner requests)` slots, because Graph runs up to 4 of its inner requests at once. Listing pages are urgent
(each nextLink needs the page before it): they take the next free slot before any waiting `$batch`. A Retry-After
holds every request of the mailbox, not just the one that was throttled.

Least privilege: every request (each inner request of a `$batch` and every absolute nextLink/deltaLink included) must
match an `Allow(method, path template)` entry of the client's allowlist, or `ForbiddenRequest` is raised before a
token is fetched or a byte is sent. `MAIL_READ_ALLOWLIST` is read-only mail; later features add entries (e.g.
`Allow("GET", "me/calendarView/delta")`). Whatever the allowlist says, a `$select` naming a property in
`SELECT_DENIED` (attachments) is refused, and so are path segments that decode to `.`/`..` or contain a slash or
backslash. `$expand` is refused unless its whole value, after whitespace normalisation (runs of whitespace → one
space, ends stripped), is exactly one of the client's `allow_expand` strings (default `EXPAND_ALLOWLIST`: only
`SENSITIVITY_EXPAND`, the MAPI PidTagSensitivity extended property); so `$expand=attachments`, a list of
expansions or another extended property are refused.

Budget: Outlook allows 10,000 requests per 10 minutes per app and mailbox. A sliding-window limiter counts every
request sent (retries included; each inner request of a `$batch` counts, the envelope does not) and blocks, through
the injectable `sleep`/`clock`, until the window has room, so a long import paces itself instead of being throttled.

Links: a nextLink/deltaLink is followed only if it is on the configured Graph origin and under its version root;
otherwise `LinkNotFollowable` (a `DeltaTokenExpired`: callers resync as for an evicted token) is raised and the bearer
token is never sent there. A saved deltaLink from another Graph URL (O365SYNC_GRAPH_URL changed, a data dir reused
with another simulator) is the common case.

Run limits: `max_pages` per listing and a `deadline` (on `clock`) stop `iter_pages` with `RunLimitReached` before it
asks for one more page, so a server that answers a fresh nextLink forever cannot keep a run going; the first page
of a listing is always fetched, so every run makes progress.

Text: a page whose JSON carries a lone UTF-16 surrogate escape (half an emoji, `"Deal \\ud83d"`) or bytes that are
not UTF-8 is valid enough for Graph but not for Python/Arrow/DuckDB text: `decode_page` replaces that text with
U+FFFD and reports which items were repaired, instead of failing the page.

Exception messages carry the HTTP status, Graph error code and request-id only: never URLs, query strings,
subjects or addresses (Prefect persists exception messages).
"""

from __future__ import annotations

import functools
import queue
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
import msgspec

from o365sync.errors import O365SyncError

__all__ = [
    "BATCH_LIMIT",
    "CALENDAR_CONSENT_WRITE_ALLOWLIST",
    "CALENDAR_READ_ALLOWLIST",
    "DELTA_EXPIRED_CODES",
    "EXPAND_ALLOWLIST",
    "MAIL_READ_ALLOWLIST",
    "SELECT_DENIED",
    "SENSITIVITY_EXPAND",
    "TEAMS_ALLOWLIST",
    "Allow",
    "DeltaTokenExpired",
    "ForbiddenRequest",
    "GraphAuthError",
    "GraphBadRequest",
    "GraphClient",
    "GraphError",
    "GraphForbidden",
    "GraphNotFound",
    "GraphPagingError",
    "GraphThrottled",
    "GraphUnavailable",
    "LinkNotFollowable",
    "RunLimitReached",
    "decode_page",
    "error_for",
    "read_ahead",
    "repair_text",
    "retry_after_seconds",
]

BATCH_LIMIT = 20
BATCH_INNER_CONCURRENCY = 4
RETRYABLE = frozenset({429, 502, 503, 504})
IMMUTABLE_ID = 'IdType="ImmutableId"'
# A token from the provider is reused this long without asking it again (each ask locks, stats the token file and
# searches MSAL's cache: ~0.2 ms, once per request). MSAL hands out only tokens valid for 5 more minutes at least, and
# a 401 always asks the provider for a fresh one.
TOKEN_REUSE_S = 30.0
OUTLOOK_BUDGET = 10_000  # requests per app and mailbox ...
OUTLOOK_BUDGET_WINDOW_S = 600.0  # ... per 10 minutes: https://learn.microsoft.com/en-us/graph/throttling-limits
# 4xx error codes that mean "this delta token is dead, start a new round" (compared case-insensitively)
DELTA_EXPIRED_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid"})


class GraphError(O365SyncError):
    """A failed Graph call. `status` 0 means no HTTP answer (network error, paging loop)."""

    def __init__(self, status: int, code: str | None = None, request_id: str | None = None):
        super().__init__(status, code, request_id)
        self.status = status
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        return f"Graph HTTP {self.status} {self.code or '-'} (request-id {self.request_id or '-'})"


class GraphAuthError(GraphError):
    """401 even after one forced token refresh."""


class GraphForbidden(GraphError):
    """403: a permission (scope) is missing or access is denied."""

    retriable = False
    action = (
        "an admin must grant the app's Graph permissions (admin consent) to the tenant, or the user needs a "
        "mailbox Graph can read"
    )


class GraphNotFound(GraphError):
    """404: item or mailbox not found."""


class GraphBadRequest(GraphError):
    """400: the request (e.g. a $filter) is invalid; retrying cannot help."""

    retriable = False
    action = "Graph refused the request as invalid: report it to the o365sync maintainers (retrying cannot help)"


class GraphThrottled(GraphError):
    """429 still answered after `max_attempts` attempts."""


class GraphUnavailable(GraphError):
    """5xx or network errors still failing after `max_attempts` attempts."""


class GraphPagingError(GraphError):
    """A nextLink repeated itself (paging loop) or pointed away from the Graph origin."""


class DeltaTokenExpired(GraphError):
    """The delta/skip token is expired or evicted (410 Gone, or a 4xx with code syncStateNotFound / resyncRequired /
    SyncStateInvalid in any case): drop the stored deltaLink and start a new round (with the scan-back `$filter`)."""


class LinkNotFollowable(DeltaTokenExpired, GraphPagingError):
    """A nextLink/deltaLink that cannot be followed, so nothing was sent: code `ForeignOrigin` (another scheme, host
    or port than the configured Graph URL: the bearer token is never sent there) or `OutsideGraphRoot` (same origin,
    not under the configured version root, e.g. saved under /beta). Handled like an expired token: a bounded
    resync from a fresh round on the configured endpoint."""

    action = (
        "Graph sent a link to another endpoint than O365SYNC_GRAPH_URL; it was not followed (the token is never "
        "sent elsewhere): point O365SYNC_GRAPH_URL at the endpoint Graph's links name"
    )


class RunLimitReached(GraphError):
    """This run's paging limit was reached (code `PageCap`: pages per listing, `TimeCap`: the run's deadline): stop
    cleanly, commit what was read, go on next run. Not a Graph failure."""


class ForbiddenRequest(GraphError):
    """Refused by the client's allowlist before anything was sent. The message names the method and a path
    template (ids replaced by `{id}`) and, for a refused query option, its name; never a query string or value."""

    def __init__(self, method: str, template: str, option: str | None = None):
        super().__init__(0, "ForbiddenRequest", None)
        self.args = (method, template, option)
        self.method, self.template, self.option = method, template, option

    def __str__(self) -> str:
        extra = f" (query option {self.option})" if self.option else ""
        return f"Graph request refused by the client allowlist: {self.method} {self.template}{extra}"


_BY_STATUS: dict[int, type[GraphError]] = {
    400: GraphBadRequest,
    401: GraphAuthError,
    403: GraphForbidden,
    404: GraphNotFound,
    429: GraphThrottled,
}


class _ErrorDetail(msgspec.Struct):
    code: str | None = None
    inner_error: dict[str, Any] | None = msgspec.field(default=None, name="innerError")


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | None = None


class PageLinks(msgspec.Struct):
    """A collection page's links alone (decoding skips its items)."""

    next_link: str | None = msgspec.field(default=None, name="@odata.nextLink")
    delta_link: str | None = msgspec.field(default=None, name="@odata.deltaLink")


class _BatchItem(msgspec.Struct):
    id: str
    status: int
    headers: dict[str, str] | None = None
    body: Any = None


class _BatchResponse(msgspec.Struct):
    responses: list[_BatchItem]


# ---------------------------------------------------------------------------------------------- least privilege
@dataclass(frozen=True, slots=True)
class Allow:
    """One allowed (method, path) pair. `template` is relative to the version root; a `{name}` segment matches one
    opaque id or well-known name, and a literal segment followed by `{name}` also matches the OData key form
    `literal('key')` that Graph uses in its own links (e.g. `mailfolders('AQMk…')/messages/delta`).
    Literal segments compare case-insensitively, as Graph does."""

    method: str
    template: str
    _parts: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parts", tuple(self.template.split("/")))

    def matches(self, method: str, segments: list[str]) -> bool:
        if method != self.method:
            return False
        parts, i, j = self._parts, 0, 0
        while i < len(parts):
            if j >= len(segments):
                return False
            part, seg = parts[i], segments[j]
            if part.startswith("{"):
                if not _is_key(seg):
                    return False
                i, j = i + 1, j + 1
            elif seg.lower() == part.lower():
                i, j = i + 1, j + 1
            elif (
                i + 1 < len(parts)
                and parts[i + 1].startswith("{")
                and (m := _KEY_FORM.fullmatch(seg))
                and m.group(1).lower() == part.lower()
                and _is_key(m.group(2))
            ):
                i, j = i + 2, j + 1
            else:
                return False
        return j == len(segments)


MAIL_READ_ALLOWLIST: tuple[Allow, ...] = (
    Allow("GET", "me"),
    Allow("GET", "me/mailFolders/{folder}"),
    Allow("GET", "me/mailFolders/{folder}/messages"),
    Allow("GET", "me/mailFolders/{folder}/messages/delta"),
    Allow("GET", "me/messages/{id}"),
    Allow("POST", "$batch"),  # each inner request must be allowed on its own
)
# Calendar import: read-only views of the signed-in user's primary calendar.
CALENDAR_READ_ALLOWLIST: tuple[Allow, ...] = (
    Allow("GET", "me"),
    Allow("GET", "me/calendarView"),
    Allow("GET", "me/calendarView/delta"),
    Allow("GET", "me/events/{id}"),
    Allow("GET", "me/events/{id}/instances"),
    Allow("POST", "$batch"),
)
# Notetaker in Explicit Consent Mode: the ONLY writes the product ever makes to a calendar — a Teams meeting link
# (POST me/onlineMeetings/createOrGet) and the join link + consent notice on a matched external meeting the user
# organizes (PATCH me/events/{id}).
CALENDAR_CONSENT_WRITE_ALLOWLIST: tuple[Allow, ...] = (
    Allow("POST", "me/onlineMeetings/createOrGet"),  # idempotent per externalId (the event id)
    Allow("PATCH", "me/events/{id}"),
)
# Teams sharing: list the user's teams and channels (no message history) and post a summary.
TEAMS_ALLOWLIST: tuple[Allow, ...] = (
    Allow("GET", "me/joinedTeams"),
    Allow("GET", "teams/{team}/channels"),
    Allow("POST", "teams/{team}/channels/{channel}/messages"),
    Allow("POST", "chats"),
    Allow("POST", "chats/{chat}/messages"),
)
SELECT_DENIED = frozenset({"attachments"})  # never selectable, whatever the path
# A message's sensitivity: Graph v1.0 `message` has no `sensitivity` property (only `event` has; `$select` of it is a
# 400), so it is read as MAPI PidTagSensitivity (0x0036, PtypInteger32) through a single-value extended property.
SENSITIVITY_EXPAND = "singleValueExtendedProperties($filter=id eq 'Integer 0x0036')"
EXPAND_ALLOWLIST = frozenset({SENSITIVITY_EXPAND})  # the only `$expand` values sent (compared after _squash)
_KEY_FORM = re.compile(r"([A-Za-z]+)\('([^']*)'\)")
_WORD = re.compile(r"\$?[a-z][A-Za-z]{0,39}")  # API words are camelCase; ids are not


def _squash(value: str) -> str:
    """Whitespace normalisation for `$expand` values: runs of whitespace → one space, ends stripped."""
    return " ".join(value.split())


def _is_key(segment: str) -> bool:
    return bool(segment) and segment not in (".", "..") and "/" not in segment and "\\" not in segment


def _template(segments: list[str]) -> str:
    """A path shape safe to put in an exception: API words kept, ids (and anything after `users`) → `{id}`."""
    out: list[str] = []
    for seg in segments:
        if (m := _KEY_FORM.fullmatch(seg)) and _WORD.fullmatch(m.group(1)):
            out.append(f"{m.group(1)}({{id}})")
        elif _WORD.fullmatch(seg) and not (out and out[-1].lower() == "users"):
            out.append(seg)
        else:
            out.append("{id}")
    return "/".join(out) or "/"


class _Inner(msgspec.Struct):
    method: str = ""
    url: str = ""


class _BatchRequest(msgspec.Struct):
    requests: list[_Inner]


_decode_batch_request = msgspec.json.Decoder(_BatchRequest).decode


_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_decode_links = msgspec.json.Decoder(PageLinks).decode
_decode_batch = msgspec.json.Decoder(_BatchResponse).decode


# ---------------------------------------------------------------------------------------------- text repair
# A JSON string escape that is a UTF-16 surrogate: an escaped backslash (kept: `\\ud83d` is literal text), a
# valid pair (kept), or a lone half (replaced).
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]")
_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
_UNDECODABLE = re.compile("[\udc80-\udcff]+")  # bytes that are not UTF-8, after decoding with surrogateescape
REPLACEMENT = b"\\ufffd"  # U+FFFD, written as a JSON escape


def repair_text(raw: bytes) -> tuple[bytes, int]:
    """`raw` JSON with every lone surrogate escape and every run of bytes that are not UTF-8 replaced by the escape
    `\\ufffd` (U+FFFD); everything else byte for byte. Returns (JSON, replacements)."""
    count = 0

    def lone(match: re.Match[bytes]) -> bytes:
        nonlocal count
        if len(match.group()) != 6:  # an escaped backslash (2 bytes) or a valid pair (12)
            return match.group()
        count += 1
        return REPLACEMENT

    if _SURROGATE_HINT.search(raw):
        raw = _ESCAPES.sub(lone, raw)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        text, bad = _UNDECODABLE.subn("\\\\ufffd", raw.decode("utf-8", "surrogateescape"))
        raw, count = text.encode("utf-8"), count + bad
    return raw, count


class _RawPage(msgspec.Struct):
    value: list[msgspec.Raw] = []
    next_link: str | None = msgspec.field(default=None, name="@odata.nextLink")
    delta_link: str | None = msgspec.field(default=None, name="@odata.deltaLink")


_decode_raw_page = msgspec.json.Decoder(_RawPage).decode


@functools.cache
def _item_decoder(item_type: type) -> Callable[[Any], Any]:
    return msgspec.json.Decoder(item_type).decode


def decode_page(
    raw: bytes, decode: Callable[[bytes], Any], page_type: type, item_type: type
) -> tuple[Any, frozenset[int]]:
    """A Graph collection page: `decode(raw)` (the fast typed decoder), or, when msgspec refuses the text, the page
    rebuilt as `page_type(value=[item_type…], next_link=…, delta_link=…)` from `repair_text(raw)`, with the
    positions of the items whose text was replaced (an item of Graph's own `\\ufffd` in such a page counts too).
    Raises `GraphError(0, "MalformedPage")` when the JSON is not a page even after repair."""
    try:
        return decode(raw), frozenset()
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises the latter for bytes that are not UTF-8
        fixed, replaced = repair_text(raw)
        if not replaced:
            raise GraphError(0, "MalformedPage") from None
    try:
        page = _decode_raw_page(fixed)
        decode_item = _item_decoder(item_type)
        items = [decode_item(item) for item in page.value]
    except msgspec.DecodeError:  # ValidationError included
        raise GraphError(0, "MalformedPage") from None
    odd = frozenset(i for i, item in enumerate(page.value) if REPLACEMENT in bytes(item))
    return page_type(value=items, next_link=page.next_link, delta_link=page.delta_link), odd


def page_links(content: bytes) -> PageLinks:
    """The nextLink and deltaLink of a raw page without building its items. Raises `GraphError(0,
    "MalformedPage")` when the text is not JSON even after `repair_text`."""
    try:
        return _decode_links(content)
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass
    try:
        return _decode_links(repair_text(content)[0])
    except msgspec.DecodeError:
        raise GraphError(0, "MalformedPage") from None


def error_for(status: int, body: Any, headers: Any = None) -> GraphError:
    """The GraphError subclass for a status, with the Graph code and request-id read from body/headers."""
    code = request_id = None
    detail: Any = None
    if isinstance(body, bytes | str):
        try:
            detail = _decode_error(body).error
        except msgspec.DecodeError:
            detail = None
        if detail is not None:
            code, inner = detail.code, detail.inner_error or {}
            request_id = inner.get("request-id")
    elif isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        request_id = (body["error"].get("innerError") or {}).get("request-id")
    if headers is not None:
        request_id = headers.get("request-id") or request_id
    code = code if isinstance(code, str) else None
    if status == 410 or (400 <= status < 500 and code is not None and code.lower() in DELTA_EXPIRED_CODES):
        return DeltaTokenExpired(status, code, request_id)
    cls = _BY_STATUS.get(status) or (GraphUnavailable if status >= 500 else GraphError)
    return cls(status, code, request_id)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: integer or fractional (Graph sends both) or an HTTP date; None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def _with_prefer(headers: dict[str, str] | None) -> dict[str, str]:
    """Copy of `headers` whose Prefer also asks for immutable ids (merged, case-insensitive)."""
    out = dict(headers or {})
    key = next((k for k in out if k.lower() == "prefer"), None)
    if key is None:
        out["Prefer"] = IMMUTABLE_ID
    elif "idtype" not in out[key].lower():
        out[key] = f"{out[key]}, {IMMUTABLE_ID}"
    return out


_DONE = object()


def read_ahead(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Iterate `items` in a helper thread, `depth` items ahead, so that producing the next (a page's request, its
    parsing) overlaps the caller's work on the current one. Errors re-raise in the caller, in order; leaving early
    stops the producer at its next item. At most depth + 2 items are alive at once."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    worker = threading.Thread(target=produce, name="graph-read-ahead", daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting to put
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()


class MailboxSlots:
    """Outlook's concurrent requests per app and mailbox, as slots shared by every thread of one mailbox's client.

    A request takes its slots all at once or waits (so two `$batch` requests never hold part of the slots each and
    deadlock), and urgent requests go first: a waiting listing page is never overtaken by a `$batch` that would
    hold the slot it needs for several rounds. `peak` is the most ever held at once (for tests)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError("a mailbox needs at least one slot")
        self.size = size
        self.peak = 0
        self._free = size
        self._urgent_waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int, *, urgent: bool = False) -> Iterator[None]:
        n = max(1, min(n, self.size))
        with self._cond:
            self._urgent_waiting += urgent
            try:
                while self._free < n or (not urgent and self._urgent_waiting):
                    self._cond.wait()
            finally:
                self._urgent_waiting -= urgent
            self._free -= n
            self.peak = max(self.peak, self.size - self._free)
        try:
            yield
        finally:
            with self._cond:
                self._free += n
                self._cond.notify_all()


class GraphClient:
    """Graph calls for one mailbox; thread-safe (share one instance between the threads of one mailbox).

    `allow` is the allowlist (default: read-only mail), `allow_expand` the permitted `$expand` values (default:
    only the sensitivity extended property). `budget` requests per `budget_window_s` seconds (default
    Outlook's 10,000 per 600 s; pass less for headroom, None to switch the limiter off) are measured with `clock`
    and waited for with `sleep`. `max_pages` caps the pages of one listing; `stop_paging_after` sets a deadline."""

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        token: Callable[[bool], str],
        max_in_flight: int = 4,
        max_attempts: int = 8,
        sleep: Callable[[float], None] = time.sleep,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        *,
        allow: Iterable[Allow] = MAIL_READ_ALLOWLIST,
        allow_expand: Iterable[str] = EXPAND_ALLOWLIST,
        budget: int | None = OUTLOOK_BUDGET,
        budget_window_s: float = OUTLOOK_BUDGET_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        max_pages: int | None = None,
    ):
        self.http = http
        self.base_url = base_url.rstrip("/")
        origin = httpx.URL(self.base_url)
        self._origin = (origin.scheme, origin.host, origin.port)
        self._base_path = urlsplit(self.base_url).path.rstrip("/")
        self._token = token
        self._reused_token: tuple[str, float] | None = None  # (token, reuse until on time.monotonic)
        self.max_in_flight = max_in_flight
        self.max_attempts = max(1, max_attempts)
        self._sleep = sleep
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self.slots = MailboxSlots(max_in_flight)
        self._pause_until = 0.0  # on `clock`: a Retry-After holds every request of the mailbox, not just its own
        self._pause_gate = threading.Lock()
        self._slept = threading.local()  # .until: the pause this thread has already slept out
        self._rng = random.Random()
        self.allow = tuple(allow)
        self._allow_by_method: dict[str, tuple[Allow, ...]] = {}
        for entry in self.allow:
            self._allow_by_method[entry.method] = (*self._allow_by_method.get(entry.method, ()), entry)
        self.allow_expand = frozenset(_squash(v) for v in allow_expand)
        if budget is not None and budget < 1:
            raise ValueError("budget must be >= 1 (or None for no limit)")
        self.budget = budget
        self.budget_window_s = budget_window_s
        self._clock = clock
        self._spent: deque[tuple[float, int]] = deque()  # (sent at, requests) inside the window, oldest first
        self._spent_total = 0
        self._budget_gate = threading.Lock()  # one waiter at a time: a batch is not starved by single requests
        if max_pages is not None and max_pages < 1:
            raise ValueError("max_pages must be >= 1 (or None for no limit)")
        self.max_pages = max_pages  # per listing (one iter_pages call)
        self.deadline: float | None = None  # on `clock`; see stop_paging_after
        self.read_ahead = 0  # listing pages requested ahead of the caller (see iter_pages)

    # ------------------------------------------------------------------ plumbing
    def _bearer(self, force_refresh: bool) -> str:
        """The access token: the provider's, reused for `TOKEN_REUSE_S` unless a refresh is forced (after a 401)."""
        reused = self._reused_token
        now = time.monotonic()
        if not force_refresh and reused is not None and now < reused[1]:
            return reused[0]
        token = self._token(force_refresh)
        self._reused_token = (token, now + TOKEN_REUSE_S)
        return token

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    def _wait(self, retry_after: float | None, attempt: int) -> None:
        if retry_after is None:
            self._sleep(self._backoff(attempt))
            return
        # never undercut Retry-After; a little jitter on top spreads the herd. It applies to the mailbox: the
        # other threads of this client hold their next request until it has passed too (see _await_pause).
        wait = retry_after + self._rng.uniform(0, min(0.25, 0.1 * retry_after + 0.02))
        with self._pause_gate:
            until = self._clock() + wait
            self._pause_until = max(self._pause_until, until)
        self._sleep(wait)
        self._slept.until = until

    def _await_pause(self) -> None:
        """Sleep out what is left of the latest Retry-After the mailbox was given (by any thread of this client),
        unless this thread has just waited it out itself."""
        until = self._pause_until
        if until <= getattr(self._slept, "until", 0.0):
            return
        left = until - self._clock()
        if left > 0:
            self._sleep(left)
        self._slept.until = until

    def _spend(self, cost: int) -> None:
        """Block until `cost` more requests fit into the sliding budget window, then book them."""
        if self.budget is None:
            return
        cost = max(1, min(cost, self.budget))
        window = self.budget_window_s
        with self._budget_gate:
            while True:
                now = self._clock()
                spent = self._spent
                while spent and spent[0][0] <= now - window:
                    self._spent_total -= spent.popleft()[1]
                excess = self._spent_total + cost - self.budget
                if excess <= 0:
                    spent.append((now, cost))
                    self._spent_total += cost
                    return
                freed, wait = 0, window
                for at, n in spent:  # the oldest bookings leave the window first
                    freed += n
                    if freed >= excess:
                        wait = at + window - now
                        break
                self._sleep(max(wait, 0.001))

    def budget_used(self) -> int:
        """Requests booked inside the current window (for status and tests)."""
        with self._budget_gate:
            now = self._clock()
            return sum(n for at, n in self._spent if at > now - self.budget_window_s)

    def check_allowed(
        self, method: str, url_or_path: str, params: Mapping[str, Any] | None = None, content: bytes | None = None
    ) -> int:
        """Raise `ForbiddenRequest` unless the request is on the allowlist; returns its budget cost (the number of
        inner requests for a `$batch`, else 1). Absolute URLs must already be on the Graph origin."""
        method = method.upper()
        segments: list[str] | None = None
        if "://" in url_or_path or "#" in url_or_path:
            parts = urlsplit(self.url(url_or_path))
            path, query_string = parts.path, parts.query
            if path.lower().startswith(self._base_path.lower() + "/"):
                segments = [unquote(s) for s in path[len(self._base_path) + 1 :].split("/")]
        else:  # relative to the version root (every `$batch` inner request): what urlsplit would give, cheaper
            relative, _, query_string = url_or_path.lstrip("/").partition("?")
            path = f"{self._base_path}/{relative}"
            segments = [unquote(s) if "%" in s else s for s in relative.split("/")]
        if segments is None or not any(a.matches(method, segments) for a in self._allow_by_method.get(method, ())):
            raw = [unquote(s) for s in path.split("/") if s] if segments is None else segments
            raise ForbiddenRequest(method, _template(raw))
        query = parse_qsl(query_string, keep_blank_values=True) if query_string else []
        if params:
            query += [(str(k), str(v)) for k, v in params.items()]
        for key, value in query:
            name = key.strip().lstrip("$").lower()
            if (name == "expand" and _squash(value) not in self.allow_expand) or (
                name == "select" and any(p.strip().split("/")[0].lower() in SELECT_DENIED for p in value.split(","))
            ):
                raise ForbiddenRequest(method, _template(segments), f"${name}")
        if not (method == "POST" and len(segments) == 1 and segments[0].lower() == "$batch"):
            return 1
        try:
            inner = _decode_batch_request(content or b"").requests
        except msgspec.DecodeError:
            raise ForbiddenRequest(method, "$batch", "requests") from None
        for item in inner:
            self._check_inner(item.method, item.url)
        return max(1, len(inner))

    def _check_inner(self, method: str, url: str) -> None:
        """An inner `$batch` request: relative to the version root, allowed on its own, never a nested batch."""
        path = url.lstrip("/")
        if not path or path.lower().startswith(("http:", "https:", "$batch")):
            raise ForbiddenRequest(method.upper() or "?", "$batch inner request")
        self.check_allowed(method, path)

    def url(self, url_or_path: str) -> str:
        """Absolute URL for a path relative to the version root; absolute URLs must stay on the Graph origin."""
        if url_or_path.startswith(("https://", "http://")):
            u = httpx.URL(url_or_path)
            if (u.scheme, u.host, u.port) != self._origin:
                raise LinkNotFollowable(0, "ForeignOrigin")  # never send the bearer token elsewhere
            return url_or_path
        return f"{self.base_url}/{url_or_path.lstrip('/')}"

    def request(
        self,
        method: str,
        url_or_path: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        slots: int = 1,
        idempotent: bool = True,
        urgent: bool = False,
    ) -> httpx.Response:
        """Send with retries: 401 → one forced token refresh; 429/502/503/504 and network errors → wait
        (Retry-After or exponential backoff with jitter) and retry up to `max_attempts`; other 4xx raise.
        `idempotent=False` (e.g. posting a chat message): only 401 and 429 are retried — after a 5xx or a dropped
        connection the server may have acted, and sending again could act twice.
        Checked against the allowlist first; every attempt is booked against the mailbox budget before it is sent.
        `urgent` (a listing page: the next one needs its nextLink) goes before requests waiting for slots."""
        cost = self.check_allowed(method, url_or_path, params, content)
        return self._send(method, url_or_path, cost, params, headers, content, slots, idempotent, urgent)

    def _send(
        self,
        method: str,
        url_or_path: str,
        cost: int,
        params: dict[str, Any] | None,
        headers: dict[str, str] | None,
        content: bytes | None,
        slots: int,
        idempotent: bool,
        urgent: bool,
    ) -> httpx.Response:
        """`request` after its allowlist check (`cost`: the requests it books against the budget)."""
        url = self.url(url_or_path)
        hdrs = _with_prefer(headers)
        if content is not None:
            hdrs.setdefault("Content-Type", "application/json")
        force_refresh = refreshed = False
        attempt = 0
        while True:
            attempt += 1
            hdrs["Authorization"] = f"Bearer {self._bearer(force_refresh)}"
            hdrs["client-request-id"] = str(uuid.uuid4())
            force_refresh = False
            failure: httpx.TransportError | None = None
            self._spend(cost)
            with self.slots.hold(slots, urgent=urgent):
                self._await_pause()  # after the wait for slots, during which another thread may have been throttled
                try:
                    resp = self.http.request(method, url, params=params, headers=hdrs, content=content)
                except httpx.TransportError as exc:
                    failure = exc
            if failure is not None:
                if attempt >= self.max_attempts or not idempotent:
                    raise GraphUnavailable(0, type(failure).__name__) from None
                self._wait(None, attempt)
                continue
            status = resp.status_code
            if status < 400:
                return resp
            if status == 401 and not refreshed:
                refreshed = force_refresh = True
                continue
            if status in RETRYABLE and attempt < self.max_attempts and (idempotent or status == 429):
                self._wait(retry_after_seconds(resp.headers.get("Retry-After")), attempt)
                continue
            raise error_for(status, resp.content, resp.headers) from None

    # ------------------------------------------------------------------ public API
    def get(
        self, url_or_path: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return self.request("GET", url_or_path, params=params, headers=headers)

    def stop_paging_after(self, seconds: float | None) -> None:
        """Set the paging deadline `seconds` from now on the client's clock (None: no deadline)."""
        self.deadline = None if seconds is None else self._clock() + max(0.0, seconds)

    @contextmanager
    def page_limit(self, max_pages: int | None) -> Iterator[None]:
        """`max_pages` per listing inside the block (None: no page limit), the client's own limit after it."""
        saved, self.max_pages = self.max_pages, max_pages
        try:
            yield
        finally:
            self.max_pages = saved

    def past_deadline(self) -> bool:
        return self.deadline is not None and self._clock() >= self.deadline

    def _check_link(self, link: str) -> None:
        """An absolute link from Graph (or saved from an earlier run) must be on the configured origin and under
        its version root; otherwise `LinkNotFollowable` before anything is sent."""
        try:
            u = httpx.URL(link)
        except httpx.InvalidURL:
            raise LinkNotFollowable(0, "OutsideGraphRoot") from None
        if (u.scheme, u.host, u.port) != self._origin:
            raise LinkNotFollowable(0, "ForeignOrigin")
        if not u.path.lower().startswith(self._base_path.lower() + "/"):
            raise LinkNotFollowable(0, "OutsideGraphRoot")

    def iter_pages(
        self, path: str, params: dict[str, Any] | None, headers: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        """Raw JSON of each page; follows the absolute `@odata.nextLink` verbatim (also past empty pages).
        `path` may be a saved absolute link. Raises `LinkNotFollowable` for a link off the configured Graph URL,
        `GraphPagingError("NextLinkLoop")` for a repeated nextLink and `RunLimitReached` once `max_pages` pages were
        read or the deadline passed (checked before each page after the first). With `read_ahead` > 0, that many
        pages are requested ahead of the caller (one more request if the caller stops early)."""
        pages = self._iter_pages(path, params, headers)
        return read_ahead(pages, self.read_ahead) if self.read_ahead else pages

    def _iter_pages(self, path: str, params: dict[str, Any] | None, headers: dict[str, str] | None) -> Iterator[bytes]:
        url: str | None = path
        seen: set[str] = set()
        pages = 0
        while url is not None:
            if pages and self.max_pages is not None and pages >= self.max_pages:
                raise RunLimitReached(0, "PageCap")
            if pages and self.past_deadline():
                raise RunLimitReached(0, "TimeCap")
            if "://" in url.split("?")[0]:  # a link, not one of our relative paths
                self._check_link(url)
            content: bytes | None = self.request("GET", url, params=params, headers=headers, urgent=True).content
            assert content is not None
            pages += 1
            next_link = page_links(content).next_link
            yield content
            content = None  # the caller has moved on: let the page go before fetching the next one
            if next_link is not None:
                if next_link in seen:
                    raise GraphPagingError(0, "NextLinkLoop")
                seen.add(next_link)
            url, params = next_link, None

    def batch(self, requests: list[dict]) -> Iterator[tuple[str, int, Any]]:
        """Run `requests` ({id, method, url relative to the version root, headers?, body?, dependsOn?}) via
        `$batch`, 20 at a time; yield (id, status, body) per request once it is final. Inner 429/502/503/504 are
        retried after their own Retry-After; other statuses are yielded for the caller to judge.
        `dependsOn` must stay within a chunk of 20. Every inner request is checked against the allowlist before
        the first chunk is sent."""
        for item in requests:
            self._check_inner(str(item.get("method", "")), str(item.get("url", "")))
        for start in range(0, len(requests), BATCH_LIMIT):
            yield from self._batch_chunk(requests[start : start + BATCH_LIMIT])

    def _batch_chunk(self, chunk: list[dict]) -> Iterator[tuple[str, int, Any]]:
        pending: dict[str, dict] = {}
        for request in chunk:
            inner = dict(request)
            inner["id"] = str(request["id"])
            inner["headers"] = _with_prefer(request.get("headers"))
            pending[inner["id"]] = inner
        attempt = 0
        while pending:
            attempt += 1
            payload = msgspec.json.encode({"requests": list(pending.values())})
            slots = min(BATCH_INNER_CONCURRENCY, len(pending))  # Graph runs 4 inner requests of a batch at once
            # every inner request was checked by `batch`: send without parsing the payload back
            resp = self._send("POST", "$batch", len(pending), None, None, payload, slots, True, False)
            answered = _decode_batch(resp.content).responses
            del resp
            retry: dict[str, dict] = {}
            delay: float | None = None
            last: _BatchItem | None = None
            for item in answered:
                if item.id not in pending:
                    continue
                if item.status in RETRYABLE:
                    retry[item.id] = pending[item.id]
                    last = item
                    ra = retry_after_seconds(
                        (item.headers or {}).get("Retry-After") or (item.headers or {}).get("retry-after")
                    )
                    if ra is not None:
                        delay = ra if delay is None else max(delay, ra)
                else:
                    pending.pop(item.id)
                    yield item.id, item.status, item.body
            for rid in [r for r in pending if r not in retry]:  # not answered at all: send again
                retry[rid] = pending[rid]
            if not retry:
                return
            if attempt >= self.max_attempts:
                status = last.status if last is not None else 503
                raise error_for(
                    status, last.body if last is not None else None, last.headers if last is not None else None
                ) from None
            for inner in retry.values():  # dependencies that already succeeded are no longer part of the batch
                if inner.get("dependsOn"):
                    inner["dependsOn"] = [d for d in inner["dependsOn"] if str(d) in retry]
                    if not inner["dependsOn"]:
                        del inner["dependsOn"]
            self._wait(delay, attempt)
            pending = retry
