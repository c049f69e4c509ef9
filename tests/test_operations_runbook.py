"""docs/OPERATIONS.md stays true: its `bash` blocks marked `<!-- runbook: step -->` (sections 1-7) are pasted, in
order, into ONE bash process, as an operator would paste them into one terminal, with the walk-through's paths
moved into a temporary root (`O365SYNC_ROOT`), a PostgreSQL cluster of a unique name and free ports (`PG_CLUSTER`,
`PG_PORT`, `SERVER_PORT`, the runbook's own knobs). After each step the test checks what that step promises:

1. PostgreSQL: the Debian cluster is online.
2. the Prefect server answers and keeps its tables in that cluster (PostgreSQL, not SQLite).
3. the work pool `o365sync` has the queues `shard-a` and `shard-b`, the zombie-run automation exists, both tenants
   are registered on their shards.
4. two worker processes are alive and the pool shows two workers.
5. the run the step started completed on work queue `shard-a` (its printed state), the API agrees (a completed
   flow run whose `tenant_id` is contoso-demo on `shard-a`, none on `shard-b`); the UI's page answers.
6. contoso-demo is on shard b; the run the step started completed on `shard-b`, and the API agrees; every file
   under the root is private (no group or other permission bits).
7. the clean-up: no process of the walk-through left, the cluster dropped, the root removed.

It asserts on flow runs by their `tenant_id` parameter and work queue, not on deployment names, so it holds for
per-tenant deployments and for one deployment per job kind alike. A step that fails (any failing command outside a
condition, caught with an ERR trap) or takes longer than its bound fails the test; whatever happens, every process
the walk-through started (found by a marker in its environment) is killed, the cluster dropped and the root
removed. Needs root and Debian's `postgresql` (`pg_createcluster`), like the runbook; skipped otherwise.
`uv sync --locked` of step 1 syncs this checkout's environment (a no-op when it is in sync).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from deployments.prefect_server import _free_port
from deployments.zombies import NAME as ZOMBIE_AUTOMATION

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "OPERATIONS.md"
MARK = "<!-- runbook: step -->"
STEP_BOUND_S = 900  # a step's own bounded waits (a worker start, a run) took minutes on a loaded 2-core machine
FAILED = "__RUNBOOK_STEP_FAILED__"
POOL = "o365sync"
TENANT = "contoso-demo"


def runbook_steps(text: str) -> list[tuple[str, str]]:
    """(the section heading, the block's text) of every `bash` block right after a `<!-- runbook: step -->` line."""
    steps = []
    heading = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            heading = line[3:].strip()
        if line.strip() == MARK:
            assert lines[i + 1] == "```bash", f"{MARK} must be followed by a ```bash block (line {i + 2})"
            end = lines.index("```", i + 2)
            steps.append((heading, "\n".join(lines[i + 2 : end]) + "\n"))
    return steps


def test_the_runbook_marks_sections_1_to_7_and_ends_with_the_clean_up():
    steps = runbook_steps(DOC.read_text())
    assert [h.split(".")[0] for h, _ in steps] == [str(n) for n in range(1, 8)]
    assert 'rm -rf "$O365SYNC_ROOT"' in steps[-1][1]
    for _, block in steps:  # the paths and ports follow the runbook's knobs, so the test can move them
        assert "/srv/" not in block.replace("${O365SYNC_ROOT:-/srv/o365sync}", "")
        assert ":4200" not in block and "5433" not in block.replace("${PG_PORT:-5433}", "")


@dataclass
class Shell:
    """One bash process fed the steps like a terminal: variables, the working directory and the umask carry over.
    Each step is written to a file and sourced with stdin from /dev/null (a command cannot eat the next lines)."""

    env: dict[str, str]
    scripts: Path
    proc: subprocess.Popen[str] = field(init=False)
    lines: queue.Queue[str | None] = field(init=False, default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=self.env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self._send(f"trap 'echo \"{FAILED} $? $BASH_COMMAND\"' ERR\n")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def run(self, n: int, block: str, bound_s: float) -> str:
        """Run one step; its output. AssertionError if a command failed, bash died or the bound passed."""
        script = self.scripts / f"step-{n}.sh"
        script.write_text(block)
        done = f"__RUNBOOK_STEP_DONE_{uuid.uuid4().hex}__"
        self._send(f"source {script} </dev/null\necho {done}\n")
        out: list[str] = []
        deadline = time.monotonic() + bound_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"step {n} still running after {bound_s:.0f} s:\n{''.join(out)[-4000:]}") from None
            if line is None:
                raise AssertionError(f"bash exited during step {n}:\n{''.join(out)[-4000:]}")
            if line.strip() == done:
                break
            out.append(line)
        text = "".join(out)
        assert FAILED not in text, f"a command of step {n} failed:\n{text[-4000:]}"
        return text

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def processes_marked(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `marker` (every process the walk-through started inherits it)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def cluster_status(version: str, name: str) -> str | None:
    """`online`/`down` for the Debian cluster, None if it does not exist."""
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True).stdout
    for row in out.splitlines():
        cols = row.split()
        if cols[:2] == [version, name]:
            return cols[3]
    return None


def newest_postgres() -> str:
    return sorted(
        (p.name for p in Path("/usr/lib/postgresql").iterdir()), key=lambda v: [int(x) for x in re.findall(r"\d+", v)]
    )[-1]


@dataclass
class Walkthrough:
    root: Path
    cluster: str
    pg_port: int
    server_port: int
    marker: str

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/api"

    def pid(self, name: str) -> int:
        return int((self.root / name).read_text())


@pytest.fixture
def walkthrough(tmp_path) -> Iterator[Walkthrough]:
    if os.geteuid() != 0 or not shutil.which("pg_createcluster") or not shutil.which("runuser"):
        pytest.skip("the runbook runs as root with Debian's postgresql (pg_createcluster, runuser)")
    token = uuid.uuid4().hex[:10]
    w = Walkthrough(
        tmp_path / "o365sync", f"runbook{token}", _free_port(), _free_port(), f"O365SYNC_RUNBOOK_TEST={token}"
    )
    try:
        yield w
    finally:
        for pid in processes_marked(w.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        version = newest_postgres()
        if cluster_status(version, w.cluster):
            subprocess.run(["pg_dropcluster", version, w.cluster, "--stop"], capture_output=True, timeout=120)
        shutil.rmtree(w.root, ignore_errors=True)


def flow_runs_of(tenant: str) -> list:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return [r for r in client.read_flow_runs(limit=200) if r.parameters.get("tenant_id") == tenant]


def completed_on(tenant: str) -> list[str]:
    return sorted(r.work_queue_name for r in flow_runs_of(tenant) if r.state_type and r.state_type.value == "COMPLETED")


@pytest.mark.slow  # PostgreSQL, a Prefect server, two workers, flow-run processes
def test_the_runbook_runs_as_written(walkthrough, tmp_path):
    from deployments.prefect_server import use_api

    w = walkthrough
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "O365SYNC_", "VIRTUAL_ENV"))}
    env |= {
        "O365SYNC_ROOT": str(w.root),
        "PG_CLUSTER": w.cluster,
        "PG_PORT": str(w.pg_port),
        "SERVER_PORT": str(w.server_port),
        w.marker.split("=")[0]: w.marker.split("=")[1],
        "PREFECT_HOME": str(tmp_path / "operator-prefect-home"),  # the operator's own ~/.prefect, kept out of $HOME
    }
    steps = runbook_steps(DOC.read_text())
    scripts = tmp_path / "steps"
    scripts.mkdir()
    shell = Shell(env, scripts)
    timings: list[tuple[str, float]] = []
    version = newest_postgres()
    try:
        with use_api(w.api_url):
            for n, (heading, block) in enumerate(steps, start=1):
                started = time.monotonic()
                out = shell.run(n, block, STEP_BOUND_S)
                timings.append((heading, time.monotonic() - started))
                print(f"[{timings[-1][1]:6.1f} s] {heading}")
                check_step(n, w, version, out, shell.proc.pid)
    finally:
        shell.close()
        for heading, seconds in timings:
            print(f"{seconds:7.1f} s  {heading}")


def check_step(n: int, w: Walkthrough, version: str, out: str, shell_pid: int) -> None:
    from prefect import get_client

    if n == 1:
        assert cluster_status(version, w.cluster) == "online"
    elif n == 2:
        assert httpx.get(f"{w.api_url}/health", timeout=10).json() is True
        tables = subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-p",
                str(w.pg_port),
                "-d",
                "prefect",
                "-tAc",
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'",
            ],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert tables == "1", "the server's tables are not in the runbook's PostgreSQL cluster"
    elif n == 3:
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(POOL).type == "process"
            queues = {q.name for q in client.read_work_queues(work_pool_name=POOL)}
            assert {"shard-a", "shard-b"} <= queues
            assert client.read_automations_by_name(ZOMBIE_AUTOMATION)
        shards = {
            t: json.loads((w.root / "registry" / "tenants" / t / "tenant.json").read_text()).get("shard")
            for t in (TENANT, "fabrikam-demo")
        }
        assert shards == {TENANT: "a", "fabrikam-demo": "b"}
    elif n == 4:
        for shard in ("a", "b"):
            os.kill(w.pid(f"worker-{shard}.pid"), 0)  # alive
        with get_client(sync_client=True) as client:
            assert len(client.read_workers_for_work_pool(POOL)) == 2
    elif n == 5:  # (a scheduled run may have fallen due meanwhile: no exact counts)
        assert '"work_queue_name": "shard-a"' in out and '"state_type": "COMPLETED"' in out
        queues = completed_on(TENANT)
        assert "shard-a" in queues and "shard-b" not in queues
        assert "<title>Prefect Server</title>" in out  # the UI's page, fetched by the step itself
    elif n == 6:
        tenant = json.loads((w.root / "registry" / "tenants" / TENANT / "tenant.json").read_text())
        assert tenant.get("shard") == "b"
        assert '"work_queue_name": "shard-b"' in out and '"state_type": "COMPLETED"' in out
        assert "shard-b" in completed_on(TENANT)
        open_to_others = [
            str(p) for p in [w.root, *w.root.rglob("*")] if not p.is_symlink() and p.stat().st_mode & 0o077
        ]
        assert not open_to_others, f"files readable by others: {open_to_others}"
    elif n == 7:
        assert not w.root.exists()
        assert cluster_status(version, w.cluster) is None
        left = [pid for pid in processes_marked(w.marker) if pid != shell_pid]
        assert not left, f"processes of the walk-through still running: {left}"
