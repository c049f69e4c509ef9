"""Provable erasure: delete, copy-compact, republish, audit — one entry point (`erase`) for every deletion.

DuckDB's DELETE, CHECKPOINT and VACUUM leave the deleted bytes in the file; only a copy into a new file removes
them. The live store is a tenant file plus the users' bucket files (`o365sync.store.partitions`), and DuckDB lets
one transaction write one file. So every erasure, under the tenant's sync locks (no sync runs meanwhile), does:

1. in one transaction of the tenant file: select the rows of the scope (reading every bucket), write tombstones
   (`erased`) where Graph would bring the data back (conversations, messages without a conversation, meetings,
   series), and delete the scope's rows the tenant file holds (a user's Teams channels, shares);
2. records the buckets it is about to change in `erasure.pending` (tenant folder), then deletes the rows in each
   bucket that holds some, one transaction per bucket. Erasing one user changes only that user's bucket;
3. `compact_live_store`: each changed bucket, then the tenant file, under the live store's exclusive lock,
   `COPY FROM DATABASE` into a new file, fsync, atomic replace (no WAL of the old file survives);
4. `publish(..., purge=True)` republishes the analysts' snapshot from the compacted files and removes every older
   generation of it (even one a reader holds: erasure does not wait for readers);
5. removes every export file of the tenant (`tenant_dir/exports`: they may hold erased rows), drops
   `erasure.pending`, and appends one line to the deletion audit log (last: an entry means the erasure is complete).

A crash after step 1 is finished by running the erasure again: the rows still stored are found again, tombstoned
ids still count as matched, and any erasure first compacts the buckets an unfinished one left in `erasure.pending`.

The bound: the erasure is complete when `erase` returns; nothing is deferred. The audit log lives outside the
tenant's folder (`<region root>/audit/<tenant>.jsonl`) so it survives the end of a subscription; it holds ids and
counts, never subjects, addresses or bodies. See docs/DATA_LIFECYCLE.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb

from o365sync.analytics import export_lock
from o365sync.auth import connected_users, disconnect
from o365sync.errors import O365SyncError
from o365sync.settings import Settings
from o365sync.store import (
    FEATURE_LOCKS,
    fsync_path,
    open_store,
    publish,
    snapshot_files,
    store_lock,
    store_path,
    tenant_sync_locks,
    transaction,
    write_synced,
)
from o365sync.store.partitions import DUCKDB_CONFIG, bucket_files, bucket_of, bucket_path, mark_dirty, use_bucket
from o365sync.store.publishing import snapshot_parts
from o365sync.store.schema import BUCKET_TABLES
from o365sync.tenants import load_tenant, region_root, registry_dir, save_tenant, tenant_dir, tenant_region

ScopeKind = Literal["conversation", "message", "meeting", "series", "user", "retention", "tenant"]
REASONS = ("user_request", "admin_request", "retention", "offboarding", "subscription_end")
_ACTOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")

# Every table that holds rows of a user (all but the CRM snapshot and the tenant-level state): the bucket's tables,
# and the tenant file's per-user ones.
TENANT_USER_TABLES = ("teams_channels", "shares")
USER_TABLES = (*BUCKET_TABLES, *TENANT_USER_TABLES)
EMAIL_TABLES = ("emails", "email_participants", "email_crm_matches")
MEETING_TABLES = ("meetings", "meeting_attendees", "meeting_crm_matches", "notetaker_queue")


class NothingMatched(LookupError):
    """The scope names nothing stored (and nothing erased before): nothing was changed, no tombstone written."""


# Per selective scope: the query that finds a stored row of one id, and the tombstone kind of an earlier erasure.
_STORED = {
    "conversation": ("conversation", "SELECT 1 FROM emails WHERE tenant_id = ? AND conversation_id = ? AND {mine}"),
    "message": ("message", "SELECT 1 FROM emails WHERE tenant_id = ? AND graph_id = ? AND {mine}"),
    "meeting": ("event", "SELECT 1 FROM meetings WHERE tenant_id = ? AND event_id = ? AND {mine}"),
    "series": (
        "series",
        "SELECT 1 FROM meetings WHERE tenant_id = ? AND ? IN (series_master_id, event_id) AND {mine} "
        "UNION ALL SELECT 1 FROM notetaker_queue WHERE tenant_id = ? AND event_id = ? AND {mine}",
    ),
}


class ErasureError(O365SyncError):
    """The rows are deleted but a later step (compaction, snapshot, exports) failed; re-run the erasure (it is
    idempotent). The message names ids and the failing step only."""

    action = "re-run the erasure (it is idempotent)"


@dataclass(frozen=True)
class Scope:
    """What to erase. Build with the class methods; `user_oid` limits a conversation/meeting scope to one
    user's copy (None: every user's copy in the tenant, and a tenant-wide tombstone)."""

    kind: ScopeKind
    ids: tuple[str, ...] = ()
    user_oid: str | None = None
    cutoff: datetime | None = None  # retention: activities dated before this instant

    @classmethod
    def conversation(cls, *conversation_ids: str, user_oid: str | None = None) -> Scope:
        return cls("conversation", tuple(conversation_ids), user_oid)

    @classmethod
    def message(cls, graph_id: str, user_oid: str | None = None) -> Scope:
        """The conversation a stored message (immutable Graph id) belongs to."""
        return cls("message", (graph_id,), user_oid)

    @classmethod
    def meeting(cls, *event_ids: str, user_oid: str | None = None) -> Scope:
        return cls("meeting", tuple(event_ids), user_oid)

    @classmethod
    def series(cls, *series_master_ids: str, user_oid: str | None = None) -> Scope:
        return cls("series", tuple(series_master_ids), user_oid)

    @classmethod
    def user(cls, user_oid: str) -> Scope:
        return cls("user", (user_oid,), user_oid)

    @classmethod
    def retention(cls, cutoff: datetime) -> Scope:
        return cls("retention", (), None, cutoff)

    @classmethod
    def tenant(cls) -> Scope:
        return cls("tenant")


@dataclass
class ErasureResult:
    tenant_id: str
    scope: str
    ids: dict[str, list[str]]  # conversation_ids / event_ids / series_ids / user_oids (ids only)
    rows: dict[str, int]  # deleted rows per table
    tombstones: int = 0
    bytes_before: int = 0  # the live store's files (tenant file, buckets, WALs) before compaction
    bytes_after: int = 0  # the same after compaction
    snapshot_bytes: int = 0  # the views file and the copies it reads
    exports_removed: int = 0  # files
    files_removed: int = 0  # tenant scope: every file of the tenant
    seconds: float = 0.0
    audit_path: str = ""
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def deleted(self) -> int:
        return sum(self.rows.values())


# ------------------------------------------------------------------------------------------------- audit log
def audit_path(settings: Settings, tenant_id: str, region: str | None = None) -> Path:
    """`<region root>/audit/<tenant>.jsonl`: outside the tenant's folder, so it survives the subscription."""
    if region is None:
        region = tenant_region(settings, tenant_id)
    registry_dir(settings, tenant_id)  # validates the id (it becomes a file name)
    return region_root(settings, region) / "audit" / f"{tenant_id}.jsonl"


def append_audit(path: Path, entry: dict) -> None:
    """One JSON line, appended (O_APPEND: concurrent writers never interleave within a line) and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    new = not path.exists()
    write_synced(path, line, append=True)
    if new:
        fsync_path(path.parent)


def read_audit(settings: Settings, tenant_id: str, region: str | None = None) -> list[dict]:
    path = audit_path(settings, tenant_id, region)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}.wal")) if p.exists())


def _store_bytes(store: Path) -> int:
    """The live store's bytes: the tenant file and every bucket, with their WALs."""
    return sum(_size(path) for path in [store, *bucket_files(store).values()])


# ------------------------------------------------------------------------------------------------ compaction
def compact_store(settings: Settings, tenant_id: str) -> dict[str, float | int]:
    """Rewrite every file of the live store (`compact_live_store`: each bucket, then the tenant file), then
    republish the analysts' snapshot and remove its older generations (`publish(..., purge=True)`: byte copies of
    the compacted files, so the snapshot has none of the old files' dead blocks either). Returns sizes in bytes
    and timings in seconds."""
    t0 = time.perf_counter()
    before, after = compact_live_store(settings, tenant_id)
    t1 = time.perf_counter()
    published = publish(settings, tenant_id, purge=True)
    t2 = time.perf_counter()
    return {
        "bytes_before": before,
        "bytes_after": after,
        "snapshot_bytes": snapshot_bytes(published.path),
        "compact_seconds": round(t1 - t0, 3),
        "publish_seconds": round(t2 - t1, 3),
        "publish_lock_seconds": round(published.lock_seconds, 3),
    }


def compact_live_store(settings: Settings, tenant_id: str, buckets: Iterable[int] | None = None) -> tuple[int, int]:
    """Compact the bucket files `buckets` (None: every bucket), then the tenant file, one file at a time, each under
    the store's exclusive lock (`compact_file`); a bucket that does not exist is skipped. Returns the bytes before
    and after, summed over the files."""
    before = after = 0
    with store_lock(settings, tenant_id, write=False) as store:
        numbers = list(bucket_files(store)) if buckets is None else sorted(set(buckets))
    for number in [*numbers, None]:
        with store_lock(settings, tenant_id, write=True) as store:
            path = store if number is None else bucket_path(store, number)
            if path.exists():
                if number is not None:
                    mark_dirty(path)  # the next publish copies the new file (a publish may have taken the marker)
                b, a = compact_file(path, tenant_id)
                before, after = before + b, after + a
    return before, after


def compact_file(path: Path, tenant_id: str) -> tuple[int, int]:
    """For a caller holding the store's exclusive lock: open the file (replaying any WAL), `COPY FROM DATABASE` into
    `<file>.compact` (DuckDB's default compression: forcing zstd saves 14 % CPU but hides strings from the byte
    greps that prove an erasure; docs/benchmarks.md), close (checkpoint), fsync the copy, remove the old file's WAL
    (its contents are in the copy), `os.replace` the copy over the file, fsync the directory. Deleted rows exist
    only in blocks of the old file, which no longer has a name. Returns the bytes before and after."""
    tmp = path.with_name(path.name + ".compact")
    tmp_wal = Path(f"{tmp}.wal")
    for p in (tmp, tmp_wal):
        p.unlink(missing_ok=True)
    before = _size(path)
    con = duckdb.connect(str(path), config=DUCKDB_CONFIG)
    try:
        con.execute("SET TimeZone='UTC'")
        live = con.execute("SELECT current_database()").fetchall()[0][0]
        con.execute("ATTACH '" + str(tmp).replace("'", "''") + "' AS compacted")
        try:
            con.execute(f'COPY FROM DATABASE "{live}" TO compacted')
            con.execute("CHECKPOINT compacted")
        finally:
            con.execute("DETACH compacted")
    finally:
        con.close()
    if tmp_wal.exists():  # DETACH checkpoints; a WAL here would mean the copy is not self-contained
        raise ErasureError(f"tenant {tenant_id}: compaction left a WAL beside the copy of {path.name}")
    os.chmod(tmp, 0o600)
    fsync_path(tmp)
    Path(f"{path}.wal").unlink(missing_ok=True)  # never let the old file's WAL replay into the new one
    os.replace(tmp, path)
    fsync_path(path.parent)
    return before, _size(path)


def snapshot_bytes(snapshot: Path) -> int:
    """The bytes of the snapshot's files: the views file and every generation's copies."""
    total = 0
    for path in (snapshot, snapshot_parts(snapshot)):
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.exists():
            total += path.stat().st_size
    return total


# ------------------------------------------------------------------------------------------------ pending work
PENDING_FILE = "erasure.pending"


def _pending_path(settings: Settings, tenant_id: str) -> Path:
    return tenant_dir(settings, tenant_id) / PENDING_FILE


def _read_pending(settings: Settings, tenant_id: str) -> set[int] | None:
    """The buckets an erasure changed and has not yet compacted and republished (ids only: bucket numbers); None if
    the record is unreadable (a crash while writing it): then every bucket is compacted."""
    path = _pending_path(settings, tenant_id)
    if not path.exists():
        return set()
    try:
        return {int(n) for n in json.loads(path.read_text())["buckets"]}
    except (ValueError, KeyError, TypeError):
        return None


def _write_pending(settings: Settings, tenant_id: str, buckets: set[int]) -> None:
    path = _pending_path(settings, tenant_id)
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, json.dumps({"buckets": sorted(buckets)}).encode())
    os.replace(tmp, path)
    fsync_path(path.parent)


# ------------------------------------------------------------------------------------------------ selection
def _select(con: duckdb.DuckDBPyConnection, tenant_id: str, scope: Scope, now: datetime) -> dict[str, list[str]]:
    """Fill temp tables `_e(user_oid, graph_id)` (emails) and `_m(user_oid, event_id)` (meetings) with the rows of
    the scope; returns the ids to report/tombstone."""
    con.execute("CREATE OR REPLACE TEMP TABLE _e (user_oid VARCHAR, graph_id VARCHAR)")
    con.execute("CREATE OR REPLACE TEMP TABLE _m (user_oid VARCHAR, event_id VARCHAR)")
    con.execute("CREATE OR REPLACE TEMP TABLE _ids (id VARCHAR)")
    if scope.ids:
        con.executemany("INSERT INTO _ids VALUES (?)", [[i] for i in scope.ids])
    user = [scope.user_oid, scope.user_oid]
    mine = "(?::VARCHAR IS NULL OR user_oid = ?)"

    def take(target: str, source: str, where: str, *params: str) -> None:
        """Into `target` (`_e` or `_m`), the keys of the rows of `source` of this tenant (and the scope's user, if
        any) where `where` holds."""
        key = "graph_id" if target == "_e" else "event_id"
        con.execute(
            f"INSERT INTO {target} SELECT user_oid, {key} FROM {source} WHERE tenant_id = ? AND {mine} AND {where}",
            [tenant_id, *user, *params],
        )

    ids: dict[str, list[str]] = {}
    if scope.kind == "message":
        rows = con.execute(
            f"SELECT DISTINCT conversation_id, internet_message_id, graph_id FROM emails WHERE "
            f"tenant_id = ? AND {mine} AND graph_id IN (SELECT id FROM _ids)",
            [tenant_id, *user],
        ).fetchall()
        if not rows:
            raise LookupError(f"message {scope.ids[0]} is not stored in tenant {tenant_id}")
        convs = sorted({r[0] for r in rows if r[0]})
        loose = sorted({r[2] for r in rows if not r[0]})  # no conversation id: just the message
        con.execute("DELETE FROM _ids")
        if convs:
            con.executemany("INSERT INTO _ids VALUES (?)", [[c] for c in convs])
        take("_e", "emails", "conversation_id IN (SELECT id FROM _ids)")
        for graph_id in loose:
            take("_e", "emails", "graph_id = ?", graph_id)
        ids = {"conversation_ids": convs, "graph_ids": loose}
    elif scope.kind == "conversation":
        take("_e", "emails", "conversation_id IN (SELECT id FROM _ids)")
        ids = {"conversation_ids": sorted(scope.ids)}
    elif scope.kind == "meeting":
        take("_m", "meetings", "event_id IN (SELECT id FROM _ids)")
        ids = {"event_ids": sorted(scope.ids)}
    elif scope.kind == "series":
        take("_m", "meetings", "(series_master_id IN (SELECT id FROM _ids) OR event_id IN (SELECT id FROM _ids))")
        take("_m", "notetaker_queue", "event_id IN (SELECT id FROM _ids)")  # Explicit Consent Mode: under the master
        ids = {"series_ids": sorted(scope.ids)}
    elif scope.kind == "user":
        ids = {"user_oids": [scope.user_oid or ""]}
    elif scope.kind == "retention":
        _select_retention(con, tenant_id, scope.cutoff or now)
        ids = {}
    return ids


# A conversation (meeting series) is exempt from retention while it is linked to a still-open opportunity: any of
# its emails (occurrences) matched the opportunity's account, or a person whose account is that account.
_OPEN_LINKS = """
CREATE OR REPLACE TEMP TABLE _open_crm AS
SELECT account_id AS crm_id FROM crm_opportunities WHERE NOT coalesce(is_closed, false) AND account_id IS NOT NULL
UNION SELECT p.crm_id FROM crm_people p JOIN crm_opportunities o ON o.account_id = p.account_id
WHERE NOT coalesce(o.is_closed, false)
"""


def _select_retention(con: duckdb.DuckDBPyConnection, tenant_id: str, cutoff: datetime) -> None:
    con.execute(_OPEN_LINKS)
    con.execute(
        "INSERT INTO _e SELECT e.user_oid, e.graph_id FROM emails e WHERE e.tenant_id = ? AND "
        "coalesce(e.received_at, e.sent_at, e.imported_at) < ? AND coalesce(e.conversation_id, e.graph_id) NOT IN ("
        " SELECT coalesce(x.conversation_id, x.graph_id) FROM emails x JOIN email_crm_matches c ON "
        " c.tenant_id = x.tenant_id AND c.user_oid = x.user_oid AND c.graph_id = x.graph_id "
        " WHERE x.tenant_id = ? AND c.crm_id IN (SELECT crm_id FROM _open_crm))",
        [tenant_id, cutoff, tenant_id],
    )
    con.execute(
        "INSERT INTO _m SELECT m.user_oid, m.event_id FROM meetings m WHERE m.tenant_id = ? AND "
        "coalesce(m.end_at, m.start_at, m.imported_at) < ? AND coalesce(m.series_master_id, m.event_id) NOT IN ("
        " SELECT coalesce(x.series_master_id, x.event_id) FROM meetings x JOIN meeting_crm_matches c ON "
        " c.tenant_id = x.tenant_id AND c.user_oid = x.user_oid AND c.event_id = x.event_id "
        " WHERE x.tenant_id = ? AND c.crm_id IN (SELECT crm_id FROM _open_crm))",
        [tenant_id, cutoff, tenant_id],
    )


def retention_exempt_counts(con: duckdb.DuckDBPyConnection, tenant_id: str, cutoff: datetime) -> dict[str, int]:
    """How many emails/meetings older than `cutoff` are kept because of an open opportunity (for artifacts)."""
    con.execute(_OPEN_LINKS)
    old_e = con.execute(
        "SELECT count(*) FROM emails WHERE tenant_id = ? AND coalesce(received_at, sent_at, imported_at) < ?",
        [tenant_id, cutoff],
    ).fetchall()[0][0]
    old_m = con.execute(
        "SELECT count(*) FROM meetings WHERE tenant_id = ? AND coalesce(end_at, start_at, imported_at) < ?",
        [tenant_id, cutoff],
    ).fetchall()[0][0]
    return {"emails_older": int(old_e), "meetings_older": int(old_m)}


def _delete_tenant_rows(con: duckdb.DuckDBPyConnection, tenant_id: str, scope: Scope) -> dict[str, int]:
    """The scope's rows in the tenant file: a user's Teams channels and shares; the shares of selected activities."""
    if scope.kind == "user":
        return {
            table: _delete_where(con, tenant_id, table, "user_oid = ?", [scope.user_oid])
            for table in TENANT_USER_TABLES
        }
    where = (
        "(activity_kind = 'email' AND EXISTS (SELECT 1 FROM _e WHERE _e.user_oid = shares.user_oid AND "
        "_e.graph_id = shares.activity_id)) OR (activity_kind = 'meeting' AND EXISTS (SELECT 1 FROM _m WHERE "
        "_m.user_oid = shares.user_oid AND _m.event_id = shares.activity_id))"
    )
    return {"shares": _delete_where(con, tenant_id, "shares", where, [])}


def _delete_bucket_rows(con: duckdb.DuckDBPyConnection, tenant_id: str, scope: Scope) -> dict[str, int]:
    """The scope's rows in the bucket the connection is in (`use_bucket`): all of a user's, or the selected
    activities (`_e`, `_m`) with their child rows."""
    if scope.kind == "user":
        return {
            table: _delete_where(con, tenant_id, table, "user_oid = ?", [scope.user_oid]) for table in BUCKET_TABLES
        }
    rows = {}
    for selected, key, tables in (("_e", "graph_id", EMAIL_TABLES), ("_m", "event_id", MEETING_TABLES)):
        for table in tables:
            where = (
                f"EXISTS (SELECT 1 FROM {selected} s WHERE s.user_oid = {table}.user_oid AND s.{key} = {table}.{key})"
            )
            rows[table] = _delete_where(con, tenant_id, table, where, [])
    return rows


def _delete_where(con: duckdb.DuckDBPyConnection, tenant_id: str, table: str, where: str, params: list) -> int:
    return int(
        con.execute(f"DELETE FROM {table} WHERE tenant_id = ? AND ({where})", [tenant_id, *params]).fetchall()[0][0]
    )


def _selected_users(con: duckdb.DuckDBPyConnection, scope: Scope) -> list[str]:
    """The users whose buckets hold rows of the scope (after `_select`)."""
    if scope.kind == "user":
        return [scope.user_oid or ""]
    return [
        row[0] for row in con.execute("SELECT user_oid FROM _e UNION SELECT user_oid FROM _m ORDER BY 1").fetchall()
    ]


def _by_bucket(con: duckdb.DuckDBPyConnection, store: Path, users: list[str]) -> dict[int, str]:
    """One of `users` per bucket file that holds rows of theirs (`use_bucket` enters a bucket by a user's id; a
    user without a bucket file has no rows there, and none is made for them)."""
    (buckets,) = con.execute("SELECT buckets FROM store_layout").fetchall()[0]
    existing = bucket_files(store)
    found: dict[int, str] = {}
    for user in users:
        if (number := bucket_of(user, buckets)) in existing:
            found.setdefault(number, user)
    return dict(sorted(found.items()))


def _add(total: dict[str, int], rows: dict[str, int]) -> None:
    for table, n in rows.items():
        total[table] = total.get(table, 0) + n


def _tombstone(
    con: duckdb.DuckDBPyConnection, tenant_id: str, scope: Scope, ids: dict[str, list[str]], now: datetime
) -> int:
    """Keys Graph would bring back: never imported again for that user (NULL user: anyone in the tenant)."""
    keys: list[tuple[str, str]] = []
    if scope.kind in ("conversation", "message"):
        keys += [("conversation", c) for c in ids.get("conversation_ids", [])]
        for gid in ids.get("graph_ids", []):  # a message without a conversation id: by internetMessageId
            for (imid,) in con.execute(
                "SELECT DISTINCT internet_message_id FROM emails WHERE tenant_id = ? AND "
                "graph_id = ? AND internet_message_id IS NOT NULL",
                [tenant_id, gid],
            ).fetchall():
                keys.append(("message", imid))
    elif scope.kind == "meeting":
        keys += [("event", e) for e in ids.get("event_ids", [])]
    elif scope.kind == "series":
        keys += [("series", s) for s in ids.get("series_ids", [])]
    n = 0
    for kind, key in keys:
        exists = con.execute(
            "SELECT count(*) FROM erased WHERE tenant_id = ? AND user_oid IS NOT DISTINCT FROM ? "
            "AND kind = ? AND key = ?",
            [tenant_id, scope.user_oid, kind, key],
        ).fetchall()[0][0]
        if not exists:
            con.execute("INSERT INTO erased VALUES (?, ?, ?, ?, ?)", [tenant_id, scope.user_oid, kind, key, now])
            n += 1
    return n


def _remove_exports(settings: Settings, tenant_id: str) -> int:
    folder = tenant_dir(settings, tenant_id) / "exports"
    if not folder.exists():
        return 0
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder)
    return files


def _require_match(con: duckdb.DuckDBPyConnection, tenant_id: str, scope: Scope) -> None:
    """NothingMatched unless every id of a conversation/message/meeting/series scope is stored, or was erased
    before (re-running an erasure whose compaction failed must complete it)."""
    kind, sql = _STORED[scope.kind]
    mine = "(?::VARCHAR IS NULL OR user_oid = ?)"
    unmatched = []
    for key in scope.ids:
        params = [tenant_id, key, scope.user_oid, scope.user_oid] * sql.count("SELECT 1")  # per SELECT of the query
        if (
            not con.execute(sql.format(mine=mine), params).fetchall()
            and not con.execute(
                "SELECT 1 FROM erased WHERE tenant_id = ? AND user_oid IS NOT DISTINCT FROM ? AND kind = ? AND key = ?",
                [tenant_id, scope.user_oid, kind, key],
            ).fetchall()
        ):
            unmatched.append(key)
    if unmatched:
        raise NothingMatched(_nothing_matched(tenant_id, scope, unmatched))


def _nothing_matched(tenant_id: str, scope: Scope, ids: list[str]) -> str:
    whose = f" of user {scope.user_oid}" if scope.user_oid else ""
    return (
        f"nothing matched: no {scope.kind} {', '.join(ids)}{whose} is stored in tenant {tenant_id}; nothing was "
        f"changed (check the id, e.g. with o365sync sql --tenant {tenant_id})"
    )


def _check(actor: str, reason: str) -> None:
    if not _ACTOR.fullmatch(actor or ""):
        raise ValueError("actor must be an id (letters, digits, . _ : @ / + -; max 128), e.g. cli:alice")
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}")


# ------------------------------------------------------------------------------------------------ entry point
def erase(
    settings: Settings, tenant_id: str, scope: Scope, actor: str, reason: str, now: datetime | None = None
) -> ErasureResult:
    """Erase `scope` from every file we keep for the tenant; complete when this returns (see the module doc).
    Idempotent: erasing what was erased before deletes nothing and still compacts, republishes and audits; a
    conversation, message, meeting or series id that was never stored raises NothingMatched (nothing changed)."""
    _check(actor, reason)
    if scope.kind == "tenant":
        return _erase_tenant(settings, tenant_id, actor, reason, now)
    load_tenant(settings, tenant_id)  # TenantNotFound before touching anything
    selective = scope.kind in _STORED
    if selective and not store_path(settings, tenant_id).exists():
        raise NothingMatched(_nothing_matched(tenant_id, scope, list(scope.ids)))
    now = now or datetime.now(UTC)
    t0 = time.perf_counter()
    log = audit_path(settings, tenant_id)
    with tenant_sync_locks(tenant_dir(settings, tenant_id), FEATURE_LOCKS):
        with open_store(settings, tenant_id, write=True) as con:
            with transaction(con):  # step 1: the tenant file
                if selective:
                    _require_match(con, tenant_id, scope)
                ids = _select(con, tenant_id, scope, now)
                tombstones = _tombstone(con, tenant_id, scope, ids, now)
                rows = _delete_tenant_rows(con, tenant_id, scope)
            result = ErasureResult(tenant_id, scope.kind, ids, rows, tombstones, audit_path=str(log))
            try:
                buckets = _by_bucket(con, store_path(settings, tenant_id), _selected_users(con, scope))
                pending = _read_pending(settings, tenant_id)
                if pending is not None and not set(buckets) <= pending:  # unreadable: every bucket is pending
                    _write_pending(settings, tenant_id, pending | set(buckets))
                for user in buckets.values():  # step 2: each bucket holding rows of the scope
                    with use_bucket(con, user), transaction(con):
                        _add(rows, _delete_bucket_rows(con, tenant_id, scope))
            except Exception as exc:
                raise _unfinished(result, actor, reason, now, t0, exc) from None
        if scope.kind == "retention" and scope.cutoff:
            result.extra["cutoff_epoch"] = int(scope.cutoff.timestamp())
        if scope.user_oid and scope.kind != "user":
            result.ids["user_oids"] = [scope.user_oid]
        if scope.kind == "user":
            result.extra |= _forget_user(settings, tenant_id, scope.user_oid or "")
        try:
            t1 = time.perf_counter()
            # Retention rewrites every bucket: its daily pass also removes the bytes of rows the syncs replaced or
            # removed (docs/DATA_LIFECYCLE.md). Any other scope rewrites only the buckets it (or an erasure that
            # did not finish) changed.
            compact = None if pending is None or scope.kind == "retention" else pending | set(buckets)
            result.bytes_before = _store_bytes(store_path(settings, tenant_id))
            compact_live_store(settings, tenant_id, compact)
            result.bytes_after = _store_bytes(store_path(settings, tenant_id))
            t2 = time.perf_counter()
            published = publish(settings, tenant_id, purge=True)
            with export_lock(settings, tenant_id, exclusive=True):  # in-flight exports finish, then go
                result.exports_removed = _remove_exports(settings, tenant_id)
            _pending_path(settings, tenant_id).unlink(missing_ok=True)
        except Exception as exc:
            raise _unfinished(result, actor, reason, now, t0, exc) from None
        result.snapshot_bytes = snapshot_bytes(published.path)
        result.extra |= {"compact_ms": round(1000 * (t2 - t1)), "publish_ms": round(1000 * (time.perf_counter() - t2))}
        result.seconds = round(time.perf_counter() - t0, 3)
        append_audit(log, _audit_entry(result, actor, reason, now, result.seconds))
    return result


def _unfinished(
    result: ErasureResult, actor: str, reason: str, now: datetime, t0: float, exc: Exception
) -> ErasureError:
    """After the tenant file's transaction committed: an audit line saying the erasure is not complete, and the
    error telling a person to run it again (which finishes it; see the module doc)."""
    entry = _audit_entry(result, actor, reason, now, time.perf_counter() - t0)
    append_audit(Path(result.audit_path), {**entry, "complete": False, "error": type(exc).__name__})
    return ErasureError(
        f"tenant {result.tenant_id}: {result.scope} rows deleted, but {type(exc).__name__} before the compaction "
        "finished; run the erasure again"
    )


def _forget_user(settings: Settings, tenant_id: str, user_oid: str) -> dict[str, int]:
    """Tokens (MSAL cache + metadata) and the user's own settings in the tenant's configuration."""
    from o365sync.auth import token_path

    had_token = int(token_path(settings, tenant_id, user_oid).exists())
    disconnect(settings, tenant_id, user_oid)
    tenant = load_tenant(settings, tenant_id)
    changed = tenant.user_preferences.pop(user_oid, None) is not None
    changed |= tenant.user_blocklists.pop(user_oid, None) is not None
    if changed:
        save_tenant(settings, tenant)
    return {"token_caches_removed": had_token, "user_settings_removed": int(changed)}


def _audit_entry(result: ErasureResult, actor: str, reason: str, now: datetime, seconds: float) -> dict:
    d = asdict(result)
    return {
        "at": now.isoformat(timespec="seconds"),
        "logged_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "actor": actor,
        "action": "erase",
        "reason": reason,
        "tenant_id": result.tenant_id,
        "scope": result.scope,
        "ids": d["ids"],
        "rows": d["rows"],
        "tombstones": result.tombstones,
        "bytes_before": result.bytes_before,
        "bytes_after": result.bytes_after,
        "snapshot_bytes": result.snapshot_bytes,
        "exports_removed": result.exports_removed,
        "files_removed": result.files_removed,
        "seconds": round(seconds, 3),
        **result.extra,
        "complete": True,
    }


def store_row_counts(store: Path) -> dict[str, int]:
    """Rows per table in a live store: its tenant file and every bucket file beside it (summed per table)."""
    counts: dict[str, int] = {}
    for path in [store, *bucket_files(store).values()] if store.exists() else []:
        con = duckdb.connect(str(path), read_only=True)
        try:
            tables = [
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1"
                ).fetchall()
            ]
            _add(counts, {t: int(con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0]) for t in tables})
        finally:
            con.close()
    return counts


def _erase_tenant(settings: Settings, tenant_id: str, actor: str, reason: str, now: datetime | None) -> ErasureResult:
    """Subscription end: every file of the tenant — store (tenant file and buckets), snapshot (views file and every
    generation), exports, CRM snapshot (in the store), CRM credentials, token caches, locks, the registry entry — is
    removed; only the audit log entry remains."""
    now = now or datetime.now(UTC)
    t0 = time.perf_counter()
    region = tenant_region(settings, tenant_id)
    log = audit_path(settings, tenant_id, region)
    folder, registry, snapshot = (
        tenant_dir(settings, tenant_id),
        registry_dir(settings, tenant_id),
        snapshot_files(settings, tenant_id),
    )
    users = [u.oid for u in connected_users(settings, tenant_id)] if folder.exists() else []
    with (
        tenant_sync_locks(folder, FEATURE_LOCKS),
        export_lock(settings, tenant_id, exclusive=True),
        store_lock(settings, tenant_id, write=True) as live,
    ):
        rows = {t: n for t, n in store_row_counts(live).items() if n}
        before = _store_bytes(live)
        for oid in users:
            disconnect(settings, tenant_id, oid)
        files = 0
        for path in (*snapshot, folder, registry):
            if path.is_dir():
                files += sum(1 for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
            elif path.exists():
                files += 1
                path.unlink()
    result = ErasureResult(
        tenant_id,
        "tenant",
        {"user_oids": sorted(users)},
        rows,
        bytes_before=before,
        files_removed=files,
        audit_path=str(log),
    )
    result.seconds = round(time.perf_counter() - t0, 3)
    append_audit(log, _audit_entry(result, actor, reason, now, result.seconds))
    return result
