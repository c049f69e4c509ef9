"""The layer contracts in pyproject.toml ([tool.importlinter], run by `.ci/run`) hold for the tree as it is, and
each one fails when an import crosses its layer the wrong way — also an import made inside a function."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("o365sync", "app", "flows", "tasks", "deployments", "crm_adapters", "simulators")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on `tree` (found first on the path, before the installed project)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages and pyproject.toml, free to break."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layers_hold(tree):
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("o365sync/settings.py", "prefect"),
        ("o365sync/matching.py", "app.cli"),
        ("o365sync/sync/mailbox.py", "tasks.mailbox_task"),
        ("o365sync/retention.py", "simulators.world"),
        ("o365sync/crm_refresh.py", "crm_adapters.registry"),
        ("tasks/mailbox_task.py", "flows.email_sync"),
        ("flows/email_sync.py", "deployments.schedules"),
        ("crm_adapters/base.py", "tasks.mailbox_task"),
        ("simulators/tls.py", "o365sync.settings"),
    ],
)
def test_an_import_across_a_layer_breaks_the_contract(tree, module, forbidden):
    with open(tree / module, "a") as source:
        source.write(f"\n\ndef _crossing():\n    import {forbidden}\n\n    return {forbidden}\n")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{module[:-3].replace('/', '.')} -> {forbidden}" in result.stdout
