"""The analysts' read-only copy of a tenant's store (analysts never open the live files), published in proportion to
what changed (issue 14, P7; docs/benchmarks.md, "Store layout for P6/P7", "Publishing and snapshots that change
under readers").

The live store is a tenant file plus users' bucket files (`o365sync.store.partitions`). A publish makes generation
N of the snapshot in a private folder beside it, `<region>/analytics/<tenant>.parts/`:

- under the live store's *shared* flock (no writer is in any file, so their bytes are consistent databases) it
  byte-copies (`copy_file_range`, about 1 GB/s, against 20-30 MB/s for a DuckDB rewrite) each bucket changed since
  its last copy — the ones with a `.dirty` marker (a writer makes it before it opens the bucket for writing), or
  with no copy in the current generation — to `b<k>.g<N>.duckdb`, and the small tenant file to `<snapshot>.tmp`;
- with the flock released, it brings the new copies to the latest bucket schema and turns the tenant copy into
  the *views file*: each bucket table becomes a view `read_duckdb([<this generation's copies>], table_name=...)`
  (absolute paths), the analysts' views and `snapshot_info` are added, and the file is fsynced, hard-linked as
  `views.g<N>.duckdb` (with `views.g<N>.json` naming its copies) and renamed over the snapshot path, which is
  the one file analysts open, as before.

So a sync waits at most for the copy of the files that changed, and the snapshot holds exactly the live rows of
the moment of the copy. A bucket's marker is renamed `.dirty.publishing` when it is copied and removed only once
the snapshot that holds the copy is in place, so a publish that fails never loses a change (the next one copies
the bucket again). Publishes of one tenant queue on `publish.lock` in the tenant's folder. A publish that raises
removes what it wrote; one whose process is killed leaves files the next publish removes before it starts; either
way the previous snapshot stays readable.

Readers keep the generation they opened: DuckDB holds a shared fcntl lock on the views file it opened, and after
each publish the garbage collection removes only older generations nobody holds (probed with a non-blocking
exclusive lock; a generation this process has open counts as held, since a probe here would drop its lock) and
the copies no kept generation names. An erasure publishes with `purge=True`, which removes every older
generation, held or not: deleted is gone from disk, and a reader of an old generation gets an error instead of
erased rows. The paths inside the views are absolute: a tenant moved to another region must republish.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from o365sync.settings import Settings
from o365sync.store.locks import flock_file, fsync_path, open_store, store_lock, store_path, write_synced
from o365sync.store.partitions import DUCKDB_CONFIG, bucket_files, dirty_marker
from o365sync.store.schema import BUCKET_MIGRATIONS, BUCKET_TABLES, PARTITIONED_VERSION, migrate, stored_version
from o365sync.store.views import create_views
from o365sync.tenants import tenant_dir

_GENERATION_FILE = re.compile(r"^(?:views|b\d+)\.g(\d+)\.(?:duckdb|duckdb\.wal|json)$")
_MANIFEST_FILE = re.compile(r"^views\.g(\d+)\.json$")


def snapshot_path(settings: Settings, tenant_id: str) -> Path:
    """The analysts' views file, in `<region root>/analytics/` (all of a tenant's files stay in its region)."""
    folder = tenant_dir(settings, tenant_id)
    return folder.parent.parent / "analytics" / f"{folder.name}.duckdb"


def snapshot_parts(snapshot: Path) -> Path:
    """The private folder beside the views file with every generation's copies of the live files."""
    return snapshot.with_name(snapshot.name.removesuffix(".duckdb") + ".parts")


def snapshot_leftovers(snapshot: Path) -> list[Path]:
    """The files a publish writes beside the snapshot before its rename (left behind if it died midway)."""
    tmp = snapshot.with_name(snapshot.name + ".tmp")
    return [tmp, Path(f"{tmp}.wal")]


def snapshot_files(settings: Settings, tenant_id: str) -> list[Path]:
    """Every path of the tenant's published snapshot: the views file, a dead publish's leftovers and the folder of
    copies (what removing a tenant removes; some may not exist)."""
    snapshot = snapshot_path(settings, tenant_id)
    return [snapshot, *snapshot_leftovers(snapshot), snapshot_parts(snapshot)]


@dataclass(frozen=True)
class Published:
    """What one publish did: the views file's path, its generation, how long the live store's lock was held (the
    copies) and the whole publish took, the bytes copied and which live files were copied."""

    path: Path
    lock_seconds: float
    seconds: float
    bytes_copied: int
    generation: int
    copied_files: tuple[Path, ...]  # the live files copied: the tenant file and the buckets that changed


@dataclass(frozen=True)
class _Generation:
    """A published generation as its manifest records it: the copy (file name in the parts folder) of each bucket,
    which live file (device, inode) each copy was made from, and the bucket schema version they were brought to."""

    number: int
    copies: dict[int, str]
    sources: dict[int, tuple[int, int]]
    bucket_version: int

    def files(self) -> set[str]:
        return {f"views.g{self.number}.duckdb", f"views.g{self.number}.json", *self.copies.values()}


@dataclass
class _Round:
    """One attempt at publishing generation `number` (started over when a live file is replaced meanwhile)."""

    number: int
    parts: Path
    copies: dict[int, str]  # bucket -> its copy's name in `parts` (made now, or carried from the last generation)
    new_copies: list[Path]
    sources: dict[Path, tuple[int, int] | None]  # every live file and its identity at the copy
    bucket_sources: dict[int, tuple[int, int] | None]  # the same, by bucket number
    copied_files: list[Path]
    bytes_copied: int
    lock_seconds: float


class _NotPartitioned(Exception):
    """The live tenant file predates the buckets (no writer opened it since the upgrade): split it first."""


def publish_snapshot(settings: Settings, tenant_id: str) -> Path:
    """Replace the analysts' snapshot with a copy of the live store (see the module doc); returns its path."""
    return publish(settings, tenant_id).path


def publish(settings: Settings, tenant_id: str, purge: bool = False) -> Published:
    """`publish_snapshot`, with what it did. `purge`: afterwards remove every older generation even if a reader
    holds it (an erasure: the erased rows' old copies must be gone from disk)."""
    t0 = time.perf_counter()
    if not store_path(settings, tenant_id).exists():
        _create_store(settings, tenant_id)
    with flock_file(tenant_dir(settings, tenant_id) / "publish.lock", exclusive=True):
        while True:
            target = snapshot_path(settings, tenant_id)
            parts = snapshot_parts(target)
            _private_folder(parts)
            current = _current_generation(target)
            _remove_leftovers(target, current)
            round_ = _copy_live_files(settings, tenant_id, target, current)
            tmp = snapshot_leftovers(target)[0]
            try:
                _finish(tmp, tenant_id, round_)
                _write_manifest(parts, round_)
                os.link(tmp, parts / f"views.g{round_.number}.duckdb")
            except _NotPartitioned:
                _drop_round(target, round_)
                _create_store(settings, tenant_id)  # a writer's open splits the store
                continue
            except BaseException:
                _drop_round(target, round_)  # copies of the live rows: not left lying around
                raise
            # Rename only if every live file is still the one copied: a compaction (erasure), a move to another
            # region or the end of the subscription replaced or removed one meanwhile, and the copies may hold
            # rows that are gone. Then they are dropped and the publish starts over (or ends, without a store).
            with store_lock(settings, tenant_id, write=False):
                if snapshot_path(settings, tenant_id) == target and _unchanged(round_.sources):
                    os.replace(tmp, target)
                    fsync_path(target.parent)
                    fsync_path(parts)
                    for copied in round_.copied_files:
                        _publishing_marker(copied).unlink(missing_ok=True)
                    break
            _drop_round(target, round_)
            if not store_path(settings, tenant_id).exists():
                raise FileNotFoundError(f"tenant {tenant_id} has no store any more; no snapshot was published")
        _collect_garbage(parts, round_.number, purge)
    return Published(
        target,
        round_.lock_seconds,
        time.perf_counter() - t0,
        round_.bytes_copied,
        round_.number,
        tuple(round_.copied_files),
    )


def _copy_live_files(settings: Settings, tenant_id: str, target: Path, current: _Generation | None) -> _Round:
    """Under the live store's shared flock: copy the changed buckets into generation N's files and the tenant file
    into `<snapshot>.tmp`; returns what was copied and every live file's identity."""
    parts = snapshot_parts(target)
    number = _next_generation(parts)
    with store_lock(settings, tenant_id, write=False) as live:
        t = time.perf_counter()
        buckets = bucket_files(live)
        sources = _live_files(live)
        round_ = _Round(number, parts, {}, [], sources, {k: sources[path] for k, path in buckets.items()}, [], 0, 0.0)
        try:
            for bucket, path in buckets.items():
                previous = _unchanged_copy(parts, current, bucket, path, round_.bucket_sources[bucket])
                if previous is not None:
                    round_.copies[bucket] = previous
                    continue
                if dirty_marker(path).exists():
                    os.replace(dirty_marker(path), _publishing_marker(path))  # a writer from now on makes a new one
                copy = parts / f"b{bucket}.g{number}.duckdb"
                round_.new_copies.append(copy)
                round_.bytes_copied += _copy_with_wal(path, copy)
                round_.copies[bucket] = copy.name
                round_.copied_files.append(path)
            round_.bytes_copied += _copy_with_wal(live, snapshot_leftovers(target)[0])
            round_.copied_files.append(live)
        except BaseException:
            _drop_round(target, round_)  # a disk that filled up midway: no partial copies left behind
            raise
        round_.lock_seconds = time.perf_counter() - t
    return round_


def _unchanged_copy(
    parts: Path, current: _Generation | None, bucket: int, path: Path, identity: tuple[int, int] | None
) -> str | None:
    """The current generation's copy of bucket `bucket` (live file `path`) if it still is the live content: made at
    today's bucket schema, from the same file (a compaction replaces it), and no marker since (a writer marks a
    bucket before it writes; a publish that failed after copying it left the marker `.publishing`)."""
    if current is None or current.bucket_version != len(BUCKET_MIGRATIONS):
        return None
    copy = current.copies.get(bucket)
    if copy is None or current.sources.get(bucket) != identity or not (parts / copy).exists():
        return None
    if dirty_marker(path).exists() or _publishing_marker(path).exists():
        return None
    return copy


def _copy_with_wal(src: Path, dst: Path) -> int:
    """`src` (and its WAL, if a writer died before its checkpoint: DuckDB replays it when the copy is opened)."""
    copied = _copy_private(src, dst)
    if Path(f"{src}.wal").exists():
        copied += _copy_private(Path(f"{src}.wal"), Path(f"{dst}.wal"))
    return copied


def _publishing_marker(path: Path) -> Path:
    """A bucket's `.dirty` marker once a publish copied it: removed when that publish's snapshot is in place."""
    return Path(f"{dirty_marker(path)}.publishing")


def _live_files(store: Path) -> dict[Path, tuple[int, int] | None]:
    return {path: _file_identity(path) for path in (store, *bucket_files(store).values())}


def _unchanged(sources: dict[Path, tuple[int, int] | None]) -> bool:
    """Whether every live file copied from is still there, the same file (a bucket made since is not in this
    generation, as it was not at the copy: the next publish copies it)."""
    return all(_file_identity(path) == identity for path, identity in sources.items())


def _file_identity(path: Path) -> tuple[int, int] | None:
    """Which file `path` names (device, inode): a sync writes into the same file; a compaction or a move replaces
    it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _create_store(settings: Settings, tenant_id: str) -> None:
    """Open the live store for writing once: a tenant without a store gets the schema's empty tables (what its
    snapshot then shows); a store from before the buckets is split."""
    with open_store(settings, tenant_id, write=True):
        pass


def _private_folder(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _copy_private(src: Path, dst: Path) -> int:
    """Copy `src` into a new private (0600) file `dst` inside the kernel (`copy_file_range`); returns the bytes."""
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(src, "rb") as f:
            size, done = os.fstat(f.fileno()).st_size, 0
            while done < size:
                n = os.copy_file_range(f.fileno(), fd_out, size - done)
                if n == 0:
                    break
                done += n
    finally:
        os.close(fd_out)
    return done


def _sql_string(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _finish(tmp: Path, tenant_id: str, round_: _Round) -> None:
    """Bring the new bucket copies to the latest bucket schema, then make the tenant copy the views file: migrated,
    each bucket table a view over this generation's copies, the analysts' views and `snapshot_info`; checkpointed
    (DuckDB merges any WAL into the file on close) and fsynced."""
    for copy in round_.new_copies:
        con = duckdb.connect(str(copy), config=DUCKDB_CONFIG)
        try:
            migrate(con, f"the snapshot copy {copy}", BUCKET_MIGRATIONS)
        finally:
            con.close()
        _no_wal_left(copy)
        fsync_path(copy)
    con = duckdb.connect(str(tmp), config=DUCKDB_CONFIG)
    try:
        con.execute("SET TimeZone='UTC'")
        version = stored_version(con)
        if version is not None and version < PARTITIONED_VERSION:
            raise _NotPartitioned(str(tmp))
        migrate(con, f"the snapshot copy {tmp}")
        _bucket_views(con, [round_.parts / name for name in round_.copies.values()])
        create_views(con, tenant_id=tenant_id, generation=round_.number)
    finally:
        con.close()
    _no_wal_left(tmp)
    fsync_path(tmp)


def _bucket_views(con: duckdb.DuckDBPyConnection, copies: list[Path]) -> None:
    """Each bucket table as a view over the copies (absolute paths: a view over `read_duckdb` persists, one over an
    ATTACHed file would not); with no buckets, the bucket schema's empty tables."""
    if not copies:
        for statements in BUCKET_MIGRATIONS:
            con.execute(statements)
        return
    files = "[" + ", ".join(_sql_string(copy.absolute()) for copy in sorted(copies)) + "]"
    for table in BUCKET_TABLES:
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_duckdb({files}, table_name = '{table}')")


def _no_wal_left(path: Path) -> None:
    if Path(f"{path}.wal").exists():
        raise RuntimeError(f"{path}: DuckDB left a WAL after its checkpoint; the snapshot was not replaced")


def _write_manifest(parts: Path, round_: _Round) -> None:
    manifest = {
        "copies": {str(k): v for k, v in round_.copies.items()},
        "sources": {str(k): round_.bucket_sources[k] for k in round_.copies},
        "bucket_version": len(BUCKET_MIGRATIONS),
    }
    write_synced(parts / f"views.g{round_.number}.json", json.dumps(manifest, sort_keys=True).encode())


def _read_generation(parts: Path, number: int) -> _Generation | None:
    try:
        manifest = json.loads((parts / f"views.g{number}.json").read_text())
        copies = {int(k): str(v) for k, v in manifest["copies"].items()}
        sources = {int(k): (int(v[0]), int(v[1])) for k, v in manifest["sources"].items() if v}
        return _Generation(number, copies, sources, int(manifest["bucket_version"]))
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return None  # none, or cut short by a publish that died: as if that generation had no manifest


def _generations(parts: Path) -> list[int]:
    """The generations whose manifest exists, oldest first."""
    if not parts.is_dir():
        return []
    found = (_MANIFEST_FILE.match(p.name) for p in parts.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _current_generation(target: Path) -> _Generation | None:
    """The generation the snapshot path names (its views file is that generation's hard link); None for a tenant
    never published, or a snapshot from before generations."""
    snapshot = _file_identity(target)
    parts = snapshot_parts(target)
    for number in reversed(_generations(parts)):
        if snapshot is not None and _file_identity(parts / f"views.g{number}.duckdb") == snapshot:
            return _read_generation(parts, number)
    return None


def _next_generation(parts: Path) -> int:
    numbers = [int(m.group(1)) for m in (_GENERATION_FILE.match(p.name) for p in parts.iterdir()) if m]
    return max(numbers, default=0) + 1


def _remove_leftovers(target: Path, current: _Generation | None) -> None:
    """What a publish that died left: its `.tmp` copy and every file of a generation after the current one."""
    for leftover in snapshot_leftovers(target):
        leftover.unlink(missing_ok=True)
    if current is None:
        return  # nothing to go by: the garbage collection after this publish removes what nobody holds
    for path in snapshot_parts(target).iterdir():
        found = _GENERATION_FILE.match(path.name)
        if found and int(found.group(1)) > current.number:
            path.unlink()


def _drop_round(target: Path, round_: _Round) -> None:
    parts = snapshot_parts(target)
    for path in (
        *snapshot_leftovers(target),
        *round_.new_copies,
        *(Path(f"{c}.wal") for c in round_.new_copies),
        parts / f"views.g{round_.number}.json",
        parts / f"views.g{round_.number}.duckdb",
    ):
        path.unlink(missing_ok=True)


def _collect_garbage(parts: Path, current: int, purge: bool) -> None:
    """Remove the older generations nobody holds (every one with `purge`) and every file no kept generation names."""
    kept: set[str] = set()
    for number in _generations(parts):
        views = parts / f"views.g{number}.duckdb"
        if number == current or (not purge and number < current and _is_held(views)):
            generation = _read_generation(parts, number)
            kept |= generation.files() if generation else set()
    for path in parts.iterdir():
        if path.name not in kept:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    fsync_path(parts)


def _is_held(views: Path) -> bool:
    """Whether a reader has the views file open: this process (a probe here would drop its DuckDB's fcntl lock,
    since POSIX locks belong to the process), or another one (its DuckDB holds a shared fcntl lock)."""
    try:
        identity = _file_identity(views)
        if identity is None:
            return False
        if identity in _open_by_this_process():
            return True
        with _opened(views) as fd:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return True
                raise
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_by_this_process() -> set[tuple[int, int]]:
    """(device, inode) of every file this process has open (Linux: `/proc/self/fd`)."""
    found: set[tuple[int, int]] = set()
    folder = Path("/proc/self/fd")
    if not folder.is_dir():
        return found
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            st = entry.stat()
            found.add((st.st_dev, st.st_ino))
    return found
