"""The late-match backfill's state (table `late_match`, migration 3): which CRM addresses and account domains a
refresh added are still to be searched for, per mailbox folder, and where each search stands.

A row is one term (a normalised address or an account's registrable domain) in one folder of one mailbox, over
`[window_start, window_end)` (end NULL: open). Status: `pending` (to search), `in_progress` (its search was cut off
after `seen` results: the rows it matched are stored, the search runs again from the start — Graph's `$skiptoken`
links are not kept, like nextLinks), `done`, or `capped` (a one-day window still hit Graph's 1,000-result cap: what
the search returned was imported, the rest of that day may be missing). `solo`: its last search with other terms hit
the cap, so it is searched alone. Terms are CRM data (already in the snapshot); no mail content is ever kept here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import polars as pl

from o365sync.store.partitions import each_bucket, in_user_bucket
from o365sync.store.transactions import transaction

PENDING, IN_PROGRESS, DONE, CAPPED = "pending", "in_progress", "done", "capped"
OPEN = (PENDING, IN_PROGRESS)


@dataclass(frozen=True)
class LateMatchWork:
    """One row of `late_match` that is still open."""

    folder: str
    term: str
    kind: str  # "address" | "domain"
    window_start: datetime
    window_end: datetime | None
    status: str
    solo: bool
    seen: int


def queue_late_matches(
    con: duckdb.DuckDBPyConnection, tenant_id: str, terms: Iterable[tuple[str, str]], now: datetime
) -> int:
    """Record (kind, term) pairs for the late-match backfill, in the tenant file: call inside the transaction that
    writes the CRM change; after it commits, `fan_out_late_matches` queues them for each mailbox folder. Returns
    the terms recorded."""
    frame = pl.DataFrame(
        [{"kind": kind, "term": term} for kind, term in sorted(set(terms))],
        schema={"kind": pl.String, "term": pl.String},
    )
    if frame.is_empty():
        return 0
    con.register("lm_terms", frame)
    try:
        con.execute("INSERT INTO late_match_terms SELECT ?, kind, term, ? FROM lm_terms", [tenant_id, now])
    finally:
        con.unregister("lm_terms")
    return frame.height


def late_match_terms_recorded(con: duckdb.DuckDBPyConnection, tenant_id: str) -> bool:
    """Whether terms wait for `fan_out_late_matches` (a refresh died before queueing them everywhere)."""
    return bool(con.execute("SELECT 1 FROM late_match_terms WHERE tenant_id = ? LIMIT 1", [tenant_id]).fetchall())


def fan_out_late_matches(con: duckdb.DuckDBPyConnection, tenant_id: str) -> int:
    """Queue every recorded term for every mailbox folder that has imported something (its backfill is done or
    under way, so mail it already listed was matched without the term), over that folder's scan window; one
    transaction per bucket (users' rows live in buckets, the terms in the tenant file), then the terms are
    forgotten. A term already open for a folder, or already queued from the same record, is not queued twice, so
    a fan-out that died midway is finished by the next one (the refresh's, or the late-match run's). Not inside a
    transaction. Returns rows queued."""
    recorded = con.execute("SELECT max(queued_at) FROM late_match_terms WHERE tenant_id = ?", [tenant_id]).fetchall()[
        0
    ][0]
    if recorded is None:
        return 0
    queued = 0
    for _bucket in each_bucket(con):
        with transaction(con):
            queued += int(
                con.execute(
                    "INSERT INTO late_match (tenant_id, user_oid, folder, term, kind, window_start, window_end, "
                    "status, queued_at, updated_at) SELECT c.tenant_id, c.user_oid, c.folder, t.term, t.kind, "
                    "c.scan_start, NULL, ?, t.queued_at, t.queued_at FROM mail_cursor c JOIN late_match_terms t "
                    "ON t.tenant_id = c.tenant_id WHERE c.tenant_id = ? AND t.queued_at <= ? AND "
                    "(coalesce(c.backfill_done, false) OR c.received_watermark IS NOT NULL) AND NOT EXISTS ("
                    " SELECT 1 FROM late_match l WHERE l.tenant_id = c.tenant_id AND l.user_oid = c.user_oid AND"
                    " l.folder = c.folder AND l.term = t.term AND"
                    " (l.status IN ('pending', 'in_progress') OR l.queued_at = t.queued_at))",
                    [PENDING, tenant_id, recorded],
                ).fetchall()[0][0]
            )
    with transaction(con):
        con.execute("DELETE FROM late_match_terms WHERE tenant_id = ? AND queued_at <= ?", [tenant_id, recorded])
    return queued


@in_user_bucket
def read_late_match_work(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str) -> list[LateMatchWork]:
    """The open rows of one mailbox: searches cut off first, then in queue order."""
    rows = con.execute(
        "SELECT folder, term, kind, window_start, window_end, status, solo, seen FROM late_match "
        "WHERE tenant_id = ? AND user_oid = ? AND status IN ('pending', 'in_progress') "
        "ORDER BY status = 'in_progress' DESC, queued_at, folder, window_start, term",
        [tenant_id, user_oid],
    ).fetchall()
    return [LateMatchWork(*r) for r in rows]


def late_match_users(con: duckdb.DuckDBPyConnection, tenant_id: str) -> list[str]:
    """The mailboxes with open late-match work."""
    rows = con.execute(
        "SELECT DISTINCT user_oid FROM late_match WHERE tenant_id = ? AND status IN ('pending', 'in_progress') "
        "ORDER BY 1",
        [tenant_id],
    ).fetchall()
    return [r[0] for r in rows]


def _key(work: LateMatchWork) -> list:
    return [work.folder, work.term, work.window_start]


_WHERE = (
    "tenant_id = ? AND user_oid = ? AND folder = ? AND term = ? AND window_start = ? "
    "AND status IN ('pending', 'in_progress')"
)


@in_user_bucket
def mark_late_match(
    con: duckdb.DuckDBPyConnection,
    tenant_id: str,
    user_oid: str,
    works: Iterable[LateMatchWork],
    status: str,
    seen: int = 0,
    imported: int = 0,
    solo: bool | None = None,
) -> None:
    """Set the status (and `seen`, `solo`) of open rows; `imported` is added to the first row's count (one count
    per search, not per term). Runs inside the caller's transaction."""
    now = datetime.now(UTC)
    for i, work in enumerate(works):
        con.execute(
            f"UPDATE late_match SET status = ?, seen = ?, imported = imported + ?, solo = coalesce(?, solo), "
            f"updated_at = ? WHERE {_WHERE}",
            [status, seen, imported if i == 0 else 0, solo, now, tenant_id, user_oid, *_key(work)],
        )


@in_user_bucket
def split_late_match(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, work: LateMatchWork, at: datetime
) -> None:
    """Replace an open row by two pending halves, `[start, at)` and `[at, end)`, both searched alone."""
    now = datetime.now(UTC)
    con.execute(f"DELETE FROM late_match WHERE {_WHERE}", [tenant_id, user_oid, *_key(work)])
    for start, end in ((work.window_start, at), (at, work.window_end)):
        con.execute(
            "INSERT INTO late_match (tenant_id, user_oid, folder, term, kind, window_start, window_end, status, solo, "
            "queued_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, true, ?, ?)",
            [tenant_id, user_oid, work.folder, work.term, work.kind, start, end, PENDING, now, now],
        )


def late_match_summary(con: duckdb.DuckDBPyConnection, tenant_id: str) -> dict[str, int]:
    """Counts for status and artifacts: distinct terms done / open / capped (over every mailbox) and the messages
    the backfill imported."""
    row = con.execute(
        "SELECT count(DISTINCT term) FILTER (WHERE status = 'done'), count(DISTINCT term) FILTER (WHERE status IN "
        "('pending', 'in_progress')), count(DISTINCT term) FILTER (WHERE status = 'capped'), "
        "coalesce(sum(imported), 0) FROM late_match WHERE tenant_id = ?",
        [tenant_id],
    ).fetchall()[0]
    return {"terms_done": row[0], "terms_open": row[1], "terms_capped": row[2], "imported": int(row[3])}


def late_match_status(con: duckdb.DuckDBPyConnection, tenant_id: str) -> dict[str, int] | None:
    """`late_match_summary` plus the mailboxes with open work, for `o365sync status` (counts only, never a term).
    None when nothing was ever queued, or when the store predates migration 3 (read-only opens do not migrate)."""
    has_table = con.execute(
        "SELECT count(*) FROM (SELECT table_name AS name FROM duckdb_tables() UNION ALL "
        "SELECT view_name FROM duckdb_views()) WHERE name = 'late_match'"
    ).fetchall()[0][0]
    if not has_table:
        return None
    summary = late_match_summary(con, tenant_id)
    if not (summary["terms_done"] or summary["terms_open"] or summary["terms_capped"]):
        return None
    return {**summary, "mailboxes_open": len(late_match_users(con, tenant_id))}
