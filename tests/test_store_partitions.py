"""The live store's files: each user's rows in exactly one bucket file, reads across users through one connection,
and the split of a store made before buckets (users' rows in the tenant file) — complete, leaving no byte of those
rows in the tenant file, and finished by the next open if it dies midway."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from o365sync.settings import Settings
from o365sync.store import (
    MIGRATIONS,
    bucket_files,
    each_bucket,
    fan_out_late_matches,
    late_match_terms_recorded,
    late_match_users,
    migrate,
    open_store,
    queue_late_matches,
    read_cursors,
    store_path,
    transaction,
    write_mail_batch,
)
from o365sync.store.partitions import _split_users, bucket_of, dirty_marker
from o365sync.store.schema import BUCKET_TABLES, PARTITIONED_VERSION
from tests.test_store import make_batch

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
USERS = [f"user-{i}" for i in range(12)]


@given(st.text(min_size=1, max_size=40), st.integers(1, 64))
def test_a_users_bucket_is_stable_and_in_range(user_oid, buckets):
    assert bucket_of(user_oid, buckets) == bucket_of(user_oid, buckets) in range(buckets)


def test_each_users_rows_live_in_their_bucket_only_and_read_together(tmp_path):
    settings = Settings(data_dir=tmp_path, store_buckets=4)
    with open_store(settings, "t1", write=True) as con:
        for user in USERS:
            write_mail_batch(con, "t1", user, make_batch([f"{user}-m1", f"{user}-m2"], T0))
    files = bucket_files(store_path(settings, "t1"))
    assert set(files) == {bucket_of(u, 4) for u in USERS} and len(files) <= 4
    for number, path in files.items():
        with duckdb.connect(str(path), read_only=True) as con:
            owners = {r[0] for r in con.execute("SELECT DISTINCT user_oid FROM emails").fetchall()}
        assert owners == {u for u in USERS if bucket_of(u, 4) == number}
        assert os.stat(path).st_mode & 0o077 == 0 and dirty_marker(path).exists()
    with open_store(settings, "t1", write=False) as con:  # one reader sees every bucket
        assert con.execute("SELECT count(*), count(DISTINCT user_oid) FROM emails").fetchall() == [(24, 12)]
        assert set(read_cursors(con, "t1", USERS[3])) == {"inbox"}
    with duckdb.connect(str(store_path(settings, "t1")), read_only=True) as con:  # the tenant file holds none
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert not tables & set(BUCKET_TABLES)


def test_a_reader_of_a_tenant_without_a_store_gets_empty_tables_and_writes_nothing(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "nobody", write=False) as con:
        assert con.execute("SELECT count(*) FROM emails").fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM crm_people").fetchall() == [(0,)]
    assert not any(tmp_path.rglob("*.duckdb"))


def old_store(settings: Settings) -> dict[str, list]:
    """A store as the version before buckets left it (schema version 3: users' rows in the tenant file), with a
    marker string in every user's subject; returns every bucket table's rows."""
    path = store_path(settings, "t1")
    path.parent.mkdir(parents=True)
    with duckdb.connect(str(path)) as con:
        con.execute("SET TimeZone='UTC'")
        migrate(con, "old", MIGRATIONS[: PARTITIONED_VERSION - 1])
        for user in USERS:
            write_mail_batch(con, "t1", user, make_batch([f"{user}-m"], T0, subject=f"SPLITMARK-{user}"))
        con.execute("INSERT INTO crm_accounts VALUES ('001', 'Initech', 'initech.example')")
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in BUCKET_TABLES}


def test_a_store_made_before_buckets_is_split_on_its_first_write_open(tmp_path):
    settings = Settings(data_dir=tmp_path, store_buckets=4)
    rows = old_store(settings)
    with open_store(settings, "t1", write=False) as con:  # a reader before the split sees the old file as it is
        assert con.execute("SELECT count(*) FROM emails").fetchall() == [(len(USERS),)]
    with open_store(settings, "t1", write=True) as con:
        assert {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in BUCKET_TABLES} == rows
        assert con.execute("SELECT name FROM crm_accounts").fetchall() == [("Initech",)]
        assert con.execute("SELECT buckets FROM store_layout").fetchall() == [(4,)]
    live = store_path(settings, "t1")
    assert b"SPLITMARK" not in live.read_bytes()  # the tenant file was rewritten, not just its tables dropped
    assert sum(b"SPLITMARK" in p.read_bytes() for p in bucket_files(live).values()) == len(bucket_files(live))


def test_a_split_that_died_midway_is_finished_by_the_next_open(tmp_path):
    settings = Settings(data_dir=tmp_path, store_buckets=4)
    rows = old_store(settings)
    live = store_path(settings, "t1")
    with duckdb.connect(str(live)) as con:  # buckets written, then the process died before the tenant file's rename
        _split_users(con, live, 4)
    with duckdb.connect(str(live), read_only=True) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchall() == [(PARTITIONED_VERSION - 1,)]
    with open_store(settings, "t1", write=True) as con:
        assert {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in BUCKET_TABLES} == rows


def test_a_writer_outside_a_users_bucket_cannot_write_users_rows(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "t1", write=True) as con, pytest.raises(duckdb.Error):
        con.execute(
            "INSERT INTO mail_cursor (tenant_id, user_oid, folder, scan_start, updated_at) VALUES "
            "('t1', 'u1', 'Inbox', now(), now())"
        )


def test_late_match_terms_recorded_by_a_refresh_reach_every_bucket_once_even_if_it_died(tmp_path):
    """A CRM refresh records the terms it added in the tenant file (its transaction) and then queues them in every
    bucket, one transaction each; one that died between the two, or midway, is finished by the next fan-out, and a
    term is never queued twice for a folder."""
    settings = Settings(data_dir=tmp_path, store_buckets=4)
    users = USERS[:6]
    with open_store(settings, "t1", write=True) as con:
        for user in users:
            write_mail_batch(con, "t1", user, make_batch([f"{user}-m"], T0))
        with transaction(con):  # the refresh's transaction; the process dies before its fan-out
            assert queue_late_matches(con, "t1", [("address", "late@initech.example")], T0) == 1
    with open_store(settings, "t1", write=False) as con:
        assert late_match_terms_recorded(con, "t1") and late_match_users(con, "t1") == []
    with open_store(settings, "t1", write=True) as con:
        assert fan_out_late_matches(con, "t1") == len(users)
        for _bucket in each_bucket(con):  # searched meanwhile: no longer open
            con.execute("UPDATE late_match SET status = 'done'")
        # As if it had died after the buckets but before forgetting the terms: the same record, fanned out again.
        con.execute("INSERT INTO late_match_terms VALUES ('t1', 'address', 'late@initech.example', ?)", [T0])
        assert fan_out_late_matches(con, "t1") == 0
        assert not late_match_terms_recorded(con, "t1")
    with open_store(settings, "t1", write=False) as con:
        assert con.execute("SELECT count(DISTINCT user_oid), count(*) FROM late_match").fetchall() == [
            (len(users), len(users))
        ]
