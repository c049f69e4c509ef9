"""`o365sync status` at 80 columns and as JSON, `o365sync sql` on the analysts' snapshot, and what
`o365sync simulate` starts and prints — against a simulated tenant imported through the real flows."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex

import duckdb
import pytest
from typer.testing import CliRunner

from app.cli import app
from simulators.world import generate_world
from tests.product import free_port, stand_up


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture(scope="module")
def imported(prefect_server, tmp_path_factory):  # noqa: ARG001 - the flows need the Prefect API
    """One tenant, two users, imported twice (the second run finds nothing new)."""
    from flows.initial_import import initial_import

    tmp = tmp_path_factory.mktemp("cli-status")
    world = generate_world(tenants=1, users_per_tenant=2, messages_per_user=60, calendars=True)
    with pytest.MonkeyPatch.context() as mp:
        product = stand_up(world, tmp, mp, features=["email", "calendar", "teams"])
        try:
            tid = world.tenants[0].tid
            initial_import(tid)
            initial_import(tid)
            yield product, dict(os.environ)
        finally:
            product.running.stop()


def run(env: dict, *args: str, columns: int = 80):  # noqa: ANN201
    return CliRunner().invoke(app, list(args), env={**env, "COLUMNS": str(columns)})


@pytest.mark.slow
def test_status_is_readable_at_80_columns(imported):
    product, env = imported
    tenant = product.world.tenants[0]
    result = run(env, "status")
    out = plain(result.output)
    assert result.exit_code == 0, out
    assert "…" not in out and "..." not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for user in tenant.users:  # names next to the full ids
        assert user.display_name in out and user.oid in out
    assert re.findall(r"\d{4}-\d\d-\d\d", out)
    assert len(re.findall(r"\d{4}-\d\d-\d\d", out)) == len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", out))


@pytest.mark.slow
def test_status_json_has_stable_keys_and_totals_since_connect(imported):
    product, env = imported
    tenant = product.world.tenants[0]
    result = run(env, "status", "--tenant", tenant.tid, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == {"generated_at", "tenants"}
    (t,) = report["tenants"]
    assert set(t) == {"id", "name", "crm", "late_match", "users"} and t["id"] == tenant.tid
    assert t["late_match"] is None  # no CRM change since the import: no late-match work ever queued
    assert (
        set(t["crm"])
        == {"kind", "state", "last_refresh_at", "mode", "last_success_at", "last_full_read_at", "last_error"}
        and t["crm"]["state"] == "ok"
    )
    assert {u["oid"] for u in t["users"]} == {u.oid for u in tenant.users}
    from o365sync.store import open_store

    with open_store(product.settings, tenant.tid, write=False) as con:
        stored = dict(con.execute("SELECT user_oid, count(*) FROM emails GROUP BY ALL").fetchall())
    for u in t["users"]:
        assert set(u) == {"oid", "upn", "display_name", "connection", "offboarding", "features"}
        assert u["connection"] == "connected" and u["display_name"]
        email = u["features"]["email"]
        assert set(email) == {
            "stage",
            "last_run_at",
            "last_success_at",
            "lag_seconds",
            "consecutive_failures",
            "next_retry_at",
            "last_error",
            "last_run",
            "total",
            "progress",
        }
        assert email["stage"] == "idle"
        assert email["progress"]["running"] is False and email["progress"]["imported"] == email["last_run"]["imported"]
        assert email["last_run"]["imported"] == 0  # the second, quiet run
        assert email["total"]["imported"] == stored.get(u["oid"], 0) > 0  # what the first run imported
        assert email["total"]["scanned"] >= email["total"]["imported"]


@pytest.mark.slow
def test_a_user_whose_token_is_gone_needs_a_reconnect_for_every_feature(imported):
    from o365sync.auth import token_path

    product, env = imported
    tenant = product.world.tenants[0]
    gone = tenant.users[0]
    token = token_path(product.settings, tenant.tid, gone.oid)
    kept = token.read_bytes()
    token.unlink()  # what a refused refresh token leaves behind (the connection's metadata stays)
    try:
        report = json.loads(run(env, "status", "--json").output)
        user = next(u for u in report["tenants"][0]["users"] if u["oid"] == gone.oid)
        assert user["connection"] == "reconnect_needed"
        assert {"email", "calendar"} <= set(user["features"])
        assert {f["stage"] for f in user["features"].values()} == {"reconnect_needed"}
        text = plain(run(env, "status").output)
        block = text.split(gone.display_name, 1)[1].split("\n\n", 1)[0]
        for feature in user["features"]:
            assert re.search(rf"{feature}\s+reconnect needed", block), block
    finally:
        token.write_bytes(kept)


@pytest.mark.slow
def test_sql_queries_the_snapshot_as_table_csv_and_json(imported):
    from o365sync.store import snapshot_path

    product, env = imported
    tid = product.world.tenants[0].tid
    query = "SELECT kind, count(*) AS n FROM activities GROUP BY ALL ORDER BY kind"
    with duckdb.connect(str(snapshot_path(product.settings, tid)), read_only=True) as con:
        expected = con.execute(query).fetchall()
    assert {k for k, _ in expected} == {"email", "meeting"}
    table = run(env, "sql", query, columns=120)  # the only tenant: no --tenant needed
    assert table.exit_code == 0, table.output
    assert all(str(n) in table.output and kind in table.output for kind, n in expected)
    as_csv = run(env, "sql", "--tenant", tid, "--format", "csv", query)
    assert list(csv.reader(io.StringIO(as_csv.output))) == [["kind", "n"], *[[k, str(n)] for k, n in expected]]
    as_json = run(env, "sql", "--tenant", tid, "--format", "json", query)
    assert json.loads(as_json.output) == [{"kind": k, "n": n} for k, n in expected]


@pytest.mark.slow
def test_sql_is_read_only(imported):
    from o365sync.store import snapshot_path

    product, env = imported
    tid = product.world.tenants[0].tid
    snap = snapshot_path(product.settings, tid)
    before = snap.read_bytes()
    for statement in (
        "DELETE FROM emails",
        "DROP VIEW activities",
        "UPDATE emails SET subject = 'x'",
        f"COPY (SELECT subject FROM emails) TO '{snap.parent}/leak.csv'",
        "INSTALL httpfs",
        "SET enable_external_access = true",
    ):
        result = run(env, "sql", "--tenant", tid, statement)
        out = plain(result.output).strip()
        assert result.exit_code != 0 and "\n" not in out and "Traceback" not in out, out
    assert snap.read_bytes() == before and not (snap.parent / "leak.csv").exists()


def test_simulate_starts_the_demo_world_and_prints_a_complete_tenant_add(tmp_path):
    from app.demo import DEMO_FEATURES, demo_world, simulate_world

    lines: list[str] = []
    port = free_port()
    running = simulate_world(tmp_path, 7, 2, 20, 20, port, lines.append)
    try:
        world = running.world
        assert world.calendars is not None and world.calendars.teams  # calendars and Teams, as in the demo
        assert [u.oid for u in world.tenants[0].users] == [u.oid for u in demo_world(7, 2, 20, 20).tenants[0].users]
    finally:
        running.stop()
    text = "\n".join(lines)
    sf = running.salesforce
    secret, refresh = sf.client_secret, sf.refresh_token_for(world.tenants[0].tid)
    (add,) = [line for line in lines if "o365sync tenant add" in line]
    words = shlex.split(add)
    assignments = dict(w.split("=", 1) for w in words[: words.index("o365sync")])
    assert assignments == {"O365SYNC_CRM_CLIENT_SECRET": secret, "O365SYNC_CRM_REFRESH_TOKEN": refresh}
    options = words[words.index("o365sync") :]
    assert secret not in options and refresh not in options
    assert not [o for o in options if o in ("--crm-client-secret", "--crm-refresh-token", "--crm-token")]
    assert [options[i + 1] for i, o in enumerate(options) if o == "--feature"] == DEMO_FEATURES
    assert options[options.index("--id") + 1] == world.tenants[0].tid and "--crm-client-id" in options
    for user in world.tenants[0].users:
        assert f"/connect?tenant={world.tenants[0].tid}&login_hint={user.upn}" in text
    assert f"O365SYNC_REDIRECT_URI=http://localhost:{port}/auth/callback" in text and "o365sync sql" in text


@pytest.mark.slow
def test_a_failed_import_ends_in_one_line_and_prefect_prints_no_traceback(imported):
    """The real command in its own process (Prefect's console logging as people see it). Runs last in this
    module: it leaves one user failed."""
    import subprocess
    import sys

    product, env = imported
    tenant = product.world.tenants[0]
    product.running.graph.inject(tenant.users[0].oid, 400, count=1, code="ErrorInvalidRequest")  # next request
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "import", "--tenant", tenant.tid],
        env={**env, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    printed = plain(done.stdout + done.stderr)
    assert done.returncode == 1, printed
    assert "Traceback" not in printed and "Encountered exception" in printed  # Prefect's line, without traceback
    assert re.fullmatch(
        rf"error: 1 of \d+ user syncs failed in tenant {tenant.tid}; who and why: o365sync status "
        rf"--tenant {tenant.tid}",
        plain(done.stderr).strip().splitlines()[-1],
    ), printed


def test_totals_since_connect_carry_on_from_a_store_written_before_they_existed(tmp_path, monkeypatch):
    """The store change is additive: an older sync_state (no total_* columns) reads fine read-only, and its last
    run's counts start the totals at the next write."""
    from o365sync.settings import load_settings
    from o365sync.store import RunCounts, open_store, read_sync_states, record_sync_state, store_path
    from o365sync.tenants import TenantConfig, save_tenant

    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path))
    settings = load_settings()
    save_tenant(settings, TenantConfig(id="t1", domains=["example.org"]))
    path = store_path(settings, "t1")
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:  # sync_state as the store of commit 518385b created it
        con.execute(
            "CREATE TABLE sync_state (tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, stage VARCHAR "
            "NOT NULL, last_run_at TIMESTAMPTZ, last_success_at TIMESTAMPTZ, last_error VARCHAR, "
            "consecutive_failures INTEGER NOT NULL DEFAULT 0, scanned BIGINT, matched BIGINT, imported BIGINT, "
            "discarded BIGINT, next_retry_at TIMESTAMPTZ, excluded VARCHAR, feature VARCHAR DEFAULT 'email')"
        )
        con.execute(
            "INSERT INTO sync_state (tenant_id, user_oid, stage, scanned, matched, imported, discarded) "
            "VALUES ('t1', 'u1', 'idle', 5, 2, 2, 3)"
        )
    with open_store(settings, "t1", write=False) as con:
        (old,) = read_sync_states(con, "t1")
    assert old["imported"] == 2 and old["total_imported"] is None
    with open_store(settings, "t1", write=True) as con:
        record_sync_state(con, "t1", "u1", "idle", RunCounts(scanned=3, matched=1, imported=1, discarded=2))
        record_sync_state(con, "t1", "u1", "syncing")
        (new,) = read_sync_states(con, "t1")
    assert (new["scanned"], new["imported"]) == (0, 0)
    assert (new["total_scanned"], new["total_matched"], new["total_imported"], new["total_discarded"]) == (8, 3, 3, 5)


def test_status_reads_a_store_made_before_the_late_match_table(tmp_path, monkeypatch):
    """Status opens stores read-only (no migration): one without `late_match` shows no late matches, no error."""
    from o365sync.settings import load_settings
    from o365sync.store import store_path
    from o365sync.tenants import TenantConfig, save_tenant
    from tests.test_store_migrations import make_old_store

    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path))
    settings = load_settings()
    save_tenant(settings, TenantConfig(id="t1", domains=["example.org"]))
    make_old_store(store_path(settings, "t1"))
    result = run(dict(os.environ), "status", "--tenant", "t1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tenants"][0]["late_match"] is None
    shown = run(dict(os.environ), "status", "--tenant", "t1")
    assert shown.exit_code == 0 and "late match" not in shown.output, shown.output
