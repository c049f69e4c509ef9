"""An import killed with SIGKILL at random points, and rerun each time, ends in exactly the store of an
uninterrupted run. The kill points are counted in Graph requests seen by the simulator (no timing involved)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from o365sync.settings import load_settings
from o365sync.store import open_store, store_path
from o365sync.store.locks import flock_file
from o365sync.sync.mailbox import FLUSH_PAGES, sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.product import Product, stand_up

pytestmark = pytest.mark.slow  # every test here runs Prefect flows or takes seconds

KILLS = 10
PAGE = 20  # listing page size of the pipelined-kill test
CHILD = (
    "import sys; from o365sync.settings import load_settings; from o365sync.sync.mailbox import sync_mailbox_now; "
    "from o365sync.tenant_context import resolve_tenant; "
    "sync_mailbox_now(resolve_tenant(load_settings(), sys.argv[1]), sys.argv[2])"
)


class Tripwire(list):
    """The simulator's request log; sets `fired` once armed and hit: `arm(n)` after n more entries, `arm(gid)` once
    the body of message `gid` (an inner `$batch` GET) is in it, `arm(None)` never."""

    def __init__(self, items=()):
        super().__init__(items)
        self.at: int | str | None = None
        self.fired = threading.Event()

    def append(self, item) -> None:
        super().append(item)
        at = self.at
        if (isinstance(at, int) and len(self) >= at) or (
            isinstance(at, str) and item.inner and unquote(item.path).endswith(f"/messages/{at}")
        ):
            self.fired.set()

    def arm(self, kill_at: int | str | None) -> None:
        self.fired.clear()
        self.at = len(self) + kill_at if isinstance(kill_at, int) else kill_at


def store_content(settings, tenant_id) -> dict[str, list]:
    with open_store(settings, tenant_id, write=False) as con:
        return {
            "emails": con.execute("SELECT * EXCLUDE (imported_at) FROM emails ORDER BY ALL").fetchall(),
            "participants": con.execute("SELECT * FROM email_participants ORDER BY ALL").fetchall(),
            "matches": con.execute("SELECT * FROM email_crm_matches ORDER BY ALL").fetchall(),
            "cursors": con.execute(
                "SELECT user_oid, folder, scan_start, received_watermark, backfill_done, "
                "delta_link IS NOT NULL FROM mail_cursor ORDER BY ALL"
            ).fetchall(),
        }


def start_child(tenant_id: str, oid: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, tenant_id, oid],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(child: subprocess.Popen, log: Tripwire, at: int | str | None) -> bool:
    """`log.arm(at)` and wait until it fires (True) or the child ends, which must be a success (False)."""
    log.arm(at)
    while not log.fired.wait(0.05):
        if child.poll() is not None:
            assert child.returncode == 0, child.stderr.read().decode()[-2000:]
            return False
    return True


def wal_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def run_child(tenant_id: str, oid: str, log: Tripwire, kill_at: int | str | None) -> bool:
    """Run the sync in a child process; SIGKILL it once `log` fires (`log.arm(kill_at)`: after that many more Graph
    requests, or at that message's body). True if killed."""
    log.arm(kill_at)
    child = start_child(tenant_id, oid)
    if not wait_for(child, log, kill_at):
        return False
    kill(child)
    return True


def test_sigkill_at_random_points_then_rerun_ends_in_the_uninterrupted_store(tmp_path: Path, monkeypatch):
    world = generate_world(seed=31, users_per_tenant=1, messages_per_user=900, contacts_per_tenant=40)
    p = stand_up(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="10")
    try:
        tenant, oid = world.tenants[0], world.tenants[0].users[0].oid
        graph = p.running.graph
        log = graph.requests = Tripwire(graph.requests)

        # The uninterrupted reference, in its own data directory with the same CRM snapshot.
        reference_dir = tmp_path / "reference"
        shutil.copytree(p.settings.data_dir, reference_dir)
        monkeypatch.setenv("O365SYNC_DATA_DIR", str(reference_dir))
        reference_settings = load_settings()
        refresh_crm_snapshot(reference_settings, tenant.tid)
        before = len(log)
        sync_mailbox_now(resolve_tenant(reference_settings, tenant.tid), oid)
        full_run_requests = len(log) - before
        reference = store_content(reference_settings, tenant.tid)
        assert reference["emails"], "the reference run should import mail"

        monkeypatch.setenv("O365SYNC_DATA_DIR", str(p.settings.data_dir))
        refresh_crm_snapshot(p.settings, tenant.tid)
        rng = random.Random(7)
        kills = 0
        for _ in range(KILLS):
            kills += run_child(tenant.tid, oid, log, rng.randint(1, max(2, full_run_requests // 15)))
        assert not run_child(tenant.tid, oid, log, 10**9)  # the final, uninterrupted rerun
        assert kills == KILLS
        assert store_content(p.settings, tenant.tid) == reference
    finally:
        p.running.stop()


def inbox_progress(settings, tenant_id):
    """(committed inbox watermark or None, stored message ids)."""
    with open_store(settings, tenant_id, write=False) as con:
        row = con.execute("SELECT received_watermark FROM mail_cursor WHERE folder = 'inbox'").fetchone()
        stored = {gid for (gid,) in con.execute("SELECT graph_id FROM emails").fetchall()}
    return (row[0] if row else None), stored


@dataclass
class PipelinedImport:
    """A one-mailbox world stood up for the pipelined-kill tests, with the store of an uninterrupted run."""

    p: Product
    tenant_id: str
    oid: str
    log: Tripwire
    expected: set[str]  # ground-truth matched message ids of the mailbox
    inbox: list  # its in-window Inbox messages, in the simulator's listing order
    reference: dict[str, list]

    def listed_from_progress(self) -> tuple[object, list]:
        """(committed inbox watermark, the inbox messages the next run lists: from that watermark on)."""
        start, _ = inbox_progress(self.p.settings, self.tenant_id)
        return start, [m for m in self.inbox if start is None or m.received >= start]

    def assert_nothing_lost(self) -> object:
        """Every matched message the committed watermark covers is stored; returns the watermark."""
        mark, stored = inbox_progress(self.p.settings, self.tenant_id)
        assert all(
            m.id in stored for m in self.inbox if m.id in self.expected and mark is not None and m.received <= mark
        )
        return mark

    def assert_rerun_ends_in_reference(self) -> None:
        assert not run_child(self.tenant_id, self.oid, self.log, None)  # the final, uninterrupted rerun
        assert store_content(self.p.settings, self.tenant_id) == self.reference


@contextlib.contextmanager
def pipelined_import(
    tmp_path: Path, monkeypatch, seed: int, messages: int, latency_s: float
) -> Iterator[PipelinedImport]:
    world = generate_world(seed=seed, users_per_tenant=1, messages_per_user=messages, contacts_per_tenant=60)
    p = stand_up(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE=str(PAGE))
    try:
        tenant, oid = world.tenants[0], world.tenants[0].users[0].oid
        graph = p.running.graph
        graph.latency_s = latency_s
        log = graph.requests = Tripwire(graph.requests)
        expected = {gid for (owner, gid) in world.expected_matches(tenant.tid) if owner == oid}
        inbox = sorted(
            (m for m in world.mailboxes[oid] if m.folder == "inbox" and m.received >= world.scan_start(tenant.tid)),
            key=lambda m: (m.received, m.id),  # the simulator's listing order
        )

        reference_dir = tmp_path / "reference"
        shutil.copytree(p.settings.data_dir, reference_dir)
        monkeypatch.setenv("O365SYNC_DATA_DIR", str(reference_dir))
        reference_settings = load_settings()
        refresh_crm_snapshot(reference_settings, tenant.tid)
        sync_mailbox_now(resolve_tenant(reference_settings, tenant.tid), oid)
        reference = store_content(reference_settings, tenant.tid)

        monkeypatch.setenv("O365SYNC_DATA_DIR", str(p.settings.data_dir))
        refresh_crm_snapshot(p.settings, tenant.tid)
        yield PipelinedImport(p, tenant.tid, oid, log, expected, inbox, reference)
    finally:
        p.running.stop()


def test_killed_between_a_page_listing_and_its_carried_over_bodies_the_cursor_stays_behind(tmp_path: Path, monkeypatch):
    """The listing runs ahead of the bodies, which are carried across pages into shared batches. Kill the import
    the moment Graph answers the first body of a page listed after a sealed group of pages (so that page and the
    group before it are listed, their bodies not all stored): the committed watermark never passes a matched
    message that is not stored, and the rerun ends in exactly the store of an uninterrupted run."""
    with pipelined_import(tmp_path, monkeypatch, seed=32, messages=1200, latency_s=0.01) as run:
        for groups in (1, 2):  # the first matched message after 1, then 2 sealed groups of this run's listing
            _, listed = run.listed_from_progress()
            target = next(m for m in listed[groups * FLUSH_PAGES * PAGE :] if m.id in run.expected)
            assert run_child(run.tenant_id, run.oid, run.log, target.id)
            mark, stored = inbox_progress(run.p.settings, run.tenant_id)
            assert target.id not in stored and (mark is None or mark < target.received)
            run.assert_nothing_lost()
        run.assert_rerun_ends_in_reference()


def test_killed_while_the_store_writer_catches_up_on_several_groups(tmp_path: Path, monkeypatch):
    """The store writer (a thread of the import) writes every sealed group that is ready when it opens the store
    in that one opening, a transaction each. Hold the store's lock so that several groups queue up behind it, let
    go, and kill the import once the first of them is committed, i.e. in that catching up: whatever was committed
    never has a watermark past a matched message that is not stored, and the rerun ends in exactly the store of an
    uninterrupted run."""
    with pipelined_import(tmp_path, monkeypatch, seed=33, messages=2000, latency_s=0.005) as run:
        lock = Path(f"{store_path(run.p.settings, run.tenant_id)}.lock")
        wal = Path(f"{store_path(run.p.settings, run.tenant_id)}.wal")
        committed = 0
        for logged in (100_000, 200_000, 300_000):
            start, listed = run.listed_from_progress()
            # a matched message three groups into this run's listing: by its body, groups are waiting to be written
            target = next((m for m in listed[3 * FLUSH_PAGES * PAGE :] if m.id in run.expected), None)
            if target is None:
                break
            child = start_child(run.tenant_id, run.oid)
            assert wait_for(child, run.log, 1)  # the first Graph request: the child has read its cursors
            with flock_file(lock, exclusive=True):  # the writer cannot open the store meanwhile
                assert wait_for(child, run.log, target.id)
            # let go; kill once the writer's opening has logged `logged` bytes of rows (DuckDB's log file): its
            # first groups are committed, the ones queued behind it are being written or not yet
            while wal_size(wal) < logged:
                try:
                    child.wait(timeout=0.002)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if child.poll() is None:
                kill(child)
            assert child.returncode in (0, -signal.SIGKILL)
            mark = run.assert_nothing_lost()
            committed += mark is not None and mark != start
        assert committed, "no kill came after a committed group: the test did not reach the writer's catching up"
        run.assert_rerun_ends_in_reference()
