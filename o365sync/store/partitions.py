"""The live store's files: one tenant file and the users' bucket files, presented to callers as one database.

A user's rows (`BUCKET_TABLES`: activities, cursors, sync progress, notetaker and late-match work) live in one
bucket file, `<tenant folder>/parts/b<k>.duckdb`, with `k` the user's hash modulo the tenant's bucket count
(`store_layout`, fixed when the tenant file is made). Everything else (CRM, tombstones, Teams, CRM state) stays in the
tenant file. Why: DuckDB never removes deleted bytes from a file, so erasing a user rewrites a file; with buckets
it rewrites one bucket instead of the whole store, and a publish copies only the files that changed
(docs/benchmarks.md, "Store layout for P6/P7"). A sync's transaction writes only its user's bucket: DuckDB lets one
transaction write one file, so every table it writes together sits in the same file.

`connect` opens an in-memory DuckDB with the tenant file and every bucket ATTACHed, and a search path under which
the product's SQL is unchanged: tenant tables by name; each bucket table as a view over all buckets (reads across
users); and, for a connection opened for one user (or inside `use_bucket`), that user's bucket first, so its
tables are the real, writable ones. A connection opened for one user attaches only that user's bucket (its views
show that bucket's rows only). Only the bucket being written is attached read-write, and it gets a `.dirty`
marker first, so a publish knows which files to copy (`o365sync.store.publishing`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

import duckdb
import polars as pl

from o365sync.store.schema import (
    BUCKET_MIGRATIONS,
    BUCKET_TABLES,
    MIGRATIONS,
    PARTITIONED_VERSION,
    migrate,
    stored_version,
)
from o365sync.store.transactions import transaction

PARTS_DIR = "parts"
DuckDBConfig = dict[str, str | bool | int | float | list[str]]
DUCKDB_CONFIG: DuckDBConfig = {"memory_limit": "1GB", "threads": 2}


def in_memory_config(spill_beside: Path | None) -> DuckDBConfig:
    """`DUCKDB_CONFIG` for an in-memory DuckDB that reads our files: it would spill into `.tmp` in the working
    directory, outside the tenant's folder and region; it spills beside `spill_beside` instead, as a DuckDB opened
    on that file would (`<file>.tmp`), or nowhere."""
    return {**DUCKDB_CONFIG, "temp_directory": f"{spill_beside}.tmp" if spill_beside else ""}


P = ParamSpec("P")
R = TypeVar("R")


def bucket_of(user_oid: str, buckets: int) -> int:
    """The user's bucket: stable across processes and versions (SHA-256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(user_oid.encode()).digest()[:8], "big") % buckets


def parts_dir(store: Path) -> Path:
    return store.parent / PARTS_DIR


def bucket_path(store: Path, bucket: int) -> Path:
    return parts_dir(store) / f"b{bucket}.duckdb"


def bucket_files(store: Path) -> dict[int, Path]:
    """The bucket files that exist beside the tenant file `store`, by bucket number."""
    folder = parts_dir(store)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.glob("b*.duckdb"):
        number = path.name[1 : -len(".duckdb")]
        if number.isdigit():
            found[int(number)] = path
    return dict(sorted(found.items()))


def dirty_marker(path: Path) -> Path:
    """Created before a file of the live store is opened for writing; removed by the publish that copies it."""
    return Path(f"{path}.dirty")


def mark_dirty(path: Path) -> None:
    marker = dirty_marker(path)
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))


@dataclass
class _Session:
    """What a connection made by `connect` is attached to, kept on the Python side (asking DuckDB costs a query
    per store call, and a failed query would abort the caller's transaction)."""

    store: Path  # the tenant file
    buckets: int
    write: bool
    attached: dict[int, bool] = field(default_factory=dict)  # bucket -> attached read-write
    views: bool = False  # the views over every attached bucket exist
    search_path: str = "tenant.main,memory.main"

    def use(self, con: duckdb.DuckDBPyConnection, search_path: str) -> str:
        """Set the connection's search path; returns the previous one."""
        previous, self.search_path = self.search_path, search_path
        con.execute(f"SET search_path = '{search_path}'")
        return previous


_SESSIONS: dict[int, _Session] = {}  # id(connection) -> its session, while `connect` holds it open


@contextlib.contextmanager
def connect(
    store: Path | None, write: bool, user_oid: str | None, default_buckets: int
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The live store as one connection (see the module doc). `store` None: a tenant without a store, read: the
    schema's empty tables in memory. The caller holds the store's flock (exclusive when `write`)."""
    con = duckdb.connect(":memory:", config=in_memory_config(store))
    try:
        con.execute("SET TimeZone='UTC'")
        if store is None:
            con.execute("ATTACH ':memory:' AS tenant")
            con.execute("SET search_path = 'tenant.main'")
            migrate(con, "an empty store")
            _union_views(con, None)
            con.execute("SET search_path = 'tenant.main,memory.main'")
            yield con
            return
        partitioned = _attach_tenant(con, store, write, default_buckets)
        buckets = con.execute("SELECT buckets FROM tenant.store_layout").fetchall()[0][0] if partitioned else None
        session = _SESSIONS[id(con)] = _Session(store, buckets or default_buckets, write)
        session.use(con, session.search_path)
        if user_oid is None:  # every user's rows: each bucket attached (~3 ms each), the views over them all
            for number, path in bucket_files(store).items():
                con.execute(f"ATTACH '{_sql_path(path)}' AS b{number} (READ_ONLY)")
                session.attached[number] = False
            _union_views(con, session)
            yield con
        else:  # one user's work: their bucket is all it needs
            with use_bucket(con, user_oid, keep=True):
                yield con
    finally:
        _SESSIONS.pop(id(con), None)
        con.close()


def _attach_tenant(con: duckdb.DuckDBPyConnection, store: Path, write: bool, default_buckets: int) -> bool:
    """The tenant file as `tenant`; a writer first brings it to the latest schema (the split included). Returns
    whether it is partitioned (a reader of a store not yet opened for writing since the upgrade sees its users' rows
    in the tenant file itself)."""
    mode = "" if write else " (READ_ONLY)"
    con.execute(f"ATTACH '{_sql_path(store)}' AS tenant{mode}")
    con.execute("SET search_path = 'tenant.main'")
    version = stored_version(con)
    if write and version != len(MIGRATIONS):
        con.execute("SET search_path = 'memory.main'")
        con.execute("DETACH tenant")
        partition(store, default_buckets)
        con.execute(f"ATTACH '{_sql_path(store)}' AS tenant")
        return True
    return version is not None and version >= PARTITIONED_VERSION


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def _union_views(con: duckdb.DuckDBPyConnection, session: _Session | None) -> None:
    """In the memory database: each bucket table as a view over the bucket schema's empty table (its columns, even
    with no bucket) and every attached bucket's. Writes the memory database: never inside a transaction that has
    written a bucket."""
    previous = con.execute("SELECT current_setting('search_path')").fetchall()[0][0]
    if not con.execute(
        "SELECT 1 FROM duckdb_schemas() WHERE database_name = 'memory' AND schema_name = 'empty'"
    ).fetchall():
        con.execute("CREATE SCHEMA memory.empty")
        con.execute("SET search_path = 'memory.empty'")
        try:
            for statements in BUCKET_MIGRATIONS:
                con.execute(statements)
        finally:
            con.execute(f"SET search_path = '{previous}'")
    attached = sorted(session.attached) if session else []
    for table in BUCKET_TABLES:
        sources = [f"SELECT * FROM memory.empty.{table}"] + [f"SELECT * FROM b{k}.{table}" for k in attached]
        con.execute(f"CREATE OR REPLACE VIEW memory.main.{table} AS " + " UNION ALL BY NAME ".join(sources))
    if session:
        session.views = True


@contextlib.contextmanager
def use_bucket(con: duckdb.DuckDBPyConnection, user_oid: str, keep: bool = False) -> Iterator[int | None]:
    """Inside the block, the bucket tables named in SQL are `user_oid`'s bucket's real tables (created, migrated and
    attached read-write, with its `.dirty` marker, when the connection writes; a reader of a user without a bucket
    keeps the views, which show no rows of theirs). Allowed inside a transaction; nests. On a connection not made
    by `connect` (a plain DuckDB file, as benchmarks and some tests use) it changes nothing."""
    session = _SESSIONS.get(id(con))
    if session is None:
        yield None
        return
    number = bucket_of(user_oid, session.buckets)
    if not session.write and number not in session.attached and not bucket_path(session.store, number).exists():
        if not session.views:
            _union_views(con, session)  # the user has no rows: the views (over what is attached) show none of theirs
        yield None
        return
    _attach_bucket(con, session, number)
    previous = session.use(con, f"b{number}.main,tenant.main,memory.main")
    try:
        yield number
    finally:
        if not keep:
            session.use(con, previous)


def in_user_bucket(function: Callable[P, R]) -> Callable[P, R]:
    """For store functions `(con, tenant_id, user_oid, ...)`: run inside `use_bucket(con, user_oid)`."""

    @functools.wraps(function)
    def scoped(*args: P.args, **kwargs: P.kwargs) -> R:
        con, user_oid = args[0], args[2]
        assert isinstance(con, duckdb.DuckDBPyConnection) and isinstance(user_oid, str)
        with use_bucket(con, user_oid):
            return function(*args, **kwargs)

    return scoped


def each_bucket(con: duckdb.DuckDBPyConnection) -> Iterator[int]:
    """The existing buckets one at a time, each as in `use_bucket` while the loop body runs (for work over every
    user's rows: erasure, retention, late-match queueing). Not inside a transaction: one bucket, one transaction."""
    session = _SESSIONS.get(id(con))
    if session is None:
        yield 0
        return
    for number in list(bucket_files(session.store)):
        _attach_bucket(con, session, number)
        previous = session.use(con, f"b{number}.main,tenant.main,memory.main")
        try:
            yield number
        finally:
            session.use(con, previous)


def _attach_bucket(con: duckdb.DuckDBPyConnection, session: _Session, number: int) -> None:
    """Bucket `number` attached: read-only for a reader (it exists), read-write for a writer (created and migrated,
    marked dirty first). A bucket new to the connection joins the views over every user's rows, if it has them."""
    alias = f"b{number}"
    path = bucket_path(session.store, number)
    known = number in session.attached
    if known and (not session.write or session.attached[number]):
        return  # attached as this connection needs it (a writer's read-only attach is replaced below)
    if not session.write:
        con.execute(f"ATTACH '{_sql_path(path)}' AS {alias} (READ_ONLY)")
    else:
        if known:
            con.execute(f"DETACH {alias}")  # read-only until now; the views name it by alias and follow it
        mark_dirty(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        con.execute(f"ATTACH '{_sql_path(path)}' AS {alias}")
        con.execute(f"SET search_path = '{alias}.main'")
        try:
            migrate(con, f"the bucket {path}", BUCKET_MIGRATIONS)
        finally:
            con.execute(f"SET search_path = '{session.search_path}'")
        os.chmod(path, 0o600)
    session.attached[number] = session.write
    if not known and session.views:
        _union_views(con, session)


def partition(store: Path, buckets: int) -> None:
    """Bring the tenant file to the latest schema, splitting a store made before buckets (its users' rows in the
    tenant file) into bucket files first. The caller holds the exclusive flock. Resumable: the buckets are rebuilt
    from the untouched tenant file until the new tenant file (without users' rows) is renamed over it."""
    con = duckdb.connect(str(store), config=DUCKDB_CONFIG)
    try:
        con.execute("SET TimeZone='UTC'")
        version = stored_version(con)
        if version is None:
            migrate(con, f"the store {store}")
            con.execute("INSERT INTO store_layout VALUES (?, ?)", [buckets, datetime.now(UTC)])
            return
        if version >= PARTITIONED_VERSION:
            migrate(con, f"the store {store}")
            return
        migrate(con, f"the store {store}", MIGRATIONS[: PARTITIONED_VERSION - 1])
        _split_users(con, store, buckets)
    finally:
        con.close()
    _rewrite_tenant_file(store, buckets)


def _split_users(con: duckdb.DuckDBPyConnection, store: Path, buckets: int) -> None:
    """Copy every user's rows from the (unpartitioned) tenant file into fresh bucket files."""
    for stale in bucket_files(store).values():  # a split that died midway: start the buckets over
        stale.unlink()
        Path(f"{stale}.wal").unlink(missing_ok=True)
    users = sorted(
        {row[0] for table in BUCKET_TABLES for row in con.execute(f"SELECT DISTINCT user_oid FROM {table}").fetchall()}
    )
    owner = pl.DataFrame(
        {"user_oid": users, "bucket": [bucket_of(u, buckets) for u in users]},
        schema={"user_oid": pl.String, "bucket": pl.Int64},
    )
    con.register("bucket_owner", owner)
    try:
        for number in sorted(set(owner["bucket"].to_list())):
            path = bucket_path(store, number)
            path.parent.mkdir(parents=True, exist_ok=True)
            con.execute(f"ATTACH '{_sql_path(path)}' AS split_bucket")
            try:
                con.execute("USE split_bucket")
                migrate(con, f"the bucket {path}", BUCKET_MIGRATIONS)
                con.execute(f"USE {_database_name(con, store)}")
                with transaction(con):
                    for table in BUCKET_TABLES:
                        con.execute(
                            f"INSERT INTO split_bucket.{table} BY NAME SELECT * FROM {table} WHERE user_oid IN "
                            "(SELECT user_oid FROM bucket_owner WHERE bucket = ?)",
                            [number],
                        )
            finally:
                con.execute(f"USE {_database_name(con, store)}")
                con.execute("DETACH split_bucket")
            os.chmod(path, 0o600)
            mark_dirty(path)
    finally:
        con.unregister("bucket_owner")


def _database_name(con: duckdb.DuckDBPyConnection, store: Path) -> str:
    return con.execute("SELECT database_name FROM duckdb_databases() WHERE path = ?", [str(store)]).fetchall()[0][0]


def _rewrite_tenant_file(store: Path, buckets: int) -> None:
    """A new tenant file at the latest schema holding the old one's tenant tables, renamed over it: the users'
    rows (now in the buckets) leave no bytes behind in it."""
    tmp = store.with_name(store.name + ".split.tmp")
    for leftover in (tmp, Path(f"{tmp}.wal")):
        leftover.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp), config=DUCKDB_CONFIG)
    try:
        con.execute("SET TimeZone='UTC'")
        migrate(con, f"the store {tmp}")
        con.execute(f"ATTACH '{_sql_path(store)}' AS old (READ_ONLY)")
        tables = [
            row[0]
            for row in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'old' AND schema_name = 'main' "
                "AND table_name NOT IN ('schema_version', 'store_layout')"
            ).fetchall()
            if row[0] not in BUCKET_TABLES
        ]
        with transaction(con):
            for table in tables:
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM old.{table}")
            con.execute("INSERT INTO store_layout VALUES (?, ?)", [buckets, datetime.now(UTC)])
        con.execute("DETACH old")
    finally:
        con.close()
    os.chmod(tmp, 0o600)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, store)
    Path(f"{store}.wal").unlink(missing_ok=True)
