"""The analysts' read-only copy of a tenant's store (analysts never open the live file).

Publishing is a byte copy of the live file, not a DuckDB rewrite: under the live store's *shared* lock (no writer is
in the file, so its bytes are a consistent database) the file (and a WAL, if a crashed writer left one) is copied
into `<snapshot>.tmp` with `copy_file_range` — about 1 GB/s here, against 20-30 MB/s for `COPY FROM DATABASE`, which
decompresses and recompresses every string (docs/benchmarks.md, "Publishing the analysts' snapshot (issue 14)").
The lock is released at once; the views and `snapshot_info` are then added to the copy, which is fsynced and
renamed over the snapshot. So a sync waits at most for the copy of the file, and the snapshot holds exactly the
live store's rows (the copy is the live file) plus the views.

The copy carries whatever the live file carries, including the bytes of rows that DuckDB's DELETE left behind;
an erasure therefore compacts the live store first (`o365sync.erasure.compact_store`) and publishes after it, so
the new snapshot is a copy of a file without them. Publishes of one tenant queue on `publish.lock` in the
tenant's folder. A publish that fails leaves the previous snapshot in place: one that raises removes its copy, one
whose process is killed leaves its `.tmp` files, which the next publish removes before it starts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from o365sync.settings import Settings
from o365sync.store.locks import flock_file, fsync_path, open_store, store_lock, store_path
from o365sync.store.schema import migrate
from o365sync.store.views import create_views
from o365sync.tenants import tenant_dir


def snapshot_path(settings: Settings, tenant_id: str) -> Path:
    """The analysts' read-only copy, in `<region root>/analytics/` (all of a tenant's files stay in its region)."""
    folder = tenant_dir(settings, tenant_id)
    return folder.parent.parent / "analytics" / f"{folder.name}.duckdb"


def snapshot_leftovers(snapshot: Path) -> list[Path]:
    """The files a publish writes beside the snapshot before its rename (left behind if it died midway)."""
    tmp = snapshot.with_name(snapshot.name + ".tmp")
    return [tmp, Path(f"{tmp}.wal")]


@dataclass(frozen=True)
class Published:
    """What one publish did: the snapshot's path, how long the live store's lock was held (the copy) and the
    whole publish took, and the bytes copied."""

    path: Path
    lock_seconds: float
    seconds: float
    bytes_copied: int


def publish_snapshot(settings: Settings, tenant_id: str) -> Path:
    """Replace the analysts' snapshot with a copy of the live store (see the module doc); returns its path."""
    return publish(settings, tenant_id).path


def publish(settings: Settings, tenant_id: str) -> Published:
    """`publish_snapshot`, with its timings (for the benchmarks and the erasure's audit)."""
    t0 = time.perf_counter()
    if not store_path(settings, tenant_id).exists():
        _create_store(settings, tenant_id)
    with flock_file(tenant_dir(settings, tenant_id) / "publish.lock", exclusive=True):
        while True:
            target = snapshot_path(settings, tenant_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp, tmp_wal = snapshot_leftovers(target)
            for leftover in (tmp, tmp_wal):
                leftover.unlink(missing_ok=True)
            with store_lock(settings, tenant_id, write=False) as live:
                t1 = time.perf_counter()
                copied_from = _file_identity(live)
                copied = _copy_private(live, tmp)
                if Path(f"{live}.wal").exists():  # a writer died before its checkpoint: the copy replays it
                    copied += _copy_private(Path(f"{live}.wal"), tmp_wal)
                lock_seconds = time.perf_counter() - t1
            try:
                _finish(tmp, tenant_id)
            except BaseException:
                for leftover in (tmp, tmp_wal):  # a copy of the live rows: not left lying around
                    leftover.unlink(missing_ok=True)
                raise
            # Rename only if the live file is still the one copied: a compaction (erasure), a move to another
            # region or the end of the subscription replaced or removed it meanwhile, and the copy may hold rows
            # that are gone. Then the copy is dropped and the publish starts over (or ends, without a store).
            with store_lock(settings, tenant_id, write=False) as live:
                if snapshot_path(settings, tenant_id) == target and _file_identity(live) == copied_from:
                    os.replace(tmp, target)
                    fsync_path(target.parent)
                    return Published(target, lock_seconds, time.perf_counter() - t0, copied)
            for leftover in (tmp, tmp_wal):
                leftover.unlink(missing_ok=True)
            if not store_path(settings, tenant_id).exists():
                raise FileNotFoundError(f"tenant {tenant_id} has no store any more; no snapshot was published")


def _file_identity(path: Path) -> tuple[int, int] | None:
    """Which file `path` names (device, inode): a sync writes into the same file; a compaction or a move replaces
    it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _create_store(settings: Settings, tenant_id: str) -> None:
    """A tenant without a store yet gets the schema's empty tables (what its snapshot then shows)."""
    with open_store(settings, tenant_id, write=True):
        pass


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


def _finish(tmp: Path, tenant_id: str) -> None:
    """Bring the copy to the current schema (a no-op unless the live store predates it), add the analysts' views
    and `snapshot_info`, checkpoint (DuckDB merges any WAL into the file on close) and fsync it."""
    con = duckdb.connect(str(tmp), config={"memory_limit": "1GB", "threads": 2})
    try:
        con.execute("SET TimeZone='UTC'")
        migrate(con, f"the snapshot copy {tmp}")
        create_views(con, tenant_id=tenant_id)
    finally:
        con.close()
    if Path(f"{tmp}.wal").exists():
        raise RuntimeError(f"{tmp}: DuckDB left a WAL after its checkpoint; the snapshot was not replaced")
    fsync_path(tmp)
