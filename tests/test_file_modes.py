"""Every file of the product is private: 0600 files in 0700 folders, under the data dir and every region root.

The demo runs from a shell's umask (022), then the tenant is exported, a conversation exported and the tenant moved
to a region; the whole tree is walked. Processes that do not go through the demo (the CLI, a flow run started by a
Prefect worker) are checked in subprocesses, and so is the tightening of a data dir written by an earlier version."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

from rich.console import Console

from app.demo import run_demo
from o365sync.analytics import export_views
from o365sync.conversations import export_conversation
from o365sync.residency import move_tenant
from o365sync.settings import load_settings
from o365sync.store import open_store
from o365sync.tenants import list_tenants

ROOT = Path(__file__).resolve().parents[1]


def not_private(*roots: Path) -> list[str]:
    """Every path below the roots (the roots included) whose mode lets group or others in."""
    out = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            wanted = 0o700 if path.is_dir() else 0o600
            if not path.is_symlink() and mode != wanted:
                out.append(f"{oct(mode)} {path.relative_to(root.parent)}")
    return out


def test_everything_the_demo_an_export_and_a_region_move_write_is_private(prefect_server, tmp_path):
    data_dir, region_root = tmp_path / "data", tmp_path / "eu"
    shell_umask = os.umask(0o022)  # what a login shell gives; the demo must make its files private itself
    try:
        with mock.patch.dict(os.environ, {"O365SYNC_REGIONS": json.dumps({"eu": str(region_root)})}):
            run_demo(data_dir, seed=5, users=2, messages=60, contacts=20, console=Console(file=io.StringIO()))
            settings = load_settings()
            (tenant,) = list_tenants(settings)
            export_views(settings, tenant.id)
            with open_store(settings, tenant.id, write=False) as con:
                (graph_id,) = con.execute("SELECT graph_id FROM emails LIMIT 1").fetchone()
            export_conversation(settings, tenant.id, graph_id=graph_id)
            move_tenant(settings, tenant.id, "eu")
            export_views(settings, tenant.id)
    finally:
        os.umask(shell_umask)
    assert any(region_root.rglob("*.parquet")) and any(region_root.rglob("*.token"))
    assert any(data_dir.rglob("*.duckdb")) or any(region_root.rglob("*.duckdb"))
    assert not_private(data_dir, region_root) == []


def _python(code: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("O365SYNC_", "PREFECT_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_a_flow_run_started_by_a_worker_makes_its_files_private(tmp_path):
    # A worker's flow-run process imports the flow from `flows.*` and nothing of our CLI.
    code = "import os; os.umask(0o022); import flows.email_sync; print(oct(os.umask(0o022)))"
    assert _python(code, _env(HOME=str(tmp_path)), tmp_path) == "0o77"


def test_the_cli_makes_files_private_and_tightens_a_data_dir_of_an_earlier_version(tmp_path):
    old = tmp_path / "data"
    (old / "tenants" / "t1" / "connections").mkdir(parents=True)
    (old / "analytics").mkdir()
    for path in (
        old / "tenants" / "t1" / "store.duckdb",
        old / "tenants" / "t1" / "connections" / "u.json",
        old / "analytics" / "t1.duckdb",
        old / "secret.key",
    ):
        path.write_text("x")
        path.chmod(0o644)
    for folder in (old, *[p for p in old.rglob("*") if p.is_dir()]):
        folder.chmod(0o755)
    elsewhere = tmp_path / "not-ours.txt"  # outside the storage roots: left alone
    elsewhere.write_text("x")
    elsewhere.chmod(0o644)

    code = "import os; os.umask(0o022); import app.cli; print(oct(os.umask(0o022)), os.environ['PREFECT_HOME'])"
    umask, prefect_home = _python(code, _env(O365SYNC_DATA_DIR=str(old), HOME=str(tmp_path / "home")), tmp_path).split()
    assert umask == "0o77"
    assert Path(prefect_home) == (old / "prefect").resolve()
    assert not_private(old) == []
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o644
