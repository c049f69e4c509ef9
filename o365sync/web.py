"""The two connect endpoints a tenant admin sends users to: `GET /connect?tenant=<id>` (redirects to the
Microsoft sign-in) and the OAuth redirect URI (default `/auth/callback`). Plain HTTP; put it behind TLS in
production (Entra only allows http redirect URIs for localhost).
"""

from __future__ import annotations

import html
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from o365sync.auth import AuthConfigError, AuthTransient, ConnectError, begin_connect, complete_connect
from o365sync.settings import Settings
from o365sync.tenants import TenantNotFound, load_tenant


def _page(title: str, message: str, status: int = 200) -> HTMLResponse:
    body = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>")
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store",
                                                           "Referrer-Policy": "no-referrer"})


def _unavailable(exc: AuthTransient) -> HTMLResponse:
    return _page("Try again later", f"The Microsoft sign-in service is unavailable ({exc.detail}).", 503)


def callback_path(settings: Settings) -> str:
    return urlsplit(settings.redirect_uri).path or "/auth/callback"


def create_app(settings: Settings) -> Starlette:
    # Sync endpoints: Starlette runs them in its thread pool, so MSAL's blocking I/O does not stall the loop.
    def connect(request: Request) -> Response:
        tenant_id = request.query_params.get("tenant", "")
        if not tenant_id:
            return _page("Missing tenant", "The link must include ?tenant=<tenant id>.", 400)
        try:
            tenant = load_tenant(settings, tenant_id)
        except TenantNotFound:
            return _page("Unknown tenant", "This organisation is not registered.", 404)
        try:
            url = begin_connect(settings, tenant.id, list(tenant.features),
                                login_hint=request.query_params.get("login_hint") or None,
                                explicit_consent=tenant.notetaker_explicit_consent)
        except AuthTransient as exc:
            return _unavailable(exc)
        except AuthConfigError as exc:
            return _page("Configuration error", f"The app registration was rejected ({exc.error}).", 500)
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})

    def callback(request: Request) -> Response:
        try:
            user = complete_connect(settings, dict(request.query_params))
        except AuthTransient as exc:
            return _unavailable(exc)
        except AuthConfigError as exc:
            codes = " ".join(f"AADSTS{c}" for c in exc.error_codes)
            return _page("Configuration error", f"The app registration was rejected: {exc.error} {codes}",
                         500)
        except ConnectError as exc:
            codes = " ".join(f"AADSTS{c}" for c in exc.error_codes)
            return _page("Not connected", f"Connecting failed: {exc.error} {codes}".strip(), 400)
        return _page("Connected", f"Connected {user.display_name}. You can close this window.")

    def health(request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    return Starlette(routes=[
        Route("/connect", connect, methods=["GET"]),
        Route(callback_path(settings), callback, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ])


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8400) -> None:
    """Run the connect endpoints in the foreground (blocking)."""
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


def run_in_thread(settings: Settings, port: int = 0, host: str = "127.0.0.1",
                  sock: socket.socket | None = None) -> tuple[str, Callable[[], None]]:
    """Serve in a daemon thread; returns (base_url, stop). The socket is bound and listening before this
    returns, so requests made right away queue in the backlog until uvicorn accepts them.

    Pass an already-bound `sock` when the redirect URI must name the port before the settings exist."""
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(128)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="o365sync-web", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://{bound_host}:{bound_port}", stop
