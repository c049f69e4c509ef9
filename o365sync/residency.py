"""Data residency: every file of a tenant lives under its region's storage root; moving is an explicit command.

`move_tenant` waits for the tenant's syncs to finish (their feature locks) and holds the live store's exclusive
lock, copies the tenant's folder and its analysts' snapshot to the new root, switches the tenant's configured
region (one atomic file replace: from then on every path resolves to the new root, and openers waiting on the old
lock follow), and then deletes the old copies. A move that dies before the switch leaves the tenant where it was
(the partial copy is overwritten by the next attempt); after the switch, the next attempt (`move` again to the same
region) removes what is left at the old location.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from o365sync.settings import Settings
from o365sync.store import FEATURE_LOCKS, snapshot_path, store_lock, tenant_sync_locks
from o365sync.tenants import load_tenant, region_root, registry_dir, save_tenant, tenant_dir


def _locations(settings: Settings, tenant_id: str, region: str | None) -> tuple[Path, Path]:
    root = region_root(settings, region)
    return root / "tenants" / tenant_id, root / "analytics" / f"{tenant_id}.duckdb"


def _leftovers(settings: Settings, tenant_id: str, keep: Path) -> list[Path]:
    """The tenant's files in every other storage location (an interrupted move, or the default location)."""
    out = []
    for region in [None, *settings.regions]:
        folder, snap = _locations(settings, tenant_id, region)
        if folder != keep:
            out += [p for p in (folder, snap) if p.exists() and p not in out]
    return out


def move_tenant(settings: Settings, tenant_id: str, region: str | None) -> dict[str, int | str]:
    """Move every file of `tenant_id` to `region`'s storage root (None: `data_dir`). Returns counts."""
    tenant = load_tenant(settings, tenant_id)
    new_dir, new_snap = _locations(settings, tenant_id, region)  # refuses an unknown region
    old_dir, old_snap = tenant_dir(settings, tenant_id), snapshot_path(settings, tenant_id)
    files = 0
    with tenant_sync_locks(old_dir, FEATURE_LOCKS), store_lock(settings, tenant_id, write=True):
        if old_dir != new_dir:
            if old_dir.exists():
                files = sum(1 for p in old_dir.rglob("*") if p.is_file())
                shutil.copytree(old_dir, new_dir, dirs_exist_ok=True)
            if old_snap.exists():
                new_snap.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(old_snap, new_snap)
            tenant.region = region
            save_tenant(settings, tenant)  # the switch
        removed = _leftovers(settings, tenant_id, keep=new_dir)
        registry = registry_dir(settings, tenant_id)
        for path in removed:
            if path == registry:  # the default location doubles as the registry: keep tenant.json only
                for child in path.iterdir():
                    if child.name != "tenant.json":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return {"tenant": tenant_id, "region": region or "(default)", "files": files, "removed_locations": len(removed)}
