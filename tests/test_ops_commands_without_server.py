"""Every operator command that needs a Prefect server says so in one line (no traceback) when none is configured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts a Python that imports Prefect

COMMANDS = [
    (["deployments.register", "--work-pool", "o365sync"], "workers need the Prefect server"),
    (["deployments.dispatch", "--kind", "email-sync", "--tenant", "t1"], "runs need the Prefect server"),
    (["deployments.worker", "--pool", "o365sync", "--shard", "default"], "the worker needs the Prefect server"),
    (["deployments.zombies", "--within", "90"], "automations live on the Prefect server"),
]


@pytest.mark.parametrize(("args", "says"), COMMANDS, ids=[c[0][0] for c in COMMANDS])
def test_one_line_when_no_server_is_configured(tmp_path: Path, args: list[str], says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "O365SYNC_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "O365SYNC_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == f"PREFECT_API_URL is not set: {says} (prefect server start)."
    assert done.stdout == ""
