"""Microsoft Graph mail simulator: `/me`, mail folders, message listing/paging, single messages and `$batch`,
with Outlook's per-mailbox concurrency limit, scope checks, the exact Graph error shape and fault injection.

Behaviour follows /work/shared/reference/graph.md §1, §2, §5, §6, §10. Deliberate simplifications:
- the `$batch` envelope itself takes no mailbox slot and never consumes an injected fault; its inner requests do
  (they are the Outlook requests), at most 4 inner requests of one batch run at a time;
- `$skip` in nextLinks is the plain offset into the filtered, ordered folder (the client must not care);
- ids in the world are already immutable, so `Prefer: IdType="ImmutableId"` is accepted and changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import random
import re
import threading
import time
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import msgspec

from simulators.server import Request, Response, SimServer
from simulators.tls import SimulatorTLS
from simulators.tokens import AccessClaims, TokenAuthority, TokenError
from simulators.world import Mailbox, SimMessage, World

WELL_KNOWN_FOLDERS = {"inbox": "Inbox", "sentitems": "Sent Items"}
MAIL_READ_SCOPES = frozenset({"Mail.Read", "Mail.ReadWrite"})
MAIL_BASIC_SCOPES = MAIL_READ_SCOPES | {"Mail.ReadBasic"}
BODY_PROPS = frozenset({"body", "bodyPreview", "uniqueBody"})
# Properties returned without $select, in Graph's order; uniqueBody only via $select.
DEFAULT_PROPS = (
    "createdDateTime", "lastModifiedDateTime", "changeKey", "categories", "receivedDateTime", "sentDateTime",
    "hasAttachments", "internetMessageId", "subject", "bodyPreview", "importance", "parentFolderId",
    "conversationId", "isDeliveryReceiptRequested", "isReadReceiptRequested", "isRead", "isDraft", "webLink",
    "inferenceClassification", "body", "sender", "from", "toRecipients", "ccRecipients", "bccRecipients",
    "replyTo", "flag",
)
SELECTABLE = {p.lower(): p for p in (*DEFAULT_PROPS, "id", "uniqueBody")}
BATCH_LIMIT = 20
BATCH_INNER_CONCURRENCY = 4
_SUPPORTED_OPTIONS = {"$select", "$filter", "$top", "$skip", "$orderby", "$count"}
_FILTER_RE = re.compile(
    r"\s*receivedDateTime\s+(ge|gt)\s+(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2}))\s*",
    re.IGNORECASE,
)
_QUOTED_FILTER_RE = re.compile(r"\s*receivedDateTime\s+(ge|gt|le|lt|eq)\s+'[^']*'\s*", re.IGNORECASE)
_ORDERBY_RE = re.compile(r"\s*(\w+)(?:\s+(asc|desc))?\s*", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_encode = msgspec.json.encode


class GraphFail(Exception):
    """Raised inside handlers; becomes a Graph error response."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, code, message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class LoggedRequest:
    method: str
    path: str
    status: int
    oid: str | None
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
    stamp: tuple[int, int] = (0, 0)
    by_id: dict[str, SimMessage] = field(default_factory=dict)


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


def _recipient(m: Mailbox) -> dict:
    return {"emailAddress": {"name": m.name, "address": m.address}}


def _opaque(*parts: str) -> str:
    return base64.urlsafe_b64encode(hashlib.blake2b("|".join(parts).encode(), digest_size=24).digest()).decode()


def _prefer(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in headers.get("prefer", "").split(","):
        key, _, value = item.strip().partition("=")
        if key:
            out[key.strip().lower()] = value.strip().strip('"')
    return out


class GraphSimulator:
    """Serve a `World`'s mailboxes as Microsoft Graph v1.0 on loopback HTTPS."""

    def __init__(self, world: World, tls: SimulatorTLS, tokens: TokenAuthority, port: int = 0,
                 max_in_flight: int = 4, latency_s: float = 0.0, throttle_retry_after: str = "0.2",
                 seed: int = 0):
        self.world = world
        self.tokens = tokens
        self.max_in_flight = max_in_flight
        self.latency_s = latency_s  # per mailbox request, slept while holding the mailbox slot
        self.throttle_retry_after = throttle_retry_after
        self.requests: list[LoggedRequest] = []
        self.peak_in_flight: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._folders: dict[tuple[str, str], _FolderIndex] = {}
        self._mailboxes: dict[str, _Mailbox] = {}
        self._folder_ids: dict[tuple[str, str], str] = {}
        self._base: dict[str, dict] = {}  # message id -> all body-independent properties
        self._frags: dict[tuple, dict[str, bytes]] = {}  # (select key, body type) -> message id -> JSON
        mail = (
            ("GET", r"/v1\.0/me", self._get_me),
            ("GET", r"/v1\.0/me/mailFolders/([^/]+)", self._get_folder),
            ("GET", r"/v1\.0/me/mailFolders/([^/]+)/messages", self._list_messages),
            ("GET", r"/v1\.0/me/messages", self._list_messages),
            ("GET", r"/v1\.0/me/messages/([^/]+)", self._get_message),
        )
        self._routes = [(m, re.compile(p, re.IGNORECASE), self._endpoint(h)) for m, p, h in mail]
        routes: list[tuple[str, str, Callable[[Request], Response]]] = [
            (m, "(?i)" + p, self._endpoint(h)) for m, p, h in mail
        ]
        routes.append(("POST", r"(?i)/v1\.0/\$batch", self._batch))
        self.server = SimServer(tls, routes, port=port, name="graph-sim")

    # ---------------------------------------------------------------- lifecycle / test hooks
    @property
    def base_url(self) -> str:
        return f"{self.server.base_url}/v1.0"

    def start(self) -> GraphSimulator:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> GraphSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, oid: str, status: int, count: int = 1, retry_after: str | None = None,
               code: str | None = None, path_contains: str | None = None) -> None:
        """The next `count` mailbox requests of `oid` (inner $batch requests included) answer `status`;
        with `path_contains`, only requests whose path contains it (case-insensitive) are hit."""
        with self._lock:
            self._faults.setdefault(oid, []).append(
                _Fault(status, count, retry_after, code, path_contains.lower() if path_contains else None))

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()
            self.peak_in_flight.clear()

    def reset(self) -> None:
        """Forget pending faults, the request log and peaks; no latency (tests share one running simulator)."""
        with self._lock:
            self._faults.clear()
        self.latency_s = 0.0
        self.reset_stats()

    def folder_id(self, oid: str, folder: str) -> str:
        key = (oid, folder.lower())
        fid = self._folder_ids.get(key)
        if fid is None:
            fid = self._folder_ids[key] = _opaque("folder", *key)
        return fid

    # ---------------------------------------------------------------- request plumbing
    def _error(self, ctx: _Ctx, status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> Response:
        body = {"error": {"code": code, "message": message, "innerError": {
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "request-id": ctx.request_id, "client-request-id": ctx.client_request_id}}}
        return Response(status, body, dict(headers or {}))

    def _authenticate(self, req: Request) -> AccessClaims:
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("Access token is empty.")
        return self.tokens.verify_access_token(token.strip())

    def _unauthorized(self, ctx: _Ctx, exc: TokenError) -> Response:
        www = ('Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
               'client_id="00000003-0000-0000-c000-000000000000"')
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
        default = {429: ("TooManyRequests", "Please retry again later."),
                   503: ("serviceNotAvailable", "The service is temporarily unavailable."),
                   504: ("UnknownError", "Gateway Timeout"),
                   500: ("generalException", "An unspecified error has occurred.")}
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

    def _endpoint(self, fn: Callable[[Request, _Ctx], Response]) -> Callable[..., Response]:
        """Auth → injected fault → mailbox concurrency slot → handler; Graph error shape; ids; request log."""

        def handle(req: Request, inner: bool = False) -> Response:
            ctx = self._new_ctx(req)
            oid = None
            try:
                ctx.claims = self._authenticate(req)
            except TokenError as exc:
                resp = self._unauthorized(ctx, exc)
            else:
                oid = ctx.claims.oid
                fault = self._take_fault(oid, req.path)
                if fault is not None:
                    resp = self._fault_response(ctx, fault)
                elif not self._admit(oid):
                    resp = self._error(ctx, 429, "ApplicationThrottled",
                                       "Application is over its MailboxConcurrency limit.",
                                       {"Retry-After": self.throttle_retry_after})
                else:
                    try:
                        if self.latency_s:
                            time.sleep(self.latency_s)
                        resp = fn(req, ctx)
                    except GraphFail as exc:
                        resp = self._error(ctx, exc.status, exc.code, exc.message, exc.headers)
                    finally:
                        self._release(oid)
            resp.headers.setdefault("Content-Type", "application/json")
            resp.headers["request-id"] = ctx.request_id
            resp.headers["client-request-id"] = ctx.client_request_id
            self._log(req, resp.status, oid, inner)
            return resp

        return handle

    # ---------------------------------------------------------------- data
    def _mailbox(self, oid: str) -> _Mailbox:
        msgs = self.world.mailboxes.get(oid)
        if msgs is None:
            raise GraphFail(404, "MailboxNotEnabledForRESTAPI", "The mailbox is either inactive, soft-deleted, "
                            "or is hosted on-premise.")
        stamp = (id(msgs), len(msgs))
        box = self._mailboxes.get(oid)
        if box is None or box.stamp != stamp:
            box = _Mailbox(stamp, {m.id: m for m in msgs})
            self._mailboxes[oid] = box
        return box

    def _folder_index(self, oid: str, folder: str | None) -> _FolderIndex:
        msgs = self.world.mailboxes.get(oid, [])
        stamp = (id(msgs), len(msgs))
        key = (oid, folder or "*")
        idx = self._folders.get(key)
        if idx is None or idx.stamp != stamp:
            with self._cache_lock:
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
            if raw == self.folder_id(oid, known):
                return known
        raise GraphFail(404, "ErrorItemNotFound", "The specified object was not found in the store.")

    def _base_props(self, m: SimMessage) -> dict:
        props = self._base.get(m.id)
        if props is None:
            digest = hashlib.blake2b(m.id.encode(), digest_size=18).digest()
            change_key = base64.urlsafe_b64encode(digest).decode()
            received, sent = _iso(m.received), _iso(m.sent)
            props = {
                "@odata.etag": f'W/"{change_key}"', "id": m.id,
                "createdDateTime": received, "lastModifiedDateTime": received, "changeKey": change_key,
                "categories": [], "receivedDateTime": received, "sentDateTime": sent,
                "hasAttachments": m.has_attachments, "internetMessageId": m.internet_message_id,
                "subject": m.subject, "bodyPreview": m.body[:255], "importance": "normal",
                "parentFolderId": self.folder_id(m.owner_oid, m.folder), "conversationId": m.conversation_id,
                "isDeliveryReceiptRequested": False, "isReadReceiptRequested": False,
                "isRead": digest[0] % 3 != 0, "isDraft": False,
                "webLink": f"https://outlook.office365.com/owa/?ItemID={_quote_id(m.id)}"
                           "&exvsurl=1&viewmodel=ReadMessageItem",
                "inferenceClassification": "focused", "sender": _recipient(m.sender), "from": _recipient(m.sender),
                "toRecipients": [_recipient(r) for r in m.to], "ccRecipients": [_recipient(r) for r in m.cc],
                "bccRecipients": [], "replyTo": [], "flag": {"flagStatus": "notFlagged"},
            }
            self._base[m.id] = props
        return props

    @staticmethod
    def _body(m: SimMessage, body_type: str) -> dict:
        if body_type == "text":
            return {"contentType": "text", "content": m.body}
        text = html.escape(m.body).replace("\n", "<br>\r\n")
        content = ('<html><head>\r\n<meta http-equiv="Content-Type" content="text/html; charset=utf-8">'
                   f'</head><body><div>{text}</div></body></html>')
        return {"contentType": "html", "content": content}

    def _fragment(self, m: SimMessage, select: tuple[str, ...] | None, body_type: str) -> bytes:
        key = (select, body_type)
        cache = self._frags.get(key)
        if cache is None:
            cache = self._frags.setdefault(key, {})
        frag = cache.get(m.id)
        if frag is None:
            base = self._base_props(m)
            props = select if select is not None else DEFAULT_PROPS
            out = {"@odata.etag": base["@odata.etag"], "id": m.id}
            for p in props:
                if p in ("body", "uniqueBody"):
                    out[p] = self._body(m, body_type)
                elif p != "id":
                    out[p] = base[p]
            frag = cache[m.id] = _encode(out)
        return frag

    # ---------------------------------------------------------------- query options
    @staticmethod
    def _check_options(req: Request) -> None:
        for k in req.query:
            if k.startswith("$") and k.lower() not in _SUPPORTED_OPTIONS:
                raise GraphFail(400, "BadRequest", f"Query option '{k}' is not supported.")

    @staticmethod
    def _parse_select(req: Request) -> tuple[str, ...] | None:
        raw = req.query.get("$select")
        if raw is None:
            return None
        out: list[str] = []
        for item in raw.split(","):
            name = item.strip()
            canon = SELECTABLE.get(name.lower())
            if canon is None:
                raise GraphFail(400, "RequestBroker--ParseUri",
                                f"Could not find a property named '{name}' on type 'microsoft.graph.message'.")
            if canon not in out:
                out.append(canon)
        return tuple(out)

    @staticmethod
    def _check_mail_scopes(ctx: _Ctx, select: tuple[str, ...] | None) -> None:
        scopes = ctx.claims.scopes if ctx.claims else frozenset()
        needs_body = select is None or any(p in BODY_PROPS for p in select)
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
    def _parse_filter(raw: str | None) -> tuple[str, int] | None:
        if raw is None:
            return None
        if m := _FILTER_RE.fullmatch(raw):
            try:
                when = datetime.fromisoformat(m.group(2).upper().replace("Z", "+00:00"))
            except ValueError:
                when = None
            if when is not None:
                return m.group(1).lower(), _us(when)
        if _QUOTED_FILTER_RE.fullmatch(raw):
            raise GraphFail(400, "BadRequest", "A binary operator with incompatible types was detected. Found "
                            "operand types 'Edm.DateTimeOffset' and 'Edm.String' for operator kind 'GreaterThan"
                            "OrEqual'.")
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
            raise GraphFail(400, "ErrorInvalidUrlQuery" if name == "$top" else "BadRequest",
                            f"The value of query option '{name}' is invalid; expected {lo}..{hi}.")
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
                raise GraphFail(400, "InefficientFilter", "The restriction or sort order is too complex for "
                                "this operation.")
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
        return Response(200, {
            "@odata.context": f"{req.base_url}/v1.0/$metadata#users/$entity",
            "id": user.oid, "displayName": user.display_name, "userPrincipalName": user.upn, "mail": user.upn,
        })

    def _get_folder(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None and req.match is not None
        oid = ctx.claims.oid
        self._check_mail_scopes(ctx, ("id",))
        self._mailbox(oid)
        folder = self._resolve_folder(oid, req.match.group(1))
        idx = self._folder_index(oid, folder)
        unread = sum(1 for m in idx.desc if not self._base_props(m)["isRead"])
        return Response(200, {
            "@odata.context": f"{req.base_url}/v1.0/$metadata#users('{oid}')/mailFolders/$entity",
            "id": self.folder_id(oid, folder), "displayName": WELL_KNOWN_FOLDERS[folder],
            "parentFolderId": self.folder_id(oid, "msgfolderroot"), "childFolderCount": 0,
            "unreadItemCount": unread, "totalItemCount": len(idx.desc), "isHidden": False,
        })

    def _list_messages(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None
        oid = ctx.claims.oid
        self._check_options(req)
        select = self._parse_select(req)
        self._check_mail_scopes(ctx, select)
        flt = self._parse_filter(req.query.get("$filter"))
        desc = self._parse_orderby(req.query.get("$orderby"), flt is not None)
        top = self._parse_int(req, "$top", 10, 1, 1000)
        skip = self._parse_int(req, "$skip", 0, 0, 10**9)
        self._mailbox(oid)
        folder = None
        if req.match is not None and req.match.groups():
            folder = self._resolve_folder(oid, req.match.group(1))
        idx = self._folder_index(oid, folder)
        n = len(idx.desc)
        if flt is not None:
            op, when = flt
            n = bisect_right(idx.neg_us, -when) if op == "ge" else bisect_left(idx.neg_us, -when)
        headers: dict[str, str] = {}
        body_type = self._body_type(req, headers)
        if desc:
            chosen = idx.desc[skip:min(skip + top, n)]
        else:
            lo, hi = max(0, n - skip - top), max(0, n - skip)
            chosen = idx.desc[lo:hi][::-1]
        frags = b",".join(self._fragment(m, select, body_type) for m in chosen)
        where = f"mailFolders('{folder}')/messages" if folder else "messages"
        sel = f"({','.join(select)})" if select else ""
        context = f"{req.base_url}/v1.0/$metadata#users('{oid}')/{where}{sel}"
        out = b'{"@odata.context":' + _encode(context) + b',"value":[' + frags + b"]"
        if skip + top < n:
            query = {k: v for k, v in req.query.items() if k.lower() != "$skip"}
            query["$skip"] = str(skip + top)
            link = f"{req.base_url}{req.path}?{urlencode(query)}"
            out += b',"@odata.nextLink":' + _encode(link)
        headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
        return Response(200, out + b"}", headers)

    def _get_message(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None and req.match is not None
        self._check_options(req)
        select = self._parse_select(req)
        self._check_mail_scopes(ctx, select)
        msg = self._mailbox(ctx.claims.oid).by_id.get(unquote(req.match.group(1)))
        if msg is None:
            raise GraphFail(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        headers: dict[str, str] = {}
        body_type = self._body_type(req, headers)
        context = f"{req.base_url}/v1.0/$metadata#users('{ctx.claims.oid}')/messages/$entity"
        frag = self._fragment(msg, select, body_type)
        headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
        return Response(200, b'{"@odata.context":' + _encode(context) + b"," + frag[1:], headers)

    # ---------------------------------------------------------------- $batch
    def _route(self, method: str, path: str) -> tuple[Callable[..., Response], re.Match[str]] | None:
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
        req = Request(method, path, {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
                      headers, _encode(body) if body is not None else b"", base_url=outer.base_url)
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
                        err = self._error(self._new_ctx(req), 424, "FailedDependency",
                                          "Request failed due to a failed dependency.")
                        results[rid] = (424, {"Content-Type": "application/json"}, err.encoded()[0])
                    else:
                        results[rid] = self._run_inner(req, item)
                    done.add(rid)
        else:
            with ThreadPoolExecutor(max_workers=min(BATCH_INNER_CONCURRENCY, len(items))) as pool:
                futures = {str(it["id"]): pool.submit(self._run_inner, req, it) for it in items}
                results = {rid: f.result() for rid, f in futures.items()}
        order = list(results)
        with self._lock:
            self._rng.shuffle(order)
        parts = []
        for rid in order:
            status, headers, data = results[rid]
            head = {"id": rid, "status": status, "headers": headers}
            parts.append(_encode(head)[:-1] + b',"body":' + (data or b"null") + b"}")
        self._log(req, 200, claims.oid, False)
        return Response(200, b'{"responses":[' + b",".join(parts) + b"]}",
                        {"Content-Type": "application/json", **ids})

    @staticmethod
    def _validate_batch(req: Request) -> list[dict]:
        try:
            payload: Any = req.json()
        except ValueError:
            payload = None
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
