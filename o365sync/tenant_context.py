"""A tenant resolved once for a run: the settings, its configuration and where its files are, read from the
registry in one step and passed down (flow → task → sync pipeline) instead of re-derived at every step.

`resolve_tenant` reads `tenant.json` once and locates the tenant's folder under its region's storage root; it raises
the registry's own errors (`TenantNotFound`, `TenantUnreadable`, `TenantMisplaced`) and creates nothing: a reader
never starts a store. The locations hold while the tenant's sync locks are held (`o365sync tenant move` and the
erasure of a tenant wait for them); `Tenant.sync_locks` resolves the tenant again once it holds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from o365sync.settings import Settings
from o365sync.store import open_store, tenant_sync_locks
from o365sync.tenants import (
    STORE_FILE,
    TenantConfig,
    TenantMisplaced,
    TenantNotFound,
    TenantUnreadable,
    checked_tenant_dir,
    region_root,
    registered_tenant,
    tenant_locations,
)


@dataclass(frozen=True)
class Tenant:
    settings: Settings
    config: TenantConfig
    root: Path  # the storage root of the tenant's region (`data_dir` without one)
    folder: Path  # every data file of the tenant: store, token caches, CRM secrets, exports, lock files
    snapshot_path: Path  # the analysts' read-only copy, `<root>/analytics/<id>.duckdb`

    @property
    def id(self) -> str:
        """The canonical id (a GUID typed in upper case names the same tenant)."""
        return self.config.id

    @property
    def store_path(self) -> Path:
        return self.folder / STORE_FILE

    def open_store(self, write: bool, user_oid: str | None = None) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """The tenant's live store, opened at `store_path` through `o365sync.store.open_store`, which confirms the
        location under its flock (a `tenant move` may run between two opens of a caller without the sync locks).
        `user_oid`: that user's bucket tables (see `open_store`)."""
        return open_store(self.settings, self.id, write, at=self.store_path, user_oid=user_oid)

    @contextlib.contextmanager
    def sync_locks(self, features: Iterable[str]) -> Iterator[Tenant | None]:
        """Hold the tenant's per-feature sync locks (`o365sync.store.tenant_sync_locks`), and give the tenant as
        resolved again under them: it may have moved while this waited (the locks are then taken again in its new
        folder, so runs started after the move queue behind this one), or ended (None: no longer registered)."""
        tenant, features = self, sorted(features)
        while True:
            with tenant_sync_locks(tenant.folder, features):
                try:
                    current = resolve_tenant(tenant.settings, tenant.id)
                except (TenantUnreadable, TenantMisplaced):
                    raise  # registered, but an operator must act: the message says what to do
                except TenantNotFound:
                    current = None
                if current is None or current.folder == tenant.folder:
                    yield current
                    return
            tenant = current


def resolve_tenant(settings: Settings, tenant_id: str) -> Tenant:
    """The registered tenant `tenant_id` and its locations; the registry's one-line errors otherwise."""
    config = registered_tenant(settings, tenant_id)
    snapshot = tenant_locations(settings, config.id, config.region)[1]
    folder = checked_tenant_dir(settings, config.id, config.region)
    return Tenant(settings, config, region_root(settings, config.region), folder, snapshot)
