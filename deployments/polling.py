"""A bounded poll: the one wait loop of the deployment helpers (Prefect server and PostgreSQL start-up, drains)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_while(
    pending: Callable[[], T], deadline: float, timed_out: Callable[[T], BaseException], interval_s: float
) -> None:
    """Call `pending` every `interval_s` seconds until it returns something falsy; once `time.monotonic()` is past
    `deadline`, raise `timed_out(what it returned last)` instead of waiting on."""
    while value := pending():
        if time.monotonic() > deadline:
            raise timed_out(value)
        time.sleep(interval_s)
