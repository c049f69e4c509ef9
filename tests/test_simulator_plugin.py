"""The simulators' pytest plugin works for a project that only installs the package: a fresh pytest process in an
empty folder (no conftest of ours) gets the fixtures from the `pytest11` entry point, and the simulators import
nothing of the product."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = {"o365sync", "crm_adapters", "flows", "tasks", "deployments"}

USER_TEST = """
import httpx


def test_graph_answers_a_users_token(sim, world, user, tokens, http):
    token = tokens.issue_access_token(user.tid, user.oid, user.upn, ["Mail.Read"], "app")
    page = http.get(f"{sim.base_url}/me/messages?$top=5", headers={"Authorization": f"Bearer {token}"}).json()
    assert len(page["value"]) == 5


def test_a_fault_knob_takes_effect(sim, user, tokens, http):
    sim.inject(user.oid, 503)
    token = tokens.issue_access_token(user.tid, user.oid, user.upn, ["Mail.Read"], "app")
    assert http.get(f"{sim.base_url}/me/messages", headers={"Authorization": f"Bearer {token}"}).status_code == 503


def test_the_whole_world_runs(running_world):
    assert running_world.identity.base_url.startswith("https://127.0.0.1")
    assert running_world.salesforce.base_url.startswith("https://127.0.0.1")
"""


def test_the_plugin_is_a_pytest11_entry_point():
    assert [ep.value for ep in entry_points(group="pytest11") if ep.value.startswith("simulators.")] == [
        "simulators.pytest_plugin"
    ]


@pytest.mark.slow  # a pytest subprocess
def test_a_fresh_pytest_run_gets_the_fixtures_from_the_installed_plugin(tmp_path: Path):
    (tmp_path / "test_with_simulators.py").write_text(USER_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_the_simulators_import_nothing_of_the_product():
    imported = set()
    for path in (ROOT / "simulators").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {f"{path.name}: {alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(f"{path.name}: {node.module}")
    assert sorted(i for i in imported if i.split(": ")[1].split(".")[0] in PRODUCT) == []
