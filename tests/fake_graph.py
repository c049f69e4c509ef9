"""Answers of a fake Graph endpoint (httpx.MockTransport handlers) that several client tests need."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx


def batch_answer(
    request: httpx.Request, body: Callable[[dict[str, Any]], Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    """The answer to a `$batch` request: every inner request 200 with `body(inner request)` (and `headers`)."""
    inner = json.loads(request.content)["requests"]
    status = {"status": 200} if headers is None else {"status": 200, "headers": headers}
    return httpx.Response(200, json={"responses": [{"id": r["id"], **status, "body": body(r)} for r in inner]})
