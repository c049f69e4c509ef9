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
it covers, so a run killed between a page's listing and its bodies' storage lists that page again.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import polars as pl

from o365sync.auth import scopes_for
from o365sync.crm_index import crm_index_for
from o365sync.errors import NoCrmSnapshot
from o365sync.exclusions import exclusion_reasons
from o365sync.graph import GraphClient, LinkNotFollowable, RunLimitReached, read_ahead
from o365sync.mail import DeltaTokenExpired, iter_delta_pages, iter_header_pages
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
    # buffers to write, in order, each with its folder and the cursor it advances (see `_Committer`)
    sealed: deque[tuple[_Buffer, str, FolderCursor]] = field(default_factory=deque)


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
    messages = messages.unique("graph_id", keep="last", maintain_order=True)
    partial = messages.filter(pl.col("is_partial"))
    if partial.height:
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


def _flush(run: MailboxRun, buf: _Buffer, folder: str, cursor: FolderCursor) -> None:
    batch = buf.take({folder: cursor}, run.bodies)  # every body of these pages first, then the cursor with them
    with open_store(run.settings, run.tenant.id, write=True) as con:
        result = write_mail_batch(con, run.tenant.id, run.user_oid, batch)
    duplicates = (("duplicate", result.duplicates),) if result.duplicates else ()
    run.counts += RunCounts(imported=result.imported, excluded=duplicates)


def _seal(run: MailboxRun, buf: _Buffer, folder: str, cursor: FolderCursor) -> None:
    run.sealed.append((buf, folder, cursor))


def _write_sealed(run: MailboxRun, ready_only: bool) -> None:
    """Write the sealed buffers oldest first; with `ready_only`, up to the first whose bodies are not all in
    (without waiting), else all of them (waiting for their bodies)."""
    while run.sealed and not (ready_only and any(t.left for t in run.sealed[0][0].tickets())):
        buf, folder, cursor = run.sealed.popleft()
        _flush(run, buf, folder, cursor)


def _keep_finished_listings(run: MailboxRun) -> None:
    """A folder failed: still write what earlier listings sealed (e.g. the whole inbox when Sent Items fails),
    waiting for their bodies. If those cannot be had either, the next run reads the pages again."""
    try:
        _write_sealed(run, ready_only=False)
    except Exception:  # noqa: BLE001 - the folder's own error is the one raised
        run.sealed.clear()


class _Committer:
    """A listing's writes: the rows of a group of pages are sealed with the cursor reached at the last of them
    and written in order (`MailboxRun.sealed`, every folder's), each once all its bodies are in, while the listing
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
            dropped = {id(buf) for buf in [*self.mine, self.buf]}
            self.run.bodies.cancel([t for buf in [*self.mine, self.buf] for t in buf.tickets()])
            self.run.sealed = deque(entry for entry in self.run.sealed if id(entry[0]) not in dropped)
            raise

    def page_done(self) -> None:
        """After each page: seal at the flush thresholds, hold the listing if too many bodies are owed, write
        what is ready."""
        if self.buf.matched >= FLUSH_MATCHED or self.buf.pages >= FLUSH_PAGES:
            self._seal()
        self.run.bodies.backpressure()
        _write_sealed(self.run, ready_only=True)

    def finish(self) -> FolderCursor:
        """Seal the last pages with the final cursor (`sync_mailbox_now` writes what is left at the end)."""
        self._seal()
        _write_sealed(self.run, ready_only=True)
        return self.cursor

    def _seal(self) -> None:
        _seal(self.run, self.buf, self.folder, self.cursor)
        self.mine.append(self.buf)
        self.buf = _Buffer()


def backfill(run: MailboxRun, folder: str, cursor: FolderCursor) -> FolderCursor:
    """List the window oldest first from the watermark; each write carries the watermark it covers."""
    out = _Committer(run, folder, cursor)
    since = cursor.received_watermark or cursor.scan_start
    with out.listing():
        for page in read_ahead(iter_header_pages(run.client, folder, since, run.settings.graph_page_size)):
            messages, participants = _frame(page.messages), _frame(page.participants)
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
        for page in iter_delta_pages(run.client, folder, delta_link=None, since=run.scan_start, page_size=size):
            if page.delta_link is not None:
                cursor = replace(cursor, delta_link=page.delta_link, delta_at=run.now)
    _seal(run, _Buffer(), folder, cursor)  # written after what earlier listings sealed
    return cursor


def delta_round(run: MailboxRun, folder: str, cursor: FolderCursor) -> FolderCursor:
    """One delta round from the committed deltaLink. The new link is written only in the transaction of the
    round's last rows; earlier writes keep the old link, so a crash replays the round (idempotently)."""
    out = _Committer(run, folder, cursor)
    pages = iter_delta_pages(
        run.client, folder, delta_link=cursor.delta_link, since=None, page_size=run.settings.graph_page_size
    )
    with out.listing():
        for page in read_ahead(pages):
            messages, participants = _frame(page.messages), _frame(page.participants)
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
    with tenant.open_store(write=False) as con:
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
        try:
            for i, folder in enumerate(MAIL_FOLDERS):  # each folder gets its share of the time left: none starves
                client.stop_paging_after((deadline - time.monotonic()) / (len(MAIL_FOLDERS) - i))
                sync_folder(run, folder, cursors.get(folder))
        except Exception:
            _keep_finished_listings(run)
            raise
        _write_sealed(run, ready_only=False)
    return run.counts
