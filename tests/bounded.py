"""Run a sync against a simulator fault that never ends by itself, so that a product without paging limits makes
the test fail instead of hang: the call gets `seconds`; after that the fault is switched off (the sync can then
end) and the test fails."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def ends_by_itself(call: Callable[[], Any], switch_fault_off: Callable[[], None], seconds: float = 60.0) -> Any:
    """`call()`'s result if it returned within `seconds` while the fault was on; AssertionError otherwise."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    worker = threading.Thread(target=run, name="bounded-sync", daemon=True)
    worker.start()
    worker.join(seconds)
    ended = not worker.is_alive()
    switch_fault_off()
    worker.join()
    assert ended, f"the sync was still paging after {seconds:.0f} s: nothing bounds it"
    if "error" in out:
        raise out["error"]
    return out["result"]
