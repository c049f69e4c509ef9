"""Sync one mailbox: Inbox and Sent Items, each with its own cursor (see docs/SYNC.md).

Per folder: (1) without a committed deltaLink, take a delta baseline: a delta round filtered to the scan
window whose items are not processed (so the 5,000-message cap of a filtered first round cannot lose mail);
(2) until the backfill is done, list the scan window oldest first with the list endpoint, which has no cap,
advancing a received-time watermark; (3) later runs do a delta round from the committed deltaLink. An expired
delta token (410 / syncStateNotFound / resyncRequired) or a saved link that cannot be followed (another Graph URL)
gets a bounded resync: a new baseline plus a list backfill from shortly before the last committed delta round.

Limits per run (settings `sync_max_pages` per listing, `sync_max_seconds` shared by the folders): at the limit a
folder commits what it has read (the backfill's watermark, or a delta round's rows under the old deltaLink, which
the next run replays idempotently) and the run ends as `catching_up`; the next run goes on from there.

Every page streams through header-first: exclusions, CRM matching, bodies fetched only for matched messages,
matched rows written with the cursor they advance in one transaction. Unmatched and excluded messages are only
counted. Nothing here imports Prefect: the Prefect task lives in tasks/mailbox_task.py.

Bodies are fetched by the mailbox's `BodyFetcher` (o365sync/sync/bodies.py) while the listing goes on, in batches
filled across pages. The rows of a group of pages are sealed with the cursor reached at their last page and written
in order, each only once all its bodies are in (`_Committer`): a cursor never runs ahead of the bodies of the pages
it covers, so a run killed between a page's listing and its bodies' storage lists that page again. One writer thread
(`StoreWriter`) does the writes, so the listing and matching never wait for DuckDB; the groups that are ready when it
opens the store are written in that one opening, each in its own transaction with its cursor.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

import polars as pl

from o365sync.auth import scopes_for
from o365sync.crm_index import crm_index_for
from o365sync.errors import NoCrmSnapshot
from o365sync.exclusions import exclusion_reasons
from o365sync.graph import GraphClient, LinkNotFollowable, RunLimitReached, read_ahead
from o365sync.mail import (
    DeltaPage,
    DeltaTokenExpired,
    HeaderPage,
    baseline_delta_link,
    iter_delta_pages,
    iter_header_pages,
)
from o365sync.matching import MATCH_SCHEMA, CrmIndex, match_participants, normalise_address
from o365sync.participants import EMPTY_NAMES, NameIndex, name_index_for, resolve_non_smtp
from o365sync.settings import Settings
from o365sync.store import (
    BATCH_EMAIL_COLUMNS,
    PARTIAL_COLUMNS,
    FolderCursor,
    MailBatch,
    RunCounts,
    open_store,
    read_cursors,
    write_mail_batch,
)
from o365sync.sync.bodies import BodyFetcher, BodyTicket
from o365sync.tenant_context import Tenant
from o365sync.tenants import TenantConfig
from o365sync.user_graph import user_graph_client

MAIL_FOLDERS = ("inbox", "sentitems")
FILTERED_ROUND_CAP = 5000  # a delta round with $filter returns at most this many messages (https://learn.microsoft.com/en-us/graph/api/message-delta)
# Counted reasons (RunCounts.excluded) that are not exclusions: what happened to the run, for status and artifacts.
RESYNC_REASONS = {"ForeignOrigin": "delta_resync_other_endpoint", "OutsideGraphRoot": "delta_resync_unusable_link"}
LIMIT_REASONS = {"PageCap": "stopped_at_page_limit", "TimeCap": "stopped_at_time_limit"}
ODD_TEXT = "odd_text"  # items whose text was not valid Unicode (imported or discarded like any other, text repaired)


def resync_reason(dead: DeltaTokenExpired) -> str:
    """The counted reason of a resync: the saved link was evicted by Graph, or could not be followed."""
    return (
        RESYNC_REASONS.get(dead.code or "", "delta_resync") if isinstance(dead, LinkNotFollowable) else "delta_resync"
    )


# Each listing page is requested as soon as the previous one is in (`GraphClient.read_ahead`), parsed in another
# thread (`read_ahead` of the parsed pages) and matched in this one: the listing chain keeps its slot busy.
PAGES_AHEAD = 1
FLUSH_MATCHED = 2000  # matched messages buffered before a write
FLUSH_PAGES = 10  # pages between writes otherwise (the backfill watermark advances with each write)
WRITE_QUEUE = 4  # sealed groups waiting for the writer at most; the listing waits beyond (memory stays flat)

_Page = TypeVar("_Page", HeaderPage, DeltaPage)
_TS = pl.Datetime("us", "UTC")
_EMPTY = {
    "emails": pl.DataFrame(
        schema={
            "graph_id": pl.String,
            "folder": pl.String,
            "internet_message_id": pl.String,
            "conversation_id": pl.String,
            "subject": pl.String,
            "body_text": pl.String,
            "from_name": pl.String,
            "from_address": pl.String,
            "received_at": _TS,
            "sent_at": _TS,
            "has_attachments": pl.Boolean,
            "web_link": pl.String,
        }
    ),
    "participants": pl.DataFrame(
        schema={"graph_id": pl.String, "role": pl.String, "name": pl.String, "address": pl.String}
    ),
    "matches": pl.DataFrame(schema=MATCH_SCHEMA),
}


@dataclass
class MailboxRun:
    settings: Settings
    tenant: TenantConfig
    user_oid: str
    client: GraphClient
    index: CrmIndex
    blocklist: list[str]
    scan_start: datetime
    now: datetime
    bodies: BodyFetcher
    counts: RunCounts = RunCounts()
    names: NameIndex = EMPTY_NAMES  # who X500 participants are (o365sync/participants.py)
    writer: StoreWriter | None = None  # writes the sealed groups of pages, in order (see `_Committer`)


@dataclass
class _Buffer:
    emails: list[tuple[pl.DataFrame, BodyTicket]] = field(default_factory=list)  # matched rows, bodies to come
    participants: list[pl.DataFrame] = field(default_factory=list)
    matches: list[pl.DataFrame] = field(default_factory=list)
    partials: list[pl.DataFrame] = field(default_factory=list)
    matched: int = 0
    pages: int = 0
    scanned: int = 0

    def tickets(self) -> list[BodyTicket]:
        return [ticket for _, ticket in self.emails]

    def take(self, cursors: dict[str, FolderCursor], fetcher: BodyFetcher) -> MailBatch:
        """The buffered rows with their bodies (waiting for them), then empty."""

        def cat(frames: list[pl.DataFrame], empty: pl.DataFrame) -> pl.DataFrame:
            return pl.concat(frames, how="vertical_relaxed") if frames else empty

        emails = [
            kept.with_columns(
                pl.col("graph_id")
                .replace_strict(fetcher.wait(ticket), default=None, return_dtype=pl.String)
                .alias("body_text")
            ).select(BATCH_EMAIL_COLUMNS)
            for kept, ticket in self.emails
        ]
        batch = MailBatch(
            cat(emails, _EMPTY["emails"]),
            cat(self.participants, _EMPTY["participants"]),
            cat(self.matches, _EMPTY["matches"]),
            cursors,
            pl.concat(self.partials, how="vertical_relaxed") if self.partials else None,
            scanned=self.scanned,
        )
        self.emails, self.participants, self.matches, self.partials = [], [], [], []
        self.matched = self.pages = self.scanned = 0
        return batch


def _frame(table: object) -> pl.DataFrame:
    """A page's Arrow table as a Polars frame (zero-copy); `pl.from_arrow` is typed to maybe give a Series."""
    frame = pl.from_arrow(table)  # type: ignore[arg-type]
    assert isinstance(frame, pl.DataFrame)
    return frame


def _framed(pages: Iterator[_Page]) -> Iterator[tuple[_Page, pl.DataFrame, pl.DataFrame]]:
    """Each page with its messages and participants as Polars frames, made where the page is parsed (the
    read-ahead thread), so that the conversion (a few ms a page) is off the matching thread."""
    for page in pages:
        yield page, _frame(page.messages), _frame(page.participants)


def classify_headers(
    messages: pl.DataFrame, participants: pl.DataFrame, domains: list[str], blocklist: list[str], index: CrmIndex
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One page of full headers through the import's rules: (excluded: graph_id, reason — first rule wins;
    matches: MATCH_SCHEMA rows of the messages not excluded). A message in neither is unmatched."""
    excluded = exclusion_reasons(messages, participants, domains, blocklist)
    candidates = messages.filter(~pl.col("graph_id").is_in(excluded["graph_id"].implode()))
    matches = match_participants(
        participants.filter(pl.col("graph_id").is_in(candidates["graph_id"].implode())).select(
            "graph_id", "address", "role"
        ),
        index,
    )
    return excluded, matches


def _process_page(
    run: MailboxRun, buf: _Buffer, messages: pl.DataFrame, participants: pl.DataFrame, removed: int = 0, odd: int = 0
) -> None:
    """Classify one page; buffer matched rows (with bodies) and partial updates; count everything else."""
    reasons: Counter[str] = Counter()
    if removed:
        reasons["removed"] = removed  # moved out or deleted in Outlook: the imported copy is kept
    if odd:
        reasons[ODD_TEXT] = odd
    if messages["graph_id"].n_unique() < messages.height:  # rare: an item repeated within a page
        messages = messages.unique("graph_id", keep="last", maintain_order=True)
    full = messages
    if messages["is_partial"].any():  # only delta rounds have partial updates
        partial = messages.filter(pl.col("is_partial"))
        buf.partials.append(partial.select("graph_id", *PARTIAL_COLUMNS))
        reasons["partial_update"] = partial.height
        full = messages.filter(~pl.col("is_partial"))
    participants, resolved = resolve_non_smtp(participants, run.names)  # before exclusions: it may be external
    reasons.update(resolved)
    excluded, matches = classify_headers(full, participants, run.tenant.domains, run.blocklist, run.index)
    reasons.update(dict(excluded.group_by("reason").len().iter_rows()))
    kept_ids = matches["graph_id"].unique()
    kept = full.filter(pl.col("graph_id").is_in(kept_ids.implode()))
    reasons["no_crm_match"] += full.height - excluded.height - kept.height
    if kept.height:
        buf.emails.append((kept, run.bodies.request(kept["graph_id"].to_list())))
        buf.participants.append(
            participants.filter(pl.col("graph_id").is_in(kept_ids.implode())).select(
                "graph_id", "role", "name", normalise_address(pl.col("address"))
            )
        )
        buf.matches.append(matches)
    buf.matched += kept.height
    buf.pages += 1
    buf.scanned += messages.height
    run.counts += RunCounts(
        scanned=messages.height,
        matched=kept.height,
        discarded=messages.height - kept.height,
        excluded=tuple(sorted((k, v) for k, v in reasons.items() if v)),
    )


_Sealed = tuple["_Buffer", str, FolderCursor]  # a group of pages' rows, their folder, the cursor they advance


class StoreWriter:
    """The one thread that writes a mailbox run's sealed groups of pages, oldest first, each once all its bodies
    are in, in one transaction with the cursor it advances. The groups ready when it opens the store are written in
    that opening (one flock and DuckDB open for several groups, each still its own transaction); it closes the store
    when none is ready, so publishing and erasure are never kept waiting longer than the writes take.

    A failed write stops it: nothing after that group is written (a cursor never passes rows that are not
    stored), and the error is raised to the run at its next `seal`, `check` or `drain`. At most `depth` groups
    wait (`seal` blocks beyond), so memory does not grow with the mailbox."""

    def __init__(self, run: MailboxRun, depth: int = WRITE_QUEUE):
        self.run, self.depth = run, depth
        self._cond = threading.Condition()
        self._queue: deque[_Sealed] = deque()
        self._writing = False
        self._closed = False
        self._error: BaseException | None = None
        self._counts = RunCounts()  # what was written; the run takes it at `drain` (one thread adds to run.counts)
        self._thread = threading.Thread(target=self._work, name="store-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop after the write under way; what is still queued is not written (the next run reads it again)."""
        with self._cond:
            self._closed = True
            left, self._queue = self._queue, deque()
            self._cond.notify_all()
        self.run.bodies.cancel([t for buf, _, _ in left for t in buf.tickets()])  # the writer waits for none of them
        self._thread.join()

    # ------------------------------------------------------------------ the run's side
    def seal(self, buf: _Buffer, folder: str, cursor: FolderCursor) -> None:
        with self._cond:
            while len(self._queue) >= self.depth and self._error is None:
                self._cond.wait()
            self._raise()
            self._queue.append((buf, folder, cursor))
            self._cond.notify_all()

    def check(self) -> None:
        """Raise the writer's error, if it has one."""
        with self._cond:
            self._raise()

    def drop(self, bufs: list[_Buffer]) -> None:
        """Take these groups off the queue (their listing failed); one being written is finished."""
        ids = {id(buf) for buf in bufs}
        with self._cond:
            self._queue = deque(entry for entry in self._queue if id(entry[0]) not in ids)
            self._cond.notify_all()

    def drain(self) -> RunCounts:
        """Wait until every sealed group is written (waiting for their bodies); the counts of what was written
        since the last drain."""
        with self._cond:
            while (self._queue or self._writing) and self._error is None:
                self._cond.wait()
            self._raise()
            counts, self._counts = self._counts, RunCounts()
        return counts

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ the writer thread
    def _work(self) -> None:
        run = self.run
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                head = self._queue[0]
            try:
                for ticket in head[0].tickets():  # outside the lock: the run may seal or drop meanwhile
                    run.bodies.wait(ticket)
            except BaseException as exc:  # noqa: BLE001 - handed to the run
                self._fail(exc)
                return
            with self._cond:
                if self._closed:
                    return
                if not self._queue or self._queue[0] is not head or not _ready(head):
                    continue  # dropped meanwhile
                group = [self._queue.popleft()]
                while self._queue and _ready(self._queue[0]):
                    group.append(self._queue.popleft())
                self._writing = True
                self._cond.notify_all()  # `seal` may go on
            try:
                counts = self._write(group)
            except BaseException as exc:  # noqa: BLE001 - handed to the run
                self._fail(exc)
                return
            with self._cond:
                self._counts += counts
                self._writing = False
                self._cond.notify_all()

    def _write(self, group: list[_Sealed]) -> RunCounts:
        run, counts = self.run, RunCounts()
        with open_store(run.settings, run.tenant.id, write=True, user_oid=run.user_oid) as con:
            for buf, folder, cursor in group:
                batch = buf.take({folder: cursor}, run.bodies)  # every body is in: the rows, then their cursor
                result = write_mail_batch(con, run.tenant.id, run.user_oid, batch)
                duplicates = (("duplicate", result.duplicates),) if result.duplicates else ()
                counts += RunCounts(imported=result.imported, excluded=duplicates)
        return counts

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = self._error or exc
            self._writing = False
            self._queue.clear()
            self._cond.notify_all()


def _ready(entry: _Sealed) -> bool:
    return not any(ticket.left for ticket in entry[0].tickets())


def _writer(run: MailboxRun) -> StoreWriter:
    assert run.writer is not None, "a mailbox run that seals pages has a StoreWriter"
    return run.writer


def _keep_finished_listings(run: MailboxRun) -> None:
    """A folder failed: still write what earlier listings sealed (e.g. the whole inbox when Sent Items fails),
    waiting for their bodies. If those cannot be had either, the next run reads the pages again."""
    try:
        _writer(run).drain()
    except Exception:  # noqa: BLE001 - the folder's own error is the one raised
        pass


class _Committer:
    """A listing's writes: the rows of a group of pages are sealed with the cursor reached at the last of them
    and written in order (`StoreWriter`, every folder's), each once all its bodies are in, while the listing
    and the next folder go on. Inside `listing()`, a `RunLimitReached` seals every page read so far with the
    cursor it reached; any other error drops this listing's unwritten pages (the next run reads them again)."""

    def __init__(self, run: MailboxRun, folder: str, cursor: FolderCursor):
        self.run, self.folder, self.cursor = run, folder, cursor
        self.buf = _Buffer()
        self.mine: list[_Buffer] = []

    @contextmanager
    def listing(self) -> Iterator[None]:
        try:
            with self.run.bodies.listing():
                yield
        except RunLimitReached:
            self.finish()
            raise
        except BaseException:
            mine = [*self.mine, self.buf]
            _writer(self.run).drop(mine)  # off the writer's queue first, so it never waits for a cancelled body
            self.run.bodies.cancel([t for buf in mine for t in buf.tickets()])
            raise

    def page_done(self) -> None:
        """After each page: seal at the flush thresholds, hold the listing if too many bodies are owed, raise
        what the writer failed with."""
        if self.buf.matched >= FLUSH_MATCHED or self.buf.pages >= FLUSH_PAGES:
            self._seal()
        self.run.bodies.backpressure()
        _writer(self.run).check()

    def finish(self) -> FolderCursor:
        """Seal the last pages with the final cursor (`sync_mailbox_now` waits for the writes at the end)."""
        self._seal()
        return self.cursor

    def _seal(self) -> None:
        _writer(self.run).seal(self.buf, self.folder, self.cursor)
        self.mine.append(self.buf)
        self.buf = _Buffer()


def backfill(run: MailboxRun, folder: str, cursor: FolderCursor) -> FolderCursor:
    """List the window oldest first from the watermark; each write carries the watermark it covers."""
    out = _Committer(run, folder, cursor)
    since = cursor.received_watermark or cursor.scan_start
    with out.listing():
        pages = iter_header_pages(run.client, folder, since, run.settings.graph_page_size)
        for page, messages, participants in read_ahead(_framed(pages)):
            _process_page(run, out.buf, messages, participants, odd=page.odd)
            page_max: datetime | None = messages["received_at"].max()  # type: ignore[assignment]  # a Datetime column
            mark = out.cursor.received_watermark
            if page_max is not None and (mark is None or page_max > mark):
                out.cursor = replace(out.cursor, received_watermark=page_max)
            del page, messages, participants  # unmatched content dies here
            out.page_done()
    out.cursor = replace(out.cursor, backfill_done=True)
    return out.finish()


def delta_baseline(run: MailboxRun, folder: str, cursor: FolderCursor) -> FolderCursor:
    """Obtain a deltaLink for changes from now on to mail in the scan window (the $filter stays with the token,
    so it must cover the window). Its items need no processing: the list backfill that follows (gated by
    `backfill_done`) covers everything received before it, whatever the 5,000-message cap of this round.
    Its page limit is at least what that cap needs, so a faithful round always ends: a baseline cut short commits
    nothing, and one that never ended would keep the backfill from ever starting."""
    size = run.settings.graph_page_size
    limit = run.client.max_pages and max(run.client.max_pages, -(-FILTERED_ROUND_CAP // size) + 1)
    with run.client.page_limit(limit), run.bodies.listing():
        link = baseline_delta_link(run.client, folder, since=run.scan_start, page_size=size)
    cursor = replace(cursor, delta_link=link, delta_at=run.now)
    _writer(run).seal(_Buffer(), folder, cursor)  # written after what earlier listings sealed
    return cursor


def delta_round(run: MailboxRun, folder: str, cursor: FolderCursor) -> FolderCursor:
    """One delta round from the committed deltaLink. The new link is written only in the transaction of the
    round's last rows; earlier writes keep the old link, so a crash replays the round (idempotently)."""
    out = _Committer(run, folder, cursor)
    pages = iter_delta_pages(
        run.client, folder, delta_link=cursor.delta_link, since=None, page_size=run.settings.graph_page_size
    )
    with out.listing():
        for page, messages, participants in read_ahead(_framed(pages)):
            _process_page(run, out.buf, messages, participants, removed=len(page.removed), odd=page.odd)
            del messages, participants
            if page.delta_link is not None:  # the round's last page
                out.cursor = replace(out.cursor, delta_link=page.delta_link, delta_at=run.now)
            else:
                out.page_done()
    return out.finish()


def sync_folder(run: MailboxRun, folder: str, cursor: FolderCursor | None) -> None:
    if cursor is None:
        cursor = FolderCursor(scan_start=run.scan_start)
    elif run.scan_start < cursor.scan_start:  # an older open opportunity appeared: backfill the new start too
        cursor = replace(cursor, scan_start=run.scan_start, received_watermark=None, backfill_done=False)
    try:
        if cursor.delta_link is not None:
            try:
                cursor = delta_round(run, folder, cursor)
            except DeltaTokenExpired as dead:  # evicted, or a link we cannot follow (LinkNotFollowable)
                cursor = cursor.resynced(run.now, run.scan_start)
                run.counts += RunCounts(excluded=((resync_reason(dead), 1),))
        if cursor.delta_link is None:
            cursor = delta_baseline(run, folder, cursor)
        if not cursor.backfill_done:
            backfill(run, folder, cursor)
    except RunLimitReached as limit:  # what was read is committed; the next run goes on from there
        run.counts += RunCounts(excluded=((LIMIT_REASONS[limit.code or "PageCap"], 1),))


def sync_mailbox_now(tenant: Tenant, user_oid: str) -> RunCounts:
    """Bring one mailbox up to date (first run: the whole scan window), resuming from its cursors."""
    settings, config = tenant.settings, tenant.config
    index, scan_start = crm_index_for(settings, config)
    if scan_start is None:
        raise NoCrmSnapshot(tenant.id)
    with tenant.open_store(write=False, user_oid=user_oid) as con:
        cursors = read_cursors(con, tenant.id, user_oid)
    scopes = scopes_for(["email"])
    with (
        user_graph_client(settings, tenant.id, user_oid, scopes, max_pages=settings.sync_max_pages) as client,
        BodyFetcher(client) as bodies,
    ):
        client.read_ahead = PAGES_AHEAD
        blocklist, now = config.blocklist_for(user_oid), datetime.now(UTC)
        run = MailboxRun(settings, config, user_oid, client, index, blocklist, scan_start, now, bodies)
        run.names = name_index_for(settings, config)
        deadline = time.monotonic() + settings.sync_max_seconds
        with StoreWriter(run) as run.writer:
            try:
                for i, folder in enumerate(MAIL_FOLDERS):  # each folder gets its share of the time left: none starves
                    client.stop_paging_after((deadline - time.monotonic()) / (len(MAIL_FOLDERS) - i))
                    sync_folder(run, folder, cursors.get(folder))
            except Exception:
                _keep_finished_listings(run)
                raise
            run.counts += run.writer.drain()
    return run.counts
