"""The analysts' read-only copy of a tenant's store (analysts never open the live file)."""

from __future__ import annotations

import os
from pathlib import Path

from o365sync.settings import Settings
from o365sync.store.locks import fsync_path, open_store
from o365sync.store.views import create_views
from o365sync.tenants import tenant_dir


def snapshot_path(settings: Settings, tenant_id: str) -> Path:
    """The analysts' read-only copy, in `<region root>/analytics/` (all of a tenant's files stay in its region)."""
    folder = tenant_dir(settings, tenant_id)
    return folder.parent.parent / "analytics" / f"{folder.name}.duckdb"


def publish_snapshot(settings: Settings, tenant_id: str) -> Path:
    """Copy the live store into the analysts' read-only file (copy + atomic replace; also drops dead bytes)."""
    target = snapshot_path(settings, tenant_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".duckdb.tmp")
    tmp.unlink(missing_ok=True)
    with open_store(settings, tenant_id, write=True) as con:
        con.execute("ATTACH '" + str(tmp).replace("'", "''") + "' AS snap")
        try:
            con.execute("COPY FROM DATABASE store TO snap")
            create_views(con, "snap", tenant_id=tenant_id)  # the analysts' views, bound to the snapshot's tables
        finally:
            con.execute("DETACH snap")
    fsync_path(tmp)
    os.replace(tmp, target)
    return target
