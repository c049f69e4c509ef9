"""Sessions, CSRF and headers of the console.

- Session: Starlette's signed cookie (itsdangerous), `HttpOnly`, `SameSite=Lax`, `Secure` unless the service runs
  on localhost; it holds only who signed in (tenant id, object id, names, admin or not), the CSRF token and the
  sign-in time; at most `SESSION_HOURS` old. Its key derives from the token key (one secret to keep).
- CSRF: a synchronizer token per session in every form, compared with `hmac.compare_digest`; a cross-site
  `Sec-Fetch-Site` is refused as well (defence in depth).
- Headers: no script at all, styles only from this origin, forms only to this origin, never framed, no referrer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from o365sync.auth import SignedIn
from o365sync.secrets import load_key
from o365sync.settings import Settings

CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
SESSION_HOURS = 8
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def cookie_secure(settings: Settings) -> bool:
    """`Secure` cookies everywhere but on localhost (where the service is plain HTTP)."""
    return (urlsplit(settings.redirect_uri).hostname or "") not in _LOCAL_HOSTS


def cookie_name(settings: Settings) -> str:
    # `__Host-`: the browser refuses it unless Secure, path=/ and no Domain (cannot be planted by a sibling host).
    return "__Host-o365sync" if cookie_secure(settings) else "o365sync_session"


class Sessions:
    """SessionMiddleware built on the first request, so that merely creating the app reads no key file."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings
        self._inner: SessionMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._inner is None:
            key = hmac.new(load_key(self.settings), b"o365sync console session v1", hashlib.sha256).hexdigest()
            self._inner = SessionMiddleware(
                self.app,
                secret_key=key,
                session_cookie=cookie_name(self.settings),
                max_age=SESSION_HOURS * 3600,
                same_site="lax",
                https_only=cookie_secure(self.settings),
            )
        await self._inner(scope, receive, send)


@dataclass(frozen=True)
class Who:
    """The signed-in person of a request (from the session)."""

    tenant_id: str
    oid: str
    upn: str
    name: str
    admin: bool
    csrf: str


def start_session(request: Request, person: SignedIn) -> None:
    """A fresh session for `person` (whatever the browser held before is dropped: no session fixation)."""
    request.session.clear()
    request.session.update(
        {
            "tid": person.tenant_id,
            "oid": person.oid,
            "upn": person.upn,
            "name": person.display_name,
            "admin": person.is_admin,
            "csrf": secrets.token_urlsafe(32),
            "at": int(time.time()),
        }
    )


def who(request: Request) -> Who | None:
    s = request.session
    if not s.get("tid") or not s.get("oid") or not s.get("csrf"):
        return None
    if int(s.get("at", 0)) < time.time() - SESSION_HOURS * 3600:
        request.session.clear()
        return None
    return Who(s["tid"], s["oid"], s.get("upn", ""), s.get("name", ""), bool(s.get("admin")), s["csrf"])


class CsrfRefused(Exception):
    """A state-changing request without this session's CSRF token (or sent from another site)."""


MAX_FORM_BYTES = 64 * 1024


async def checked_form(request: Request, person: Who) -> dict[str, str]:
    """The posted form (URL-encoded: the console's forms hold short fields only) if it carries the session's CSRF
    token and did not come from another site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise CsrfRefused
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise CsrfRefused
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise CsrfRefused
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    token = form.get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), person.csrf.encode()):
        raise CsrfRefused
    return form
