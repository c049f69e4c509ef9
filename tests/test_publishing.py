"""The analysts' snapshot (`o365sync.store.publish`): after any sequence of writes, deletions, compactions and
publishes its views file holds exactly the live store's rows as of the last publish, and a publish copies only the
tenant file and the buckets written since the last one; a publish that dies (exception or killed process) leaves the
previous snapshot readable and the next one repairs it; a reader opening the snapshot while publishes run always
sees one whole published state, and keeps the generation it opened until it closes it (unless an erasure purges
it); then the generation's files are removed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import o365sync.store.publishing
from o365sync.erasure import compact_live_store, compact_store
from o365sync.settings import Settings
from o365sync.store import (
    open_store,
    publish,
    publish_snapshot,
    snapshot_files,
    snapshot_leftovers,
    snapshot_parts,
    snapshot_path,
    store_lock,
    store_path,
)
from o365sync.store.partitions import bucket_files, bucket_of, bucket_path, each_bucket, mark_dirty
from o365sync.store.schema import MIGRATIONS, PARTITIONED_VERSION, migrate
from o365sync.store.views import VIEW_NAMES

TENANT = "publish-tenant"
ROOT = Path(__file__).resolve().parents[1]
TABLES = ("emails", "email_participants", "email_crm_matches", "meetings", "sync_state", "erased")


def write(settings: Settings, sql: str, *params, user: str | None = None) -> None:
    """`sql` on the live store: on `user`'s bucket, or else on every bucket in turn (one transaction each)."""
    with open_store(settings, TENANT, write=True, user_oid=user) as con:
        for _ in [None] if user else each_bucket(con):
            con.execute(sql, list(params))


def user_bucket(settings: Settings, user: str) -> Path:
    return bucket_path(store_path(settings, TENANT), bucket_of(user, settings.store_buckets))


def add_emails(settings: Settings, user: str, first: int, n: int) -> None:
    """`n` emails of `user` with two participants and a CRM match each (what a sync writes, in one transaction)."""
    with open_store(settings, TENANT, write=True, user_oid=user) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute(
            f"INSERT INTO emails (tenant_id, user_oid, graph_id, conversation_id, subject, body_text, imported_at) "
            f"SELECT '{TENANT}', ?, ? || i, 'conv' || (i // 2), 'subject ' || i, repeat('body ' || i, 30), now() "
            f"FROM range(?, ?) t(i)",
            [user, f"{user}-m", first, first + n],
        )
        for role in ("from", "to"):
            con.execute(
                "INSERT INTO email_participants SELECT tenant_id, user_oid, graph_id, ?, 'N', graph_id || '@x.example' "
                "FROM emails WHERE user_oid = ? AND graph_id NOT IN (SELECT graph_id FROM email_participants "
                "WHERE role = ?)",
                [role, user, role],
            )
        con.execute(
            "INSERT INTO email_crm_matches SELECT tenant_id, user_oid, graph_id, 'per1', 'contact', 'a@x.example', "
            "true FROM emails WHERE user_oid = ? AND graph_id NOT IN (SELECT graph_id FROM email_crm_matches)",
            [user],
        )
        con.execute("COMMIT")


def content(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    """Every row of the compared tables, sorted (a multiset per table)."""
    return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}


def live_content(settings: Settings) -> dict[str, list[tuple]]:
    with open_store(settings, TENANT, write=False) as con:
        return content(con)


def snapshot_content(settings: Settings) -> dict[str, list[tuple]]:
    """The rows the analysts' views file shows (its users' tables are views over the generation's copies)."""
    with duckdb.connect(str(snapshot_path(settings, TENANT)), read_only=True) as con:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert set(VIEW_NAMES) <= views
        (emails,) = con.execute("SELECT count(*) FROM activities WHERE kind = 'email'").fetchone()
        got = content(con)
    assert emails == len(got["emails"])
    return got


def generation_files(settings: Settings, generation: int) -> set[str]:
    """The files a generation consists of with no reader about: its views file, manifest and one copy per bucket."""
    copies = {name for name in os.listdir(snapshot_parts(snapshot_path(settings, TENANT))) if name.startswith("b")}
    assert len(copies) == len(bucket_files(store_path(settings, TENANT)))
    return {f"views.g{generation}.duckdb", f"views.g{generation}.json", *copies}


class SnapshotMachine(RuleBasedStateMachine):
    """Random sequences of what changes a store (sync writes, updates, deletions, erasures = delete + compaction,
    publishes that die midway) against the invariant: the snapshot holds the live rows of the last publish, which
    copied the tenant file and exactly the buckets written since the publish before."""

    @initialize()
    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="o365sync-publish-"))
        self.settings = Settings(data_dir=self.root)
        self.next_id = 0
        self.written: set[Path] = set()  # the buckets written since the last publish
        publish_snapshot(self.settings, TENANT)
        self.published = live_content(self.settings)

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)

    def every_bucket_written(self) -> None:
        self.written |= set(bucket_files(store_path(self.settings, TENANT)).values())

    @rule(user=st.sampled_from(["u1", "u2", "u3"]), n=st.integers(1, 5))
    def sync_adds(self, user: str, n: int) -> None:
        add_emails(self.settings, user, self.next_id, n)
        self.next_id += n
        self.written.add(user_bucket(self.settings, user))

    @rule(user=st.sampled_from(["u1", "u2", "u3"]), stage=st.sampled_from(["idle", "failed"]))
    def sync_state_changes(self, user: str, stage: str) -> None:
        write(self.settings, "DELETE FROM sync_state WHERE user_oid = ?", user, user=user)
        write(
            self.settings,
            "INSERT INTO sync_state (tenant_id, user_oid, stage) VALUES (?, ?, ?)",
            TENANT,
            user,
            stage,
            user=user,
        )
        self.written.add(user_bucket(self.settings, user))

    @rule(modulo=st.integers(2, 4))
    def sync_updates_subjects(self, modulo: int) -> None:
        write(self.settings, "UPDATE emails SET subject = subject || '!' WHERE hash(graph_id) % ? = 0", modulo)
        self.every_bucket_written()

    @rule(conv=st.integers(0, 10), compact=st.booleans())
    def erase_conversation(self, conv: int, compact: bool) -> None:
        """The rows of a conversation deleted from every bucket and tombstoned; with `compact`, the erasure's
        compaction, which publishes too."""
        for table in ("email_participants", "email_crm_matches", "emails"):
            write(
                self.settings,
                f"DELETE FROM {table} WHERE graph_id IN (SELECT graph_id FROM emails WHERE conversation_id = ?)",
                f"conv{conv}",
            )
        with open_store(self.settings, TENANT, write=True) as con:
            con.execute("INSERT INTO erased VALUES (?, NULL, 'conversation', ?, now())", [TENANT, f"conv{conv}"])
        self.every_bucket_written()
        if compact:
            compact_store(self.settings, TENANT)
            self.published = live_content(self.settings)
            self.written = set()

    @rule()
    def publish(self) -> None:
        done = publish(self.settings, TENANT)
        assert done.path == snapshot_path(self.settings, TENANT) and done.lock_seconds <= done.seconds
        assert set(done.copied_files) == self.written | {store_path(self.settings, TENANT)}
        assert done.bytes_copied >= sum(path.stat().st_size for path in done.copied_files)
        self.published = live_content(self.settings)
        self.written = set()
        assert not any(p.exists() for p in snapshot_leftovers(done.path))
        parts = snapshot_parts(done.path)
        assert set(os.listdir(parts)) == generation_files(self.settings, done.generation)  # older ones collected

    @rule(garbage=st.binary(min_size=0, max_size=4096), with_wal=st.booleans())
    def publish_dies_midway(self, garbage: bytes, with_wal: bool) -> None:
        """What a killed publish leaves: part of a copy (and of a WAL) beside the snapshot, part of a bucket's copy
        and of a views file of the next generation; the snapshot is untouched."""
        tmp, tmp_wal = snapshot_leftovers(snapshot_path(self.settings, TENANT))
        tmp.write_bytes(store_path(self.settings, TENANT).read_bytes()[: len(garbage) * 16] + garbage)
        if with_wal:
            tmp_wal.write_bytes(garbage)
        parts = snapshot_parts(snapshot_path(self.settings, TENANT))
        (parts / "b0.g99.duckdb").write_bytes(garbage)
        if with_wal:
            (parts / "views.g99.duckdb").write_bytes(garbage)
            (parts / "views.g99.json").write_bytes(garbage)

    @invariant()
    def snapshot_holds_the_last_published_rows(self) -> None:
        if hasattr(self, "settings"):
            assert snapshot_content(self.settings) == self.published


TestSnapshotMachine = pytest.mark.slow(SnapshotMachine.TestCase)
TestSnapshotMachine.settings = settings(
    max_examples=12, stateful_step_count=8, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture
def store(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path / "data")
    add_emails(s, "u1", 0, 20)
    publish_snapshot(s, TENANT)
    return s


def parts_files(settings: Settings) -> set[str]:
    return set(os.listdir(snapshot_parts(snapshot_path(settings, TENANT))))


def test_a_publish_copies_the_tenant_file_and_only_the_buckets_written_since_the_last_one(store):
    u1, u2 = user_bucket(store, "u1"), user_bucket(store, "u2")
    assert u1 != u2, "positive control: the two users hash to different buckets"
    add_emails(store, "u2", 0, 10)
    first = publish(store, TENANT)
    assert first.copied_files == (u2, store_path(store, TENANT))
    assert first.bytes_copied == u2.stat().st_size + store_path(store, TENANT).stat().st_size
    add_emails(store, "u1", 100, 3)
    second = publish(store, TENANT)
    assert second.copied_files == (u1, store_path(store, TENANT)) and second.generation == first.generation + 1
    assert publish(store, TENANT).copied_files == (store_path(store, TENANT),)  # nothing written since
    assert snapshot_content(store) == live_content(store)


def test_a_publish_that_raises_leaves_the_previous_snapshot_and_the_next_one_repairs(store, monkeypatch):
    before, files_before = snapshot_content(store), parts_files(store)
    add_emails(store, "u1", 100, 5)

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("o365sync.store.publishing.create_views", crash)
    with pytest.raises(OSError):
        publish_snapshot(store, TENANT)
    assert snapshot_content(store) == before
    assert not any(p.exists() for p in snapshot_leftovers(snapshot_path(store, TENANT)))  # removed on the way out
    assert parts_files(store) == files_before  # and the copies it made
    monkeypatch.undo()
    done = publish(store, TENANT)
    assert user_bucket(store, "u1") in done.copied_files  # its marker was not lost with the failed publish
    assert snapshot_content(store) == live_content(store) != before
    assert not any(p.exists() for p in snapshot_leftovers(snapshot_path(store, TENANT)))


_KILLED_MIDWAY = """
import os, signal, sys
from pathlib import Path
import o365sync.store.publishing as publishing
from o365sync.settings import Settings

def die(*args, **kwargs):  # after the copies of the live files, before the rename: the process is killed
    os.kill(os.getpid(), signal.SIGKILL)

publishing.create_views = die
publishing.publish_snapshot(Settings(data_dir=Path(sys.argv[1])), sys.argv[2])
"""


@pytest.mark.slow
def test_a_killed_publish_leaves_the_previous_snapshot_and_the_next_one_repairs(store):
    before = snapshot_content(store)
    add_emails(store, "u1", 200, 7)  # a bucket the current generation has a copy of
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, str(store.data_dir), TENANT], cwd=ROOT, capture_output=True
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    snap = snapshot_path(store, TENANT)
    assert snapshot_leftovers(snap)[0].exists()  # the copy it was finishing
    assert snapshot_content(store) == before
    again = publish(store, TENANT)  # its locks died with it: nothing waits
    assert user_bucket(store, "u1") in again.copied_files  # its marker was not lost with the killed publish
    assert snapshot_content(store) == live_content(store) != before
    assert not any(p.exists() for p in snapshot_leftovers(snap))
    assert parts_files(store) == generation_files(store, again.generation)


def test_the_snapshot_and_its_copies_are_private(store):
    shell = os.umask(0o022)
    try:
        add_emails(store, "u2", 0, 3)
        publish_snapshot(store, TENANT)
    finally:
        os.umask(shell)
    snap = snapshot_path(store, TENANT)
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    parts = snapshot_parts(snap)
    assert stat.S_IMODE(parts.stat().st_mode) == 0o700
    assert len(list(parts.iterdir())) == 4  # the views file's link, its manifest, two buckets' copies
    assert {stat.S_IMODE(p.stat().st_mode) for p in parts.iterdir()} == {0o600}
    assert snapshot_files(store, TENANT)[0] == snap and parts in snapshot_files(store, TENANT)


_READER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
for line in sys.stdin:
    try:
        print(con.execute("SELECT count(*) FROM emails WHERE user_oid = 'u1'").fetchall()[0][0], flush=True)
    except duckdb.Error as exc:
        print("error", type(exc).__name__, flush=True)
"""


class Reader:
    """Another process (POSIX locks belong to a process: one here would not count) that opens the snapshot and
    counts u1's emails each time it is asked, until it is closed."""

    def __init__(self, settings: Settings) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _READER, str(snapshot_path(settings, TENANT))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def count(self) -> str:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_reader_keeps_its_generation_across_publishes_and_it_is_removed_once_the_reader_closes(store):
    opened = publish(store, TENANT)
    held = parts_files(store)  # its views file, manifest and u1's bucket's copy (the only bucket)
    assert held == generation_files(store, opened.generation) and len(held) == 3
    reader = Reader(store)
    try:
        assert reader.count() == "20"
        add_emails(store, "u1", 100, 5)
        newer = publish(store, TENANT)
        assert held <= parts_files(store)  # kept for the reader
        assert reader.count() == "20"  # its generation, whole
        assert (
            snapshot_content(store)["emails"] == live_content(store)["emails"]
            and len(live_content(store)["emails"]) == 25
        )
        publish(store, TENANT)
        assert held <= parts_files(store)
    finally:
        reader.close()
    latest = publish(store, TENANT)
    assert not held & parts_files(store)
    assert parts_files(store) == generation_files(store, latest.generation) and newer.generation < latest.generation


@pytest.mark.slow
def test_a_purging_publish_removes_every_older_generation_even_a_held_one(store):
    """What an erasure does: the erased rows' old copies are gone from disk; their reader gets an error."""
    opened = publish(store, TENANT)
    reader = Reader(store)
    try:
        assert reader.count() == "20"
        write(store, "DELETE FROM emails WHERE graph_id = 'u1-m3'", user="u1")
        purged = publish(store, TENANT, purge=True)
        assert parts_files(store) == generation_files(store, purged.generation)
        assert f"views.g{opened.generation}.duckdb" not in parts_files(store)
        assert reader.count().startswith("error")
    finally:
        reader.close()
    assert len(snapshot_content(store)["emails"]) == 19


@pytest.mark.slow
def test_a_reader_during_publishes_sees_whole_published_states(store):
    """Readers open the snapshot (a new connection each time) while syncs write and publishes replace it: each
    read sees one of the published states, never a mix (emails without their participants, a half copy)."""
    published = [len(snapshot_content(store)["emails"])]
    seen: list[tuple[int, int, int]] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not done.is_set():
                with duckdb.connect(str(snapshot_path(store, TENANT)), read_only=True) as con:
                    seen.append(
                        con.execute(
                            "SELECT (SELECT count(*) FROM emails), (SELECT count(*) FROM email_participants), "
                            "(SELECT count(*) FROM activities)"
                        ).fetchone()
                    )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(6):
            add_emails(store, "u1" if i % 2 else "u2", 1000 + 10 * i, 10)
            publish_snapshot(store, TENANT)
            # (From the live store: in this process, a connection to the snapshot's path opened while the reader's
            # is open would share DuckDB's cached instance of the file the reader opened, i.e. an older one.)
            published.append(len(live_content(store)["emails"]))
    finally:
        done.set()
        thread.join()
    assert errors == [] and seen
    torn = [(e, parts, acts) for e, parts, acts in seen if e not in published or parts != 2 * e or acts != e]
    assert torn == [], (published, torn[:5], len(seen))


def compact_bucket(settings: Settings, user: str, mark: bool = True) -> None:
    """What an erasure does to a bucket after its DELETE: rewritten into a new file renamed over it, under the
    store's exclusive flock (`mark`: marked dirty, as every writer of a bucket should)."""
    with store_lock(settings, TENANT, write=True):
        path = user_bucket(settings, user)
        if mark:
            mark_dirty(path)
        tmp = path.with_name(path.name + ".compact")
        with duckdb.connect(str(path)) as con:
            con.execute(f"ATTACH '{tmp}' AS compacted")
            con.execute(f"COPY FROM DATABASE {con.execute('SELECT current_database()').fetchall()[0][0]} TO compacted")
            con.execute("DETACH compacted")
        os.replace(tmp, path)


def test_a_compaction_while_a_publish_finishes_its_copy_makes_it_start_over(store, monkeypatch):
    """An erasure compacts a live file while a publish is adding the views to its copy (no lock held): that copy
    still holds the erased rows, so it is dropped, never renamed into place, and the publish copies again."""
    marker = "ERASEDMARK" + "x" * 40
    write(store, "UPDATE emails SET subject = ? WHERE graph_id = 'u1-m3'", marker, user="u1")
    assert marker.encode() in user_bucket(store, "u1").read_bytes(), "positive control: the live file holds it"
    finished: list[Path] = []
    finish = o365sync.store.publishing._finish

    def erasure_meanwhile(tmp: Path, tenant_id: str, round_) -> None:
        if not finished:
            for table in ("emails", "email_participants", "email_crm_matches"):
                write(store, f"DELETE FROM {table} WHERE graph_id = 'u1-m3'", user="u1")
            compact_bucket(store, "u1")
            compact_live_store(store, TENANT)
        finished.append(tmp)
        finish(tmp, tenant_id, round_)

    monkeypatch.setattr(o365sync.store.publishing, "_finish", erasure_meanwhile)
    publish_snapshot(store, TENANT)
    assert len(finished) == 2
    assert snapshot_content(store) == live_content(store)
    for path in snapshot_parts(snapshot_path(store, TENANT)).iterdir():
        assert marker.encode() not in path.read_bytes(), path.name
    assert marker.encode() not in user_bucket(store, "u1").read_bytes()


def test_a_bucket_replaced_without_a_marker_is_copied_all_the_same(store):
    """The manifest records which live file each copy came from: a bucket file replaced since (a compaction that
    did not mark it) is not the one copied, so the next publish copies it."""
    publish(store, TENANT)
    compact_bucket(store, "u1", mark=False)
    assert publish(store, TENANT).copied_files == (user_bucket(store, "u1"), store_path(store, TENANT))
    assert publish(store, TENANT).copied_files == (store_path(store, TENANT),)


def test_a_store_from_before_the_buckets_is_split_then_published(tmp_path):
    """A tenant file of schema version 3 (users' rows in it) that no writer opened since the upgrade: the publish
    has the store split (a writer's open) and publishes the split store."""
    s = Settings(data_dir=tmp_path / "data")
    path = store_path(s, TENANT)
    path.parent.mkdir(parents=True)
    with duckdb.connect(str(path)) as con:
        migrate(con, "an old store", MIGRATIONS[: PARTITIONED_VERSION - 1])
        con.execute(
            "INSERT INTO emails (tenant_id, user_oid, graph_id, imported_at) VALUES (?, 'u1', 'm1', now())", [TENANT]
        )
    done = publish(s, TENANT)
    assert done.copied_files == (user_bucket(s, "u1"), path)
    assert snapshot_content(s)["emails"] == live_content(s)["emails"] and len(live_content(s)["emails"]) == 1


def test_a_copy_that_fails_midway_leaves_nothing_and_the_next_publish_copies_again(store, monkeypatch):
    before, files_before = snapshot_content(store), parts_files(store)
    add_emails(store, "u1", 100, 5)
    copy = o365sync.store.publishing._copy_private

    def disk_full(src: Path, dst: Path) -> int:
        copy(src, dst)  # the bucket's copy is made, then the tenant file's fails
        if dst.name.endswith(".tmp"):
            raise OSError("disk full")
        return dst.stat().st_size

    monkeypatch.setattr(o365sync.store.publishing, "_copy_private", disk_full)
    with pytest.raises(OSError):
        publish(store, TENANT)
    assert parts_files(store) == files_before
    assert not any(p.exists() for p in snapshot_leftovers(snapshot_path(store, TENANT)))
    monkeypatch.undo()
    assert user_bucket(store, "u1") in publish(store, TENANT).copied_files
    assert snapshot_content(store) == live_content(store) != before
