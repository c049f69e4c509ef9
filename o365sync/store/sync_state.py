"""Per user and feature: how the last sync run went (stage, counts, totals, failures, next retry). The store
records; `o365sync.sync_policy` decides the failures, last success and next retry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from o365sync.store.partitions import in_user_bucket
from o365sync.store.transactions import transaction
from o365sync.sync_policy import SyncStanding, after_run


@dataclass(frozen=True)
class RunCounts:
    scanned: int = 0
    matched: int = 0
    imported: int = 0
    discarded: int = 0
    excluded: tuple[tuple[str, int], ...] = ()  # (reason, count), reasons sorted

    def __add__(self, other: RunCounts) -> RunCounts:
        reasons = dict(self.excluded)
        for reason, n in other.excluded:
            reasons[reason] = reasons.get(reason, 0) + n
        return RunCounts(
            self.scanned + other.scanned,
            self.matched + other.matched,
            self.imported + other.imported,
            self.discarded + other.discarded,
            tuple(sorted(reasons.items())),
        )


TOTALS = ("scanned", "matched", "imported", "discarded")  # sync_state keeps these per run and summed (total_*)
SYNCING = "syncing"  # the stage of a run under way: its counts are its progress so far


@in_user_bucket
def record_sync_state(
    con: duckdb.DuckDBPyConnection,
    tenant_id: str,
    user_oid: str,
    stage: str,
    counts: RunCounts | None = None,
    error: str | None = None,
    feature: str = "email",
    note: str | None = None,
) -> None:
    """Upsert the user's sync state of `feature` (email, calendar). `error` is a code or exception class name
    (optionally with a fixed explanation), never message content. `note`: what a person should know about a run
    that did not fail (a resync, a run stopped at its limit), shown where errors are. The last success, failure
    count and next retry are what `sync_policy.after_run` decides. The run's counts replace the last run's and add
    to the totals since the first run (a row from before the totals existed starts them at its last run's
    counts). Stage `syncing` starts a run: its counts start at 0 and `add_sync_progress` advances them while it
    runs; `run_started_at` is when the running (or last) run started."""
    now = datetime.now(UTC)
    key = [tenant_id, user_oid, feature]
    totals_so_far = ", ".join(f"coalesce(total_{n}, {n}, 0)" for n in TOTALS)
    prev = con.execute(
        f"SELECT last_success_at, consecutive_failures, run_started_at, {totals_so_far} FROM sync_state "
        "WHERE tenant_id = ? AND user_oid = ? AND feature = ?",
        key,
    ).fetchall()
    previous = SyncStanding(*prev[0][:2]) if prev else SyncStanding()
    totals = prev[0][3:] if prev else (0,) * len(TOTALS)
    run_started_at = now if stage == SYNCING or not prev else prev[0][2]
    standing = after_run(previous, stage, error, now)
    error = error if error is not None else note
    c = counts or RunCounts()
    with transaction(con):
        con.execute("DELETE FROM sync_state WHERE tenant_id = ? AND user_oid = ? AND feature = ?", key)
        con.execute(
            "INSERT INTO sync_state (tenant_id, user_oid, stage, last_run_at, last_success_at, last_error, "
            "consecutive_failures, scanned, matched, imported, discarded, next_retry_at, excluded, feature, "
            "total_scanned, total_matched, total_imported, total_discarded, run_started_at, progress_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                tenant_id,
                user_oid,
                stage,
                now,
                standing.last_success_at,
                error,
                standing.consecutive_failures,
                c.scanned,
                c.matched,
                c.imported,
                c.discarded,
                standing.next_retry_at,
                json.dumps(dict(c.excluded)),
                feature,
                *(t + getattr(c, n) for t, n in zip(totals, TOTALS, strict=True)),
                run_started_at,
                now,
            ],
        )


def read_sync_states(con: duckdb.DuckDBPyConnection, tenant_id: str, feature: str = "email") -> list[dict]:
    """Every column of the feature's sync states, plus `lag`; `total_*` None in a store opened read-only before
    a writer added those columns."""
    cur = con.execute(
        "SELECT *, now() - last_success_at AS lag FROM sync_state WHERE tenant_id = ? AND "
        "feature = ? ORDER BY user_oid",
        [tenant_id, feature],
    )
    columns = [d[0] for d in cur.description]
    return [{**{f"total_{n}": None for n in TOTALS}, **dict(zip(columns, row, strict=True))} for row in cur.fetchall()]


@in_user_bucket
def add_sync_progress(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, feature: str, scanned: int, imported: int
) -> None:
    """Advance the running sync's counts (stage `syncing`; any other row is left alone) by what one write stores.
    Call it inside that write's transaction: the counts then never run ahead of the data (a run that dies loses
    the counts of what it did not commit, with the data)."""
    con.execute(
        "UPDATE sync_state SET scanned = coalesce(scanned, 0) + ?, imported = coalesce(imported, 0) + ?, "
        "progress_at = ? WHERE tenant_id = ? AND user_oid = ? AND feature = ? AND stage = ?",
        [scanned, imported, datetime.now(UTC), tenant_id, user_oid, feature, SYNCING],
    )


NOUNS = {"email": "messages", "calendar": "events"}


@dataclass(frozen=True)
class SyncProgress:
    """Where a user's sync of one feature stands, counts only: the run under way (`running`), or the last one."""

    user_oid: str
    feature: str
    stage: str
    running: bool
    first_import: bool  # no run of this feature has succeeded yet: the initial import
    started_at: datetime | None
    updated_at: datetime | None  # when the counts last advanced
    last_run_at: datetime | None
    scanned: int
    imported: int

    def line(self) -> str:
        """One line for a page or `o365sync status`, e.g. "importing: 12,400 messages scanned, 310 imported"."""
        counts = f"{self.scanned:,} {NOUNS.get(self.feature, 'items')} scanned, {self.imported:,} imported"
        if self.running:
            return f"{'importing' if self.first_import else 'syncing'}: {counts}"
        return f"{'import' if self.first_import else 'last run'} ({self.stage}): {counts}"


def read_sync_progress(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str | None = None
) -> list[SyncProgress]:
    """The progress of every user's (or one user's) syncs, per feature, ordered by user and feature."""
    cur = con.execute(
        "SELECT * FROM sync_state WHERE tenant_id = ? AND (? IS NULL OR user_oid = ?) ORDER BY user_oid, feature",
        [tenant_id, user_oid, user_oid],
    )
    columns = [d[0] for d in cur.description]
    out = []
    for values in cur.fetchall():
        row = dict(zip(columns, values, strict=True))  # a store not yet migrated has no run_started_at/progress_at
        out.append(
            SyncProgress(
                user_oid=row["user_oid"],
                feature=row.get("feature") or "email",
                stage=row["stage"],
                running=row["stage"] == SYNCING,
                first_import=row["last_success_at"] is None,
                started_at=row.get("run_started_at"),
                updated_at=row.get("progress_at"),
                last_run_at=row["last_run_at"],
                scanned=int(row["scanned"] or 0),
                imported=int(row["imported"] or 0),
            )
        )
    return out
