"""The HTTP side every API adapter shares: one retried request under the CRM's own rule (`RestClient`,
`send_with_retry`), JSON bodies, rate-limit headers, cursor paging, and the time and watermark helpers (a watermark
is the newest modification time read, in the CRM's clock). Messages carry statuses and codes only."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import httpx

from o365sync.crm import CrmError

log = logging.getLogger(__name__)

Classify = Callable[[httpx.Response, int, bool], float | None]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_S = 0.5  # the first retry's wait; doubles per attempt
MAX_BACKOFF_S = 30.0  # the longest any CRM request waits before its next attempt, Retry-After included


def backoff_delay(attempt: int, base_s: float = BACKOFF_S, cap_s: float = MAX_BACKOFF_S) -> float:
    """Exponential backoff for attempt 1, 2, ...: base, 2*base, ... capped."""
    return min(cap_s, base_s * 2 ** (attempt - 1))


def retry_after_seconds(resp: httpx.Response, cap_s: float = MAX_BACKOFF_S) -> float | None:
    """The server's Retry-After in seconds (integer or decimal form), capped; None when absent or a date."""
    value = resp.headers.get("Retry-After", "").strip()
    try:
        return min(cap_s, max(0.0, float(value))) if value else None
    except ValueError:
        return None


def send_with_retry(
    crm: str,
    send: Callable[[], httpx.Response],
    classify: Callable[[httpx.Response, int, bool], float | None],
    *,
    sleep: Callable[[float], None],
    max_attempts: int = 5,
) -> httpx.Response:
    """One logical CRM request, shared by every adapter.

    `classify(response, attempt, last_attempt)` decides: None hands the response back to the caller, a number
    of seconds waits and sends again, and a raised CrmError ends it (permanent errors, quotas, and whatever the
    CRM-specific rule says on the last attempt). Network errors are retried with `backoff_delay`. A retryable
    answer on the last attempt that `classify` did not raise for becomes `CrmError("<crm>: HTTP <status>")`.
    """
    for attempt in range(1, max_attempts + 1):
        last = attempt == max_attempts
        try:
            resp = send()
        except httpx.TransportError as exc:
            if last:
                raise CrmError(f"{crm}: network error {type(exc).__name__}") from exc
            log.warning("%s: %s on attempt %d, retrying", crm, type(exc).__name__, attempt)
            sleep(backoff_delay(attempt))
            continue
        delay = classify(resp, attempt, last)
        if delay is None:
            return resp
        if last:
            raise CrmError(f"{crm}: HTTP {resp.status_code}", status=resp.status_code)
        log.warning("%s: HTTP %d on attempt %d, retrying in %.1fs", crm, resp.status_code, attempt, delay)
        sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def json_object(crm: str, resp: httpx.Response) -> dict:
    """The response's JSON object, or CrmError naming the CRM and status (never the body)."""
    try:
        body = resp.json()
    except ValueError as exc:
        raise CrmError(f"{crm}: HTTP {resp.status_code} non-JSON body", status=resp.status_code) from exc
    if not isinstance(body, dict):
        raise CrmError(f"{crm}: unexpected response shape", status=resp.status_code)
    return body


def int_header(resp: httpx.Response, name: str) -> int | None:
    """A header holding a non-negative integer (Pipedrive's x-ratelimit-reset, Retry-After), else None."""
    value = resp.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


class RestClient:
    """One CRM's requests: each is one `send_with_retry` under the CRM's `classify` rule."""

    def __init__(
        self,
        crm: str,
        http: httpx.Client,
        classify: Classify,
        *,
        sleep: Callable[[float], None],
        max_attempts: int,
    ):
        self.crm = crm
        self.http = http
        self.classify = classify
        self.sleep = sleep
        self.max_attempts = max_attempts

    def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return send_with_retry(
            self.crm,
            lambda: self.http.request(method, url, **kwargs),
            self.classify,
            sleep=self.sleep,
            max_attempts=self.max_attempts,
        )

    def json(self, method: str, url: str, **kwargs: Any) -> dict:
        """`send`, then the answer's JSON object (`json_object`)."""
        return json_object(self.crm, self.send(method, url, **kwargs))


def new_cursor(seen: set[str], cursor: Any, message: str) -> str:
    """`cursor` as text, remembered in `seen`; CrmError(message) when it is missing or was seen before (a CRM that
    repeats a page cursor would otherwise be paged forever)."""
    if not cursor or str(cursor) in seen:
        raise CrmError(message)
    seen.add(str(cursor))
    return str(cursor)


def as_utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_seconds(value: datetime) -> str:
    """`2024-05-02T10:11:12Z`: UTC, whole seconds (floored: with `>=` that only widens a window)."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """A CRM timestamp as an aware UTC datetime: ISO-8601 / RFC 3339 (`Z`, `+00:00` or `+0000`; without an offset,
    UTC) or a millisecond epoch string; None when blank or not a time."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    try:
        if text.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(text) / 1000, UTC)
        return as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except (ValueError, OverflowError, OSError):
        return None


def newest(*times: datetime | None) -> datetime | None:
    """The latest of the known times (a watermark), None when none is known."""
    return max((t for t in times if t is not None), default=None)


def newest_time(values: Iterable[Any]) -> datetime | None:
    """The latest of the timestamps `values` (`parse_time`), None when none parses."""
    return newest(*(parse_time(v) for v in values))
