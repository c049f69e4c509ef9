"""Opening a tenant's store: the flocks taken before DuckDB opens the file (DuckDB locks a file all-or-nothing
across processes and has no lock timeout, so concurrent flows queue on ours instead of failing), the per-feature
sync locks, and fsync. Opening for writing applies the missing schema migrations."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import duckdb

from o365sync.settings import Settings
from o365sync.store.partitions import connect
from o365sync.tenants import STORE_FILE, tenant_dir


def store_path(settings: Settings, tenant_id: str) -> Path:
    return tenant_dir(settings, tenant_id) / STORE_FILE


@contextlib.contextmanager
def open_store(
    settings: Settings, tenant_id: str, write: bool, at: Path | None = None, user_oid: str | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The one way to open a tenant's live store (its tenant file and users' buckets as one connection:
    `o365sync.store.partitions`). Blocks (no polling) until the flock is granted; if the tenant's files moved to
    another region meanwhile (`o365sync tenant move` holds the lock while it moves them), it follows them. Only
    writers create files: a reader of a tenant without a store gets the schema's empty tables in memory and writes
    nothing anywhere. `at`: the store's path as the caller resolved it (a `Tenant`), which spares looking it up; it
    is confirmed under the flock all the same. `user_oid`: the bucket tables named in SQL are that user's bucket
    (writable when `write`), not the view over every user's rows."""
    if at is not None and not at.exists():
        at = None  # not there (not yet, or not any more): look it up
    if not write and at is None and not store_path(settings, tenant_id).exists():
        with connect(None, write=False, user_oid=None, default_buckets=settings.store_buckets) as con:
            yield con
        return
    with (
        store_lock(settings, tenant_id, write, at) as path,
        connect(path, write, user_oid, settings.store_buckets) as con,
    ):
        yield con


@contextlib.contextmanager
def store_lock(settings: Settings, tenant_id: str, write: bool, at: Path | None = None) -> Iterator[Path]:
    """The store's flock (shared for readers, exclusive for writers), on the tenant's current store path (tried
    first at `at`)."""
    path = at or store_path(settings, tenant_id)
    while True:
        with flock_file(Path(f"{path}.lock"), exclusive=write):
            current = store_path(settings, tenant_id)
            if current != path:
                path = current
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


def write_synced(path: Path, data: bytes, *, append: bool = False) -> None:
    """`data` written to `path` (created private, 0o600; replacing its content, or with `append` added at its end
    with O_APPEND, so concurrent writers never interleave within one write) and on disk before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk before it is renamed into place or relied on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
