"""A small Microsoft Graph client on httpx: per-mailbox concurrency cap, Retry-After, backoff, one token refresh
on 401, opaque nextLink paging and `$batch` with per-inner-request retries.

One `GraphClient` serves one mailbox (one user token): Outlook allows 4 concurrent requests per app and mailbox
(graph.md §5.2), so the client holds a slot of a `BoundedSemaphore` per request in flight and a `$batch` holds
`min(4, inner requests)` slots, because Graph runs up to 4 of its inner requests at once.

Exception messages carry the HTTP status, Graph error code and request-id only: never URLs, query strings,
subjects or addresses (Prefect persists exception messages).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import msgspec

__all__ = [
    "BATCH_LIMIT",
    "GraphAuthError",
    "GraphBadRequest",
    "GraphClient",
    "GraphError",
    "GraphForbidden",
    "GraphNotFound",
    "GraphPagingError",
    "GraphThrottled",
    "GraphUnavailable",
    "error_for",
]

BATCH_LIMIT = 20
BATCH_INNER_CONCURRENCY = 4
RETRYABLE = frozenset({429, 502, 503, 504})
IMMUTABLE_ID = 'IdType="ImmutableId"'


class GraphError(Exception):
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


class GraphNotFound(GraphError):
    """404: item or mailbox not found."""


class GraphBadRequest(GraphError):
    """400: the request (e.g. a $filter) is invalid; retrying cannot help."""


class GraphThrottled(GraphError):
    """429 still answered after `max_attempts` attempts."""


class GraphUnavailable(GraphError):
    """5xx or network errors still failing after `max_attempts` attempts."""


class GraphPagingError(GraphError):
    """A nextLink repeated itself (paging loop) or pointed away from the Graph origin."""


_BY_STATUS: dict[int, type[GraphError]] = {400: GraphBadRequest, 401: GraphAuthError, 403: GraphForbidden,
                                           404: GraphNotFound, 429: GraphThrottled}


class _ErrorDetail(msgspec.Struct):
    code: str | None = None
    inner_error: dict[str, Any] | None = msgspec.field(default=None, name="innerError")


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | None = None


class _NextLink(msgspec.Struct):
    next_link: str | None = msgspec.field(default=None, name="@odata.nextLink")


class _BatchItem(msgspec.Struct):
    id: str
    status: int
    headers: dict[str, str] | None = None
    body: Any = None


class _BatchResponse(msgspec.Struct):
    responses: list[_BatchItem]


_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_decode_next = msgspec.json.Decoder(_NextLink).decode
_decode_batch = msgspec.json.Decoder(_BatchResponse).decode


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
    cls = _BY_STATUS.get(status) or (GraphUnavailable if status >= 500 else GraphError)
    return cls(status, code if isinstance(code, str) else None, request_id)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: integer or fractional (graph.md §5.1) or an HTTP date; None if absent/invalid."""
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


class GraphClient:
    """Graph calls for one mailbox; thread-safe (share one instance between the threads of one mailbox)."""

    def __init__(self, http: httpx.Client, base_url: str, token: Callable[[bool], str], max_in_flight: int = 4,
                 max_attempts: int = 8, sleep: Callable[[float], None] = time.sleep,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0):
        self.http = http
        self.base_url = base_url.rstrip("/")
        origin = httpx.URL(self.base_url)
        self._origin = (origin.scheme, origin.host, origin.port)
        self._token = token
        self.max_in_flight = max_in_flight
        self.max_attempts = max(1, max_attempts)
        self._sleep = sleep
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._multi = threading.Lock()  # multi-slot acquisitions are serialised so two batches cannot deadlock
        self._rng = random.Random()

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _hold(self, n: int) -> Iterator[None]:
        n = max(1, min(n, self.max_in_flight))
        if n == 1:
            self._slots.acquire()
        else:
            with self._multi:
                for _ in range(n):
                    self._slots.acquire()
        try:
            yield
        finally:
            for _ in range(n):
                self._slots.release()

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    def _wait(self, retry_after: float | None, attempt: int) -> None:
        if retry_after is None:
            self._sleep(self._backoff(attempt))
        else:  # never undercut Retry-After; a little jitter on top spreads the herd
            self._sleep(retry_after + self._rng.uniform(0, min(0.25, 0.1 * retry_after + 0.02)))

    def url(self, url_or_path: str) -> str:
        """Absolute URL for a path relative to the version root; absolute URLs must stay on the Graph origin."""
        if url_or_path.startswith(("https://", "http://")):
            u = httpx.URL(url_or_path)
            if (u.scheme, u.host, u.port) != self._origin:
                raise GraphPagingError(0, "ForeignOrigin")  # never send the bearer token elsewhere
            return url_or_path
        return f"{self.base_url}/{url_or_path.lstrip('/')}"

    def request(self, method: str, url_or_path: str, *, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None, content: bytes | None = None,
                slots: int = 1) -> httpx.Response:
        """Send with retries: 401 → one forced token refresh; 429/502/503/504 and network errors → wait
        (Retry-After or exponential backoff with jitter) and retry up to `max_attempts`; other 4xx raise."""
        url = self.url(url_or_path)
        hdrs = _with_prefer(headers)
        if content is not None:
            hdrs.setdefault("Content-Type", "application/json")
        force_refresh = refreshed = False
        attempt = 0
        while True:
            attempt += 1
            hdrs["Authorization"] = f"Bearer {self._token(force_refresh)}"
            hdrs["client-request-id"] = str(uuid.uuid4())
            force_refresh = False
            failure: httpx.TransportError | None = None
            with self._hold(slots):
                try:
                    resp = self.http.request(method, url, params=params, headers=hdrs, content=content)
                except httpx.TransportError as exc:
                    failure = exc
            if failure is not None:
                if attempt >= self.max_attempts:
                    raise GraphUnavailable(0, type(failure).__name__) from None
                self._wait(None, attempt)
                continue
            status = resp.status_code
            if status < 400:
                return resp
            if status == 401 and not refreshed:
                refreshed = force_refresh = True
                continue
            if status in RETRYABLE and attempt < self.max_attempts:
                self._wait(retry_after_seconds(resp.headers.get("Retry-After")), attempt)
                continue
            raise error_for(status, resp.content, resp.headers) from None

    # ------------------------------------------------------------------ public API
    def get(self, url_or_path: str, params: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("GET", url_or_path, params=params, headers=headers)

    def iter_pages(self, path: str, params: dict[str, Any] | None,
                   headers: dict[str, str] | None = None) -> Iterator[bytes]:
        """Raw JSON of each page; follows the absolute `@odata.nextLink` verbatim (also past empty pages)."""
        url: str | None = path
        seen: set[str] = set()
        while url is not None:
            content: bytes | None = self.get(url, params=params, headers=headers).content
            assert content is not None
            next_link = _decode_next(content).next_link
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
        `dependsOn` must stay within a chunk of 20."""
        for start in range(0, len(requests), BATCH_LIMIT):
            yield from self._batch_chunk(requests[start:start + BATCH_LIMIT])

    def _batch_chunk(self, chunk: list[dict]) -> Iterator[tuple[str, int, Any]]:
        pending: dict[str, dict] = {}
        for item in chunk:
            inner = dict(item)
            inner["id"] = str(item["id"])
            inner["headers"] = _with_prefer(item.get("headers"))
            pending[inner["id"]] = inner
        attempt = 0
        while pending:
            attempt += 1
            payload = msgspec.json.encode({"requests": list(pending.values())})
            resp = self.request("POST", "$batch", content=payload,
                                slots=min(BATCH_INNER_CONCURRENCY, len(pending)))
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
                    ra = retry_after_seconds((item.headers or {}).get("Retry-After")
                                             or (item.headers or {}).get("retry-after"))
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
                raise error_for(status, last.body if last is not None else None,
                                last.headers if last is not None else None) from None
            for inner in retry.values():  # dependencies that already succeeded are no longer part of the batch
                if inner.get("dependsOn"):
                    inner["dependsOn"] = [d for d in inner["dependsOn"] if str(d) in retry]
                    if not inner["dependsOn"]:
                        del inner["dependsOn"]
            self._wait(delay, attempt)
            pending = retry
