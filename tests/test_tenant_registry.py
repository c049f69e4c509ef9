"""The tenant registry against a simulated world: registering never overwrites a tenant, an update keeps everything
it is not told to change, nothing creates a tenant's files outside the place they live, a move never loses the only
copy of a store, and a tenant id typed in upper case is the same tenant."""

from __future__ import annotations

import json
import os
import uuid

import duckdb
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from app.cli import app
from app.web import run_in_thread
from o365sync.auth import connected_users
from o365sync.erasure import store_row_counts
from o365sync.http import ssl_context
from o365sync.residency import MoveRefused, move_tenant
from o365sync.settings import load_settings
from o365sync.store import SCHEMA, open_store, store_path
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import (
    TenantConfig,
    TenantMisplaced,
    canonical_id,
    list_tenants,
    load_crm_secrets,
    load_tenant,
    registry_dir,
    save_tenant,
    tenant_dir,
)
from simulators.running import start_world
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.product import free_port, stand_up, stored_matches

runner = CliRunner()


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None):  # noqa: A002, ANN201
    result = runner.invoke(app, list(args), input=input, env={"COLUMNS": "250", **(env or {})})
    result.one_line = " ".join(result.output.split())
    return result


def tenant_files(root, tid: str) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and tid in str(p) and not p.name.endswith(".lock")
    )


def rows_in(path, table: str) -> int:
    """The rows of `table` in the live store at `path` (the tenant file and its bucket files, read directly)."""
    return store_row_counts(path).get(table, 0)


def emails_in(path) -> int:
    return rows_in(path, "emails")


def accounts_in(path) -> int:
    return rows_in(path, "crm_accounts")


@pytest.mark.slow
def test_reregistering_and_moving_never_loses_the_store(tmp_path, monkeypatch):
    """The issue's reproduction: a second `tenant add`, `status` and a `tenant move` used to take a tenant in a
    region from 24 stored emails to 0."""
    eu = tmp_path / "eu"
    monkeypatch.setenv("O365SYNC_REGIONS", json.dumps({"eu": str(eu)}))
    world = generate_world(seed=41, users_per_tenant=1, messages_per_user=40, contacts_per_tenant=20)
    p = stand_up(world, tmp_path, monkeypatch)
    try:
        tenant, user = world.tenants[0], world.tenants[0].users[0]
        tid, settings, data_dir = tenant.tid, p.settings, p.settings.data_dir
        move_tenant(settings, tid, "eu")
        refresh_crm_snapshot(settings, tid)
        sync_mailbox_now(resolve_tenant(settings, tid), user.oid)
        emails = emails_in(eu / "tenants" / tid / "store.duckdb")
        assert emails > 0
        assert cli("tenant", "block", tid, "spam.example").exit_code == 0
        assert cli("tenant", "block", tid, "x.org", "--user", user.oid.upper()).exit_code == 0
        assert cli("user", "set", tid, user.oid, "--internal-meetings").exit_code == 0
        before = load_tenant(settings, tid)
        assert before.region == "eu" and before.blocklist_for(user.oid) == ["spam.example", "x.org"]
        assert before.preferences_for(user.oid).internal_meetings

        sf = p.running.salesforce
        secrets = (
            f"O365SYNC_CRM_CLIENT_SECRET={sf.client_secret}\nO365SYNC_CRM_REFRESH_TOKEN={sf.refresh_token_for(tid)}\n"
        )
        add = cli(
            "tenant",
            "add",
            "--id",
            tid,
            *[a for d in tenant.domains for a in ("--domain", d)],
            "--crm-login-url",
            sf.base_url,
            "--crm-client-id",
            sf.client_id,
            "--crm-secrets-stdin",
            input=secrets,
        )
        assert add.exit_code == 2 and f"o365sync tenant update {tid}" in add.one_line
        assert load_tenant(settings, tid) == before

        update = cli("tenant", "update", tid, "--name", "Renamed", "--crm-secrets-stdin", input=secrets)
        assert update.exit_code == 0, update.output
        after = load_tenant(settings, tid)
        assert after.name == "Renamed" and after.model_dump(exclude={"name"}) == before.model_dump(exclude={"name"})
        assert (eu / "tenants" / tid / "crm.secret").exists() and load_crm_secrets(settings, tid)
        assert cli("status").exit_code == 0
        assert tenant_files(data_dir, tid) == [f"tenants/{tid}/tenant.json"]  # nothing created outside the region
        assert refresh_crm_snapshot(settings, tid)["people"] > 0  # the new secrets work where they were stored

        # The configuration points elsewhere than the files (what the old `tenant add` did): nothing may be
        # created at the configured place, not by a reader, not by a writer...
        save_tenant(settings, after.model_copy(update={"region": None}))
        for write in (False, True):
            with (
                pytest.raises(TenantMisplaced, match=f"tenant move {tid} --region eu"),
                open_store(settings, tid, write=write),
            ):
                pass
        with pytest.raises(TenantMisplaced):
            sync_mailbox_now(resolve_tenant(settings, tid), user.oid)
        assert tenant_files(data_dir, tid) == [f"tenants/{tid}/tenant.json"]
        # ... and moving to where the files are points the configuration back at them.
        move = cli("tenant", "move", tid, "--region", "eu")
        assert move.exit_code == 0, move.output
        assert load_tenant(settings, tid).region == "eu" and emails_in(store_path(settings, tid)) == emails

        # A data dir damaged by an earlier version (an empty store at the default location): no move overwrites
        # or deletes the store that holds the mail.
        save_tenant(settings, after.model_copy(update={"region": None}))
        with duckdb.connect(str(data_dir / "tenants" / tid / "store.duckdb")) as con:
            con.execute(SCHEMA)
        for region in ("eu", "default"):
            refused = cli("tenant", "move", tid, "--region", region)
            assert refused.exit_code == 2 and "nothing was changed" in refused.one_line, refused.output
            assert len(refused.output.strip().splitlines()) == 1
        assert emails_in(eu / "tenants" / tid / "store.duckdb") == emails
    finally:
        p.running.stop()


def _tenant_with_a_store(settings, region: str | None) -> None:
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"], region=region))
    with open_store(settings, "t1", write=True) as con:
        con.execute("INSERT INTO crm_accounts VALUES ('a1', 'Fabrikam', 'fabrikam.com')")


def _accounts(settings) -> int:
    with open_store(settings, "t1", write=False) as con:
        return con.execute("SELECT count(*) FROM crm_accounts").fetchone()[0]


def test_a_move_onto_the_current_location_is_refused(tmp_path, monkeypatch):
    for root in ("eu", "data"):
        (tmp_path / root).mkdir()
        (tmp_path / f"{root}-alias").symlink_to(tmp_path / root)
    regions = {"eu": tmp_path / "eu", "eu-alias": tmp_path / "eu-alias", "home": tmp_path / "data-alias"}
    monkeypatch.setenv("O365SYNC_REGIONS", json.dumps({k: str(v) for k, v in regions.items()}))
    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    _tenant_with_a_store(settings, "eu")
    refused = cli("tenant", "move", "t1", "--region", "eu-alias")
    assert refused.exit_code == 2 and "where its files already are" in refused.one_line, refused.output
    assert load_tenant(settings, "t1").region == "eu" and _accounts(settings) == 1

    assert cli("tenant", "move", "t1", "--region", "default").exit_code == 0
    with pytest.raises(MoveRefused, match="where its files already are"):
        move_tenant(settings, "t1", "home")  # the data dir under another name
    assert load_tenant(settings, "t1").region is None and _accounts(settings) == 1
    assert not (tmp_path / "eu" / "tenants" / "t1").exists()

    assert cli("tenant", "move", "t1", "--region", "eu").exit_code == 0
    assert cli("tenant", "move", "t1", "--region", "home").exit_code == 0  # back into the registry's own folder
    assert load_tenant(settings, "t1").region == "home" and _accounts(settings) == 1
    assert not (tmp_path / "eu" / "tenants" / "t1").exists()


@pytest.mark.parametrize(
    "rows, newer, refused", [(0, True, "newer than"), (1, False, "different from"), (0, False, None)]
)
def test_a_destination_store_is_replaced_only_if_empty_and_older(rows, newer, refused, tmp_path, monkeypatch):
    monkeypatch.setenv("O365SYNC_REGIONS", json.dumps({"eu": str(tmp_path / "eu")}))
    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    _tenant_with_a_store(settings, None)
    source = store_path(settings, "t1")
    target = tmp_path / "eu" / "tenants" / "t1" / "store.duckdb"
    target.parent.mkdir(parents=True)
    with duckdb.connect(str(target)) as con:
        con.execute(SCHEMA)
        con.execute("INSERT INTO crm_accounts SELECT 'x', 'X', 'x.com' FROM range(?)", [rows])
    shift = 10**9 if newer else -(10**9)
    os.utime(target, ns=(source.stat().st_mtime_ns + shift,) * 2)
    if refused:
        with pytest.raises(MoveRefused, match=refused):
            move_tenant(settings, "t1", "eu")
        assert load_tenant(settings, "t1").region is None and accounts_in(target) == rows
    else:
        move_tenant(settings, "t1", "eu")
        assert load_tenant(settings, "t1").region == "eu" and _accounts(settings) == 1
        assert not source.exists()


def test_a_reader_of_a_tenant_without_a_store_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"]))
    with open_store(settings, "t1", write=False) as con:
        assert con.execute("SELECT count(*) FROM emails").fetchone()[0] == 0
    assert [p.name for p in tenant_dir(settings, "t1").iterdir()] == ["tenant.json"]


@pytest.mark.slow
def test_an_upper_case_tenant_id_registers_connects_and_syncs(tmp_path, monkeypatch):
    world = generate_world(seed=43, users_per_tenant=1, messages_per_user=30, contacts_per_tenant=20)
    tenant, user = world.tenants[0], world.tenants[0].users[0]
    upper = tenant.tid.upper()
    port = free_port()
    redirect = f"http://localhost:{port}/auth/callback"
    running = start_world(world, tmp_path / "tls", redirect_uris=[redirect])
    try:
        for key, value in running.settings_env(tmp_path / "data", redirect).items():
            monkeypatch.setenv(key, value)
        sf = running.salesforce
        added = cli(
            "tenant",
            "add",
            "--id",
            upper,
            *[a for d in tenant.domains for a in ("--domain", d)],
            "--crm-login-url",
            sf.base_url,
            "--crm-client-id",
            sf.client_id,
            env={
                "O365SYNC_CRM_CLIENT_SECRET": sf.client_secret,
                "O365SYNC_CRM_REFRESH_TOKEN": sf.refresh_token_for(tenant.tid),
            },
        )
        assert added.exit_code == 0, added.output
        settings = load_settings()
        base_url, stop_web = run_in_thread(settings, port=port)
        try:
            with httpx.Client(verify=ssl_context(settings), follow_redirects=True, trust_env=False) as browser:
                running.identity.login_as(user.oid)
                reply = browser.get(f"{base_url}/connect", params={"tenant": upper})
        finally:
            stop_web()
        assert reply.status_code == 200 and f"Connected {user.display_name}" in reply.text, reply.text
        assert [t.id for t in list_tenants(settings)] == [tenant.tid] == [load_tenant(settings, upper).id]
        assert tenant_dir(settings, upper) == tenant_dir(settings, tenant.tid)
        assert [u.oid for u in connected_users(settings, tenant.tid)] == [user.oid]
        refresh_crm_snapshot(settings, tenant.tid)
        sync_mailbox_now(resolve_tenant(settings, tenant.tid), user.oid)
        assert stored_matches(settings, tenant.tid) == world.expected_matches(tenant.tid)
        assert cli("tenant", "show", upper).one_line.count(f"connected user {user.oid}") == 1
    finally:
        running.stop()


@given(st.uuids(), st.lists(st.booleans(), min_size=36, max_size=36))
def test_a_guid_names_one_tenant_in_any_case(guid: uuid.UUID, upper: list[bool]):
    settings = load_settings(data_dir="/srv/o365sync")
    typed = "".join(c.upper() if u else c for c, u in zip(str(guid), upper, strict=True))
    assert canonical_id(typed) == str(guid) == TenantConfig(id=typed, domains=["contoso.com"]).id
    assert registry_dir(settings, typed) == registry_dir(settings, str(guid))


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
def test_other_ids_are_kept_as_typed(tenant_id: str):
    assert canonical_id(tenant_id) == tenant_id == TenantConfig(id=tenant_id, domains=["contoso.com"]).id
