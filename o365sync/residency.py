"""Data residency: every file of a tenant lives under its region's storage root; moving is an explicit command.

`move_tenant` waits for the tenant's syncs to finish (their feature locks) and holds the live store's exclusive
lock, copies the tenant's folder (the tenant file, its `parts/` buckets and their dirty markers, tokens, ...; into a
staging folder renamed into place when complete) to the new root, switches the tenant's configured region (one
atomic file replace: from then on every path resolves to the new root, and openers waiting on the old lock follow),
deletes the old copies (the old analysts' snapshot included: its views file names its copies by absolute path), and
then republishes the analysts' snapshot at the new root. A move that dies before the switch leaves the tenant where
it was (the next attempt replaces its own copy); after the switch, the next attempt (`move` again to the same
region) removes what is left at the old location and publishes.

It never loses the only copy: a destination that is the current location (e.g. a region root that is the current
root through a symlink) is refused, and so is a destination store that is not this move's own copy and holds rows
or is newer than the source. When the configured location is empty and the files are at the destination (the
configured region was reset by hand), the move only points the configuration back at them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from o365sync.erasure import store_row_counts
from o365sync.settings import Settings
from o365sync.store import FEATURE_LOCKS, flock_file, publish, snapshot_leftovers, tenant_sync_locks
from o365sync.store.publishing import snapshot_parts
from o365sync.tenants import holds_tenant_files, load_tenant, registry_dir, save_tenant, tenant_locations

STORE = "store.duckdb"


class MoveRefused(ValueError):
    """The move would overwrite or delete data; nothing was changed."""


def _leftovers(settings: Settings, tenant_id: str, keep: Path) -> list[Path]:
    """The tenant's files in every other storage location (an interrupted move, or the default location); a root
    that resolves to the kept one (a symlink) is the same location, never a leftover."""
    found: dict[Path, Path] = {}  # resolved -> as configured: two roots may name one place
    for region in [None, *settings.regions]:
        folder, snap = tenant_locations(settings, tenant_id, region)
        if folder.resolve() != keep.resolve():
            paths = (folder, snap, *snapshot_leftovers(snap), snapshot_parts(snap))
            found.update({p.resolve(): p for p in paths if p.exists() and p.resolve() not in found})
    return list(found.values())


def _is_copy(source: Path, target: Path) -> bool:
    """`target` is a copy of `source` made by a move (copy2 keeps size and modification time)."""
    a, b = source.stat(), target.stat()
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _check_destination(old_dir: Path, new_dir: Path, tenant_id: str, current: str | None) -> None:
    """Refuse to overwrite a destination store that holds rows or is newer than the source, unless it is this
    move's own copy of the source (an interrupted earlier attempt)."""
    source, target = old_dir / STORE, new_dir / STORE
    if not target.exists() or (source.exists() and _is_copy(source, target)):
        return
    rows = sum(store_row_counts(target).values())
    newer = not source.exists() or target.stat().st_mtime_ns > source.stat().st_mtime_ns
    if rows or newer:
        raise MoveRefused(
            f"{target.resolve()} already holds a store of tenant {tenant_id} ({rows} rows, "
            f"{'newer than' if newer else 'different from'} the one in {old_dir.resolve()}); nothing "
            "was changed. Keep the store you want and remove the other (if it is left over from an "
            f"earlier move, `o365sync tenant move {tenant_id} --region {current or 'default'}` removes "
            "it), then move again"
        )


def _check_leftovers(leftovers: list[Path], kept_store: Path, tenant_id: str) -> None:
    """Leftovers of a finished move are removed, but never a store with rows while the kept one has none: that is
    not a leftover but the tenant's data, and the configuration points at the wrong place."""
    if kept_store.exists() and any(store_row_counts(kept_store).values()):
        return
    for folder in leftovers:
        store = folder / STORE
        if not store.is_file() or store.resolve() == kept_store.resolve():
            continue
        if rows := sum(store_row_counts(store).values()):
            raise MoveRefused(
                f"{store.resolve()} holds {rows} rows of tenant {tenant_id} while the store being kept "
                f"({kept_store.resolve()}) is {'empty' if kept_store.exists() else 'missing'}; nothing "
                "was changed. Move the tenant to that store's region, or remove one of the two"
            )


@contextlib.contextmanager
def _tenant_locked(folder: Path) -> Iterator[None]:
    """Every sync of the tenant and every opener of its store wait while the files move."""
    with tenant_sync_locks(folder, FEATURE_LOCKS), flock_file(folder / f"{STORE}.lock", exclusive=True):
        yield


def _empty(folder: Path) -> None:
    """Remove everything in a tenant folder but the registry entry (`data_dir`'s folder doubles as the registry)."""
    for child in folder.iterdir():
        if not child.name.startswith("tenant.json"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _copy(old_dir: Path, new_dir: Path) -> int:
    """Copy the folder; returns the files copied. The folder is copied into a staging folder first and its entries
    renamed into place, so the store at the destination is never a partial copy. The snapshot is not copied but
    republished."""
    staging = new_dir.with_name(f".{new_dir.name}.moving")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(old_dir, staging, ignore=shutil.ignore_patterns("tenant.json*"))
    new_dir.mkdir(parents=True, exist_ok=True)
    _empty(new_dir)  # nothing worth keeping: checked by _check_destination
    for child in staging.iterdir():
        os.replace(child, new_dir / child.name)
    staging.rmdir()
    return sum(1 for p in new_dir.rglob("*") if p.is_file() and not p.name.startswith("tenant.json"))


def move_tenant(
    settings: Settings, tenant_id: str, region: str | None, *, shard: str | None = None
) -> dict[str, int | str]:
    """Move every file of `tenant_id` to `region`'s storage root (None: `data_dir`). Returns counts.

    `shard`: the tenant's new worker shard, switched with the region (`o365sync tenant assign`; the shard's
    files live in the region of its name). A sharded tenant moves only that way."""
    tenant = load_tenant(settings, tenant_id)
    tenant_id = tenant.id
    if tenant.shard is not None and shard != region:
        raise MoveRefused(
            f"tenant {tenant_id} runs on worker shard {tenant.shard}, whose files are in region {tenant.shard}; "
            f"nothing was changed. Move it with `o365sync tenant assign {tenant_id} --shard <name>`"
        )
    new_dir, new_snap = tenant_locations(settings, tenant_id, region)  # refuses an unknown region
    old_dir, old_snap = tenant_locations(settings, tenant_id, tenant.region)
    moving = tenant.region != region
    if moving and old_dir.resolve() == new_dir.resolve():
        raise MoveRefused(
            f"region {region or 'default'} stores tenant {tenant_id} in {new_dir.resolve()}, which is "
            f"where its files already are (region {tenant.region or 'default'}); nothing was changed"
        )
    repoint = moving and not holds_tenant_files(old_dir) and holds_tenant_files(new_dir)
    copying = moving and not repoint
    files = 0
    with _tenant_locked(old_dir if copying else new_dir):
        removed = _leftovers(settings, tenant_id, keep=new_dir)
        published = any(p.exists() for p in (old_snap, new_snap)) or any(p.name == new_snap.name for p in removed)
        _check_leftovers(removed, (old_dir if copying else new_dir) / STORE, tenant_id)
        if copying:
            _check_destination(old_dir, new_dir, tenant_id, tenant.region)
            if holds_tenant_files(old_dir):
                files = _copy(old_dir, new_dir)
        if moving or shard != tenant.shard:
            tenant.region, tenant.shard = region, shard
            save_tenant(settings, tenant)  # the switch
        registry = registry_dir(settings, tenant_id)
        for path in removed:
            if path == registry:  # keep tenant.json
                _empty(path)
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    if published and (moving or removed):  # at the new root: a publish copies every file (no generation there yet)
        publish(settings, tenant_id)
    return {"tenant": tenant_id, "region": region or "(default)", "files": files, "removed_locations": len(removed)}
