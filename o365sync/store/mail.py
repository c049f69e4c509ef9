"""Imported mail: batches of matched emails written with their folder cursors in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl

from o365sync.store.partitions import in_user_bucket
from o365sync.store.sync_state import add_sync_progress
from o365sync.store.transactions import transaction

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
BATCH_EMAIL_COLUMNS = tuple(c for c in EMAIL_COLUMNS if c not in ("tenant_id", "user_oid", "imported_at"))
"""The columns of `MailBatch.emails`: the store adds the tenant, the user and the import time."""


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

    emails: pl.DataFrame  # BATCH_EMAIL_COLUMNS (body_text may be null: keep the stored one)
    participants: pl.DataFrame  # graph_id, role, name, address
    matches: pl.DataFrame  # graph_id, crm_id, crm_kind, matched_address
    cursors: dict[str, FolderCursor]  # folder -> cursor covered by this batch
    partials: pl.DataFrame | None = None  # partial delta updates: graph_id + PARTIAL_COLUMNS, null = unchanged
    scanned: int = 0  # messages read for this batch (kept or not): the running sync's progress advances by it
    also: Callable[[duckdb.DuckDBPyConnection, BatchResult], None] | None = None  # more state, same transaction


@dataclass(frozen=True)
class BatchResult:
    imported: int  # emails not stored before
    duplicates: int  # same internetMessageId already stored under another id (e.g. the copy in another folder)


# What a partial delta update (graph_id plus these) may change; a null keeps the stored value.
PARTIAL_COLUMNS = ("subject", "from_name", "from_address", "received_at", "sent_at", "has_attachments", "web_link")


@in_user_bucket
def write_mail_batch(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, batch: MailBatch) -> BatchResult:
    """Idempotently persist one batch and its cursors in one transaction.

    Rows are keyed on (tenant, user, immutable Graph id): dedupe, DELETE, INSERT. A message whose
    internetMessageId is already stored under another id is the same mail seen in another folder: skipped.
    A null body keeps the stored one; partial updates only overwrite the fields they carry. The running sync's
    progress (sync_state) advances in the same transaction, and so does the batch's `also` (e.g. the late-match
    backfill's state), which sees the result."""
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
            sets = ", ".join(f"{c} = coalesce(p.{c}, emails.{c})" for c in PARTIAL_COLUMNS)
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
        add_sync_progress(con, tenant_id, user_oid, "email", batch.scanned, int(new[0][0]))
        result = BatchResult(imported=int(new[0][0]), duplicates=int(duplicates))
        if batch.also is not None:
            batch.also(con, result)
    return result


@in_user_bucket
def read_cursors(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str) -> dict[str, FolderCursor]:
    rows = con.execute(
        "SELECT folder, scan_start, received_watermark, coalesce(backfill_done, false), delta_link, "
        "delta_at FROM mail_cursor WHERE tenant_id = ? AND user_oid = ?",
        [tenant_id, user_oid],
    ).fetchall()
    return {r[0]: FolderCursor(*r[1:]) for r in rows}
