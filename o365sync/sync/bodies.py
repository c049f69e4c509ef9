"""Bodies of one mailbox's matched messages, fetched in `$batch` requests filled across pages, on the mailbox's slots
next to the listing (docs/benchmarks.md, "Initial import of a 100k mailbox under Graph limits").

Why: Outlook allows 4 requests in flight per mailbox, and with a few percent of the mail matching, the body GETs
are most of an import's requests. Fetching a page's bodies before listing the next page left slots idle: the
listing waited for a `$batch` holding all 4 slots, and each page sent its own short last batch.

How: each page hands its matched ids to `BodyFetcher.request` and gets a `BodyTicket`; sender threads take ids
off one queue, oldest first, whatever page they came from. Graph runs 4 inner requests of a `$batch` at once, so a
batch of k inner requests holds min(k, 4) slots (`GraphClient`). While a listing runs (`listing()`), a batch takes
at most `max_in_flight - 1` ids (one round), so one slot stays for the next listing page, which the client's
`MailboxSlots` serves first; otherwise up to 20, in whole rounds of 4 while more are queued. The caller stores a
page only after `wait(ticket)`, so a cursor is never committed past bodies that are not stored; `backpressure()`
holds the listing while too many bodies are owed, so memory does not grow with the mailbox.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from o365sync.graph import BATCH_INNER_CONCURRENCY, BATCH_LIMIT, GraphClient
from o365sync.mail import fetch_bodies

BACKLOG_HIGH = 1000  # bodies owed (queued or in flight) at which the listing waits ...
BACKLOG_LOW = 500  # ... until they are down to this many


def senders_for(max_in_flight: int) -> int:
    """Sender threads for a mailbox's slots: one per `$batch` that fits into them at once (a batch holds up to 4),
    plus one whose batch is ready to take the slots the first to finish frees. Under Outlook's 4 that is 2: one
    batch in flight at a time. With the limits off and a higher cap (a benchmark), more batches run at once."""
    return -(-max(1, max_in_flight) // BATCH_INNER_CONCURRENCY) + 1


class BodyTicket:
    """The bodies of one page's matched messages; `bodies` is complete once `left` is 0 (a message deleted
    meanwhile has no body: Graph's 404 is skipped)."""

    __slots__ = ("bodies", "cancelled", "left")

    def __init__(self, count: int):
        self.bodies: dict[str, str] = {}
        self.left = count
        self.cancelled = False


class BodyFetcher:
    """One per mailbox run: `with BodyFetcher(client) as bodies:`. Thread-safe; errors of a sender are raised to
    whoever waits next, and the fetcher takes no more work."""

    def __init__(
        self, client: GraphClient, senders: int | None = None, high: int = BACKLOG_HIGH, low: int = BACKLOG_LOW
    ):
        self.client = client
        senders = senders_for(client.max_in_flight) if senders is None else senders
        self.high, self.low = high, low
        self._cond = threading.Condition()
        self._queue: deque[tuple[BodyTicket, str]] = deque()
        self._owed = 0  # ids queued or in flight
        self._listings = 0
        self._error: BaseException | None = None
        self._closed = False
        self._senders = [
            threading.Thread(target=self._send, name=f"graph-bodies-{i}", daemon=True) for i in range(senders)
        ]
        for sender in self._senders:
            sender.start()

    def __enter__(self) -> BodyFetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop what is still queued and stop the senders (a batch in flight is finished first)."""
        with self._cond:
            self._closed = True
            self._owed -= len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for sender in self._senders:
            sender.join()

    # ------------------------------------------------------------------ callers
    def request(self, ids: list[str]) -> BodyTicket:
        ticket = BodyTicket(len(ids))
        with self._cond:
            self._raise_error()
            self._queue.extend((ticket, gid) for gid in ids)
            self._owed += len(ids)
            self._cond.notify_all()
        return ticket

    def wait(self, ticket: BodyTicket) -> dict[str, str]:
        """The ticket's bodies once all are in; returns early (incomplete) if the ticket was cancelled."""
        with self._cond:
            while ticket.left and self._error is None and not ticket.cancelled:
                self._cond.wait()
            if ticket.left and not ticket.cancelled:
                self._raise_error()
        return ticket.bodies

    def cancel(self, tickets: list[BodyTicket]) -> None:
        """Nobody will wait for these (their pages are abandoned): take their ids off the queue."""
        with self._cond:
            for ticket in tickets:
                ticket.cancelled = True
            before = len(self._queue)
            self._queue = deque(item for item in self._queue if not item[0].cancelled)
            self._owed -= before - len(self._queue)
            self._cond.notify_all()  # whoever waits for them stops waiting

    @contextmanager
    def listing(self) -> Iterator[None]:
        """A listing runs inside: batches leave it a slot."""
        with self._cond:
            self._listings += 1
        try:
            yield
        finally:
            with self._cond:
                self._listings -= 1

    def backpressure(self) -> None:
        """If more than `high` bodies are owed, wait (batches taking every slot) until `low` are."""
        with self._cond:
            if self._owed <= self.high:
                return
            self._listings -= 1  # the listing is held: batches may take its slot meanwhile
            try:
                while self._owed > self.low and self._error is None:
                    self._cond.wait()
            finally:
                self._listings += 1
            self._raise_error()

    # ------------------------------------------------------------------ senders
    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _next_batch(self) -> list[tuple[BodyTicket, str]]:
        """Oldest ids first: one round leaving a slot while a listing runs, else up to 20 in whole rounds. A batch
        holds as many slots as it runs inner requests at once (at most 4), so with more than 4 slots beside the
        listing's (limits off) a batch is filled as when no listing runs; under Outlook's 4 it is at most 3."""
        queued, slots = len(self._queue), self.client.max_in_flight
        if self._listings > 0 and slots - 1 < BATCH_INNER_CONCURRENCY:
            size = min(queued, max(1, slots - 1))
        else:
            per_round = max(1, min(BATCH_INNER_CONCURRENCY, slots))
            size = min(queued, BATCH_LIMIT)
            if size > per_round:
                size -= size % per_round  # the rest goes with the next batch, which more ids may fill
        return [self._queue.popleft() for _ in range(size)]

    def _send(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed and self._error is None:
                    self._cond.wait()
                if self._closed or self._error is not None:
                    return
                batch = self._next_batch()
            try:
                got = dict(fetch_bodies(self.client, [gid for _, gid in batch]))
            except BaseException as exc:  # handed to the waiting caller
                with self._cond:
                    self._error = self._error or exc
                    self._cond.notify_all()
                return
            with self._cond:
                for ticket, gid in batch:
                    if gid in got:
                        ticket.bodies[gid] = got[gid]
                    ticket.left -= 1
                self._owed -= len(batch)
                self._cond.notify_all()
