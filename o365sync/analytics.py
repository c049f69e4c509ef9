"""What analysts query: documented views over a tenant's published snapshot, and the Parquet export of them.

Analysts never open the live store (a read-write DuckDB connection locks every other process out, even readers).
`store.publish_snapshot` copies the live files that changed (byte copies, under the live store's shared lock for
the copies only) and atomically replaces `<region root>/analytics/<tenant>.duckdb` with a new views file: the
tenant file's tables, the users' tables as views over the copies of their bucket files (`read_duckdb`), and the
analysts' views, which `create_views` (defined in `store.views`, beside the schema whose tables they read) adds
before the replace, so every snapshot carries the view definitions that match its tables (docs/ANALYSTS.md
documents every column). The raw tables (`emails`, `meetings`, `email_crm_matches`, ...) stay queryable beside
them. This module imports the store; the store never imports it.

Views (names chosen not to clash with the tables):
- `activities`: one row per stored email or meeting, with its primary CRM record and that record's account.
- `email_activity`, `meeting_activity`: the same rows per kind, with the kind's own columns.
- `crm_matches`: every link between an activity and a CRM record (email and meeting links unioned).
- `crm_records`: one row per CRM person or account of the snapshot, with the person's account resolved.
- `sync_status`: per user and feature: stage, last success, lag, failures, next retry, reconnect/consent needed.

`export_views` writes views as Parquet from the published snapshot (read-only, never the live store) into
`<tenant dir>/exports/<UTC timestamp>/`, atomically (a hidden temporary folder renamed into place). Erasures
delete a tenant's exports; `export_lock` is the lock they share with exports so no export lands after one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from o365sync.settings import Settings
from o365sync.store import fsync_path, publish_snapshot, snapshot_parts, snapshot_path
from o365sync.store.partitions import in_memory_config
from o365sync.store.views import (  # noqa: F401 (re-exported: the analysts' API)
    ANALYTICS_VERSION,
    VIEW_NAMES,
    VIEWS,
    add_views_to_file,
    create_views,
    quoted_identifier,
)
from o365sync.tenants import tenant_dir

DEFAULT_EXPORT: tuple[str, ...] = (
    "activities",
    "email_activity",
    "meeting_activity",
    "crm_matches",
    "crm_records",
    "sync_status",
)
EXPORTABLE: tuple[str, ...] = (*DEFAULT_EXPORT, "emails", "meetings")  # + the raw tables (emails carry bodies)


def exports_dir(settings: Settings, tenant_id: str) -> Path:
    return tenant_dir(settings, tenant_id) / "exports"


@contextlib.contextmanager
def export_lock(settings: Settings, tenant_id: str, exclusive: bool) -> Iterator[None]:
    """Shared while an export reads the snapshot and renames its folder into place; exclusive for an erasure
    while it deletes `exports/` — taken *after* it republished the snapshot, so an export either finishes
    before the deletion (and is deleted) or starts after it (and reads the new snapshot). Blocking."""
    folder = tenant_dir(settings, tenant_id)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "exports.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class ExportResult:
    path: Path
    rows: dict[str, int] = field(default_factory=dict)  # view -> rows written
    snapshot_published_at: datetime | None = None


def open_snapshot(settings: Settings, tenant_id: str) -> duckdb.DuckDBPyConnection:
    """A read-only session on the tenant's published snapshot (attached as `snap` and in use), with the analyst
    views available even if the snapshot predates them. Never touches the live store. The folder of the snapshot's
    copies stays readable when the caller then disables file access (`SET enable_external_access = false`, as
    `o365sync sql` does): the users' tables are views that read them (`read_duckdb`)."""
    path = snapshot_path(settings, tenant_id)
    con = duckdb.connect(config=in_memory_config(path))
    try:
        con.execute("SET TimeZone='UTC'")
        con.execute("SET allowed_directories = [?]", [f"{snapshot_parts(path).absolute()}{os.sep}"])
        con.execute("ATTACH '" + str(path).replace("'", "''") + "' AS snap (READ_ONLY)")
        con.execute("USE snap")
        present = {
            r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE database_name = 'snap'").fetchall()
        }
        if not set(VIEW_NAMES) <= present:
            create_views(con, temporary=True)
    except BaseException:
        con.close()
        raise
    return con


def export_views(
    settings: Settings, tenant_id: str, views: Sequence[str] | None = None, out: Path | None = None
) -> ExportResult:
    """Write each view (or raw table `emails` / `meetings`) as `<name>.parquet` (zstd) plus `manifest.json`
    (counts only) into `out` (must not exist yet) or a new `<tenant dir>/exports/<UTC timestamp>/`. Reads the
    published snapshot (publishing one first if there is none). Atomic: the files are written into a hidden
    sibling folder that is renamed into place only when complete."""
    names = list(dict.fromkeys(views or DEFAULT_EXPORT))
    unknown = [n for n in names if n not in EXPORTABLE]
    if unknown:
        raise ValueError(f"unknown view {', '.join(unknown)}; choose from {', '.join(EXPORTABLE)}")
    if out is not None and out.exists():
        raise FileExistsError(f"{out} already exists")
    if not snapshot_path(settings, tenant_id).exists():
        publish_snapshot(settings, tenant_id)
    with export_lock(settings, tenant_id, exclusive=False):
        now = datetime.now(UTC)
        if out is None:
            parent = exports_dir(settings, tenant_id)
            parent.mkdir(parents=True, exist_ok=True)
            stamp, n = now.strftime("%Y%m%dT%H%M%SZ"), 0
            final = parent / stamp
            while final.exists():
                n += 1
                final = parent / f"{stamp}-{n}"
        else:
            final = out.absolute()
            final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        result = ExportResult(path=final)
        try:
            con = open_snapshot(settings, tenant_id)
            try:
                if con.execute(
                    "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'snap' AND table_name = 'snapshot_info'"
                ).fetchall()[0][0]:
                    result.snapshot_published_at = con.execute("SELECT published_at FROM snapshot_info").fetchall()[0][
                        0
                    ]
                for name in names:
                    target = tmp / f"{name}.parquet"
                    written = con.execute(
                        f"COPY (SELECT * FROM {quoted_identifier(name)}) TO '"
                        + str(target).replace("'", "''")
                        + "' (FORMAT parquet, COMPRESSION zstd)"
                    ).fetchall()
                    result.rows[name] = int(written[0][0])
                    fsync_path(target)
            finally:
                con.close()
            manifest = {
                "tenant_id": tenant_id,
                "created_at": now.isoformat(timespec="seconds"),
                "snapshot_published_at": (
                    result.snapshot_published_at.isoformat(timespec="seconds") if result.snapshot_published_at else None
                ),
                "analytics_version": ANALYTICS_VERSION,
                "files": {name: {"file": f"{name}.parquet", "rows": rows} for name, rows in result.rows.items()},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            fsync_path(tmp / "manifest.json")
            fsync_path(tmp)
            os.rename(tmp, final)  # fails if `final` appeared meanwhile: never merges into another export
            fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result


def is_inside_tenant(settings: Settings, tenant_id: str, path: Path) -> bool:
    """Whether `path` is under the tenant's directory (covered by erasure and data residency)."""
    return path.absolute().is_relative_to(tenant_dir(settings, tenant_id).absolute())
