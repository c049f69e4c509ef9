"""A user's saved sync positions as a whole: who has one, and resetting them for a bounded resync."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import duckdb

from o365sync.store.mail import read_cursors
from o365sync.store.partitions import use_bucket
from o365sync.store.transactions import transaction


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
    for oid in users:  # one transaction per user: each user's positions live in their bucket
        with use_bucket(con, oid), transaction(con):
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
