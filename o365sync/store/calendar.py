"""Imported meetings: calendar rounds with their cursor, and the notetaker queue built from them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import polars as pl

from o365sync.store.partitions import in_user_bucket
from o365sync.store.sync_state import add_sync_progress
from o365sync.store.transactions import transaction


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
    scanned: int = 0  # instances read for this round (kept or not): the running sync's progress advances by it


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


@in_user_bucket
def read_calendar_cursor(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str) -> CalendarCursor | None:
    row = con.execute(
        "SELECT window_start, window_end, delta_link, delta_at FROM calendar_cursor "
        "WHERE tenant_id = ? AND user_oid = ?",
        [tenant_id, user_oid],
    ).fetchone()
    return CalendarCursor(*row) if row else None


@in_user_bucket
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
        ).fetchall()[0][0]
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
        add_sync_progress(con, tenant_id, user_oid, "calendar", batch.scanned, batch.meetings.height)
    return removed


@in_user_bucket
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
        listed = con.execute("SELECT count(*) FROM _due").fetchall()[0][0]
    return listed


@in_user_bucket
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


@in_user_bucket
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
