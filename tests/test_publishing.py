"""The analysts' snapshot (`o365sync.store.publish`): after any sequence of writes, deletions, compactions and
publishes it holds exactly the live store's rows as of the last publish; a publish that dies (exception or killed
process) leaves the previous snapshot readable and the next one repairs it; a reader opening the snapshot while
publishes run always sees one whole published state."""

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
    snapshot_leftovers,
    snapshot_path,
    store_path,
)
from o365sync.store.views import VIEW_NAMES

TENANT = "publish-tenant"
ROOT = Path(__file__).resolve().parents[1]
TABLES = ("emails", "email_participants", "email_crm_matches", "meetings", "sync_state", "erased")


def write(settings: Settings, sql: str, *params) -> None:
    with open_store(settings, TENANT, write=True) as con:
        con.execute(sql, list(params))


def add_emails(settings: Settings, user: str, first: int, n: int) -> None:
    """`n` emails of `user` with two participants and a CRM match each (what a sync writes, in one transaction)."""
    with open_store(settings, TENANT, write=True) as con:
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
    with duckdb.connect(str(snapshot_path(settings, TENANT)), read_only=True) as con:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert set(VIEW_NAMES) <= views
        (emails,) = con.execute("SELECT count(*) FROM activities WHERE kind = 'email'").fetchone()
        got = content(con)
    assert emails == len(got["emails"])
    return got


class SnapshotMachine(RuleBasedStateMachine):
    """Random sequences of what changes a store (sync writes, updates, deletions, erasures = delete + compaction,
    publishes that die midway) against the invariant: the snapshot holds the live rows of the last publish."""

    @initialize()
    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="o365sync-publish-"))
        self.settings = Settings(data_dir=self.root)
        self.next_id = 0
        publish_snapshot(self.settings, TENANT)
        self.published = live_content(self.settings)

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)

    @rule(user=st.sampled_from(["u1", "u2"]), n=st.integers(1, 5))
    def sync_adds(self, user: str, n: int) -> None:
        add_emails(self.settings, user, self.next_id, n)
        self.next_id += n

    @rule(user=st.sampled_from(["u1", "u2"]), stage=st.sampled_from(["idle", "failed"]))
    def sync_state_changes(self, user: str, stage: str) -> None:
        write(self.settings, "DELETE FROM sync_state WHERE user_oid = ?", user)
        write(
            self.settings, "INSERT INTO sync_state (tenant_id, user_oid, stage) VALUES (?, ?, ?)", TENANT, user, stage
        )

    @rule(modulo=st.integers(2, 4))
    def sync_updates_subjects(self, modulo: int) -> None:
        write(self.settings, "UPDATE emails SET subject = subject || '!' WHERE hash(graph_id) % ? = 0", modulo)

    @rule(conv=st.integers(0, 10), compact=st.booleans())
    def erase_conversation(self, conv: int, compact: bool) -> None:
        """The rows of a conversation deleted (and tombstoned); with `compact`, the erasure's compaction, which
        publishes too."""
        with open_store(self.settings, TENANT, write=True) as con:
            con.execute("BEGIN TRANSACTION")
            con.execute(
                "CREATE TEMP TABLE gone AS SELECT graph_id FROM emails WHERE conversation_id = ?", [f"conv{conv}"]
            )
            for table in ("emails", "email_participants", "email_crm_matches"):
                con.execute(f"DELETE FROM {table} WHERE graph_id IN (SELECT graph_id FROM gone)")
            con.execute("INSERT INTO erased VALUES (?, NULL, 'conversation', ?, now())", [TENANT, f"conv{conv}"])
            con.execute("COMMIT")
        if compact:
            compact_store(self.settings, TENANT)
            self.published = live_content(self.settings)

    @rule()
    def publish(self) -> None:
        done = publish(self.settings, TENANT)
        assert done.path == snapshot_path(self.settings, TENANT) and done.lock_seconds <= done.seconds
        self.published = live_content(self.settings)
        assert not any(p.exists() for p in snapshot_leftovers(done.path))

    @rule(garbage=st.binary(min_size=0, max_size=4096), with_wal=st.booleans())
    def publish_dies_midway(self, garbage: bytes, with_wal: bool) -> None:
        """What a killed publish leaves: part of a copy (and of a WAL) beside the snapshot, which is untouched."""
        tmp, tmp_wal = snapshot_leftovers(snapshot_path(self.settings, TENANT))
        tmp.write_bytes(store_path(self.settings, TENANT).read_bytes()[: len(garbage) * 16] + garbage)
        if with_wal:
            tmp_wal.write_bytes(garbage)

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


def test_a_publish_that_raises_leaves_the_previous_snapshot_and_the_next_one_repairs(store, monkeypatch):
    before = snapshot_content(store)
    add_emails(store, "u1", 100, 5)

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("o365sync.store.publishing.create_views", crash)
    with pytest.raises(OSError):
        publish_snapshot(store, TENANT)
    assert snapshot_content(store) == before
    assert not any(p.exists() for p in snapshot_leftovers(snapshot_path(store, TENANT)))  # removed on the way out
    monkeypatch.undo()
    publish_snapshot(store, TENANT)
    assert snapshot_content(store) == live_content(store) != before
    assert not any(p.exists() for p in snapshot_leftovers(snapshot_path(store, TENANT)))


_KILLED_MIDWAY = """
import os, signal, sys
from pathlib import Path
import o365sync.store.publishing as publishing
from o365sync.settings import Settings

def die(*args, **kwargs):  # after the copy of the live file, before the rename: the process is killed
    os.kill(os.getpid(), signal.SIGKILL)

publishing.create_views = die
publishing.publish_snapshot(Settings(data_dir=Path(sys.argv[1])), sys.argv[2])
"""


@pytest.mark.slow
def test_a_killed_publish_leaves_the_previous_snapshot_and_the_next_one_repairs(store):
    before = snapshot_content(store)
    add_emails(store, "u2", 0, 7)
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, str(store.data_dir), TENANT], cwd=ROOT, capture_output=True
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    snap = snapshot_path(store, TENANT)
    assert snapshot_leftovers(snap)[0].exists()  # the copy it was finishing
    assert snapshot_content(store) == before
    publish_snapshot(store, TENANT)  # its locks died with it: nothing waits
    assert snapshot_content(store) == live_content(store) != before
    assert not any(p.exists() for p in snapshot_leftovers(snap))


def test_the_snapshot_and_the_copy_being_finished_are_private(store):
    snap = snapshot_path(store, TENANT)
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    shell = os.umask(0o022)
    try:
        publish_snapshot(store, TENANT)
    finally:
        os.umask(shell)
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600


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
            add_emails(store, "u1", 1000 + 10 * i, 10)
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


def test_a_compaction_while_a_publish_finishes_its_copy_makes_it_start_over(store, monkeypatch):
    """An erasure compacts the live store while a publish is adding the views to its copy (no lock held): that copy
    still holds the erased rows, so it is dropped, never renamed into place, and the publish copies again."""
    marker = "ERASEDMARK" + "x" * 40
    write(store, "UPDATE emails SET subject = ? WHERE graph_id = 'u1-m3'", marker)
    assert marker.encode() in store_path(store, TENANT).read_bytes(), "positive control: the live file holds it"
    finished: list[Path] = []
    finish = o365sync.store.publishing._finish

    def erasure_meanwhile(tmp: Path, tenant_id: str) -> None:
        if not finished:
            for table in ("emails", "email_participants", "email_crm_matches"):
                write(store, f"DELETE FROM {table} WHERE graph_id = 'u1-m3'")
            compact_live_store(store, TENANT)
        finished.append(tmp)
        finish(tmp, tenant_id)

    monkeypatch.setattr(o365sync.store.publishing, "_finish", erasure_meanwhile)
    publish_snapshot(store, TENANT)
    assert len(finished) == 2
    assert snapshot_content(store) == live_content(store)
    assert marker.encode() not in snapshot_path(store, TENANT).read_bytes()
    assert marker.encode() not in store_path(store, TENANT).read_bytes()
