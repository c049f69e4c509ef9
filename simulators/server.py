"""The small HTTPS server every simulator runs on: stdlib ThreadingHTTPServer (one thread per connection, so
concurrency limits such as Outlook's 4 requests per mailbox can really be exceeded), TLS from `tls.py`, and a
regex router. Simulators are plain handler functions `(Request) -> Response`."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, urlsplit

from simulators.tls import SimulatorTLS


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]  # first value of each parameter, keys as sent (case kept)
    headers: dict[str, str]  # lower-case names
    body: bytes
    match: re.Match[str] | None = None
    base_url: str = ""

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def json_or_none(self) -> Any:
        """The body as JSON, or None when it is not JSON (handlers then answer their API's 400)."""
        try:
            return self.json()
        except ValueError:
            return None


@dataclass
class Response:
    status: int = 200
    body: bytes | str | dict | list | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, dict | list):
            return json.dumps(self.body, separators=(",", ":")).encode(), "application/json"
        if isinstance(self.body, str):
            return self.body.encode(), "text/html; charset=utf-8"
        return self.body or b"", "application/octet-stream"


Handler = Callable[[Request], Response]
H = TypeVar("H")  # a simulator's own handler type, before its `_wrap` makes it a Handler
ANY_METHOD = ("GET", "POST", "PATCH", "DELETE", "PUT")


def wrapped_routes(
    routes: Iterable[tuple[str, str, H]], wrap: Callable[[H], Handler], other_paths: H
) -> list[tuple[str, str, Handler]]:
    """`routes` plus `other_paths` for any other path and method, every handler passed through `wrap` (the
    simulator's gate, faults and request log)."""
    every = [*routes, *((method, r"/.*", other_paths) for method in ANY_METHOD)]
    return [(method, pattern, wrap(handler)) for method, pattern, handler in every]


@dataclass(frozen=True)
class LoggedRequest:
    """One request as a simulator saw it, for tests to inspect: never tokens, secrets or form bodies. Each
    simulator's own log entry adds what its tests ask about."""

    method: str
    path: str
    status: int


class Served:
    """`with` for anything that serves: `start()` on entry, `stop()` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SimServer(Served):
    """Serve `routes` over HTTPS on 127.0.0.1:`port` (0 = any free port) in a background thread."""

    def __init__(self, tls: SimulatorTLS, routes: list[tuple[str, str, Handler]], port: int = 0, name: str = "sim"):
        self.name = name
        self._routes = [(m, re.compile(p), h) for m, p, h in routes]
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body are separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms a request.
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:  # quiet: request lines carry addresses
                pass

            def _dispatch(self) -> None:
                server._handle(self)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.socket = tls.server_context().wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self.base_url = f"https://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        req = Request(
            h.command, parts.path, query, {k.lower(): v for k, v in h.headers.items()}, body, base_url=self.base_url
        )
        resp = None
        for method, pattern, handler in self._routes:
            if method == h.command and (m := pattern.fullmatch(parts.path)):
                req.match = m
                try:
                    resp = handler(req)
                except Exception as exc:  # a simulator bug must be visible, not a hung client
                    resp = Response(500, {"error": {"code": "generalException", "message": repr(exc)}})
                break
        if resp is None:
            resp = Response(404, {"error": {"code": "NotFound", "message": f"No route for {h.command} {parts.path}"}})
        data, ctype = resp.encoded()
        h.send_response(resp.status)
        headers = {"Content-Type": ctype, **resp.headers}
        headers.setdefault("request-id", str(uuid.uuid4()))
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=self.name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class OnServer(Served):
    """A simulator that runs on a `SimServer` it holds in `server` (rather than being one): starts and stops it."""

    server: SimServer

    def start(self) -> Self:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
