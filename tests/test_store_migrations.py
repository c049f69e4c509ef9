"""Numbered store migrations: a store made before them (the schema text of main, frozen in tests/fixtures) upgrades
to exactly a fresh store's schema without losing a row, each migration is applied once and atomically, and a
store from a newer version is refused before anything is written."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from o365sync.settings import Settings
from o365sync.store import MIGRATIONS, StoreFromNewerVersion, migrate, open_store, store_path

BEFORE_MIGRATIONS = (Path(__file__).parent / "fixtures" / "store_schema_before_migrations.sql").read_text()
# The statements of that text (comments dropped), in order: what an earlier version ran on every open.
OLD_STATEMENTS = [
    s.strip() for s in re.sub(r"^--.*$", "", BEFORE_MIGRATIONS, flags=re.MULTILINE).split(";") if s.strip()
]
T0 = datetime(2026, 11, 1, tzinfo=UTC)
ALL_VERSIONS = [(n,) for n in range(1, len(MIGRATIONS) + 1)]


def schema_of(con: duckdb.DuckDBPyConnection) -> dict[str, list]:
    """Everything DuckDB reports about the database's tables: columns in order with type, default and nullability,
    and constraints."""
    where = "WHERE database_name = current_database() AND schema_name = 'main'"
    return {
        "tables": con.execute(f"SELECT table_name FROM duckdb_tables() {where} ORDER BY 1").fetchall(),
        "columns": con.execute(
            "SELECT table_name, column_index, column_name, data_type, column_default, is_nullable "
            f"FROM duckdb_columns() {where} ORDER BY table_name, column_index"
        ).fetchall(),
        "constraints": con.execute(
            "SELECT table_name, constraint_type, constraint_text, constraint_column_names "
            f"FROM duckdb_constraints() {where} ORDER BY ALL"
        ).fetchall(),
    }


def fresh_schema() -> dict[str, list]:
    with duckdb.connect() as con:
        migrate(con, "fresh")
        return schema_of(con)


def make_old_store(path: Path, statements: list[str] = OLD_STATEMENTS) -> None:
    """A store as an earlier version left it: its schema statements run on a plain connection (no schema_version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        con.execute("SET TimeZone='UTC'")
        for statement in statements:
            con.execute(statement)


def fill_every_table(con: duckdb.DuckDBPyConnection) -> None:
    """Two rows in every table, every column set (by type), so a lost row or value shows."""
    columns: dict[str, list[tuple[str, str]]] = {}
    for table, name, kind in con.execute(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
        "ORDER BY table_name, column_index"
    ).fetchall():
        columns.setdefault(table, []).append((name, kind))
    samples = {"VARCHAR": "v", "BOOLEAN": True, "INTEGER": 3, "BIGINT": 7, "TIMESTAMP WITH TIME ZONE": T0}
    for table, cols in columns.items():
        rows = 1 if table in ("crm_state", "crm_drop_guard") else 2  # singleton tables (a primary key)
        for i in range(rows):
            values = [f"{table}-{name}-{i}" if kind == "VARCHAR" else samples[kind] for name, kind in cols]
            names = ", ".join(name for name, _ in cols)
            con.execute(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(cols))})", values)


def every_row(con: duckdb.DuckDBPyConnection, tables: list[str]) -> dict[str, list]:
    return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}


def test_a_store_made_by_main_upgrades_to_exactly_the_fresh_schema(tmp_path):
    settings = Settings(data_dir=tmp_path)
    make_old_store(store_path(settings, "t1"))
    with open_store(settings, "t1", write=True) as con:
        upgraded = schema_of(con)
        assert con.execute("SELECT version FROM schema_version").fetchall() == ALL_VERSIONS
    assert upgraded == fresh_schema()
    with open_store(settings, "t2", write=True) as con:  # and a store created by open_store is the fresh one
        assert schema_of(con) == upgraded


@hypothesis_settings(max_examples=25, deadline=None)
@given(st.data())
def test_a_store_from_any_earlier_version_upgrades_to_the_fresh_schema(data):
    """Earlier versions had fewer tables and columns (each later one added a CREATE, or appended an ALTER ... ADD
    COLUMN to those of its table): any such store reaches migration 1's schema."""
    creates = [s for s in OLD_STATEMENTS if s.startswith("CREATE")]
    kept_creates = data.draw(st.lists(st.sampled_from(creates), unique=True), label="tables")
    kept_alters = []
    for table in sorted(s.split()[5] for s in kept_creates):  # CREATE TABLE IF NOT EXISTS <name>
        alters = [s for s in OLD_STATEMENTS if s.startswith(f"ALTER TABLE {table} ")]
        kept_alters += alters[: data.draw(st.integers(0, len(alters)), label=f"{table} columns added")]
    with duckdb.connect() as con:
        for statement in [s for s in OLD_STATEMENTS if s in kept_creates or s in kept_alters]:
            con.execute(statement)
        migrate(con, "old")
        assert schema_of(con) == fresh_schema()


def test_the_upgrade_keeps_every_row(tmp_path):
    settings = Settings(data_dir=tmp_path)
    path = store_path(settings, "t1")
    make_old_store(path)
    with duckdb.connect(str(path)) as con:
        con.execute("SET TimeZone='UTC'")
        fill_every_table(con)
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        before = every_row(con, tables)
    assert all(len(rows) >= 1 for rows in before.values()) and len(tables) == 19
    with open_store(settings, "t1", write=True) as con:
        # Later migrations may add columns (null in old rows): every old row keeps its values in its first columns.
        for table, rows in every_row(con, tables).items():
            width = len(before[table][0])
            assert sorted(r[:width] for r in rows) == before[table]
            assert all(value is None for r in rows for value in r[width:])


def test_each_migration_is_applied_once_in_order_and_atomically(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "t1", write=True) as con:
        recorded = con.execute("SELECT * FROM schema_version").fetchall()
        schema = schema_of(con)
    with open_store(settings, "t1", write=True) as con:  # re-opening changes nothing
        assert con.execute("SELECT * FROM schema_version").fetchall() == recorded
        assert schema_of(con) == schema

    # A later migration (not idempotent on purpose: applied twice, it would fail) runs once, after migration 1.
    later = (*MIGRATIONS, "ALTER TABLE crm_accounts ADD COLUMN industry VARCHAR;")
    with duckdb.connect() as con:
        assert migrate(con, "mem", later) == migrate(con, "mem", later) == len(later)
        versions = con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        assert versions == [(n,) for n in range(1, len(later) + 1)]
        columns = con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'crm_accounts'").fetchall()
        assert columns[-1] == ("industry",)

        # A migration that fails leaves the store at the previous version, with none of its changes.
        failing = (*later, "CREATE TABLE half_done (a INTEGER); SELECT error('the last migration failed');")
        with pytest.raises(duckdb.Error, match="the last migration failed"):
            migrate(con, "mem", failing)
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(later)
        assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'half_done'").fetchone()[0] == 0


def test_a_store_from_a_newer_version_is_refused_before_anything_is_written(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "t1", write=True) as con:
        # A newer version that recorded migration N+1 and, say, dropped a table this code would create again.
        con.execute("INSERT INTO schema_version VALUES (?, ?)", [len(MIGRATIONS) + 1, T0])
        con.execute("DROP TABLE crm_drop_guard")
        before = schema_of(con)
    with pytest.raises(StoreFromNewerVersion) as refused:
        with open_store(settings, "t1", write=True):
            pytest.fail("a newer store was opened for writing")
    message = str(refused.value)
    assert "\n" not in message and f"schema version {len(MIGRATIONS) + 1}" in message
    assert str(store_path(settings, "t1")) in message and "upgrade o365sync" in message
    with duckdb.connect(str(store_path(settings, "t1")), read_only=True) as con:
        assert schema_of(con) == before
