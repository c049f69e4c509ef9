"""Analysts never block syncs, and two syncs of one tenant queue instead of failing — with real separate processes
(DuckDB's file lock is per process), synchronised by pipes and the tenant's own lock, never by sleeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from flows.email_sync import email_sync
from o365sync.store import open_store, snapshot_path, tenant_sync_locks
from o365sync.tenants import tenant_dir
from simulators.world import generate_world
from tests.product import stand_up, stored_matches

pytestmark = pytest.mark.slow  # every test here runs Prefect flows or takes seconds

# A notebook left open on the snapshot: one read-only connection, queried in a loop until told to stop.
ANALYST = r"""
import sys, threading
import duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
count = lambda: con.execute("SELECT count(*) FROM emails").fetchall()[0][0]
before = count()
print("ready", before, flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
queries = 0
while not stop.wait(0.002):  # pacing the loop, not synchronising: the parent's line on stdin ends it
    assert count() == before, "the snapshot changed under an open connection"
    queries += 1
print("done", queries, count(), flush=True)
"""

# One flow run in its own process; starts when the parent writes a line, reports its totals.
SYNC = r"""
import json, sys
from o365sync.prefect_env import configure_prefect_env
configure_prefect_env()
from flows.email_sync import email_sync
from flows.initial_import import initial_import
flow = {"initial-import": initial_import, "email-sync": email_sync}[sys.argv[1]]
print("ready", flush=True)
sys.stdin.readline()
print("started", flush=True)
print("totals", json.dumps(flow(sys.argv[2])), flush=True)
"""


def read_line(proc: subprocess.Popen, prefix: str) -> list[str]:
    """The child's next line starting with `prefix` (other output, e.g. Prefect's, is skipped)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.split(maxsplit=1)[1:]
    proc.wait()
    raise AssertionError(f"child exited ({proc.returncode}) before '{prefix}': {errors(proc)}")


def spawn(args: list[str], err: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Python child with pipes for stdin/stdout (text) and its stderr in a file (a full pipe would block it)."""
    with open(err, "w") as stderr:  # the child keeps its own copy
        proc = subprocess.Popen(
            [sys.executable, "-c", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    proc.err_path = err
    return proc


def errors(proc: subprocess.Popen) -> str:
    return proc.err_path.read_text()[-3000:]


def child_env() -> dict[str, str]:
    from prefect.settings import get_current_settings

    return {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=41, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30)
    p = stand_up(world, tmp_path, monkeypatch, features=["email"], O365SYNC_GRAPH_PAGE_SIZE="25")
    yield p
    p.running.stop()


def test_an_analyst_holding_the_snapshot_open_never_blocks_a_sync(prefect_server, product, tmp_path):
    world, settings = product.world, product.settings
    tenant = world.tenants[0]
    email_sync(tenant.tid)  # the first sync publishes the first snapshot
    path = snapshot_path(settings, tenant.tid)
    first_inode = path.stat().st_ino
    new = [world.add_message(u.oid, "inbox", kind="contact") for u in tenant.users]

    analyst = spawn([ANALYST, str(path)], tmp_path / "analyst.err")
    try:
        before = int(read_line(analyst, "ready")[0])
        # While the analyst's connection is open and querying: a real sync, which ends by publishing.
        totals = email_sync(tenant.tid)
        assert totals["imported"] == len(new) and totals["failed"] == 0
        assert path.stat().st_ino != first_inode, "a new snapshot was published (copy + atomic replace)"
        analyst.stdin.write("stop\n")
        analyst.stdin.flush()
        queries, still = map(int, read_line(analyst, "done")[0].split())
        assert analyst.wait() == 0, errors(analyst)
    finally:
        analyst.kill()
    assert queries > 0 and still == before  # the old connection kept working, on the old snapshot
    with duckdb.connect(str(path), read_only=True) as fresh:  # a new connection sees the new data
        assert fresh.execute("SELECT count(*) FROM emails").fetchall()[0][0] == before + len(new)
    assert stored_matches(settings, tenant.tid) == world.expected_matches(tenant.tid)


def test_two_syncs_of_one_tenant_queue_and_both_complete(prefect_server, product, tmp_path):
    """An operator's initial import and the scheduled email sync start together in two processes: the second
    waits for the tenant's lock, then finds nothing left to do; no error, no duplicate."""
    world, settings = product.world, product.settings
    tenant = world.tenants[0]
    env = child_env()
    children = [
        spawn([SYNC, flow, tenant.tid], tmp_path / f"{flow}.err", env) for flow in ("initial-import", "email-sync")
    ]
    try:
        for child in children:
            read_line(child, "ready")
        # Hold the tenant's email lock while both start, so both runs are in flight before either can proceed:
        # each run's call begins before the release and ends after it (the two runs overlap).
        with tenant_sync_locks(tenant_dir(settings, tenant.tid), ["email"]):
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            for child in children:
                read_line(child, "started")
        totals = [json.loads(read_line(child, "totals")[0]) for child in children]
        for child in children:
            assert child.wait() == 0, errors(child)
    finally:
        for child in children:
            child.kill()
    expected = world.expected_matches(tenant.tid)
    assert all(t["failed"] == 0 for t in totals)
    # Queued, not interleaved: whichever ran first imported everything, the other found it all stored.
    assert sorted(t["imported"] for t in totals) == [0, len(expected)]
    assert stored_matches(settings, tenant.tid) == expected
    with open_store(settings, tenant.tid, write=False) as con:
        rows, distinct = con.execute("SELECT count(*), count(DISTINCT (user_oid, graph_id)) FROM emails").fetchall()[0]
        states = con.execute("SELECT DISTINCT stage FROM sync_state").fetchall()
    assert rows == distinct == len(expected)
    assert states == [("idle",)]
    assert snapshot_path(settings, tenant.tid).exists()
