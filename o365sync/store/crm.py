"""The tenant's CRM snapshot (people, accounts, opportunities), its refresh state and the drop guard."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import duckdb
import polars as pl

from o365sync.store.transactions import transaction

CRM_TABLES = {  # table: (CrmChanges key, columns)
    "crm_people": ("people", "crm_id, kind, email, account_id, name"),
    "crm_accounts": ("accounts", "crm_id, name, domain"),
    "crm_opportunities": ("opportunities", "crm_id, account_id, name, is_closed, created_at"),
}


def _write_crm(
    con: duckdb.DuckDBPyConnection,
    frames: dict[str, pl.DataFrame],
    changed_ids: dict[str, set[str]] | None,
    crm_kind: str,
    watermark: datetime | None,
    scan_start: Callable[[datetime | None], datetime],
    also: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> dict[str, Any]:
    """One transaction: full replace (`changed_ids` None) or replace the rows of the changed ids, then a meta row
    with the counts and `scan_start(oldest open opportunity)` of the result, then `also(con)` (e.g. queueing the
    late-match backfill of what the refresh added). Re-applying the same changes is harmless (an overlap window
    re-reads records); a crash leaves the previous snapshot. A written refresh ends any refused one and uses up a
    confirmation (`crm_drop_guard`)."""
    with transaction(con):
        con.execute("DELETE FROM crm_drop_guard")
        for table, (key, columns) in CRM_TABLES.items():
            con.register("s_rows", frames[key])
            if changed_ids is None:
                con.execute(f"DELETE FROM {table}")
            else:
                con.register("s_ids", pl.DataFrame({"crm_id": sorted(changed_ids[key])}, schema={"crm_id": pl.String}))
                con.execute(f"DELETE FROM {table} WHERE crm_id IN (SELECT crm_id FROM s_ids)")
                con.unregister("s_ids")
            con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM s_rows")
            con.unregister("s_rows")
        people, accounts, opps, oldest_open = con.execute(
            "SELECT (SELECT count(DISTINCT crm_id) FROM crm_people), (SELECT count(DISTINCT crm_id) FROM crm_accounts),"
            " (SELECT count(*) FROM crm_opportunities WHERE NOT is_closed),"
            " (SELECT min(created_at) FROM crm_opportunities WHERE NOT is_closed)"
        ).fetchall()[0]
        start = scan_start(oldest_open)
        mode = "full" if changed_ids is None else "incremental"
        con.execute(
            "INSERT INTO crm_snapshot_meta (taken_at, crm_kind, people, accounts, opportunities, scan_start, "
            "mode, watermark) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [datetime.now(UTC), crm_kind, people, accounts, opps, start, mode, watermark],
        )
        if also is not None:
            also(con)
    return {"people": people, "accounts": accounts, "open_opportunities": opps, "scan_start": start, "mode": mode}


def replace_crm_snapshot(
    con: duckdb.DuckDBPyConnection,
    people: pl.DataFrame,
    accounts: pl.DataFrame,
    opportunities: pl.DataFrame,
    crm_kind: str,
    scan_start: datetime | Callable,
    watermark: datetime | None = None,
    also: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> dict[str, Any]:
    """Store a full snapshot in place of the previous one (this is also how hard deletes are reconciled).
    `scan_start`: a fixed date, or `f(oldest open opportunity's created date)`."""
    start_fn = scan_start if callable(scan_start) else (lambda _oldest: scan_start)
    return _write_crm(
        con,
        {"people": people, "accounts": accounts, "opportunities": opportunities},
        None,
        crm_kind,
        watermark,
        start_fn,
        also,
    )


def apply_crm_changes(
    con: duckdb.DuckDBPyConnection,
    frames: dict[str, pl.DataFrame],
    changed_ids: dict[str, set[str]],
    crm_kind: str,
    scan_start: Callable[[datetime | None], datetime],
    watermark: datetime | None,
    also: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> dict[str, Any]:
    """Upsert an incremental refresh; the scan start is recomputed on the result. The stored watermark never
    moves back (a refresh that saw no change keeps the previous one)."""
    previous = crm_state_summary(con)["watermark"]
    mark = max((w for w in (watermark, previous) if w is not None), default=None)
    return _write_crm(con, frames, changed_ids, crm_kind, mark, scan_start, also)


GUARDED_CRM_TABLES = {"people": "crm_people", "accounts": "crm_accounts"}


def crm_removals(
    con: duckdb.DuckDBPyConnection, frames: dict[str, pl.DataFrame], changed_ids: dict[str, set[str]] | None
) -> dict[str, tuple[int, int]]:
    """What writing this refresh would do to people and accounts: {key: (records it removes, records stored)}. A
    full refresh (`changed_ids` None) removes every stored record it does not list; an incremental one the changed
    records it has no rows for."""
    removals = {}
    for key, table in GUARDED_CRM_TABLES.items():
        listed = frames[key].select("crm_id")
        if changed_ids is None:
            con.register("s_ids", listed)
            join = "ANTI JOIN"
        else:
            gone = changed_ids[key] - set(listed["crm_id"].to_list())
            con.register("s_ids", pl.DataFrame({"crm_id": sorted(gone)}, schema={"crm_id": pl.String}))
            join = "SEMI JOIN"
        removed, before = con.execute(
            f"SELECT (SELECT count(*) FROM (SELECT DISTINCT crm_id FROM {table}) t {join} s_ids USING (crm_id)), "
            f"(SELECT count(DISTINCT crm_id) FROM {table})"
        ).fetchall()[0]
        con.unregister("s_ids")
        removals[key] = (removed, before)
    return removals


def read_crm_drop_guard(con: duckdb.DuckDBPyConnection) -> dict | None:
    """The refused refresh waiting for `o365sync crm confirm-drop` (confirmed_at set once confirmed), or None."""
    cur = con.execute(
        "SELECT refused_at, people_removed, people_before, accounts_removed, accounts_before, "
        "confirmed_at FROM crm_drop_guard"
    )
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None


def record_crm_drop_refusal(con: duckdb.DuckDBPyConnection, removals: dict[str, tuple[int, int]]) -> None:
    """Remember a refused refresh's counts (ids never); a confirmation given for an earlier one is used up."""
    (people, people_before), (accounts, accounts_before) = removals["people"], removals["accounts"]
    con.execute(
        "INSERT OR REPLACE INTO crm_drop_guard VALUES (TRUE, ?, ?, ?, ?, ?, NULL)",
        [datetime.now(UTC), people, people_before, accounts, accounts_before],
    )


def confirm_crm_drop(con: duckdb.DuckDBPyConnection) -> dict | None:
    """Let the next refresh remove as many records as the refused one would have; None when nothing was refused."""
    con.execute("UPDATE crm_drop_guard SET confirmed_at = ? WHERE confirmed_at IS NULL", [datetime.now(UTC)])
    return read_crm_drop_guard(con)


def crm_state_summary(con: duckdb.DuckDBPyConnection) -> dict:
    """The stored CRM snapshot's kind, last refresh, last full refresh (reconciliation) and watermark."""
    row = con.execute(
        "SELECT crm_kind, taken_at, watermark, mode FROM crm_snapshot_meta ORDER BY taken_at DESC LIMIT 1"
    ).fetchone()
    last_full = con.execute(
        "SELECT max(taken_at) FROM crm_snapshot_meta WHERE coalesce(mode, 'full') = 'full'"
    ).fetchall()[0][0]
    if row is None:
        return {"crm_kind": None, "taken_at": None, "watermark": None, "mode": None, "last_full_at": None}
    return {
        "crm_kind": row[0],
        "taken_at": row[1],
        "watermark": row[2],
        "mode": row[3] or "full",
        "last_full_at": last_full,
    }


def record_crm_state(con: duckdb.DuckDBPyConnection, status: str, error: str | None = None) -> None:
    """The tenant's CRM connection state for ops: ok | reconnect_needed | quota_exhausted | invalid_file | refused |
    failed; `error` is what went wrong (or, with ok, what was adjusted)."""
    now = datetime.now(UTC)
    con.execute(
        "INSERT INTO crm_state VALUES (TRUE, ?, ?, ?, ?) ON CONFLICT (singleton) DO UPDATE SET "
        "status = excluded.status, last_attempt_at = excluded.last_attempt_at, "
        "last_success_at = coalesce(excluded.last_success_at, crm_state.last_success_at), "
        "last_error = excluded.last_error",
        [status, now, now if status == "ok" else None, error],
    )


def read_crm_state(con: duckdb.DuckDBPyConnection) -> dict | None:
    cur = con.execute("SELECT status, last_attempt_at, last_success_at, last_error FROM crm_state")
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None


def load_crm_frames(con: duckdb.DuckDBPyConnection) -> tuple[pl.DataFrame, pl.DataFrame, datetime | None]:
    """(people, accounts, scan_start of the latest snapshot)."""
    people = con.sql("SELECT crm_id, kind, email, account_id FROM crm_people").pl()
    accounts = con.sql("SELECT crm_id, domain FROM crm_accounts WHERE domain IS NOT NULL").pl()
    row = con.execute("SELECT scan_start FROM crm_snapshot_meta ORDER BY taken_at DESC LIMIT 1").fetchall()
    return people, accounts, (row[0][0] if row else None)


def load_crm_names(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(name, email) of every CRM person with both (for participants known only by name, o365sync/participants.py)."""
    return con.execute(
        "SELECT name, email FROM crm_people WHERE name IS NOT NULL AND email IS NOT NULL ORDER BY ALL"
    ).fetchall()


def latest_crm_snapshot_at(con: duckdb.DuckDBPyConnection) -> datetime | None:
    return con.execute("SELECT max(taken_at) FROM crm_snapshot_meta").fetchall()[0][0]
