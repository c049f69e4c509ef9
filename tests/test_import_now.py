"""Consent starts the import at once: the connect callback starts that user's import (in a thread of the web server
without a Prefect server, a `user-import` deployment run with one), the progress of the running import is in the
user's sync state (counts written with the data they count), and two connects of one user never run two imports
of the mailbox at once. Driven through the real web app, real MSAL and the simulators."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import replace
from urllib.parse import urlsplit

import duckdb
import httpx
import pytest

from app import import_trigger
from app.import_trigger import (
    IN_PROCESS,
    NOT_STARTED,
    QUEUED,
    STARTED,
    ImportStarted,
    import_starter,
    start_user_import,
)
from app.web import run_in_thread
from o365sync.http import ssl_context
from o365sync.settings import Settings
from o365sync.store import (
    MailBatch,
    open_store,
    read_sync_progress,
    record_sync_state,
    tenant_sync_locks,
    write_mail_batch,
)
from o365sync.store.sync_state import RunCounts
from o365sync.sync.user_import import sync_progress
from o365sync.tenants import tenant_dir
from simulators.world import generate_world
from tests.product import Product, stand_up, stored_matches
from tests.test_store import T0, make_batch

POLL_S = 0.02


def poll(what, done, seconds: float, why: str):  # noqa: ANN001, ANN201
    """`what()` once `done(value)`; fails after `seconds` (a bound, not a timing)."""
    deadline = time.monotonic() + seconds
    while True:
        value = what()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{why}: still {value!r} after {seconds} s"
        time.sleep(POLL_S)


# ------------------------------------------------------------------------------------------------ store


def test_a_write_advances_the_running_syncs_progress_in_its_own_transaction(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "t1", write=True) as con:
        record_sync_state(con, "t1", "u1", "idle", RunCounts(scanned=9, imported=4))
        record_sync_state(con, "t1", "u1", "syncing")  # a run starts: its counts start at 0
        (p,) = read_sync_progress(con, "t1", "u1")
        assert (p.running, p.scanned, p.imported, p.first_import) == (True, 0, 0, False)
        started = p.started_at
        write_mail_batch(con, "t1", "u1", replace(make_batch(["m1", "m2"], T0), scanned=7))
        write_mail_batch(con, "t1", "u1", replace(make_batch(["m2", "m3"], T0), scanned=5))  # m2 is not new
        (p,) = read_sync_progress(con, "t1", "u1")
        assert (p.scanned, p.imported) == (12, 3) and p.line() == "syncing: 12 messages scanned, 3 imported"
        # A write that fails leaves the counts with its rows: neither is there.
        good = replace(make_batch(["m4"], T0), scanned=50)
        broken = MailBatch(good.emails, good.participants.drop("role"), good.matches, good.cursors, scanned=50)
        with pytest.raises(duckdb.Error):
            write_mail_batch(con, "t1", "u1", broken)
        (p,) = read_sync_progress(con, "t1", "u1")
        assert (p.scanned, p.imported) == (12, 3)
        assert con.execute("SELECT count(*) FROM emails").fetchall()[0][0] == 3
        # The run ends: its counts stay, it is no longer running; its start time is kept.
        record_sync_state(con, "t1", "u1", "idle", RunCounts(scanned=12, matched=3, imported=3))
        (p,) = read_sync_progress(con, "t1", "u1")
        assert (p.running, p.scanned, p.imported, p.started_at) == (False, 12, 3, started)
        assert p.line() == "last run (idle): 12 messages scanned, 3 imported"
        # Writes outside a run (no `syncing` row) leave the state alone.
        write_mail_batch(con, "t1", "u1", replace(make_batch(["m9"], T0), scanned=1))
        assert read_sync_progress(con, "t1", "u1")[0].scanned == 12


def test_the_progress_of_a_store_not_yet_upgraded_can_be_read(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "t1", write=True, user_oid="u1") as con:
        record_sync_state(con, "t1", "u1", "syncing", feature="calendar")
        con.execute("ALTER TABLE sync_state DROP COLUMN run_started_at")  # the user's bucket, as migration 1 left it
        con.execute("ALTER TABLE sync_state DROP COLUMN progress_at")
    with open_store(settings, "t1", write=False) as con:
        (p,) = read_sync_progress(con, "t1")
    assert (p.feature, p.running, p.started_at) == ("calendar", True, None)
    assert p.line() == "importing: 0 events scanned, 0 imported"
    assert sync_progress(settings, "nobody") == []  # no store: nothing, and nothing written


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def product(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    world = generate_world(
        seed=7, tenants=1, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30, calendars=True
    )
    # Registered and connected (no import yet); small pages so the import writes several batches.
    p = stand_up(world, tmp_path, monkeypatch, features=["email", "calendar"], O365SYNC_GRAPH_PAGE_SIZE="10")
    yield p
    p.running.stop()


def connect(p: Product, oid: str, start_import) -> httpx.Response:  # noqa: ANN001
    """The user signs in again through the web app (a re-consent), `start_import` wired into its callback."""
    tid = p.world.tenants[0].tid
    base_url, stop = run_in_thread(p.settings, port=urlsplit(p.settings.redirect_uri).port, start_import=start_import)
    try:
        with httpx.Client(verify=ssl_context(p.settings), follow_redirects=True, trust_env=False) as browser:
            p.running.identity.login_as(oid)
            reply = browser.get(f"{base_url}/connect", params={"tenant": tid})
    finally:
        stop()
    assert reply.status_code == 200, reply.text
    return reply


def stored(p: Product, oid: str) -> tuple[int, int]:
    tid = p.world.tenants[0].tid
    with open_store(p.settings, tid, write=False) as con:
        return tuple(
            con.execute(f"SELECT count(*) FROM {table} WHERE user_oid = ?", [oid]).fetchall()[0][0]
            for table in ("emails", "meetings")
        )


def progress_of(p: Product, oid: str) -> dict[str, object]:
    return {s.feature: s for s in sync_progress(p.settings, p.world.tenants[0].tid, oid)}


@pytest.mark.slow
def test_a_connect_starts_the_users_import_in_process_and_its_progress_shows(product):
    p, tid = product, product.world.tenants[0].tid
    alice, bob = p.world.tenants[0].users
    expected = {gid for oid, gid in p.world.expected_matches(tid) if oid == alice.oid}
    assert expected and stored(p, alice.oid) == (0, 0)

    seen: list[tuple[int, int, int]] = []  # (imported so far, emails stored) while the import runs

    def watch() -> None:
        while not done.is_set():
            with open_store(p.settings, tid, write=False) as con:  # a consistent view: between writes
                states = {s.feature: s for s in read_sync_progress(con, tid, alice.oid)}
                rows = con.execute("SELECT count(*) FROM emails WHERE user_oid = ?", [alice.oid]).fetchall()[0][0]
            if (email := states.get("email")) and email.running:
                seen.append((email.imported, rows, email.scanned))
            time.sleep(POLL_S)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    reply = connect(p, alice.oid, import_starter(p.settings))  # as `o365sync web` wires it
    assert STARTED in reply.text

    # Started within the bound (the thread exists when the page is sent), then finished with the oracle's counts.
    poll(lambda: progress_of(p, alice.oid), lambda s: "email" in s, 10, "no import started within 10 s of the callback")
    final = poll(
        lambda: progress_of(p, alice.oid),
        lambda s: set(s) == {"email", "calendar"} and not any(x.running for x in s.values()),
        300,
        "the import did not finish",
    )
    done.set()
    watcher.join()
    poll(lambda: IN_PROCESS.running(tid, alice.oid), lambda running: not running, 60, "the import thread did not end")
    email, calendar = final["email"], final["calendar"]
    assert (email.stage, calendar.stage) == ("idle", "idle")
    assert email.imported == len(expected) and email.scanned >= email.imported
    assert stored(p, alice.oid) == (len(expected), calendar.imported)
    assert calendar.line().endswith(f"{calendar.imported} imported") and "events scanned" in calendar.line()
    # While it ran, the counts never ran ahead of the data (and grew in several steps).
    assert seen and all(imported == rows for imported, rows, _ in seen)
    assert progress_of(p, bob.oid) == {}  # only the user who connected


@pytest.mark.slow
def test_two_connects_of_one_user_never_run_two_imports_at_once(product, monkeypatch):
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    guard, active, most, runs = threading.Lock(), [0], [0], [0]
    real = import_trigger.import_in_process

    def observed(*args):  # noqa: ANN002, ANN202 - counts the imports of the mailbox running at once
        with guard:
            active[0], runs[0] = active[0] + 1, runs[0] + 1
            most[0] = max(most[0], active[0])
        try:
            return real(*args)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(import_trigger, "import_in_process", observed)
    start = import_starter(p.settings)
    # A sync of the tenant is running (it holds the tenant's sync locks): the import waits for it, and connects
    # meanwhile ask for one more run after it, not for a second import beside it.
    with tenant_sync_locks(tenant_dir(p.settings, tid), ["calendar", "email"]):
        replies = [connect(p, alice.oid, start) for _ in range(3)]
        assert progress_of(p, alice.oid) == {}
    assert STARTED in replies[0].text
    assert QUEUED in replies[1].text and QUEUED in replies[2].text
    poll(lambda: IN_PROCESS.running(tid, alice.oid), lambda running: not running, 300, "the imports did not end")
    assert (runs[0], most[0]) == (2, 1)
    final = progress_of(p, alice.oid)
    expected = {gid for oid, gid in p.world.expected_matches(tid) if oid == alice.oid}
    assert final["email"].stage == "idle" and stored(p, alice.oid)[0] == len(expected)
    assert final["email"].imported == 0  # the second run found everything imported by the first


def test_an_import_that_cannot_start_leaves_the_connect_successful(monkeypatch, caplog):
    settings = Settings()

    def broken(*args, **kwargs) -> ImportStarted:
        raise ConnectionError("prefect unreachable at http://secret-host")

    monkeypatch.setattr(IN_PROCESS, "start", broken)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started = start_user_import(settings, "t1", "u1")
    assert started.how == "failed" and started.line == NOT_STARTED.format(ref=started.ref)
    assert f"ref={started.ref}" in caplog.text and "ConnectionError" in caplog.text
    assert "secret-host" not in caplog.text


@pytest.mark.slow
def test_with_a_prefect_server_the_connect_creates_a_user_import_run_that_completes(
    prefect_server, product, monkeypatch
):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.settings import get_current_settings

    from deployments.dispatch import job_kind_name
    from deployments.prefect_server import _prefect_executable
    from deployments.register import register_deployments
    from deployments.user_import import USER_IMPORT
    from tests.test_workers import _process_pool

    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    monkeypatch.setenv("PREFECT_API_URL", str(get_current_settings().api.url))  # a Prefect server is configured
    pool = _process_pool()
    register_deployments(p.settings, pool, dispatchers_paused=True)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(job_kind_name(USER_IMPORT))  # one for all tenants

    def all_runs() -> list:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                flow_run_filter=FlowRunFilter(),
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            )

    earlier = {r.id for r in all_runs()}  # the deployment may have runs of other tests of the session

    def runs() -> list:
        return [r for r in all_runs() if r.id not in earlier]

    reply = connect(p, alice.oid, import_starter(p.settings))
    assert STARTED in reply.text
    # The run exists once the callback's page has been sent (polled with a bound of 10 s).
    (run,) = poll(runs, lambda found: len(found) == 1, 10, "no user-import run within 10 s of the callback")
    assert run.parameters == {"tenant_id": tid, "user_id": alice.oid}  # ids only
    again = start_user_import(p.settings, tid, alice.oid)  # the same connect started again (a retry): same run
    assert (again.how, again.flow_run_id) == ("prefect", str(run.id)) and len(runs()) == 1

    worker = subprocess.run(  # a worker of the pool picks the run up and runs it
        [*_prefect_executable(), "worker", "start", "--pool", pool, "--run-once", "--limit", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run.id)
    assert run.state.is_completed(), (run.state, worker.stdout[-3000:])
    assert run.name.startswith("user-import: ") and run.name.endswith(f" / {alice.oid}")
    expected = p.world.expected_matches(tid)
    assert stored_matches(p.settings, tid) == {k: v for k, v in expected.items() if k[0] == alice.oid}
    final = progress_of(p, alice.oid)
    assert final["email"].stage == final["calendar"].stage == "idle"
    assert final["email"].imported == stored(p, alice.oid)[0] and final["calendar"].imported == stored(p, alice.oid)[1]


def test_each_email_tenant_has_an_on_demand_user_import_deployment_one_run_at_a_time(tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from deployments.user_import import user_import_deployment, user_import_deployments
    from o365sync.tenants import TenantConfig, save_tenant

    settings = Settings(data_dir=tmp_path)
    save_tenant(settings, TenantConfig(id="contoso", domains=["contoso.com"]))
    save_tenant(settings, TenantConfig(id="fabrikam", domains=["fabrikam.com"], features=[]))
    (d,) = user_import_deployments(settings)
    assert d.full_name == user_import_deployment("contoso") == "user-import/user-import-contoso"
    assert d.parameters == {"tenant_id": "contoso"} and not d.schedules
    assert d.concurrency_limit == 1
    assert d.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


def test_status_shows_a_running_import_at_80_columns(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app.cli import app

    world = generate_world(seed=3, tenants=1, users_per_tenant=1, messages_per_user=5)
    p = stand_up(world, tmp_path, monkeypatch)  # connected, not imported
    try:
        tid, alice = world.tenants[0].tid, world.tenants[0].users[0]
        with open_store(p.settings, tid, write=True) as con:  # an import under way, two writes in
            record_sync_state(con, tid, alice.oid, "syncing")
            write_mail_batch(con, tid, alice.oid, replace(make_batch(["m1", "m2"], T0), scanned=12_400))
            write_mail_batch(con, tid, alice.oid, replace(make_batch([f"n{i}" for i in range(308)], T0), scanned=0))
        result = CliRunner().invoke(app, ["status"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert "             importing: 12,400 messages scanned, 310 imported" in lines
        assert max(len(line) for line in lines) <= 80
        assert any(line.strip().startswith("this run") for line in lines)
        report = json.loads(CliRunner().invoke(app, ["status", "--json"]).output)
        (user,) = report["tenants"][0]["users"]
        progress = user["features"]["email"]["progress"]
        assert (progress["running"], progress["scanned"], progress["imported"]) == (True, 12_400, 310)
    finally:
        p.running.stop()


def test_a_prefect_api_that_does_not_answer_does_not_hold_the_page(monkeypatch, tmp_path):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    monkeypatch.setattr(import_trigger, "START_WAIT_S", 0.5)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            started = start_user_import(Settings(data_dir=tmp_path), "t1", "u1")
    finally:
        silent.close()
    assert (started.how, started.line, started.flow_run_id) == ("pending", import_trigger.PENDING, None)
