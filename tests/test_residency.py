"""Data residency: every file of a tenant (store with its bucket files, snapshot with its copies, token caches, CRM
credentials, locks) lives under its region's storage root, syncs keep working there, and moving is an explicit
command that leaves nothing behind and republishes the analysts' snapshot at the new root."""

from __future__ import annotations

import json

import duckdb
import pytest

from o365sync.residency import move_tenant
from o365sync.store import publish_snapshot, snapshot_path
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import load_tenant, registry_dir, save_tenant
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.product import stand_up, stored_matches


def tenant_files(root, tid: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and tid in str(p))


def snapshot_rows(settings, tid: str) -> int:
    """The emails the analysts' snapshot shows (opened as an analyst does)."""
    con = duckdb.connect(str(snapshot_path(settings, tid)), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM emails").fetchone()[0]
    finally:
        con.close()


@pytest.mark.slow
def test_files_live_in_the_tenants_region_and_move_with_it(tmp_path, monkeypatch):
    roots = {"eu": tmp_path / "eu", "us": tmp_path / "us"}
    monkeypatch.setenv("O365SYNC_REGIONS", json.dumps({k: str(v) for k, v in roots.items()}))
    world = generate_world(seed=41, users_per_tenant=1, messages_per_user=40, contacts_per_tenant=20)
    p = stand_up(world, tmp_path, monkeypatch)
    try:
        tid, user = world.tenants[0].tid, world.tenants[0].users[0]
        data_dir = p.settings.data_dir
        assert any(f.endswith(".token") for f in tenant_files(data_dir, tid))  # connected in the default location

        assert move_tenant(p.settings, tid, "eu")["files"] > 0
        assert tenant_files(data_dir, tid) == [f"tenants/{tid}/tenant.json"]  # only the registry entry
        refresh_crm_snapshot(p.settings, tid)
        sync_mailbox_now(resolve_tenant(p.settings, tid), user.oid)
        publish_snapshot(p.settings, tid)
        assert stored_matches(p.settings, tid) == world.expected_matches(tid)
        eu = tenant_files(roots["eu"], tid)
        assert {f"analytics/{tid}.duckdb", f"tenants/{tid}/store.duckdb", f"tenants/{tid}/crm.secret"} <= set(eu)
        assert any(f.endswith(".token") for f in eu)
        assert any(f.startswith(f"tenants/{tid}/parts/b") for f in eu), "the user's rows are in a bucket file"
        assert any(f.startswith(f"analytics/{tid}.parts/b") for f in eu), "and the snapshot has a copy of it"
        assert tenant_files(data_dir, tid) == [f"tenants/{tid}/tenant.json"]
        assert snapshot_path(p.settings, tid).is_relative_to(roots["eu"])

        published = snapshot_rows(p.settings, tid)
        move_tenant(p.settings, tid, "us")
        assert load_tenant(p.settings, tid).region == "us" and tenant_files(roots["eu"], tid) == []
        us = tenant_files(roots["us"], tid)
        assert any(f.startswith(f"tenants/{tid}/parts/b") for f in us) and f"analytics/{tid}.duckdb" in us
        # republished at the new root: the views file reads the copies there (the old root's are gone)
        assert snapshot_path(p.settings, tid).is_relative_to(roots["us"])
        assert snapshot_rows(p.settings, tid) == published > 0
        world.add_message(user.oid, "inbox", kind="contact")
        # tokens and cursors were moved too: it just continues
        sync_mailbox_now(resolve_tenant(p.settings, tid), user.oid)
        assert stored_matches(p.settings, tid) == world.expected_matches(tid)
        assert tenant_files(roots["eu"], tid) == [] and tenant_files(data_dir, tid) == [f"tenants/{tid}/tenant.json"]
    finally:
        p.running.stop()


def test_an_unknown_region_is_refused_before_anything_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("O365SYNC_REGIONS", json.dumps({"eu": str(tmp_path / "eu")}))
    from o365sync.settings import load_settings
    from o365sync.tenants import TenantConfig

    settings = load_settings(data_dir=tmp_path / "data")
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"]))
    with pytest.raises(ValueError, match="unknown region 'mars'"):
        move_tenant(settings, "t1", "mars")
    with pytest.raises(ValueError, match="unknown region"):
        save_tenant(settings, TenantConfig(id="t2", domains=["contoso.com"], region="mars"))
    assert load_tenant(settings, "t1").region is None and not registry_dir(settings, "t2").exists()
