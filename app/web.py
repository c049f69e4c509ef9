"""The two connect endpoints a tenant admin sends users to: `GET /connect?tenant=<id>` (redirects to the
Microsoft sign-in) and the OAuth redirect URI (default `/auth/callback`), plus the web console (app/console/,
docs/CONSOLE.md), whose sign-ins and admin consents come back to the same redirect URI (told apart by `state`).
Plain HTTP; put it behind TLS in production (Entra only allows http redirect URIs for localhost).

Neither needs a login, so both are bounded: /connect is rate-limited per client address, the pending sign-ins are
capped (per tenant and overall) and `login_hint` is bounded. People only ever read fixed sentences, one per case
(`_CASES`); error codes and caller-sent text never reach the page: codes go to the log with a short reference
that the page shows for the cases an operator must look into.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import uvicorn
from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.console import Console
from app.console.security import Sessions
from o365sync.auth import (
    CONFIG_ERRORS,
    TRANSIENT_ERRORS,
    AuthConfigError,
    AuthError,
    AuthTransient,
    ConnectError,
    ConnectSetupError,
    InvalidLoginHint,
    PendingSignIns,
    SignInsBusy,
    TenantGone,
    UserOffboarded,
    WrongTenant,
    begin_connect,
    complete_connect,
)
from o365sync.settings import Settings
from o365sync.tenants import TenantMisplaced, TenantNotFound, TenantUnreadable, load_tenant

if TYPE_CHECKING:
    from app.import_trigger import ImportStarted

log = logging.getLogger("o365sync.web")

# Pages hold text only: nothing may load, run, frame them or leak the URL (it carries the sign-in state or code).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
UNAVAILABLE_RETRY_S = 60
START_AGAIN = "Start again from your connect link."
ASK_ADMIN = "Please contact your administrator and give them this reference: {ref}."

# case -> (HTTP status, title, sentence). `{ref}` is a short reference logged with the codes, for operators.
_CASES: dict[str, tuple[int, str, str]] = {
    "missing_tenant": (
        400,
        "Incomplete link",
        "This connect link is incomplete: it must name your organisation "
        "(?tenant=...). Ask your administrator for your connect link.",
    ),
    "bad_login_hint": (
        400,
        "Invalid link",
        "This connect link is not valid (its login_hint is not a sign-in "
        "name). Ask your administrator for your connect link.",
    ),
    "rate_limited": (
        429,
        "Too many attempts",
        "Too many sign-ins were started from your network. Wait {retry} "
        "seconds, then start again from your connect link.",
    ),
    "busy": (
        503,
        "Too many sign-ins",
        "Too many sign-ins are in progress right now. Wait {retry} seconds, then start again from your connect link.",
    ),
    "expired_link": (400, "Sign-in link expired", "This sign-in link expired or was already used. " + START_AGAIN),
    "wrong_tenant": (
        403,
        "Account of another organisation",
        "This account belongs to another organisation than the one this link connects. Sign out of "
        "Microsoft, then start again from your connect link with your work account.",
    ),
    "access_denied": (
        403,
        "Access not granted",
        "Access was not granted: the permissions were declined, or your organisation lets only an "
        "administrator approve this app. Ask your administrator, then start again from your connect "
        "link.",
    ),
    "code_expired": (400, "Sign-in expired", "This sign-in took too long or its code was already used. " + START_AGAIN),
    "configuration": (
        503,
        "Service not set up correctly",
        "This connection service is not set up correctly, so your account cannot be connected now. " + ASK_ADMIN,
    ),
    "unavailable": (
        503,
        "Try again later",
        "Microsoft's sign-in service is unavailable right now. Try again in a few minutes from your connect link.",
    ),
    "tenant_gone": (
        404,
        "Organisation not registered",
        "Your organisation is not (or no longer) registered with this service, so nothing was "
        "connected. Please contact your administrator.",
    ),
    "offboarded": (
        403,
        "Account offboarded",
        "Your account was offboarded from your organisation's activity capture, so it is not connected "
        "again. If this is a mistake, ask your administrator to re-admit it.",
    ),
    "unknown": (
        400,
        "Not connected",
        "The sign-in could not be completed. Start again from your connect link; if "
        "it happens again, give your administrator this reference: {ref}.",
    ),
    "internal": (500, "Something went wrong", "Your account could not be connected. " + ASK_ADMIN),
}
# AADSTS codes (Microsoft identity platform) that decide the case when the OAuth error name does not.
_OTHER_TENANT_CODES = frozenset({50020})
_CONFIG_CODES = frozenset({50011, 700016, 7000215, 7000218, 90008, 650056, 650057, 28000})
_ACCESS_CODES = frozenset({65001, 65004, 90094, 90095, 50105})
_EXPIRED_CODES = frozenset({54005, 70008, 501481, 70000})
_CONFIG_OAUTH_ERRORS = CONFIG_ERRORS | {"invalid_scope", "unsupported_response_type", "invalid_request"}
_ACCESS_OAUTH_ERRORS = frozenset({"access_denied", "consent_required", "interaction_required", "login_required"})
_OPS_CASES = frozenset({"configuration", "unknown", "internal"})


def case_of(exc: AuthError) -> str:
    """Which fixed page a failed connect shows."""
    if isinstance(exc, SignInsBusy):
        return "busy"
    if isinstance(exc, AuthTransient):
        return "unavailable"
    if isinstance(exc, AuthConfigError | ConnectSetupError):
        return "configuration"
    if isinstance(exc, TenantGone):
        return "tenant_gone"
    if isinstance(exc, UserOffboarded):
        return "offboarded"
    if isinstance(exc, WrongTenant):
        return "wrong_tenant"
    if isinstance(exc, InvalidLoginHint):
        return "bad_login_hint"
    if not isinstance(exc, ConnectError):
        return "unknown"
    codes = set(exc.error_codes)
    if exc.error == "unknown_state":
        return "expired_link"
    if codes & _OTHER_TENANT_CODES:
        return "wrong_tenant"
    if codes & _CONFIG_CODES or exc.error in _CONFIG_OAUTH_ERRORS:
        return "configuration"
    if exc.error in TRANSIENT_ERRORS:
        return "unavailable"
    if codes & _ACCESS_CODES or exc.error in _ACCESS_OAUTH_ERRORS:
        return "access_denied"
    if codes & _EXPIRED_CODES or exc.error == "invalid_grant":
        return "code_expired"
    return "unknown"


def _page(title: str, message: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    body = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def _case_page(case: str, retry_after_s: int | None = None, ref: str = "") -> HTMLResponse:
    status, title, sentence = _CASES[case]
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return _page(title, sentence.format(ref=ref, retry=retry_after_s), status, headers)


def _failure(exc: AuthError, tenant_id: str) -> HTMLResponse:
    """The page for a failed connect; the cause (ids and codes only, never caller text) goes to the log."""
    case = case_of(exc)
    ref = secrets.token_hex(4)
    level = logging.WARNING if case in _OPS_CASES else logging.INFO
    log.log(level, "connect failed: case=%s ref=%s tenant=%s %s", case, ref, tenant_id or "-", exc)
    retry = (
        exc.retry_after_s if isinstance(exc, SignInsBusy) else UNAVAILABLE_RETRY_S if case == "unavailable" else None
    )
    return _case_page(case, retry, ref)


def client_key(host: str | None) -> str:
    """What the rate limit counts by: the client's address, an IPv6 client by its /64 (one subscriber's range)."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectRateLimit:
    """`settings.connect_rate_limit` per client address, with the `limits` package's moving window in memory: a
    key holds at most the limit's count of timestamps and is dropped when its window passes, so memory stays
    bounded by the addresses seen in one window."""

    def __init__(self, spec: str):
        self.items = parse_many(spec)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def retry_after(self, host: str | None) -> int | None:
        """None if the client may start a sign-in now (and counts it), else seconds until it may."""
        key = client_key(host)
        full = [item for item in self.items if not self.limiter.test(item, "connect", key)]
        if not full:
            for item in self.items:
                self.limiter.hit(item, "connect", key)
            return None
        reset = max(self.limiter.get_window_stats(item, "connect", key).reset_time for item in full)
        return max(1, math.ceil(reset - time.time()))


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response that does not set them itself (redirects, 404s, /healthz)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def callback_path(settings: Settings) -> str:
    return urlsplit(settings.redirect_uri).path or "/auth/callback"


def create_app(
    settings: Settings,
    pending: PendingSignIns | None = None,
    start_import: Callable[[str, str], ImportStarted] | None = None,
) -> Starlette:
    """The connect app; `pending` (default: a new store) holds this server's sign-ins in progress. `start_import(
    tenant id, user id)` (app/import_trigger.py; None: nothing started) runs after each successful connect."""
    sign_ins = PendingSignIns() if pending is None else pending
    rate_limit = ConnectRateLimit(settings.connect_rate_limit)
    console = Console(settings, rate_limit)

    # Sync endpoints: Starlette runs them in its thread pool, so MSAL's blocking I/O does not stall the loop.
    def connect(request: Request) -> Response:
        retry = rate_limit.retry_after(request.client.host if request.client else None)
        if retry is not None:
            return _case_page("rate_limited", retry)
        tenant_id = request.query_params.get("tenant", "")
        if not tenant_id:
            return _case_page("missing_tenant")
        try:
            tenant = load_tenant(settings, tenant_id)
            url = begin_connect(
                settings,
                tenant.id,
                list(tenant.features),
                login_hint=request.query_params.get("login_hint") or None,
                explicit_consent=tenant.notetaker_explicit_consent,
                pending=sign_ins,
            )
        except (TenantUnreadable, TenantMisplaced) as exc:  # ours to repair, not the user's: ask the admin
            return _failure(ConnectSetupError(tenant_id, str(exc)), tenant_id)
        except TenantNotFound:
            return _case_page("tenant_gone")
        except AuthError as exc:
            return _failure(exc, tenant_id)
        return RedirectResponse(url, status_code=302, headers=SECURITY_HEADERS)

    def callback(request: Request) -> Response:
        if console.owns(request.query_params.get("state", "")):
            return console.callback(request)  # a console sign-in or an admin consent
        try:
            user = complete_connect(settings, dict(request.query_params), pending=sign_ins)
        except AuthError as exc:
            return _failure(exc, getattr(exc, "tenant_id", ""))
        started = start_import(user.tenant_id, user.oid) if start_import else None  # never waits for the import
        if console.same_user(request, user.tenant_id, user.oid):  # a rep who connected from the console
            return RedirectResponse("/me?connected=1", status_code=303)  # /me shows the import's progress
        after = f" {started.line}" if started else ""
        return _page("Connected", f"Connected {user.display_name}. You can close this window.{after}")

    def health(request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    def internal_error(request: Request, exc: Exception) -> Response:
        ref = secrets.token_hex(4)
        log.error("connect endpoint %s failed: ref=%s", request.url.path, ref, exc_info=exc)
        return _case_page("internal", ref=ref)

    return Starlette(
        routes=[
            Route("/connect", connect, methods=["GET"]),
            Route(callback_path(settings), callback, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
            *console.routes(),
        ],
        middleware=[Middleware(SecurityHeaders), Middleware(Sessions, settings=settings)],
        exception_handlers={Exception: internal_error},
    )


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8400) -> None:
    """Run the connect endpoints in the foreground (blocking)."""
    from app.import_trigger import import_starter

    uvicorn.run(create_app(settings, start_import=import_starter(settings)), host=host, port=port, log_level="warning")


def run_in_thread(
    settings: Settings,
    port: int = 0,
    host: str = "127.0.0.1",
    sock: socket.socket | None = None,
    pending: PendingSignIns | None = None,
    start_import: Callable[[str, str], ImportStarted] | None = None,
) -> tuple[str, Callable[[], None]]:
    """Serve in a daemon thread; returns (base_url, stop). The socket is bound and listening before this
    returns, so requests made right away queue in the backlog until uvicorn accepts them.

    Pass an already-bound `sock` when the redirect URI must name the port before the settings exist."""
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(128)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(settings, pending, start_import), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="o365sync-web", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://{bound_host}:{bound_port}", stop
