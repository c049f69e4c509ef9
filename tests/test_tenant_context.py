"""The `Tenant` context: resolved once from the registry, it names the same files as the per-call path functions,
fails with the registry's own errors and creates nothing (a reader never starts a store)."""

from __future__ import annotations

import dataclasses
import fcntl
import uuid

import pytest

from o365sync.offboarding import end_subscription_now
from o365sync.residency import move_tenant
from o365sync.settings import load_settings
from o365sync.store import open_store, publish_snapshot, snapshot_path, store_path
from o365sync.sync.tenant import sync_states
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import (
    TenantConfig,
    TenantMisplaced,
    TenantNotFound,
    TenantUnreadable,
    region_root,
    registry_dir,
    save_tenant,
    tenant_dir,
)


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path / "data", regions={"eu": tmp_path / "eu"})


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("region", [None, "eu"])
def test_the_context_names_the_files_the_path_functions_name(settings, region):
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"], region=region))
    with open_store(settings, "t1", write=True):
        pass
    publish_snapshot(settings, "t1")
    tenant = resolve_tenant(settings, "t1")
    assert tenant.settings is settings and tenant.config.region == region and tenant.id == "t1"
    assert tenant.root == region_root(settings, region)
    assert tenant.folder == tenant_dir(settings, "t1") and tenant.folder.is_relative_to(tenant.root)
    assert tenant.store_path == store_path(settings, "t1") and tenant.store_path.exists()
    assert tenant.snapshot_path == snapshot_path(settings, "t1") and tenant.snapshot_path.exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tenant.folder = settings.data_dir  # type: ignore[misc]


def test_a_guid_typed_in_upper_case_resolves_to_the_canonical_tenant(settings):
    guid = str(uuid.UUID(int=7))
    save_tenant(settings, TenantConfig(id=guid, domains=["contoso.com"]))
    tenant = resolve_tenant(settings, guid.upper())
    assert tenant.id == guid and tenant.folder == tenant_dir(settings, guid)


def test_an_unknown_tenant_fails_in_one_line_and_nothing_is_created(settings, tmp_path):
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"]))
    before = files_under(tmp_path)
    with pytest.raises(TenantNotFound, match=r"tenant t2 is not registered in data dir .*O365SYNC_DATA_DIR"):
        resolve_tenant(settings, "t2")
    with pytest.raises(TenantNotFound, match="invalid tenant id|not registered"):
        resolve_tenant(settings, "../t1")
    assert files_under(tmp_path) == before


def test_a_registered_tenant_without_files_resolves_without_creating_any(settings, tmp_path):
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"], region="eu"))
    before = files_under(tmp_path)
    tenant = resolve_tenant(settings, "t1")
    assert sync_states(tenant, "email") == {}  # a reader of a tenant without a store
    assert not tenant.store_path.exists() and files_under(tmp_path) == before


def test_an_unreadable_entry_and_misplaced_files_raise_the_registry_errors(settings):
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"]))
    with open_store(settings, "t1", write=True):
        pass
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"], region="eu"))  # region reset by hand
    with pytest.raises(TenantMisplaced, match="o365sync tenant move t1 --region default"):
        resolve_tenant(settings, "t1")
    (registry_dir(settings, "t1") / "tenant.json").write_text("{not json")
    with pytest.raises(TenantUnreadable, match="tenant.json is invalid"):
        resolve_tenant(settings, "t1")


def test_a_context_resolved_before_a_move_follows_the_files(settings):
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"]))
    with open_store(settings, "t1", write=True) as con:
        con.execute("INSERT INTO crm_accounts SELECT 'a1', 'A', 'a.com'")
    stale = resolve_tenant(settings, "t1")
    move_tenant(settings, "t1", "eu")
    with stale.open_store(write=False) as con:
        assert con.execute("SELECT count(*) FROM crm_accounts").fetchall() == [(1,)]
    with stale.open_store(write=True) as con:
        con.execute("INSERT INTO crm_accounts SELECT 'a2', 'B', 'b.com'")
    moved = resolve_tenant(settings, "t1")
    assert moved.root == settings.regions["eu"]
    assert [p.name for p in stale.folder.iterdir()] == ["tenant.json"]  # nothing recreated where it was
    with moved.open_store(write=False) as con:
        assert con.execute("SELECT count(*) FROM crm_accounts").fetchall() == [(2,)]


def test_the_sync_locks_follow_a_move_and_say_when_the_tenant_ended(settings):
    save_tenant(settings, TenantConfig(id="t1", domains=["contoso.com"]))
    with open_store(settings, "t1", write=True):
        pass
    stale = resolve_tenant(settings, "t1")
    move_tenant(settings, "t1", "eu")  # e.g. while a run waited for the locks
    with stale.sync_locks(["email"]) as tenant:
        assert tenant is not None and tenant.folder == settings.regions["eu"] / "tenants" / "t1"
        with open(tenant.folder / "sync-email.lock", "a+") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held where a run started after the move locks
    end_subscription_now(settings, "t1")
    with tenant.sync_locks(["email"]) as gone:
        assert gone is None
