"""Benchmark: the tenant's live store as one DuckDB file (the layout before issue 14) against the same rows split
into one file per user (per user x month, or users hashed into buckets: the layout the product adopted) — erasure
of a user or of a conversation, publish after a sync of one mailbox, the sync's write, the analysts' queries, files
and bytes (issue 14: the design step for P6/P7). Every layout here, the one file included, is built and run by this
bench (the product's own partitioned store is measured by bench/publish.py).

    uv run --group bench python bench/store_layout.py [--sizes 1000000] [--new 1000] [--reps 3] [--query-reps 2]
        [--users 50] [--layouts user,user_month] [--body-words 300] [--keep DIR] [--json out.json] [--quick]

For each size N the one-file store is built by bench/compaction.py's generator (85 % emails with ~2.7 KB bodies,
15 % meetings, `--users` users interleaved through the file, a CRM snapshot) and the tenant registered. Its six
activity tables are then split, through a Parquet staging export partitioned by (user, month), into the partitioned
layouts of `--layouts`:

- **user**: `parts/<user>.duckdb`, one file per user;
- **user_month**: `parts/<user>/<yyyy-mm>.duckdb`, one file per user and month of the activity (emails by
  received/sent date, meetings by start);
- **bucket<B>**: users hashed into B files, `parts/b<k>.duckdb` (a user's erasure then rewrites its bucket
  instead of unlinking a file);

each next to a small *tenant file* (the product's `store.duckdb` path: CRM snapshot, sync state, tombstones...).
Every partition file has the product's schema (`migrate`), so the product's write functions run on it unchanged.
A partitioned layout's analysts' snapshot is one *views file* at the product's snapshot path (a byte copy of the
tenant file whose activity tables are replaced by views over `read_duckdb([...])` of byte copies of the partition
files, generation-named, plus the product's analyst views) — one file an analyst opens as today.

Measured in one run, for each layout: files and bytes (live and snapshot); three analyst queries through the
`activities` view (results checked equal across layouts); `--reps` rounds of a sync of one mailbox (`--new`
activities through `write_mail_batch` + `write_meeting_batch`) followed by a publish — for one file the byte copy of
the whole file that the product's `publish` made before the buckets, for the others the copy of the changed
partitions + a new views file; a reader holding an old views file while a publish replaces a partition, and the
generation GC that waits for it; the erasure of one user — for one file its old path (delete + whole-file
compaction + byte-copy publish), for the others unlink (a bucket: delete + compaction of it) + tenant-file
delete/compaction + republish; the erasure of a conversation that spans three mailboxes on the
partitioned layouts (its find, delete + compaction of the partitions holding it, republish). Prints tables with
ratios against the one file and the <= 10 s target (P6).
docs/benchmarks.md ("Store layout for P6/P7 (issue 14): one file vs partitions") records four 1M runs.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
from compaction import (
    ACTIVITY_TABLES,
    ONE_FILE_MIGRATIONS,
    TENANT,
    add_store_options,
    build,
    for_each_size,
    mb,
    one_file_store,
    print_report,
)
from import_vs_dlt import parse_with_quick
from publish import compact_file

from o365sync.erasure import USER_TABLES
from o365sync.settings import Settings
from o365sync.store import (
    MEETING_COLUMNS,
    CalendarCursor,
    FolderCursor,
    MailBatch,
    MeetingBatch,
    flock_file,
    fsync_path,
    migrate,
    snapshot_path,
    store_lock,
    store_path,
    transaction,
    write_mail_batch,
    write_meeting_batch,
)
from o365sync.store.views import create_views
from o365sync.tenants import TenantConfig, save_tenant, tenant_dir

PARTITIONED = ACTIVITY_TABLES  # the tables whose rows a layout splits by user (and month)
EMAIL_MONTH = "strftime(coalesce(received_at, sent_at, imported_at), '%Y-%m')"
MEETING_MONTH = "strftime(coalesce(start_at, imported_at), '%Y-%m')"
P6_TARGET_S = 10.0
SYNCED_USER, ERASED_USER, TIMELINE_USER = "user7", "user2", "user3"
CONVERSATION = "conv1001"  # emails 3003-3005: users 3, 4 and 5 (the generator gives email i to user i % --users)
QUERIES = {
    "count by month": "SELECT date_trunc('month', occurred_at) AS month, kind, count(*) FROM activities "
    "GROUP BY ALL ORDER BY ALL",
    "top 10 accounts": "SELECT crm_account_name, count(*) AS n FROM activities WHERE crm_account_name IS NOT NULL "
    "GROUP BY 1 ORDER BY n DESC, 1 LIMIT 10",
    "one user's timeline": f"SELECT occurred_at, kind, activity_id, subject, primary_crm_name FROM activities "
    f"WHERE user_oid = '{TIMELINE_USER}' ORDER BY occurred_at, activity_id",
}
_READER = """import duckdb, sys
con = duckdb.connect(sys.argv[1], read_only=True)
for _ in range(2):
    print(con.execute("SELECT count(*) FROM emails WHERE user_oid = ?", [sys.argv[2]]).fetchall()[0][0], flush=True)
    sys.stdin.readline()
"""


def quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def file_identity(path: Path) -> tuple[int, int, int]:
    """What tells a partition changed since its last copy: a write (checkpoint) changes its mtime or size, a
    compaction its inode."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def copy_synced(src: Path, dst: Path) -> int:
    """A private byte copy (`copy_file_range` via shutil on Linux) fsynced; returns its bytes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)
    fsync_path(dst)
    return dst.stat().st_size


@dataclass
class Layout:
    """A partitioned layout of the tenant: its tenant file is `store_path(settings, TENANT)`, its partitions live
    under `tenant_dir/parts`, their snapshot copies (generation-named) under `<analytics>/<tenant>/`, and the views
    file at the product's snapshot path (also hard-linked as `views.g<N>.duckdb`, which readers' locks pin)."""

    name: str
    settings: Settings
    by_month: bool = False
    buckets: int = 0  # > 0: users hashed into this many files (a user's erasure rewrites its bucket)
    gen: int = 0
    copied: dict[Path, tuple[int, int, int]] = field(default_factory=dict)  # live partition -> identity copied
    current: dict[Path, Path] = field(default_factory=dict)  # live partition -> its snapshot copy now
    views_of: dict[int, set[Path]] = field(default_factory=dict)  # generation -> snapshot copies its views read

    @property
    def live(self) -> Path:
        return tenant_dir(self.settings, TENANT) / "parts"

    @property
    def views(self) -> Path:
        return snapshot_path(self.settings, TENANT)

    @property
    def snap(self) -> Path:
        return self.views.with_suffix("")

    @classmethod
    def named(cls, name: str, root: Path) -> Layout:
        """`user`, `user_month` or `bucket<B>` (users hashed into B files), its data under `root`/name."""
        buckets = int(name[len("bucket") :]) if re.fullmatch(r"bucket[1-9]\d*", name) else 0
        if name not in ("user", "user_month") and not buckets:
            raise ValueError(f"unknown layout {name} (known: user, user_month, bucket<B>)")
        return cls(name, Settings(data_dir=root / name), by_month=name == "user_month", buckets=buckets)

    def part(self, user: str, month: str) -> Path:
        if self.buckets:
            return self.live / f"b{int(hashlib.sha256(user.encode()).hexdigest(), 16) % self.buckets:04d}.duckdb"
        return self.live / user / f"{month}.duckdb" if self.by_month else self.live / f"{user}.duckdb"

    def parts(self, user: str = "*") -> list[Path]:
        return sorted(self.live.glob(f"{user}/*.duckdb" if self.by_month else f"{user}.duckdb"))

    def user_snapshots(self, user: str) -> list[Path]:
        """The snapshot copies of the user's own files (none in a bucket layout: a bucket holds other users too)."""
        if self.buckets:
            return []
        return sorted(self.snap.glob(f"{user}/*.duckdb" if self.by_month else f"{user}.g*.duckdb"))


# ----------------------------------------------------------------------------------------------- building
def stage(one_file: Path, staging: Path) -> None:
    """Export the activity tables once to Parquet partitioned by (`_u` user, `_m` month); child rows take their
    activity's month."""
    staging.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(one_file), read_only=True, config={"memory_limit": "2GB", "threads": 2})
    try:
        months = {"emails": EMAIL_MONTH, "meetings": MEETING_MONTH}
        for table in PARTITIONED:
            parent, key = ("emails", "graph_id") if table.startswith("email") else ("meetings", "event_id")
            source = (
                f"SELECT *, user_oid AS _u, {months[table]} AS _m FROM {table}"
                if table == parent
                else f"SELECT c.*, c.user_oid AS _u, p._m FROM {table} c JOIN (SELECT user_oid, {key}, "
                f"{months[parent]} AS _m FROM {parent}) p ON p.user_oid = c.user_oid AND p.{key} = c.{key}"
            )
            con.execute(f"COPY ({source}) TO {quoted(staging / table)} (FORMAT parquet, PARTITION_BY (_u, _m))")
    finally:
        con.close()


def open_partition(path: Path) -> duckdb.DuckDBPyConnection:
    """A partition opened for writing, with the one file's schema (the caller holds its flock)."""
    con = duckdb.connect(str(path), config={"memory_limit": "1GB", "threads": 2})
    con.execute("SET TimeZone='UTC'")
    migrate(con, f"the partition {path}", ONE_FILE_MIGRATIONS)
    return con


def ingest(layout: Layout, staging: Path, one_file: Path) -> None:
    """Create the layout's partition files from the staging export, and its tenant file (every other table)."""
    keys = sorted({(d.parent.name[3:], d.name[3:]) for t in PARTITIONED for d in (staging / t).glob("_u=*/_m=*")})
    by_part: dict[Path, list[tuple[str, str]]] = {}
    for user, month in keys:
        by_part.setdefault(layout.part(user, month), []).append((user, month))
    for path, members in by_part.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        con = open_partition(path)
        try:
            for table in PARTITIONED:
                files = [f for u, m in members for f in sorted((staging / table / f"_u={u}" / f"_m={m}").glob("*"))]
                if files:
                    listed = "[" + ", ".join(quoted(f) for f in files) + "]"
                    con.execute(f"INSERT INTO {table} SELECT * FROM read_parquet({listed}, hive_partitioning=false)")
        finally:
            con.close()
    with one_file_store(layout.settings) as con:
        con.execute(f"ATTACH {quoted(one_file)} AS one (READ_ONLY)")
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'one' AND schema_name = 'main'"
            ).fetchall()
        ]
        for table in tables:
            if table not in (*PARTITIONED, "schema_version"):
                con.execute(f"INSERT INTO {table} SELECT * FROM one.{table}")
        con.execute("DETACH one")


# ----------------------------------------------------------------------------------------------- publishing
def publish_layout(layout: Layout) -> dict[str, float]:
    """Copy the partitions changed since their last copy (each under its own shared flock) into new
    generation-named files, then a views file (a copy of the tenant file, its activity tables replaced by views
    over `read_duckdb` of the current copies, plus the analysts' views), renamed over the snapshot path."""
    t0 = time.perf_counter()
    with flock_file(tenant_dir(layout.settings, TENANT) / "publish.lock", exclusive=True):
        gen = layout.gen + 1
        copied_bytes = copied = 0
        lock_max = 0.0
        alive = set(layout.parts())
        for gone in set(layout.current) - alive:  # erased partitions: their copies leave the views
            del layout.current[gone]
            layout.copied.pop(gone, None)
        for part in sorted(alive):
            with flock_file(Path(f"{part}.lock"), exclusive=False):
                ident = file_identity(part)
                if layout.copied.get(part) == ident:
                    continue
                assert not Path(f"{part}.wal").exists(), f"{part}: a writer left a WAL"
                rel = part.relative_to(layout.live)
                dst = layout.snap / rel.parent / f"{rel.stem}.g{gen}.duckdb"
                t = time.perf_counter()
                copied_bytes += copy_synced(part, dst)
                lock_max = max(lock_max, time.perf_counter() - t)
                copied += 1
            layout.copied[part], layout.current[part] = ident, dst
        tmp = layout.views.with_name(layout.views.name + ".tmp")
        tmp.unlink(missing_ok=True)
        with store_lock(layout.settings, TENANT, write=False) as tenant_file:
            t = time.perf_counter()
            copied_bytes += copy_synced(tenant_file, tmp)
            lock_max = max(lock_max, time.perf_counter() - t)
        files = "[" + ", ".join(quoted(p) for p in sorted(layout.current.values())) + "]"
        con = duckdb.connect(str(tmp))
        try:
            con.execute("SET TimeZone='UTC'")
            for table in PARTITIONED:
                con.execute(f"DROP TABLE {table}")
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_duckdb({files}, table_name = '{table}')")
            create_views(con, tenant_id=TENANT)
        finally:
            con.close()
        fsync_path(tmp)
        pinned = layout.snap / f"views.g{gen}.duckdb"
        pinned.parent.mkdir(parents=True, exist_ok=True)
        os.link(tmp, pinned)  # the same inode: a reader's lock on the snapshot path is a lock on this name
        os.replace(tmp, layout.views)
        fsync_path(layout.views.parent)
        fsync_path(layout.snap)
        layout.gen = gen
        layout.views_of[gen] = set(layout.current.values())
    return {"s": time.perf_counter() - t0, "lock_s": lock_max, "bytes": copied_bytes, "files": copied}


def publish_one_file(settings: Settings) -> dict[str, float]:
    """The one file's publish as the product made it before the buckets: under the store's shared flock a byte copy
    of the file, then the analysts' views, fsync, rename over the snapshot path."""
    t0 = time.perf_counter()
    target = snapshot_path(settings, TENANT)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with store_lock(settings, TENANT, write=False) as live:
        t = time.perf_counter()
        copied = copy_synced(live, tmp)
        lock_s = time.perf_counter() - t
    con = duckdb.connect(str(tmp))
    try:
        con.execute("SET TimeZone='UTC'")
        create_views(con, tenant_id=TENANT)
    finally:
        con.close()
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)
    return {"s": time.perf_counter() - t0, "lock_s": lock_s, "bytes": copied, "files": 1}


def delete_user_rows(settings: Settings, user: str) -> None:
    """DELETE the user's rows from a one-file (or tenant) store, in one transaction."""
    with one_file_store(settings) as con, transaction(con):
        for table in USER_TABLES:
            con.execute(f"DELETE FROM {table} WHERE tenant_id = ? AND user_oid = ?", [TENANT, user])


def compact_tenant_file(settings: Settings) -> None:
    """The whole-file compaction (`COPY FROM DATABASE` into a new file renamed over it) under the exclusive flock."""
    with store_lock(settings, TENANT, write=True) as path:
        compact_file(path)


def in_use(views_file: Path) -> bool:
    """Whether a process holds `views_file` open in DuckDB (its read-only connection keeps a shared fcntl lock on
    the file; an exclusive probe then fails). Only meaningful from a process that does not itself hold it."""
    fd = os.open(views_file, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


def collect_garbage(layout: Layout) -> dict[str, int]:
    """Remove the views files of past generations nobody holds, then every snapshot copy no kept generation reads."""
    kept = {layout.gen}
    for gen in sorted(set(layout.views_of) - {layout.gen}):
        pinned = layout.snap / f"views.g{gen}.duckdb"
        if in_use(pinned):
            kept.add(gen)
        else:
            pinned.unlink()
            del layout.views_of[gen]
    needed = set().union(*(layout.views_of[g] for g in kept))
    removed = 0
    for copy in layout.snap.rglob("*.g*.duckdb"):
        if not copy.name.startswith("views.") and copy not in needed:
            copy.unlink()
            removed += 1
    return {"kept_generations": len(kept), "removed_files": removed}


# ----------------------------------------------------------------------------------------------- the workloads
def mailbox_batches(user: str, new: int, tag: str) -> tuple[MailBatch, MeetingBatch]:
    """One mailbox's sync: `new` activities (85 % emails with participants and matches, 15 % meetings with
    attendees and matches), dated now, as the product's sync hands them to the store."""
    rnd = random.Random(tag)
    words = [f"w{i}" for i in range(2000)]
    now = datetime.now(UTC)
    n_emails = int(new * 0.85)
    ids = [f"{tag}-{user}-{i}" for i in range(n_emails)]
    emails = pl.DataFrame(
        {
            "graph_id": ids,
            "folder": ["inbox"] * n_emails,
            "internet_message_id": [f"<{g}@mail.example.com>" for g in ids],
            "conversation_id": [f"{tag}-conv{i // 3}" for i in range(n_emails)],
            "subject": [" ".join(rnd.choices(words, k=6)) for _ in ids],
            "body_text": [" ".join(rnd.choices(words, k=300)) for _ in ids],
            "from_name": [f"Person {i}" for i in range(n_emails)],
            "from_address": [f"person{i}@company{i % 20}.com" for i in range(n_emails)],
            "received_at": [now] * n_emails,
            "sent_at": [now] * n_emails,
            "has_attachments": [False] * n_emails,
            "web_link": [f"https://outlook.office365.com/owa/?ItemID={g}" for g in ids],
        }
    )
    participants = pl.DataFrame(
        {
            "graph_id": [g for g in ids for _ in range(4)],
            "role": ["from", "to", "to", "cc"] * n_emails,
            "name": ["Name"] * (4 * n_emails),
            "address": [f"someone{rnd.randrange(100000)}@example.com" for _ in range(4 * n_emails)],
        }
    )
    matches = pl.DataFrame(
        {
            "graph_id": ids,
            "crm_id": [f"per{i}" for i in range(n_emails)],
            "crm_kind": ["contact"] * n_emails,
            "matched_address": emails["from_address"],
            "is_primary": [True] * n_emails,
        }
    )
    mail = MailBatch(emails, participants, matches, {"inbox": FolderCursor(scan_start=now - timedelta(days=365))})
    n_meetings = new - n_emails
    events = [f"{tag}-{user}-ev{i}" for i in range(n_meetings)]
    meetings = pl.DataFrame(
        {c: [None] * n_meetings for c in MEETING_COLUMNS},
        schema={c: pl.Datetime("us", "UTC") if c in ("start_at", "end_at") else pl.String for c in MEETING_COLUMNS}
        | {"is_all_day": pl.Boolean, "is_online": pl.Boolean, "is_internal": pl.Boolean},
    ).with_columns(
        event_id=pl.Series(events, dtype=pl.String),
        event_type=pl.lit("singleInstance"),
        subject=pl.lit("New meeting"),
        start_at=pl.lit(now),
        end_at=pl.lit(now + timedelta(minutes=30)),
        organizer_address=pl.lit("person1@company1.com"),
    )
    attendees = pl.DataFrame(
        {
            "event_id": [e for e in events for _ in range(5)],
            "role": ["to"] * (5 * n_meetings),
            "name": ["Name"] * (5 * n_meetings),
            "address": [f"someone{rnd.randrange(100000)}@example.com" for _ in range(5 * n_meetings)],
            "response": ["accepted"] * (5 * n_meetings),
        }
    )
    meeting_matches = pl.DataFrame({"event_id": events}, schema={"event_id": pl.String}).with_columns(
        crm_id=pl.lit("per1"),
        crm_kind=pl.lit("contact"),
        matched_address=pl.lit("person1@company1.com"),
        is_primary=pl.lit(True),
    )
    calendar = MeetingBatch(
        meetings, attendees, meeting_matches, set(), set(), CalendarCursor(now - timedelta(days=30), now)
    )
    return mail, calendar


def write_batches(con: duckdb.DuckDBPyConnection, user: str, batches: tuple[MailBatch, MeetingBatch]) -> None:
    write_mail_batch(con, TENANT, user, batches[0])
    write_meeting_batch(con, TENANT, user, batches[1])


def sync_one_file(settings: Settings, user: str, batches: tuple[MailBatch, MeetingBatch]) -> float:
    """The one file's path: open the store, write the mailbox's batches, close (checkpoint)."""
    t = time.perf_counter()
    with one_file_store(settings) as con:
        write_batches(con, user, batches)
    return time.perf_counter() - t


def sync_partition(layout: Layout, user: str, batches: tuple[MailBatch, MeetingBatch]) -> float:
    """The same batches into the user's partition (this month's, for the month layout), under its flock."""
    t = time.perf_counter()
    path = layout.part(user, datetime.now(UTC).strftime("%Y-%m"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with flock_file(Path(f"{path}.lock"), exclusive=True):
        con = open_partition(path)
        try:
            write_batches(con, user, batches)
        finally:
            con.close()
    return time.perf_counter() - t


def analyst_queries(views_file: Path, reps: int) -> tuple[dict[str, float], dict[str, object]]:
    """Each query in a fresh read-only connection to the snapshot (open included), the median of `reps`; returns
    the times and the results (to compare layouts)."""
    times, results = {}, {}
    for name, sql in QUERIES.items():
        runs = []
        for _ in range(reps):
            t = time.perf_counter()
            con = duckdb.connect(str(views_file), read_only=True, config={"memory_limit": "1GB", "threads": 2})
            try:
                con.execute("SET TimeZone='UTC'")
                rows = con.execute(sql).fetchall()
            finally:
                con.close()
            runs.append(time.perf_counter() - t)
        times[name], results[name] = statistics.median(runs), rows
    return times, results


def layout_bytes(paths: list[Path]) -> tuple[int, int]:
    files = [p for p in paths if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def footprint(settings: Settings, layout: Layout | None) -> dict[str, int]:
    if layout is None:
        live_n, live_b = layout_bytes([store_path(settings, TENANT)])
        snap_n, snap_b = layout_bytes([snapshot_path(settings, TENANT)])
    else:
        live_n, live_b = layout_bytes([store_path(layout.settings, TENANT), *layout.parts()])
        snap_n, snap_b = layout_bytes([layout.views, *layout.current.values()])
    return {"live_files": live_n, "live_bytes": live_b, "snapshot_files": snap_n, "snapshot_bytes": snap_b}


def reader_keeps_snapshot(layout: Layout, new: int) -> dict[str, object]:
    """A reader (another process) holds the views file open while a sync + publish replaces the synced user's
    partition; the GC must keep what the reader's generation reads, and the reader keeps seeing its snapshot."""
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(layout.views), SYNCED_USER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None and reader.stdout is not None
    before = int(reader.stdout.readline())
    sync_partition(layout, SYNCED_USER, mailbox_batches(SYNCED_USER, new, f"{layout.name}-reader"))
    publish_layout(layout)
    while_held = collect_garbage(layout)
    reader.stdin.write("\n")
    reader.stdin.flush()
    again = int(reader.stdout.readline())
    reader.stdin.write("\n")
    reader.stdin.close()
    reader.wait(timeout=60)
    t = time.perf_counter()
    after_close = collect_garbage(layout)
    gc_s = time.perf_counter() - t
    con = duckdb.connect(str(layout.views), read_only=True)
    try:
        now_seen = con.execute(f"SELECT count(*) FROM emails WHERE user_oid = '{SYNCED_USER}'").fetchall()[0][0]
    finally:
        con.close()
    assert again == before and now_seen == before + int(new * 0.85), (before, again, now_seen)
    return {
        "reader_rows_before": before,
        "reader_rows_after_publish": again,
        "new_snapshot_rows": now_seen,
        "gc_while_held": while_held,
        "gc_after_close": after_close,
        "gc_s": gc_s,
    }


def delete_and_compact(part: Path, deletes: list[tuple[str, list[str]]]) -> int:
    """Under the partition's exclusive flock: the DELETEs in one transaction, then the compaction that drops their
    bytes from the file; returns the rows deleted."""
    with flock_file(Path(f"{part}.lock"), exclusive=True):
        con = open_partition(part)
        try:
            with transaction(con):
                rows = sum(int(con.execute(sql, params).fetchall()[0][0]) for sql, params in deletes)
        finally:
            con.close()
        compact_file(part)
    return rows


def erase_user_partitioned(layout: Layout, user: str) -> dict[str, float]:
    """Unlink the user's partitions (each under its exclusive flock) — in a bucket layout, delete the user's rows
    from its bucket and compact it instead —, delete the user's rows from the tenant file and compact it (the
    whole-file compaction), republish, and unlink every snapshot copy of the user's partitions (all
    generations: erased rows do not wait for readers) or the bucket's superseded copies."""
    t0 = time.perf_counter()
    if layout.buckets:
        parts = [layout.part(user, "")]
        superseded = {layout.current[parts[0]]}
        delete_and_compact(
            parts[0], [(f"DELETE FROM {t} WHERE tenant_id = ? AND user_oid = ?", [TENANT, user]) for t in USER_TABLES]
        )
    else:
        parts, superseded = layout.parts(user), set()
        for part in parts:
            with flock_file(Path(f"{part}.lock"), exclusive=True):
                part.unlink()
                Path(f"{part}.wal").unlink(missing_ok=True)
    t1 = time.perf_counter()
    delete_user_rows(layout.settings, user)
    t2 = time.perf_counter()
    compact_tenant_file(layout.settings)
    t3 = time.perf_counter()
    published = publish_layout(layout)
    for copy in [*layout.user_snapshots(user), *superseded]:
        copy.unlink()
    for gen_files in layout.views_of.values():
        gen_files.difference_update([c for c in gen_files if not c.exists()])
    t4 = time.perf_counter()
    return {
        "partitions": len(parts),
        "partition_s": t1 - t0,
        "delete_s": t2 - t1,
        "compact_s": t3 - t2,
        "publish_s": published["s"],
        "total_s": t4 - t0,
    }


def erase_conversation_partitioned(layout: Layout, conversation: str) -> dict[str, float]:
    """Find the partitions holding the conversation (the current snapshot for partitions unchanged since their
    copy, the live file for the others), delete its rows there and compact each (under its exclusive flock),
    republish, and unlink the superseded copies of those partitions."""
    t0 = time.perf_counter()
    con = duckdb.connect(str(layout.views), read_only=True)
    try:
        found = con.execute(
            f"SELECT DISTINCT user_oid, {EMAIL_MONTH} FROM emails WHERE conversation_id = ?", [conversation]
        ).fetchall()
    finally:
        con.close()
    holding = {layout.part(u, m) for u, m in found}
    for part in layout.parts():
        if layout.copied.get(part) != file_identity(part):  # changed since its copy: look in the live file
            with flock_file(Path(f"{part}.lock"), exclusive=False):
                live = duckdb.connect(str(part), read_only=True)
                try:
                    if live.execute("SELECT 1 FROM emails WHERE conversation_id = ?", [conversation]).fetchall():
                        holding.add(part)
                finally:
                    live.close()
    t1 = time.perf_counter()
    mine = "graph_id IN (SELECT graph_id FROM emails WHERE conversation_id = ?)"  # emails go last
    deletes = [(f"DELETE FROM {t} WHERE {mine}", [conversation]) for t in ("email_participants", "email_crm_matches")]
    deletes.append(("DELETE FROM emails WHERE conversation_id = ?", [conversation]))
    rows = sum(delete_and_compact(part, deletes) for part in sorted(holding))
    t2 = time.perf_counter()
    superseded = {layout.current[p] for p in holding}
    published = publish_layout(layout)
    for copy in superseded:
        copy.unlink()
    for gen_files in layout.views_of.values():
        gen_files.difference_update(superseded)
    t3 = time.perf_counter()
    return {
        "partitions": len(holding),
        "rows": rows,
        "find_s": t1 - t0,
        "delete_compact_s": t2 - t1,
        "publish_s": published["s"],
        "total_s": t3 - t0,
        "compacted_bytes": sum(p.stat().st_size for p in holding),
    }


def count_in_snapshot(views_file: Path, where: str) -> int:
    """Email rows (with their participants and matches) in the snapshot whose email satisfies `where`."""
    con = duckdb.connect(str(views_file), read_only=True)
    try:
        con.execute(f"CREATE TEMP TABLE _chosen AS SELECT user_oid, graph_id FROM emails WHERE {where}")
        return sum(
            con.execute(
                f"SELECT count(*) FROM {t} WHERE (user_oid, graph_id) IN (SELECT (user_oid, graph_id) FROM _chosen)"
            ).fetchall()[0][0]
            for t in PARTITIONED[:3]
        )
    finally:
        con.close()


# ----------------------------------------------------------------------------------------------- one size
def run(n: int, args: argparse.Namespace, root: Path) -> dict:
    new, reps, query_reps = args.new, args.reps, args.query_reps
    shutil.rmtree(root / f"n{n}", ignore_errors=True)
    one = Settings(data_dir=root / f"n{n}" / "one_file")
    layouts = [Layout.named(name, root / f"n{n}") for name in args.layouts.split(",")]
    for s in (one, *(lay.settings for lay in layouts)):
        save_tenant(s, TenantConfig(id=TENANT, domains=["company0.com"]))
    t = time.perf_counter()
    counts = build(one, n, args.body_words, users=args.users, split=False)
    one_file = store_path(one, TENANT)
    print(f"  built {n:,} activities in {time.perf_counter() - t:.1f} s, {mb(one_file.stat().st_size)} MB", flush=True)
    first = publish_one_file(one)
    staging = root / f"n{n}" / "staging"
    t = time.perf_counter()
    stage(one_file, staging)
    split: dict[str, float] = {"stage_s": time.perf_counter() - t}
    full_publish = {"one_file": first["s"]}
    for lay in layouts:
        t = time.perf_counter()
        ingest(lay, staging, one_file)
        split[f"{lay.name}_ingest_s"] = time.perf_counter() - t
        full_publish[lay.name] = publish_layout(lay)["s"]
    shutil.rmtree(staging)
    print(f"  split: {split}; first publish: {full_publish}", flush=True)

    sizes = {"one_file": footprint(one, None)} | {lay.name: footprint(one, lay) for lay in layouts}
    queries, answers = {}, {}
    for name, views in [("one_file", snapshot_path(one, TENANT)), *((lay.name, lay.views) for lay in layouts)]:
        queries[name], answers[name] = analyst_queries(views, query_reps)
        print(f"  analyst queries {name}: {queries[name]}", flush=True)
    same = all(answers[name] == answers["one_file"] for name in answers)
    assert same, "a layout's snapshot answers differently from the one file's"

    writes: dict[str, list[float]] = {"one_file": []} | {lay.name: [] for lay in layouts}
    publishes: dict[str, list[dict[str, float]]] = {name: [] for name in writes}
    for i in range(reps):
        batches = mailbox_batches(SYNCED_USER, new, f"sync{i}")
        writes["one_file"].append(sync_one_file(one, SYNCED_USER, batches))
        publishes["one_file"].append(publish_one_file(one))
        for lay in layouts:
            writes[lay.name].append(sync_partition(lay, SYNCED_USER, batches))
            publishes[lay.name].append(publish_layout(lay))
            collect_garbage(lay)
    print(f"  sync of one mailbox s: {writes}", flush=True)
    print(f"  publish after it: {publishes}", flush=True)
    readers = {lay.name: reader_keeps_snapshot(lay, new) for lay in layouts}
    print(f"  reader during a publish: {readers}", flush=True)

    erased = {}
    rows_before = count_in_snapshot(snapshot_path(one, TENANT), f"user_oid = '{ERASED_USER}'")
    t, cpu = time.perf_counter(), time.process_time()
    delete_user_rows(one, ERASED_USER)
    t1 = time.perf_counter()
    compact_tenant_file(one)
    t2 = time.perf_counter()
    published = publish_one_file(one)
    erased["one_file"] = {
        "total_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - cpu,
        "compact_s": t2 - t1,
        "publish_s": published["s"],
        "partitions": 1,
    }
    for lay in layouts:
        cpu = time.process_time()
        erased[lay.name] = erase_user_partitioned(lay, ERASED_USER) | {"cpu_s": 0.0}
        erased[lay.name]["cpu_s"] = time.process_time() - cpu
        assert count_in_snapshot(lay.views, f"user_oid = '{ERASED_USER}'") == 0
        assert not lay.parts(ERASED_USER) and not lay.user_snapshots(ERASED_USER)
    assert count_in_snapshot(snapshot_path(one, TENANT), f"user_oid = '{ERASED_USER}'") == 0
    print(f"  erasure of {ERASED_USER} ({rows_before:,} email rows): {erased}", flush=True)
    conversations = {}
    for lay in layouts:
        conversation_rows = count_in_snapshot(lay.views, f"conversation_id = '{CONVERSATION}'")
        conversations[lay.name] = erase_conversation_partitioned(lay, CONVERSATION)
        assert conversations[lay.name]["rows"] == conversation_rows > 0
        assert count_in_snapshot(lay.views, f"conversation_id = '{CONVERSATION}'") == 0
    print(f"  erasure of {CONVERSATION}: {conversations}", flush=True)
    return {
        "n": n,
        "users": args.users,
        "rows": sum(counts.values()),
        "split": split,
        "full_publish_s": full_publish,
        "sizes": sizes,
        "queries": queries,
        "answers_equal": same,
        "sync_s": {k: statistics.median(v) for k, v in writes.items()},
        "sync_runs": writes,
        "publish": {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in publishes.items()},
        "publish_runs": publishes,
        "reader": readers,
        "erased_user_email_rows": rows_before,
        "erase_user": erased,
        "erase_conversation": conversations,
        "load_avg": os.getloadavg(),
    }


# ----------------------------------------------------------------------------------------------- report
LAYOUTS = ("user", "user_month")  # the default comparison; `bucket<B>` can be added


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def table_row(label: str, values: dict[str, float], fmt: str = "{:.2f}") -> str:
    """One measure for the layouts (`values` in column order, the one file first), with each partitioned layout's
    ratio to the one file."""
    cells = [fmt.format(values["one_file"])]
    for name in list(values)[1:]:
        cells += [fmt.format(values[name]), ratio(values[name], values["one_file"])]
    return f"| {label} | " + " | ".join(cells) + " |"


def report(rows: list[dict], new: int) -> list[str]:
    lines: list[str] = []
    for r in rows:
        parted = [k for k in r["erase_user"] if k != "one_file"]
        columns = ("one_file", *parted)
        lines += [
            f"N = {r['n']:,} activities ({r['rows']:,} rows) of {r['users']} users; layouts: one_file = the "
            "store.duckdb before issue 14's buckets; user = one file per user + tenant file; user_month = one file "
            "per user and month + tenant file; bucket<B> = users hashed into B files + tenant file. Ratios: "
            f"layout / one_file. Load average (1 min) at the end: {r['load_avg'][0]:.1f}.",
            "",
            "| measure | one_file | " + " | ".join(f"{k} | {k} / one_file" for k in parted) + " |",
            "|---|--:|" + "--:|--:|" * len(parted),
        ]

        e = r["erase_user"]
        lines.append(table_row("**erasure of one user, s** (target <= 10 s)", {k: e[k]["total_s"] for k in columns}))
        lines.append(
            table_row("- its compaction s (tenant file only, partitioned)", {k: e[k]["compact_s"] for k in columns})
        )
        lines.append(table_row("- its publish s", {k: e[k]["publish_s"] for k in columns}))
        lines.append(table_row("- its CPU s (this process)", {k: e[k]["cpu_s"] for k in columns}))
        lines.append(table_row(f"sync of one mailbox ({new:,} activities) s", r["sync_s"]))
        lines.append(table_row("publish after it s", {k: r["publish"][k]["s"] for k in columns}))
        lines.append(
            table_row(
                "- live lock held s (longest file copy)", {k: r["publish"][k]["lock_s"] for k in columns}, "{:.3f}"
            )
        )
        lines.append(table_row("- MB copied", {k: r["publish"][k]["bytes"] / 1e6 for k in columns}, "{:,.1f}"))
        lines.append(table_row("first (full) publish s", r["full_publish_s"]))
        for q in QUERIES:
            lines.append(
                table_row(f"analyst query '{q}' s (open + query)", {k: r["queries"][k][q] for k in columns}, "{:.3f}")
            )
        for key, label, fmt in (
            ("live_files", "live files", "{:,.0f}"),
            ("live_bytes", "live MB", "{:,.1f}"),
            ("snapshot_files", "snapshot files", "{:,.0f}"),
            ("snapshot_bytes", "snapshot MB", "{:,.1f}"),
        ):
            scale = 1e6 if key.endswith("bytes") else 1
            lines.append(table_row(label, {k: r["sizes"][k][key] / scale for k in columns}, fmt))
        c = r["erase_conversation"]
        lines += [
            "",
            f"Erasure of a conversation spanning 3 mailboxes ({CONVERSATION}) on the partitioned layouts (on one_file "
            "it is the same whole-file compaction + publish as the user's erasure above):",
            "",
            "| layout | partitions rewritten | MB rewritten | find s | delete + compaction s | publish s | total s |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for name in parted:
            x = c[name]
            lines.append(
                f"| {name} | {x['partitions']} | {x['compacted_bytes'] / 1e6:,.1f} | {x['find_s']:.2f} | "
                f"{x['delete_compact_s']:.2f} | {x['publish_s']:.2f} | {x['total_s']:.2f} |"
            )
        lines += ["", "A reader holding the views file open while a sync + publish replaced the synced partition:", ""]
        for name in parted:
            x = r["reader"][name]
            lines.append(
                f"- {name}: the reader saw {x['reader_rows_before']:,} rows before and "
                f"{x['reader_rows_after_publish']:,} after the publish (its generation; the new snapshot: "
                f"{x['new_snapshot_rows']:,}); GC while held "
                f"kept {x['gc_while_held']['kept_generations']} generations, removed "
                f"{x['gc_while_held']['removed_files']} files; after the reader closed: kept "
                f"{x['gc_after_close']['kept_generations']}, removed {x['gc_after_close']['removed_files']} "
                f"({x['gc_s']:.3f} s)"
            )
        best = min(e[k]["total_s"] for k in parted)
        lines += [
            "",
            f"- P6 (erasure of one user <= {P6_TARGET_S:.0f} s): one_file {e['one_file']['total_s']:.1f} s "
            f"({'met' if e['one_file']['total_s'] <= P6_TARGET_S else 'not met'}; its whole-file compaction took "
            f"{e['one_file']['compact_s']:.1f} s of it); partitioned best {best:.2f} s "
            f"({'met' if best <= P6_TARGET_S else 'not met'}).",
            f"- Split of the one file into the layouts: staging export {r['split']['stage_s']:.1f} s, ingest "
            + ", ".join(f"{k} {r['split'][f'{k}_ingest_s']:.1f} s" for k in parted)
            + f"; the snapshots answered the analyst queries identically: {'yes' if r['answers_equal'] else 'NO'}.",
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000")
    ap.add_argument("--new", type=int, default=1000, help="activities of the one-mailbox sync before a publish")
    ap.add_argument("--reps", type=int, default=3, help="sync + publish rounds")
    ap.add_argument("--query-reps", type=int, default=2, help="runs of each analyst query (median)")
    ap.add_argument("--users", type=int, default=50, help="mailboxes the activities are spread over (>= 8)")
    ap.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help="partitioned layouts to compare: user, user_month, bucket<B> (users hashed into B files)",
    )
    add_store_options(ap)
    args = parse_with_quick(ap, argv, sizes="20000", reps=1, query_reps=1, new=200)
    for name in args.layouts.split(","):
        try:
            Layout.named(name, Path("."))
        except ValueError as exc:
            ap.error(str(exc))
    if args.users < 8:
        ap.error("--users must be at least 8 (the bench syncs user7)")
    rows = for_each_size(
        args,
        "o365sync-bench-store-layout-",
        lambda n, root: run(n, args, root),
    )
    return print_report(args, rows, report(rows, args.new))


if __name__ == "__main__":
    sys.exit(main())
