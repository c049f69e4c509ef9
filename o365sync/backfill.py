"""Late matches: mail that matches the CRM only since a refresh added a person's address or an account's domain
(or changed an address). We never keep unmatched mail (unlike products that stage it for 30 days), so such mail is
found again in Graph: the refresh queues what it added (`queue_added_terms`, in the snapshot's own transaction),
and `o365sync/sync/late_match.py` searches each affected mailbox folder for it with `$search` and imports what
matches through the normal pipeline. This module holds the parts without I/O: the CRM's match keys and the KQL.

Why `$search` (see simulators/graph_search.py for the sources): message `$filter` on recipients is refused
(ErrorInvalidUrlQuery / InefficientFilter, docs/SYNC.md), while KQL `participants:` covers from, to, cc (and bcc,
which the pipeline ignores) by address, and by domain for an account. Its limits shape the queries: no `$filter`
or `$orderby` beside it (the scan window goes into the KQL as `received>=date`, at day granularity, and the exact
window is applied to what comes back), no `$skip` (paging by nextLink), and at most 1,000 results per search (a
search that reaches it is narrowed: fewer terms, then halves of the window).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import duckdb

from o365sync.matching import CrmIndex, build_index
from o365sync.store import load_crm_frames, queue_late_matches

SEARCH_RESULT_CAP = 1000  # Graph: "A $search request returns up to 1,000 results."
MAX_TERMS_PER_SEARCH = 20  # terms OR-ed into one search
MAX_SEARCH_CHARS = 1000  # our own bound on a $search value (Graph documents none per option; see the simulator)

Term = tuple[str, str]  # (kind "address" | "domain", normalised address or registrable domain)


def match_keys(index: CrmIndex) -> set[Term]:
    """Everything a message can match on: people's addresses and accounts' registrable domains (free-mail and own
    domains are already left out of the index)."""
    return {("address", a) for a in index.people["email"].unique().to_list()} | {
        ("domain", d) for d in index.accounts["domain"].unique().to_list()
    }


def stored_match_keys(con: duckdb.DuckDBPyConnection, own_domains: Iterable[str]) -> set[Term]:
    """`match_keys` of the snapshot the connection sees."""
    people, accounts, _ = load_crm_frames(con)
    return match_keys(build_index(people, accounts, own_domains))


def queue_added_terms(
    con: duckdb.DuckDBPyConnection, tenant_id: str, before: set[Term], own_domains: Iterable[str], now: datetime
) -> int:
    """Inside the refresh's transaction: queue the keys the written snapshot has and `before` had not, for every
    mailbox folder already imported; returns the number of added keys."""
    added = stored_match_keys(con, own_domains) - before
    queue_late_matches(con, tenant_id, added, now)
    return len(added)


def kql_date(when: datetime) -> str:
    return when.strftime("%Y-%m-%d")


def search_query(terms: Sequence[str], start: datetime, end: datetime | None) -> str:
    """The `$search` value for `terms` received in [start's day, end's day): double-quoted KQL."""
    anyone = " OR ".join(f"participants:{t}" for t in terms)
    window = f"received>={kql_date(start)}" + (f" AND received<{kql_date(end)}" if end is not None else "")
    return f'"({anyone}) AND {window}"'


def batch_terms(terms: Sequence[str], start: datetime, end: datetime | None) -> list[list[str]]:
    """`terms` cut into searches of at most MAX_TERMS_PER_SEARCH terms and MAX_SEARCH_CHARS characters."""
    batches: list[list[str]] = []
    for term in terms:
        if batches and len(batches[-1]) < MAX_TERMS_PER_SEARCH:
            if len(search_query([*batches[-1], term], start, end)) <= MAX_SEARCH_CHARS:
                batches[-1].append(term)
                continue
        batches.append([term])
    return batches


def split_point(start: datetime, end: datetime) -> datetime | None:
    """Where a window that hit the result cap is halved (a day boundary), or None when it spans one day only."""
    days = (end.date() - start.date()).days
    if days < 2:
        return None
    mid = start.date() + timedelta(days=days // 2)
    return datetime(mid.year, mid.month, mid.day, tzinfo=start.tzinfo)
