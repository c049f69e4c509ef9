"""Store functions for Teams sharing: a user's channels (`teams_channels`) and the shares made (`shares`).

Both tables live in the store's schema (o365sync/store/schema.py); callers open the store with `open_store` as
everywhere else.

- `teams_channels`: one row per (tenant, user, team, channel) the user can see. A refresh replaces all of the user's
  rows in one transaction, so readers see the old list or the new one, never a mix.
- `shares`: one row per (tenant, user, activity, target), keyed by a deterministic `share_id`. A row with a null
  `message_id` is an *intent*: a post may have been sent but its message id was not recorded (see docs/TEAMS.md).
  Only ids are stored here: never a subject, a rendered summary or a member's address.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from o365sync.store import transaction

__all__ = [
    "ChannelRow",
    "ShareRecord",
    "abandon_share",
    "begin_share",
    "channels_refreshed_at",
    "complete_share",
    "find_channel",
    "get_share",
    "read_channels",
    "read_shares",
    "replace_channels",
    "share_id_for",
]

_CHANNEL_COLUMNS = "team_id, team_name, channel_id, channel_name, membership_type, refreshed_at"
_SHARE_COLUMNS = "share_id, user_oid, target_kind, target_id, activity_kind, activity_id, message_id, posted_at"


@dataclass(frozen=True)
class ChannelRow:
    team_id: str
    team_name: str | None
    channel_id: str
    channel_name: str | None
    membership_type: str | None  # standard | private | shared (Graph's channelMembershipType)


@dataclass(frozen=True)
class ShareRecord:
    share_id: str
    user_oid: str
    target_kind: str  # channel | chat
    target_id: str  # channel: the channel id; chat: the chat id
    activity_kind: str  # meeting | email
    activity_id: str  # meetings.event_id | emails.graph_id
    message_id: str | None = None  # null: intent recorded, message id not (yet) known
    posted_at: datetime | None = None

    @property
    def posted(self) -> bool:
        return self.message_id is not None


def share_id_for(
    tenant_id: str, user_oid: str, activity_kind: str, activity_id: str, target_kind: str, target_key: Sequence[str]
) -> str:
    """The deterministic id of sharing one activity to one target: the idempotency key of a share.

    `target_key` is (team id, channel id) for a channel, or the chat members (object ids or UPNs, the user's own
    id included or not) for a chat; members are compared case-insensitively and in any order, so the same people
    mean the same share. The id is a hash, so member addresses never reach the store."""
    if target_kind == "chat":
        key = sorted({m.strip().lower() for m in target_key if m.strip()} - {user_oid.lower()})
    else:
        key = [k.strip() for k in target_key]
    raw = "\x1f".join([tenant_id, user_oid, activity_kind, activity_id, target_kind, *key])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ channels
def replace_channels(
    con: duckdb.DuckDBPyConnection,
    tenant_id: str,
    user_oid: str,
    rows: Iterable[ChannelRow],
    refreshed_at: datetime | None = None,
) -> int:
    """Replace the user's channel list in one transaction (duplicates dropped); returns the rows stored."""
    at = refreshed_at or datetime.now(UTC)
    unique = list({(r.team_id, r.channel_id): r for r in rows}.values())
    with transaction(con):
        con.execute("DELETE FROM teams_channels WHERE tenant_id = ? AND user_oid = ?", [tenant_id, user_oid])
        if unique:
            con.executemany(
                f"INSERT INTO teams_channels (tenant_id, user_oid, {_CHANNEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    [tenant_id, user_oid, r.team_id, r.team_name, r.channel_id, r.channel_name, r.membership_type, at]
                    for r in unique
                ],
            )
    return len(unique)


def read_channels(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str | None = None) -> list[dict]:
    """The stored channels (of one user, or of every user of the tenant), ordered by user, team and channel name."""
    where, params = "tenant_id = ?", [tenant_id]
    if user_oid is not None:
        where, params = where + " AND user_oid = ?", [tenant_id, user_oid]
    cur = con.execute(
        f"SELECT user_oid, {_CHANNEL_COLUMNS} FROM teams_channels WHERE {where} "
        "ORDER BY user_oid, lower(team_name), team_id, lower(channel_name), channel_id",
        params,
    )
    columns = [d[0] for d in cur.description]
    return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def find_channel(
    con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str, team_id: str, channel_id: str
) -> dict | None:
    rows = [
        r for r in read_channels(con, tenant_id, user_oid) if r["team_id"] == team_id and r["channel_id"] == channel_id
    ]
    return rows[0] if rows else None


def channels_refreshed_at(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str) -> datetime | None:
    """When the user's channel list was last replaced (None: never, or the user is in no team)."""
    return con.execute(
        "SELECT max(refreshed_at) FROM teams_channels WHERE tenant_id = ? AND user_oid = ?", [tenant_id, user_oid]
    ).fetchall()[0][0]


# ------------------------------------------------------------------------------------------------ shares
def _record(row: tuple) -> ShareRecord:
    return ShareRecord(*row)


def get_share(con: duckdb.DuckDBPyConnection, tenant_id: str, share_id: str) -> ShareRecord | None:
    row = con.execute(
        f"SELECT {_SHARE_COLUMNS} FROM shares WHERE tenant_id = ? AND share_id = ? "
        "ORDER BY message_id NULLS LAST LIMIT 1",
        [tenant_id, share_id],
    ).fetchone()
    return _record(row) if row else None


def begin_share(
    con: duckdb.DuckDBPyConnection, tenant_id: str, share: ShareRecord, replace: bool = False
) -> ShareRecord | None:
    """Record the intent to post (message id null), atomically with the check that the share is not already
    recorded. Returns the existing record instead (and records nothing) when there is one, unless `replace`
    (a forced re-post) drops an intent without a message id first. The caller holds the store's write lock."""
    with transaction(con):
        existing = get_share(con, tenant_id, share.share_id)
        if existing is not None and (existing.posted or not replace):  # nothing written: the commit is empty
            return existing
        con.execute("DELETE FROM shares WHERE tenant_id = ? AND share_id = ?", [tenant_id, share.share_id])
        con.execute(
            f"INSERT INTO shares (tenant_id, {_SHARE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            [
                tenant_id,
                share.share_id,
                share.user_oid,
                share.target_kind,
                share.target_id,
                share.activity_kind,
                share.activity_id,
            ],
        )
    return None


def complete_share(
    con: duckdb.DuckDBPyConnection, tenant_id: str, share_id: str, message_id: str, posted_at: datetime | None = None
) -> None:
    """The post succeeded: store its message id (from then on the share is never posted again)."""
    con.execute(
        "UPDATE shares SET message_id = ?, posted_at = ? WHERE tenant_id = ? AND share_id = ?",
        [message_id, posted_at or datetime.now(UTC), tenant_id, share_id],
    )


def abandon_share(con: duckdb.DuckDBPyConnection, tenant_id: str, share_id: str) -> None:
    """The post certainly did not happen (Graph refused it): drop the intent so a later run may post."""
    con.execute("DELETE FROM shares WHERE tenant_id = ? AND share_id = ? AND message_id IS NULL", [tenant_id, share_id])


def read_shares(con: duckdb.DuckDBPyConnection, tenant_id: str, user_oid: str | None = None) -> list[ShareRecord]:
    where, params = "tenant_id = ?", [tenant_id]
    if user_oid is not None:
        where, params = where + " AND user_oid = ?", [tenant_id, user_oid]
    rows = con.execute(
        f"SELECT {_SHARE_COLUMNS} FROM shares WHERE {where} ORDER BY posted_at NULLS LAST, share_id", params
    ).fetchall()
    return [_record(r) for r in rows]
