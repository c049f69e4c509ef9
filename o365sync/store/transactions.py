"""One DuckDB transaction with Polars/Arrow frames registered for it: how every store write is made atomic."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import duckdb


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection, frames: dict[str, Any] | None = None) -> Iterator[None]:
    """One DuckDB transaction: `frames` (name -> Polars/Arrow frame) registered for the SQL inside, committed when
    the block ends, rolled back if it raises; the frames are unregistered either way."""
    for name, frame in (frames or {}).items():
        con.register(name, frame)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        for name in frames or {}:
            con.unregister(name)
