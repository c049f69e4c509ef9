"""The store's tables, as numbered migrations, and the runner that brings a store to the latest one.

`MIGRATIONS[n - 1]` is migration n. Migration 1 is the whole schema as it stood when numbering began; a change
to the schema is a new migration appended to the tuple, never an edit of an applied one. `schema_version` records
every migration applied (one row each). Opening a store for writing applies the missing ones in order, one
transaction each, so a store that dies mid-upgrade keeps its previous version. A store made before numbering
(tables but no `schema_version`) is brought to version 1 by `PRE_MIGRATION_UPGRADE`, the idempotent
CREATE/ALTER ... IF NOT EXISTS statements those versions ran on every open. A store from a newer version than
this code knows is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import duckdb

from o365sync.store.transactions import transaction

SCHEMA_VERSION_TABLE = "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL);"

SCHEMA = """
CREATE TABLE emails (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    folder VARCHAR, internet_message_id VARCHAR, conversation_id VARCHAR, subject VARCHAR, body_text VARCHAR,
    from_name VARCHAR, from_address VARCHAR, received_at TIMESTAMPTZ, sent_at TIMESTAMPTZ,
    has_attachments BOOLEAN, web_link VARCHAR, imported_at TIMESTAMPTZ NOT NULL);
CREATE TABLE email_participants (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, name VARCHAR, address VARCHAR NOT NULL);
CREATE TABLE email_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    crm_id VARCHAR NOT NULL, crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL, is_primary BOOLEAN);
CREATE TABLE mail_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, folder VARCHAR NOT NULL,
    scan_start TIMESTAMPTZ NOT NULL, received_watermark TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL,
    backfill_done BOOLEAN DEFAULT false, delta_link VARCHAR, delta_at TIMESTAMPTZ);
CREATE TABLE sync_state (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, stage VARCHAR NOT NULL,
    last_run_at TIMESTAMPTZ, last_success_at TIMESTAMPTZ, last_error VARCHAR,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    scanned BIGINT, matched BIGINT, imported BIGINT, discarded BIGINT,
    next_retry_at TIMESTAMPTZ, excluded VARCHAR, feature VARCHAR DEFAULT 'email',
    total_scanned BIGINT, total_matched BIGINT, total_imported BIGINT, total_discarded BIGINT);
CREATE TABLE crm_people (crm_id VARCHAR, kind VARCHAR, email VARCHAR, account_id VARCHAR, name VARCHAR);
CREATE TABLE crm_accounts (crm_id VARCHAR, name VARCHAR, domain VARCHAR);
CREATE TABLE crm_opportunities (
    crm_id VARCHAR, account_id VARCHAR, name VARCHAR, is_closed BOOLEAN, created_at TIMESTAMPTZ);
CREATE TABLE crm_snapshot_meta (
    taken_at TIMESTAMPTZ NOT NULL, crm_kind VARCHAR, people BIGINT, accounts BIGINT, opportunities BIGINT,
    scan_start TIMESTAMPTZ NOT NULL, mode VARCHAR, watermark TIMESTAMPTZ);
CREATE TABLE meetings (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, event_type VARCHAR,
    series_master_id VARCHAR, ical_uid VARCHAR, subject VARCHAR, start_at TIMESTAMPTZ, start_tz VARCHAR,
    end_at TIMESTAMPTZ, end_tz VARCHAR, is_all_day BOOLEAN, is_online BOOLEAN, join_url VARCHAR,
    organizer_name VARCHAR, organizer_address VARCHAR, is_internal BOOLEAN, web_link VARCHAR,
    imported_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE meeting_attendees (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, name VARCHAR, address VARCHAR NOT NULL, response VARCHAR);
CREATE TABLE meeting_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL,
    crm_id VARCHAR NOT NULL, crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL, is_primary BOOLEAN);
CREATE TABLE calendar_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, window_start TIMESTAMPTZ NOT NULL,
    window_end TIMESTAMPTZ NOT NULL, delta_link VARCHAR, delta_at TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE notetaker_queue (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, status VARCHAR NOT NULL,
    join_url VARCHAR, link_created BOOLEAN DEFAULT false, consent_noted_at TIMESTAMPTZ, updated_at TIMESTAMPTZ);
CREATE TABLE teams_channels (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, team_id VARCHAR NOT NULL, team_name VARCHAR,
    channel_id VARCHAR NOT NULL, channel_name VARCHAR, membership_type VARCHAR, refreshed_at TIMESTAMPTZ NOT NULL);
CREATE TABLE shares (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, share_id VARCHAR NOT NULL, target_kind VARCHAR NOT NULL,
    target_id VARCHAR NOT NULL, activity_kind VARCHAR NOT NULL, activity_id VARCHAR NOT NULL, message_id VARCHAR,
    posted_at TIMESTAMPTZ);
CREATE TABLE erased (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR, kind VARCHAR NOT NULL, key VARCHAR NOT NULL,
    erased_at TIMESTAMPTZ NOT NULL);
CREATE TABLE crm_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE, status VARCHAR NOT NULL, last_attempt_at TIMESTAMPTZ,
    last_success_at TIMESTAMPTZ, last_error VARCHAR);
CREATE TABLE crm_drop_guard (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE, refused_at TIMESTAMPTZ NOT NULL, people_removed BIGINT NOT NULL,
    people_before BIGINT NOT NULL, accounts_removed BIGINT NOT NULL, accounts_before BIGINT NOT NULL,
    confirmed_at TIMESTAMPTZ);
"""
"""Migration 1: every table as it stood when numbering began (each ALTER ... ADD COLUMN of that time folded into
its CREATE TABLE, in the same column order). Tests create stores with it (it is also what a fresh store gets)."""

PRE_MIGRATION_UPGRADE = """CREATE TABLE IF NOT EXISTS emails (
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
"""What every open ran before numbered migrations, verbatim: applied to a store without `schema_version`, it
brings whatever earlier version made the store to exactly migration 1's schema (it creates what is missing and
adds columns at the end, where migration 1 has them)."""

MIGRATION_2_IMPORT_PROGRESS = """ALTER TABLE sync_state ADD COLUMN run_started_at TIMESTAMPTZ;
ALTER TABLE sync_state ADD COLUMN progress_at TIMESTAMPTZ;
"""
"""Migration 2: when the running (or last) sync run of a user and feature started, and when its counts last advanced
(`o365sync.store.sync_state`: the live progress of an import)."""

MIGRATION_3_LATE_MATCH = """CREATE TABLE late_match (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, folder VARCHAR NOT NULL, term VARCHAR NOT NULL,
    kind VARCHAR NOT NULL, window_start TIMESTAMPTZ NOT NULL, window_end TIMESTAMPTZ, status VARCHAR NOT NULL,
    solo BOOLEAN NOT NULL DEFAULT false, seen BIGINT NOT NULL DEFAULT 0, imported BIGINT NOT NULL DEFAULT 0,
    queued_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
"""
"""Migration 3: the late-match backfill's work (`o365sync.store.late_match`): per mailbox folder, each CRM address or
account domain a refresh added, the part of the scan window still to search, and where its search stands."""

BUCKET_TABLES = (
    "emails",
    "email_participants",
    "email_crm_matches",
    "mail_cursor",
    "sync_state",
    "meetings",
    "meeting_attendees",
    "meeting_crm_matches",
    "calendar_cursor",
    "notetaker_queue",
    "late_match",
)
"""The tables of a user's rows that a sync writes in one transaction (activities, their cursors and progress, the
user's notetaker and late-match work): since migration 4 they live in the user's bucket file
(`o365sync.store.partitions`), not in the tenant file."""

MIGRATION_4_PARTITIONS = "".join(f"DROP TABLE {table};\n" for table in BUCKET_TABLES) + (
    "CREATE TABLE store_layout (buckets INTEGER NOT NULL, partitioned_at TIMESTAMPTZ NOT NULL);\n"
    "CREATE TABLE late_match_terms (tenant_id VARCHAR NOT NULL, kind VARCHAR NOT NULL, term VARCHAR NOT NULL, "
    "queued_at TIMESTAMPTZ NOT NULL);\n"
)
"""Migration 4: the users' rows moved into bucket files (the tenant file keeps the CRM, tombstones, Teams and state);
`store_layout` records how many buckets the tenant's users are hashed into; `late_match_terms` holds the terms a CRM
refresh added until they are queued in every bucket (`o365sync.store.late_match.fan_out_late_matches`). Applied by
the split in `o365sync.store.partitions`, which copies the rows into the buckets first."""

MIGRATIONS: tuple[str, ...] = (
    SCHEMA,
    MIGRATION_2_IMPORT_PROGRESS,
    MIGRATION_3_LATE_MATCH,
    MIGRATION_4_PARTITIONS,
)  # append, never edit: [n - 1] is migration n
PARTITIONED_VERSION = 4  # the tenant file's version from which users' rows live in buckets

BUCKET_SCHEMA = """
CREATE TABLE emails (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL, folder VARCHAR,
    internet_message_id VARCHAR, conversation_id VARCHAR, subject VARCHAR, body_text VARCHAR, from_name VARCHAR,
    from_address VARCHAR, received_at TIMESTAMPTZ, sent_at TIMESTAMPTZ, has_attachments BOOLEAN, web_link VARCHAR,
    imported_at TIMESTAMPTZ NOT NULL);
CREATE TABLE email_participants (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL, "role" VARCHAR NOT NULL,
    "name" VARCHAR, address VARCHAR NOT NULL);
CREATE TABLE email_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL, crm_id VARCHAR NOT NULL,
    crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL, is_primary BOOLEAN);
CREATE TABLE mail_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, folder VARCHAR NOT NULL,
    scan_start TIMESTAMPTZ NOT NULL, received_watermark TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL,
    backfill_done BOOLEAN DEFAULT(false), delta_link VARCHAR, delta_at TIMESTAMPTZ);
CREATE TABLE sync_state (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, stage VARCHAR NOT NULL, last_run_at TIMESTAMPTZ,
    last_success_at TIMESTAMPTZ, last_error VARCHAR, consecutive_failures INTEGER DEFAULT(0) NOT NULL,
    scanned BIGINT, "matched" BIGINT, imported BIGINT, discarded BIGINT, next_retry_at TIMESTAMPTZ,
    excluded VARCHAR, feature VARCHAR DEFAULT('email'), total_scanned BIGINT, total_matched BIGINT,
    total_imported BIGINT, total_discarded BIGINT, run_started_at TIMESTAMPTZ, progress_at TIMESTAMPTZ);
CREATE TABLE meetings (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, event_type VARCHAR,
    series_master_id VARCHAR, ical_uid VARCHAR, subject VARCHAR, start_at TIMESTAMPTZ, start_tz VARCHAR,
    end_at TIMESTAMPTZ, end_tz VARCHAR, is_all_day BOOLEAN, is_online BOOLEAN, join_url VARCHAR,
    organizer_name VARCHAR, organizer_address VARCHAR, is_internal BOOLEAN, web_link VARCHAR,
    imported_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE meeting_attendees (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, "role" VARCHAR NOT NULL,
    "name" VARCHAR, address VARCHAR NOT NULL, response VARCHAR);
CREATE TABLE meeting_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, crm_id VARCHAR NOT NULL,
    crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL, is_primary BOOLEAN);
CREATE TABLE calendar_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, window_start TIMESTAMPTZ NOT NULL,
    window_end TIMESTAMPTZ NOT NULL, delta_link VARCHAR, delta_at TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE notetaker_queue (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, status VARCHAR NOT NULL,
    join_url VARCHAR, link_created BOOLEAN DEFAULT(false), consent_noted_at TIMESTAMPTZ, updated_at TIMESTAMPTZ);
CREATE TABLE late_match (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, folder VARCHAR NOT NULL, term VARCHAR NOT NULL,
    kind VARCHAR NOT NULL, window_start TIMESTAMPTZ NOT NULL, window_end TIMESTAMPTZ, status VARCHAR NOT NULL,
    solo BOOLEAN DEFAULT(false) NOT NULL, seen BIGINT DEFAULT(0) NOT NULL, imported BIGINT DEFAULT(0) NOT NULL,
    queued_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
"""
"""Bucket migration 1: the tables of `BUCKET_TABLES` exactly as the tenant file had them at migration 3."""

BUCKET_MIGRATIONS: tuple[str, ...] = (BUCKET_SCHEMA,)  # append, never edit: [n - 1] is migration n
"""A bucket file's own migrations: [n - 1] is migration n, recorded in its own `schema_version`."""


class StoreFromNewerVersion(Exception):
    """The store was written by a newer o365sync (a higher schema version than this code knows)."""


def stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The schema version of the connection's database: None for an empty database, 0 for a store made before
    numbered migrations, else the highest migration recorded."""
    tables = {
        row[0]
        for row in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall()
    }
    if "schema_version" in tables:
        return con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
    return 0 if tables else None


def migrate(con: duckdb.DuckDBPyConnection, where: str, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Bring the store to the latest migration (one transaction per migration); returns the version reached.
    `where` names the store in the refusal of a newer one."""
    version = stored_version(con)
    latest = len(migrations)
    if version is not None and version > latest:
        raise StoreFromNewerVersion(
            f"{where} has schema version {version} but this o365sync knows only up to {latest}: "
            "upgrade o365sync to use it (nothing was written)"
        )
    if version == 0:
        _apply(con, 1, PRE_MIGRATION_UPGRADE + SCHEMA_VERSION_TABLE)
        version = 1
    for number in range((version or 0) + 1, latest + 1):
        _apply(con, number, migrations[number - 1] + (SCHEMA_VERSION_TABLE if number == 1 else ""))
    return latest


def _apply(con: duckdb.DuckDBPyConnection, number: int, statements: str) -> None:
    with transaction(con):
        con.execute(statements)
        con.execute("INSERT INTO schema_version VALUES (?, ?)", [number, datetime.now(UTC)])
