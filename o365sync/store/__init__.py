"""The activity store: one DuckDB file per tenant, opened only through `open_store`.

DuckDB locks a file all-or-nothing across processes and has no lock timeout, so every open takes our own
advisory flock first (shared for readers, exclusive for writers): concurrent flows queue instead of failing.
Writes are idempotent: dedupe the batch, then DELETE + INSERT in one transaction (no PRIMARY KEY — measured
6-36x faster than PK upserts), with the resume cursor written in that same transaction. Analysts read snapshots
published by `publish_snapshot`, never the live file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from o365sync.settings import Settings
from o365sync.tenants import tenant_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS emails (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    folder VARCHAR, internet_message_id VARCHAR, conversation_id VARCHAR, subject VARCHAR, body_text VARCHAR,
    from_name VARCHAR, from_address VARCHAR, received_at TIMESTAMPTZ, sent_at TIMESTAMPTZ,
    has_attachments BOOLEAN, web_link VARCHAR, imported_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS email_participants (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, name VARCHAR, address VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS email_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    crm_id VARCHAR NOT NULL, crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL);
ALTER TABLE email_crm_matches ADD COLUMN IF NOT EXISTS is_primary BOOLEAN;
CREATE TABLE IF NOT EXISTS mail_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, folder VARCHAR NOT NULL,
    scan_start TIMESTAMPTZ NOT NULL, received_watermark TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL);
ALTER TABLE mail_cursor ADD COLUMN IF NOT EXISTS backfill_done BOOLEAN DEFAULT false;
ALTER TABLE mail_cursor ADD COLUMN IF NOT EXISTS delta_link VARCHAR;
ALTER TABLE mail_cursor ADD COLUMN IF NOT EXISTS delta_at TIMESTAMPTZ;
CREATE TABLE IF NOT EXISTS sync_state (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, stage VARCHAR NOT NULL,
    last_run_at TIMESTAMPTZ, last_success_at TIMESTAMPTZ, last_error VARCHAR,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    scanned BIGINT, matched BIGINT, imported BIGINT, discarded BIGINT);
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS next_retry_at TIMESTAMPTZ;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS excluded VARCHAR;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS feature VARCHAR DEFAULT 'email';
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_scanned BIGINT;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_matched BIGINT;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_imported BIGINT;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_discarded BIGINT;
CREATE TABLE IF NOT EXISTS crm_people (crm_id VARCHAR, kind VARCHAR, email VARCHAR, account_id VARCHAR, name VARCHAR);
CREATE TABLE IF NOT EXISTS crm_accounts (crm_id VARCHAR, name VARCHAR, domain VARCHAR);
CREATE TABLE IF NOT EXISTS crm_opportunities (
    crm_id VARCHAR, account_id VARCHAR, name VARCHAR, is_closed BOOLEAN, created_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS crm_snapshot_meta (
    taken_at TIMESTAMPTZ NOT NULL, crm_kind VARCHAR, people BIGINT, accounts BIGINT, opportunities BIGINT,
    scan_start TIMESTAMPTZ NOT NULL);
ALTER TABLE crm_snapshot_meta ADD COLUMN IF NOT EXISTS mode VARCHAR;
ALTER TABLE crm_snapshot_meta ADD COLUMN IF NOT EXISTS watermark TIMESTAMPTZ;
CREATE TABLE IF NOT EXISTS meetings (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, event_type VARCHAR,
    series_master_id VARCHAR, ical_uid VARCHAR, subject VARCHAR, start_at TIMESTAMPTZ, start_tz VARCHAR,
    end_at TIMESTAMPTZ, end_tz VARCHAR, is_all_day BOOLEAN, is_online BOOLEAN, join_url VARCHAR,
    organizer_name VARCHAR, organizer_address VARCHAR, is_internal BOOLEAN, web_link VARCHAR,
    imported_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS meeting_attendees (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, name VARCHAR, address VARCHAR NOT NULL, response VARCHAR);
CREATE TABLE IF NOT EXISTS meeting_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL,
    crm_id VARCHAR NOT NULL, crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL, is_primary BOOLEAN);
CREATE TABLE IF NOT EXISTS calendar_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, window_start TIMESTAMPTZ NOT NULL,
    window_end TIMESTAMPTZ NOT NULL, delta_link VARCHAR, delta_at TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS notetaker_queue (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, status VARCHAR NOT NULL,
    join_url VARCHAR, link_created BOOLEAN DEFAULT false, consent_noted_at TIMESTAMPTZ, updated_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS teams_channels (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, team_id VARCHAR NOT NULL, team_name VARCHAR,
    channel_id VARCHAR NOT NULL, channel_name VARCHAR, membership_type VARCHAR, refreshed_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS shares (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, share_id VARCHAR NOT NULL, target_kind VARCHAR NOT NULL,
    target_id VARCHAR NOT NULL, activity_kind VARCHAR NOT NULL, activity_id VARCHAR NOT NULL, message_id VARCHAR,
    posted_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS erased (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR, kind VARCHAR NOT NULL, key VARCHAR NOT NULL,
    erased_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS crm_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE, status VARCHAR NOT NULL, last_attempt_at TIMESTAMPTZ,
    last_success_at TIMESTAMPTZ, last_error VARCHAR);
CREATE TABLE IF NOT EXISTS crm_drop_guard (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE, refused_at TIMESTAMPTZ NOT NULL, people_removed BIGINT NOT NULL,
    people_before BIGINT NOT NULL, accounts_removed BIGINT NOT NULL, accounts_before BIGINT NOT NULL,
    confirmed_at TIMESTAMPTZ);
"""

EMAIL_COLUMNS = (
    "tenant_id",
    "user_oid",
    "graph_id",
    "folder",
    "internet_message_id",
    "conversation_id",
    "subject",
    "body_text",
    "from_name",
    "from_address",
    "received_at",
    "sent_at",
    "has_attachments",
    "web_link",
    "imported_at",
)


def store_path(settings: Settings, tenant_id: str) -> Path:
    return tenant_dir(settings, tenant_id) / "store.duckdb"


def snapshot_path(settings: Settings, tenant_id: str) -> Path:
    """The analysts' read-only copy, in `<region root>/analytics/` (all of a tenant's files stay in its region)."""
    folder = tenant_dir(settings, tenant_id)
    return folder.parent.parent / "analytics" / f"{folder.name}.duckdb"


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection, frames: dict[str, Any] | None = None) -> Iterator[None]:
    """One DuckDB transaction: `frames` (name -> Polars/Arrow frame) registered for the SQL inside, committed when
    the block ends, rolled back if it raises; the frames are unregistered either way."""
    for name, frame in (frames or {}).items():
        con.register(name, frame)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        for name in frames or {}:
            con.unregister(name)


@contextlib.contextmanager
def open_store(settings: Settings, tenant_id: str, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """The one way to open a tenant's live store. Blocks (no polling) until the flock is granted; if the tenant's
    files moved to another region meanwhile (`o365sync tenant move` holds the lock while it moves them), it
    follows them. Only writers create the file: a reader of a tenant without a store gets the schema's empty
    tables in memory and writes nothing anywhere."""
    if not write and not store_path(settings, tenant_id).exists():
        with _connect(":memory:", write=True) as con:
            yield con
        return
    with store_lock(settings, tenant_id, write) as path, _connect(str(path), write) as con:
        yield con


@contextlib.contextmanager
def _connect(database: str, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(database, read_only=not write, config={"memory_limit": "1GB", "threads": 2})
    try:
        con.execute("SET TimeZone='UTC'")
        if write:
            con.execute(SCHEMA)
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def store_lock(settings: Settings, tenant_id: str, write: bool) -> Iterator[Path]:
    """The store's flock (shared for readers, exclusive for writers), on the tenant's current store path."""
    while True:
        path = store_path(settings, tenant_id)
        with flock_file(Path(f"{path}.lock"), exclusive=write):
            if store_path(settings, tenant_id) != path:
                continue  # moved while we waited: lock the new location
            yield path
            return


@contextlib.contextmanager
def flock_file(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold a blocking flock on `path` (created with its folder if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


FEATURE_LOCKS = ("calendar", "email")


@contextlib.contextmanager
def tenant_sync_locks(folder: Path, features: Iterable[str]) -> Iterator[None]:
    """Exclusive, blocking: one lock file per feature, taken in a fixed order (no deadlock between flows). Runs of
    the same tenant and feature queue behind each other; moving or erasing a tenant takes them all."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for feature in sorted(features):
            f = stack.enter_context(open(folder / f"sync-{feature}.lock", "a+"))
            fcntl.flock(f, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
        yield


@dataclass(frozen=True)
class FolderCursor:
    """Where a folder's sync stands. The list backfill (oldest first) advances `received_watermark` until
    `backfill_done`; `delta_link` is the committed Graph deltaLink for changes after `delta_at`."""

    scan_start: datetime
    received_watermark: datetime | None = None
    backfill_done: bool = False
    delta_link: str | None = None
    delta_at: datetime | None = None

    def resynced(self, now: datetime, scan_start: datetime | None = None) -> FolderCursor:
        """The cursor of a bounded resync (dead or unusable deltaLink, or an operator's `tenant resync`): no link,
        so a new baseline is taken, and the backfill re-lists from `RESYNC_OVERLAP` before the last committed
        delta round (a backfill still under way keeps its watermark)."""
        start = max(scan_start or self.scan_start, (self.delta_at or now) - RESYNC_OVERLAP)
        return replace(
            self,
            delta_link=None,
            delta_at=None,
            backfill_done=False,
            received_watermark=start if self.backfill_done else self.received_watermark,
        )


RESYNC_OVERLAP = timedelta(days=1)  # a resync re-lists from this long before the last committed delta round


@dataclass(frozen=True)
class MailBatch:
    """Matched mail ready to persist (Polars frames), with the folder cursors it advances."""

    emails: pl.DataFrame  # EMAIL_COLUMNS minus tenant_id, user_oid, imported_at (body_text may be null: keep old)
    participants: pl.DataFrame  # graph_id, role, name, address
    matches: pl.DataFrame  # graph_id, crm_id, crm_kind, matched_address
    cursors: dict[str, FolderCursor]  # folder -> cursor covered by this batch
    partials: pl.DataFrame | None = None  # partial delta updates: graph_id + header columns, null = unchanged


@dataclass(frozen=True)
class BatchResult:
    imported: int  # emails not stored before
    duplicates: int  # same internetMessageId already stored under another id (e.g. the copy in another folder)


_MERGE_COLUMNS = ("subject", "from_name", "from_address", "received_at", "sent_at", "has_attachments", "web_link")


def write_mail_batch(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, batch: MailBatch) -> BatchResult:
    """Idempotently persist one batch and its cursors in one transaction.

    Rows are keyed on (tenant, user, immutable Graph id): dedupe, DELETE, INSERT. A message whose
    internetMessageId is already stored under another id is the same mail seen in another folder: skipped.
    A null body keeps the stored one; partial updates only overwrite the fields they carry."""
    now = datetime.now(UTC)
    emails = batch.emails.unique("graph_id", keep="last", maintain_order=True)
    key = [tenant_id, user_oid]
    frames = {
        "b_emails": emails,
        "b_participants": batch.participants.unique(maintain_order=True),
        "b_matches": batch.matches.unique(["graph_id", "crm_id", "crm_kind"], maintain_order=True),
    }
    if batch.partials is not None and batch.partials.height:
        frames["b_partials"] = batch.partials.unique("graph_id", keep="last", maintain_order=True)
    with transaction(con, frames):
        # Keep one row per internetMessageId: drop batch rows whose message is stored under another id,
        # and within the batch keep the first id of each internetMessageId.
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _kept AS SELECT * FROM b_emails b WHERE NOT EXISTS ("
            " SELECT 1 FROM emails e WHERE e.tenant_id = ? AND e.user_oid = ? AND"
            " e.internet_message_id = b.internet_message_id AND e.graph_id <> b.graph_id)"
            " AND NOT EXISTS (SELECT 1 FROM erased x WHERE x.tenant_id = ? AND coalesce(x.user_oid, ?) = ? AND"
            " ((x.kind = 'conversation' AND x.key = b.conversation_id) OR"
            " (x.kind = 'message' AND x.key = b.internet_message_id)))"
            " QUALIFY b.internet_message_id IS NULL OR"
            " row_number() OVER (PARTITION BY b.internet_message_id ORDER BY b.graph_id) = 1",
            [*key, *key, user_oid],
        )
        duplicates = emails.height - con.execute("SELECT count(*) FROM _kept").fetchall()[0][0]
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _old AS SELECT graph_id, body_text FROM emails "
            "WHERE tenant_id = ? AND user_oid = ? AND graph_id IN (SELECT graph_id FROM _kept)",
            key,
        )
        new = con.execute("SELECT count(*) FROM _kept WHERE graph_id NOT IN (SELECT graph_id FROM _old)").fetchall()
        for table in ("emails", "email_participants", "email_crm_matches"):
            con.execute(
                f"DELETE FROM {table} WHERE tenant_id = ? AND user_oid = ? "
                "AND graph_id IN (SELECT graph_id FROM _kept)",
                key,
            )
        con.execute(
            "INSERT INTO emails SELECT ?, ?, k.graph_id, folder, internet_message_id, conversation_id, subject, "
            "coalesce(k.body_text, o.body_text), from_name, from_address, received_at, sent_at, has_attachments, "
            "web_link, ? FROM _kept k LEFT JOIN _old o ON o.graph_id = k.graph_id",
            [*key, now],
        )
        con.execute(
            "INSERT INTO email_participants SELECT ?, ?, graph_id, role, name, address "
            "FROM b_participants WHERE graph_id IN (SELECT graph_id FROM _kept)",
            key,
        )
        con.execute(
            "INSERT INTO email_crm_matches (tenant_id, user_oid, graph_id, crm_id, crm_kind, matched_address, "
            "is_primary) SELECT ?, ?, graph_id, crm_id, crm_kind, matched_address, is_primary "
            "FROM b_matches WHERE graph_id IN (SELECT graph_id FROM _kept)",
            key,
        )
        if "b_partials" in frames:
            sets = ", ".join(f"{c} = coalesce(p.{c}, emails.{c})" for c in _MERGE_COLUMNS)
            con.execute(
                f"UPDATE emails SET {sets} FROM b_partials p WHERE emails.tenant_id = ? AND "
                "emails.user_oid = ? AND emails.graph_id = p.graph_id",
                key,
            )
        for folder, c in batch.cursors.items():
            con.execute("DELETE FROM mail_cursor WHERE tenant_id = ? AND user_oid = ? AND folder = ?", [*key, folder])
            con.execute(
                "INSERT INTO mail_cursor (tenant_id, user_oid, folder, scan_start, received_watermark, "
                "updated_at, backfill_done, delta_link, delta_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [*key, folder, c.scan_start, c.received_watermark, now, c.backfill_done, c.delta_link, c.delta_at],
            )
        con.execute("DROP TABLE _kept")
        con.execute("DROP TABLE _old")
    return BatchResult(imported=int(new[0][0]), duplicates=int(duplicates))


def read_cursors(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str) -> dict[str, FolderCursor]:
    rows = con.execute(
        "SELECT folder, scan_start, received_watermark, coalesce(backfill_done, false), delta_link, "
        "delta_at FROM mail_cursor WHERE tenant_id = ? AND user_oid = ?",
        [tenant_id, user_oid],
    ).fetchall()
    return {r[0]: FolderCursor(*r[1:]) for r in rows}


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
RETRY_BASE = timedelta(minutes=15)
RETRY_MAX = timedelta(hours=6)


def next_retry_delay(consecutive_failures: int) -> timedelta:
    """15 min, 30 min, 1 h, ... capped at 6 h: a failing mailbox backs off instead of hammering Graph."""
    return min(RETRY_BASE * 2 ** max(0, consecutive_failures - 1), RETRY_MAX)


CATCHING_UP = "catching_up"  # the run stopped at its paging limit, committed what it read; the next run goes on


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
    that did not fail (a resync, a run stopped at its limit), shown where errors are. `CATCHING_UP` is neither a
    success (the lag keeps growing) nor a failure (no back-off: the next run goes on). The run's counts replace the
    last run's and add to the totals since the first run (a row from before the totals existed starts them at its
    last run's counts)."""
    now = datetime.now(UTC)
    key = [tenant_id, user_oid, feature]
    totals_so_far = ", ".join(f"coalesce(total_{n}, {n}, 0)" for n in TOTALS)
    prev = con.execute(
        f"SELECT last_success_at, consecutive_failures, {totals_so_far} FROM sync_state "
        "WHERE tenant_id = ? AND user_oid = ? AND feature = ?",
        key,
    ).fetchall()
    last_success, failures, *totals = prev[0] if prev else (None, 0, *[0] * len(TOTALS))
    next_retry = None
    if error is None and stage == "idle":
        last_success, failures = now, 0
    elif error is not None:
        failures += 1
        next_retry = None if stage in ("reconnect_needed", "consent_needed") else now + next_retry_delay(failures)
    elif stage == CATCHING_UP:
        failures = 0
    error = error if error is not None else note
    c = counts or RunCounts()
    with transaction(con):
        con.execute("DELETE FROM sync_state WHERE tenant_id = ? AND user_oid = ? AND feature = ?", key)
        con.execute(
            "INSERT INTO sync_state (tenant_id, user_oid, stage, last_run_at, last_success_at, last_error, "
            "consecutive_failures, scanned, matched, imported, discarded, next_retry_at, excluded, feature, "
            "total_scanned, total_matched, total_imported, total_discarded) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                tenant_id,
                user_oid,
                stage,
                now,
                last_success,
                error,
                failures,
                c.scanned,
                c.matched,
                c.imported,
                c.discarded,
                next_retry,
                json.dumps(dict(c.excluded)),
                feature,
                *(t + getattr(c, n) for t, n in zip(totals, TOTALS, strict=True)),
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


def sync_position_users(con: duckdb.DuckDBPyConnection, tenant_id: str) -> set[str]:
    """Users of the tenant with a saved sync position or sync state."""
    return {
        r[0]
        for r in con.execute(
            "SELECT user_oid FROM mail_cursor WHERE tenant_id = ? UNION SELECT user_oid FROM calendar_cursor WHERE "
            "tenant_id = ? UNION SELECT user_oid FROM sync_state WHERE tenant_id = ?",
            [tenant_id] * 3,
        ).fetchall()
    }


def reset_sync_positions(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oids: Iterable[str], features: Iterable[str]
) -> list[tuple[str, str, str]]:
    """Drop the saved deltaLinks of `user_oids` for `features` (email, calendar), so that each one's next sync is a
    bounded resync (mail: `FolderCursor.resynced`; calendar: a new baseline over the same window). Returns
    (user, feature, folder or "calendar") for every position that had a link."""
    users = sorted(set(user_oids))
    now, done = datetime.now(UTC), []
    with transaction(con):
        for oid in users:
            if "email" in features:
                for folder, cursor in sorted(read_cursors(con, tenant_id, oid).items()):
                    if cursor.delta_link is None:
                        continue
                    c = cursor.resynced(now)
                    con.execute(
                        "UPDATE mail_cursor SET received_watermark = ?, backfill_done = ?, delta_link = NULL,"
                        " delta_at = NULL, updated_at = ? WHERE tenant_id = ? AND user_oid = ? AND folder = ?",
                        [c.received_watermark, c.backfill_done, now, tenant_id, oid, folder],
                    )
                    done.append((oid, "email", folder))
            if "calendar" in features:
                hit = con.execute(
                    "UPDATE calendar_cursor SET delta_link = NULL, delta_at = NULL, updated_at = ? "
                    "WHERE tenant_id = ? AND user_oid = ? AND delta_link IS NOT NULL RETURNING 1",
                    [now, tenant_id, oid],
                ).fetchall()
                if hit:
                    done.append((oid, "calendar", "calendar"))
    return done


@dataclass(frozen=True)
class CalendarCursor:
    window_start: datetime
    window_end: datetime
    delta_link: str | None = None
    delta_at: datetime | None = None


@dataclass
class MeetingBatch:
    """One calendar round for one user: rows to (re)write, instance ids and series to drop first, and the cursor
    committed with them. `reconcile` = a baseline round: stored instances inside the window it did not return
    are gone from the calendar."""

    meetings: pl.DataFrame  # MEETING_COLUMNS minus tenant/user/imported/updated
    attendees: pl.DataFrame  # event_id, role, name, address, response
    matches: pl.DataFrame  # event_id, crm_id, crm_kind, matched_address, is_primary
    drop_ids: set[str]
    drop_series: set[str]
    cursor: CalendarCursor
    reconcile: bool = False


MEETING_COLUMNS = (
    "event_id",
    "event_type",
    "series_master_id",
    "ical_uid",
    "subject",
    "start_at",
    "start_tz",
    "end_at",
    "end_tz",
    "is_all_day",
    "is_online",
    "join_url",
    "organizer_name",
    "organizer_address",
    "is_internal",
    "web_link",
)
MEETING_TABLES = ("meetings", "meeting_attendees", "meeting_crm_matches", "notetaker_queue")


def read_calendar_cursor(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str) -> CalendarCursor | None:
    row = con.execute(
        "SELECT window_start, window_end, delta_link, delta_at FROM calendar_cursor "
        "WHERE tenant_id = ? AND user_oid = ?",
        [tenant_id, user_oid],
    ).fetchone()
    return CalendarCursor(*row) if row else None


def write_meeting_batch(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, batch: MeetingBatch) -> int:
    """Apply one calendar round and its cursor in one transaction; returns the number of instances removed.
    Rows are keyed on (tenant, user, instance id): DELETE then INSERT, so a repeated round changes nothing."""
    now, key = datetime.now(UTC), [tenant_id, user_oid]
    drops = pl.DataFrame(
        {"event_id": sorted(batch.drop_ids | set(batch.meetings["event_id"].to_list()))}, schema={"event_id": pl.String}
    )
    frames = {
        "b_meetings": batch.meetings,
        "b_attendees": batch.attendees,
        "b_matches": batch.matches,
        "b_drop": drops,
        "b_series": pl.DataFrame({"sid": sorted(batch.drop_series)}, schema={"sid": pl.String}),
    }
    with transaction(con, frames):
        gone = (
            "event_id IN (SELECT event_id FROM b_drop) OR event_id IN (SELECT event_id FROM meetings m WHERE "
            "m.tenant_id = ? AND m.user_oid = ? AND m.series_master_id IN (SELECT sid FROM b_series))"
        )
        if batch.reconcile:
            gone += (
                " OR event_id IN (SELECT event_id FROM meetings m WHERE m.tenant_id = ? AND m.user_oid = ? AND "
                "m.end_at > ? AND m.start_at < ? AND m.event_id NOT IN (SELECT event_id FROM b_meetings))"
            )
        extra = [*key, batch.cursor.window_start, batch.cursor.window_end] if batch.reconcile else []
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _gone AS SELECT event_id FROM meetings WHERE tenant_id = ? AND "
            f"user_oid = ? AND ({gone})",
            [*key, *key, *extra],
        )
        removed = con.execute(
            "SELECT count(*) FROM _gone WHERE event_id NOT IN (SELECT event_id FROM b_meetings)"
        ).fetchone()[0]
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _old AS SELECT event_id, imported_at FROM meetings WHERE "
            "tenant_id = ? AND user_oid = ? AND event_id IN (SELECT event_id FROM b_meetings)",
            key,
        )
        for table in MEETING_TABLES[:3]:
            con.execute(
                f"DELETE FROM {table} WHERE tenant_id = ? AND user_oid = ? AND (event_id IN "
                "(SELECT event_id FROM _gone) OR event_id IN (SELECT event_id FROM b_drop))",
                key,
            )
        con.execute(
            "DELETE FROM notetaker_queue WHERE tenant_id = ? AND user_oid = ? AND event_id IN "
            "(SELECT event_id FROM _gone) AND event_id NOT IN (SELECT event_id FROM b_meetings)",
            key,
        )
        cols = ", ".join(f"b.{c}" for c in MEETING_COLUMNS)
        # Meetings (or series) a user erased are never imported again.
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _erased AS SELECT event_id FROM b_meetings b WHERE EXISTS ("
            "SELECT 1 FROM erased x WHERE x.tenant_id = ? AND coalesce(x.user_oid, ?) = ? AND "
            "((x.kind = 'event' AND x.key = b.event_id) OR "
            "(x.kind = 'series' AND x.key = b.series_master_id)))",
            [tenant_id, user_oid, user_oid],
        )
        con.execute(
            f"INSERT INTO meetings SELECT ?, ?, {cols}, coalesce(o.imported_at, ?), ? FROM b_meetings b "
            "LEFT JOIN _old o ON o.event_id = b.event_id "
            "WHERE b.event_id NOT IN (SELECT event_id FROM _erased)",
            [*key, now, now],
        )
        con.execute(
            "INSERT INTO meeting_attendees SELECT ?, ?, event_id, role, name, address, response "
            "FROM b_attendees WHERE event_id NOT IN (SELECT event_id FROM _erased)",
            key,
        )
        con.execute(
            "INSERT INTO meeting_crm_matches SELECT ?, ?, event_id, crm_id, crm_kind, matched_address, "
            "is_primary FROM b_matches WHERE event_id NOT IN (SELECT event_id FROM _erased)",
            key,
        )
        c = batch.cursor
        con.execute("DELETE FROM calendar_cursor WHERE tenant_id = ? AND user_oid = ?", key)
        con.execute(
            "INSERT INTO calendar_cursor VALUES (?, ?, ?, ?, ?, ?, ?)",
            [*key, c.window_start, c.window_end, c.delta_link, c.delta_at, now],
        )
    return removed


def refresh_notetaker_queue(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, enabled: bool, now: datetime
) -> int:
    """Notetaker's list for one user: upcoming external, CRM-matched meetings with an online-meeting link
    (the event's own, or the one Explicit Consent Mode added) are `to_record`; everything else leaves the list.
    Returns how many are listed."""
    key = [tenant_id, user_oid]
    with transaction(con):
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _due AS SELECT m.event_id, coalesce(m.join_url, q.join_url) AS join_url "
            "FROM meetings m LEFT JOIN notetaker_queue q ON q.tenant_id = m.tenant_id AND q.user_oid = m.user_oid "
            "AND q.link_created AND q.event_id = coalesce(m.series_master_id, m.event_id) "
            "WHERE m.tenant_id = ? AND m.user_oid = ? AND ? AND NOT m.is_internal "
            "AND m.end_at > ? AND coalesce(m.join_url, q.join_url) IS NOT NULL AND EXISTS (SELECT 1 FROM "
            "meeting_crm_matches c WHERE c.tenant_id = m.tenant_id AND c.user_oid = m.user_oid AND "
            "c.event_id = m.event_id)",
            [*key, enabled, now],
        )
        con.execute(
            "DELETE FROM notetaker_queue WHERE tenant_id = ? AND user_oid = ? AND status = 'to_record' AND "
            "NOT link_created AND event_id NOT IN (SELECT event_id FROM _due)",
            key,
        )
        con.execute(
            "UPDATE notetaker_queue SET status = 'to_record', join_url = d.join_url, updated_at = ? "
            "FROM _due d WHERE notetaker_queue.tenant_id = ? AND notetaker_queue.user_oid = ? AND "
            "notetaker_queue.event_id = d.event_id",
            [now, *key],
        )
        con.execute(
            "INSERT INTO notetaker_queue SELECT ?, ?, event_id, 'to_record', join_url, false, NULL, ? "
            "FROM _due WHERE event_id NOT IN (SELECT event_id FROM notetaker_queue WHERE tenant_id = ? AND "
            "user_oid = ?)",
            [*key, now, *key],
        )
        listed = con.execute("SELECT count(*) FROM _due").fetchone()[0]
    return listed


def consent_mode_candidates(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, organizer: str, now: datetime
) -> list[tuple[str, str, datetime, datetime, str | None]]:
    """(event id to change — the series master for an occurrence —, instance id, start, end, subject) of upcoming
    external, CRM-matched meetings the user organizes that have no online-meeting link and no consent notice yet."""
    return con.execute(
        "SELECT coalesce(m.series_master_id, m.event_id), min(m.event_id), min(m.start_at), min(m.end_at), "
        "any_value(m.subject) FROM meetings m WHERE m.tenant_id = ? AND m.user_oid = ? AND NOT m.is_internal AND "
        "m.join_url IS NULL AND m.end_at > ? AND lower(m.organizer_address) = lower(?) AND EXISTS (SELECT 1 FROM "
        "meeting_crm_matches c WHERE c.tenant_id = m.tenant_id AND c.user_oid = m.user_oid AND c.event_id = "
        "m.event_id) AND NOT EXISTS (SELECT 1 FROM notetaker_queue q WHERE q.tenant_id = m.tenant_id AND "
        "q.user_oid = m.user_oid AND q.event_id = coalesce(m.series_master_id, m.event_id) AND q.link_created) "
        "GROUP BY 1 ORDER BY 1",
        [tenant_id, user_oid, now, organizer],
    ).fetchall()


def record_consent_link(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, event_id: str, join_url: str, now: datetime
) -> None:
    """Explicit Consent Mode changed `event_id` (a single meeting or a series master): remember its link."""
    key = [tenant_id, user_oid, event_id]
    with transaction(con):
        con.execute("DELETE FROM notetaker_queue WHERE tenant_id = ? AND user_oid = ? AND event_id = ?", key)
        con.execute(
            "INSERT INTO notetaker_queue VALUES (?, ?, ?, 'consent_link', ?, true, ?, ?)", [*key, join_url, now, now]
        )


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
) -> dict[str, Any]:
    """One transaction: full replace (`changed_ids` None) or replace the rows of the changed ids, then a meta row
    with the counts and `scan_start(oldest open opportunity)` of the result. Re-applying the same changes is
    harmless (an overlap window re-reads records); a crash leaves the previous snapshot. A written refresh ends
    any refused one and uses up a confirmation (`crm_drop_guard`)."""
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
        ).fetchone()
        start = scan_start(oldest_open)
        mode = "full" if changed_ids is None else "incremental"
        con.execute(
            "INSERT INTO crm_snapshot_meta (taken_at, crm_kind, people, accounts, opportunities, scan_start, "
            "mode, watermark) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [datetime.now(UTC), crm_kind, people, accounts, opps, start, mode, watermark],
        )
    return {"people": people, "accounts": accounts, "open_opportunities": opps, "scan_start": start, "mode": mode}


def replace_crm_snapshot(
    con: duckdb.DuckDBPyConnection,
    people: pl.DataFrame,
    accounts: pl.DataFrame,
    opportunities: pl.DataFrame,
    crm_kind: str,
    scan_start: datetime | Callable,
    watermark: datetime | None = None,
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
    )


def apply_crm_changes(
    con: duckdb.DuckDBPyConnection,
    frames: dict[str, pl.DataFrame],
    changed_ids: dict[str, set[str]],
    crm_kind: str,
    scan_start: Callable[[datetime | None], datetime],
    watermark: datetime | None,
) -> dict[str, Any]:
    """Upsert an incremental refresh; the scan start is recomputed on the result. The stored watermark never
    moves back (a refresh that saw no change keeps the previous one)."""
    previous = crm_state_summary(con)["watermark"]
    mark = max((w for w in (watermark, previous) if w is not None), default=None)
    return _write_crm(con, frames, changed_ids, crm_kind, mark, scan_start)


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
    ).fetchone()[0]
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


def latest_crm_snapshot_at(con: duckdb.DuckDBPyConnection) -> datetime | None:
    return con.execute("SELECT max(taken_at) FROM crm_snapshot_meta").fetchall()[0][0]


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk before it is renamed into place or relied on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_snapshot(settings: Settings, tenant_id: str) -> Path:
    """Copy the live store into the analysts' read-only file (copy + atomic replace; also drops dead bytes)."""
    target = snapshot_path(settings, tenant_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".duckdb.tmp")
    tmp.unlink(missing_ok=True)
    with open_store(settings, tenant_id, write=True) as con:
        con.execute("ATTACH '" + str(tmp).replace("'", "''") + "' AS snap")
        try:
            con.execute("COPY FROM DATABASE store TO snap")
            from o365sync.analytics import create_views  # analytics imports this module

            create_views(con, "snap", tenant_id=tenant_id)  # the analysts' views, bound to the snapshot's tables
        finally:
            con.execute("DETACH snap")
    fsync_path(tmp)
    os.replace(tmp, target)
    return target
