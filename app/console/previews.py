"""Import previews run beside the console's requests, not inside them: listing a large mailbox's headers against
Graph's limits takes minutes (about 100 requests per 100k messages, plus the calendar), longer than a page should
hang. The button starts a preview and the page shows it running until the counts are there.

One preview per user at a time (a second click while it runs shows the same run), at most `at_once` running
together (each keeps up to 4 Graph requests in flight against its mailbox). A finished preview is kept in this
process's memory for `keep_s` so the page can be reloaded, then forgotten: it holds counts, CRM account names and
the user's display name only (never a message), and it is never written to disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("o365sync.console")

Report = dict[str, Any] | str  # `o365sync preview`'s report, or the sentence why there is none


@dataclass
class PreviewRun:
    started_at: datetime
    finished_at: datetime | None = None
    result: Report | None = None
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    finished_clock: float = 0.0  # the `Previews` clock when it finished


class Previews:
    """The previews of one console process, by (tenant id, user oid)."""

    def __init__(
        self,
        make: Callable[[str, str], Report],
        at_once: int = 2,
        keep_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make = make
        self._slots = threading.BoundedSemaphore(at_once)
        self._keep_s = keep_s
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], PreviewRun] = {}

    def start(self, tenant_id: str, oid: str) -> PreviewRun:
        """The user's running preview, or a new one (replacing a finished one)."""
        key = (tenant_id, oid)
        with self._lock:
            self._forget_old()
            current = self._runs.get(key)
            if current is not None and not current.finished.is_set():
                return current
            run = self._runs[key] = PreviewRun(started_at=datetime.now(UTC))
        try:
            threading.Thread(target=self._run, args=(key, run), name=f"preview-{oid}", daemon=True).start()
        except BaseException:  # no thread (the process is out of them): no run either, so a later click retries
            with self._lock:
                self._runs.pop(key, None)
            raise
        return run

    def get(self, tenant_id: str, oid: str) -> PreviewRun | None:
        with self._lock:
            self._forget_old()
            return self._runs.get((tenant_id, oid))

    def _run(self, key: tuple[str, str], run: PreviewRun) -> None:
        with self._slots:
            try:
                result: Report = self._make(*key)
            except Exception as exc:  # the log gets ids and the class, never content; the page one sentence
                log.warning("console preview failed: tenant=%s user=%s error=%s", *key, type(exc).__name__)
                result = "The preview could not be made right now. Try again later."
        run.result, run.finished_at, run.finished_clock = result, datetime.now(UTC), self._clock()
        run.finished.set()

    def _forget_old(self) -> None:
        """Drop previews that finished more than `keep_s` ago (caller holds the lock)."""
        now = self._clock()
        for key, run in list(self._runs.items()):
            if run.finished.is_set() and now - run.finished_clock > self._keep_s:
                del self._runs[key]
