"""Run one mailbox's late-match backfill (see o365sync/backfill.py): search its folders for the CRM addresses and
domains a refresh added, and import what matches with the normal pipeline.

Each search (`$search="(participants:a OR participants:b …) AND received>=day"` on one folder) streams its pages
through the mail sync's own page handling — exclusions, CRM matching against the current snapshot, bodies only for
matched messages, unmatched and excluded messages only counted — after dropping what lies outside the scan window.
Matched rows are written page by page with the search's state (`late_match`) in the same transaction; a stored
message is not doubled (rows are keyed on the immutable id and the internetMessageId) and an erased one never comes
back (the store's tombstones). A search that returned 1,000 results (Graph's cap) is narrowed and run again: its
terms alone, then its window in halves.

Bounded per run: at most `max_searches` searches per mailbox, the settings' page and time limits of a mail sync.
A search cut off (limit, crash) stays `in_progress` and runs again from its start next time (the writes are
idempotent); finished searches are never repeated. Nothing here imports Prefect (tasks/late_match_task.py does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from urllib.parse import quote

import duckdb
import polars as pl

from o365sync.auth import scopes_for
from o365sync.backfill import SEARCH_RESULT_CAP, batch_terms, search_query, split_point
from o365sync.crm_index import crm_index_for
from o365sync.graph import SENSITIVITY_EXPAND, RunLimitReached
from o365sync.mail import HEADER_FIELDS, parse_page
from o365sync.participants import name_index_for
from o365sync.store import (
    CAPPED,
    DONE,
    IN_PROGRESS,
    PENDING,
    BatchResult,
    LateMatchWork,
    RunCounts,
    mark_late_match,
    read_late_match_work,
    split_late_match,
    write_mail_batch,
)
from o365sync.sync.bodies import BodyFetcher
from o365sync.sync.mailbox import MailboxRun, _Buffer, _frame, _process_page
from o365sync.tenant_context import Tenant
from o365sync.user_graph import user_graph_client

MAX_SEARCHES_PER_RUN = 30  # per mailbox and run; each search reads at most 1,000 results


@dataclass(frozen=True)
class Search:
    """One `$search` request (and its pages) covering `works` (same folder and window)."""

    folder: str
    works: tuple[LateMatchWork, ...]
    start: datetime
    end: datetime | None


@dataclass
class LateMatchOutcome:
    """Counts of one mailbox's run: searches made, terms finished, still open or capped, and the mail pipeline's
    counts (scanned, matched, imported, discarded, by reason)."""

    searches: int = 0
    terms_done: int = 0  # addresses/domains whose search of this mailbox (every folder) finished in this run
    terms_open: int = 0
    terms_capped: int = 0
    counts: RunCounts = RunCounts()
    stopped: str | None = None  # "PageCap" | "TimeCap" | "SearchCap" when the run ended before its work did
    finished: set[str] = field(default_factory=set)  # terms whose searches finished in this run (some folder)


def plan_searches(works: list[LateMatchWork]) -> Iterator[Search]:
    """Searches covering `works`: interrupted ones first (their order), solo terms alone, the others batched per
    folder and window."""
    groups: dict[tuple, list[LateMatchWork]] = {}
    for w in works:
        key = (w.status != IN_PROGRESS, w.folder, w.window_start, w.window_end, w.solo and w.term)
        groups.setdefault(key, []).append(w)
    for (_, folder, start, end, _solo), group in groups.items():
        by_term = {w.term: w for w in group}
        for terms in batch_terms(list(by_term), start, end):
            yield Search(folder, tuple(by_term[t] for t in terms), start, end)


def late_match_mailbox(
    tenant: Tenant, user_oid: str, max_searches: int = MAX_SEARCHES_PER_RUN, now: datetime | None = None
) -> LateMatchOutcome:
    """Run the mailbox's open late-match searches (at most `max_searches`), planning again after each one (a search
    that hit the result cap leaves narrower ones behind)."""
    settings, config = tenant.settings, tenant.config
    outcome = LateMatchOutcome()
    index, scan_start = crm_index_for(settings, config)
    next_search = _next_search(tenant, user_oid)
    if next_search is None or scan_start is None:
        outcome.terms_open = len(_open_terms(tenant, user_oid))
        return outcome
    now = now or datetime.now(UTC)
    scopes = scopes_for(["email"])
    with (
        user_graph_client(settings, tenant.id, user_oid, scopes, max_pages=settings.sync_max_pages) as client,
        BodyFetcher(client) as bodies,
    ):
        client.stop_paging_after(settings.sync_max_seconds)
        deadline = time.monotonic() + settings.sync_max_seconds
        blocklist = config.blocklist_for(user_oid)
        run = MailboxRun(settings, config, user_oid, client, index, blocklist, scan_start, now, bodies)
        run.names = name_index_for(settings, config)
        while next_search is not None:
            if outcome.searches >= max_searches or time.monotonic() >= deadline:
                outcome.stopped = "SearchCap" if outcome.searches >= max_searches else "TimeCap"
                break
            outcome.searches += 1
            try:
                _run_search(tenant, run, next_search, outcome)
            except RunLimitReached as limit:
                outcome.stopped = limit.code or "PageCap"
                break
            finally:
                outcome.counts = run.counts
            next_search = _next_search(tenant, user_oid)
    open_terms = _open_terms(tenant, user_oid)
    outcome.terms_open, outcome.terms_done = len(open_terms), len(outcome.finished - open_terms)
    return outcome


def _next_search(tenant: Tenant, user_oid: str) -> Search | None:
    with tenant.open_store(write=False, user_oid=user_oid) as con:
        return next(plan_searches(read_late_match_work(con, tenant.id, user_oid)), None)


def _open_terms(tenant: Tenant, user_oid: str) -> set[str]:
    with tenant.open_store(write=False, user_oid=user_oid) as con:
        return {w.term for w in read_late_match_work(con, tenant.id, user_oid)}


def _run_search(tenant: Tenant, run: MailboxRun, search: Search, outcome: LateMatchOutcome) -> None:
    """One search, page by page; the state of its terms is written with each page's rows."""
    start = max(search.start, run.scan_start).astimezone(UTC)
    terms = [w.term for w in search.works]
    params = {
        "$search": search_query(terms, start, search.end.astimezone(UTC) if search.end else None),
        "$select": ",".join(HEADER_FIELDS),
        "$expand": SENSITIVITY_EXPAND,
        "$top": str(run.settings.graph_page_size),
    }
    path = f"me/mailFolders/{quote(search.folder, safe='')}/messages"
    seen = 0
    for raw in run.client.iter_pages(path, params):
        page = parse_page(raw, search.folder)
        del raw
        messages, participants = _frame(page.messages), _frame(page.participants)
        seen += messages.height
        messages = messages.filter(pl.col("received_at") >= start)  # KQL dates are whole days
        participants = participants.filter(pl.col("graph_id").is_in(messages["graph_id"].implode()))
        buf = _Buffer()
        _process_page(run, buf, messages, participants, odd=page.odd)
        del page, messages, participants  # unmatched content dies here
        _write(tenant, run, buf, search, IN_PROGRESS, seen)
    if seen < SEARCH_RESULT_CAP:
        _write(tenant, run, _Buffer(), search, DONE, seen)
        outcome.finished.update(w.term for w in search.works)
    elif len(search.works) > 1:  # narrow: each term alone
        _write(tenant, run, _Buffer(), search, PENDING, 0, solo=True)
    else:
        at = split_point(start, (search.end or run.now).astimezone(UTC))
        _write(tenant, run, _Buffer(), search, PENDING if at else CAPPED, seen, split_at=at)
        if at is None:
            outcome.terms_capped += 1
            outcome.finished.add(search.works[0].term)


def _write(
    tenant: Tenant,
    run: MailboxRun,
    buf: _Buffer,
    search: Search,
    status: str,
    seen: int,
    solo: bool | None = None,
    split_at: datetime | None = None,
) -> None:
    """The buffered rows and the search's state, in one transaction."""

    def state(con: duckdb.DuckDBPyConnection, result: BatchResult) -> None:
        if split_at is not None:
            split_late_match(con, tenant.id, run.user_oid, search.works[0], split_at)
        else:
            mark_late_match(con, tenant.id, run.user_oid, search.works, status, seen, result.imported, solo)

    batch = replace(buf.take({}, run.bodies), also=state)  # no folder cursor moves; waits for the page's bodies
    with tenant.open_store(write=True, user_oid=run.user_oid) as con:
        result = write_mail_batch(con, tenant.id, run.user_oid, batch)
    duplicates = (("duplicate", result.duplicates),) if result.duplicates else ()
    run.counts += RunCounts(imported=result.imported, excluded=duplicates)
