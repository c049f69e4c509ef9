"""The zombie-run automation fires, against the real thing: `python -m deployments.zombies` creates it on a
`prefect server start` backed by PostgreSQL; two flow-run processes send heartbeats every 30 s (the shard
workers' interval); one is SIGKILLed after the server recorded its first heartbeat (a worker machine that died: no
process is left to report a state). The automation sets that run Crashed within its window, while the other run,
still sending heartbeats, stays Running and later completes.

The flows run as plain processes (`python probe.py`) rather than under a worker: a live process worker would itself
mark a killed flow process Crashed, and the case the automation exists for is the one where nobody is left to.
Waits are bounded polls on the server's events and states, never sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID

import pytest

from deployments.zombies import NAME

pytestmark = pytest.mark.slow  # PostgreSQL, a Prefect server, flow-run processes

HEARTBEAT_S = 30  # Prefect's minimum; deployments.worker sets it for the shard workers' runs
WITHIN_S = 60  # twice the heartbeat: a healthy run's next heartbeat arrives well inside the window
START_BOUND_S = 300  # a flow process starting on a loaded 2-core machine
FIRE_BOUND_S = WITHIN_S + 120  # the window, the 5 s proactive evaluation and the action, with room for load

PROBE = textwrap.dedent(
    """
    import sys
    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="zombie-probe", persist_result=False)
    def probe(role: str) -> None:
        print(f"flow-run-id {flow_run.id}", flush=True)
        sys.stdin.read()  # runs until the test closes stdin (or kills the process)

    probe(sys.argv[1])
    """
)


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.5) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return value


def heartbeats_recorded(flow_run_id: UUID) -> int:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
            ),
            limit=50,  # the client's default (100) is over the server's maximum
        )
    return page.total


def state_of(flow_run_id: UUID):  # noqa: ANN201 (prefect's State)
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def start_probe(script: Path, role: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], UUID]:
    proc = subprocess.Popen(
        [sys.executable, str(script), role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # ends (EOF) if the process dies before printing its id
        if line.startswith("flow-run-id "):
            return proc, UUID(line.split()[1])
    proc.wait(30)
    raise AssertionError(f"the {role} probe exited with {proc.returncode} before its flow run started")


@pytest.fixture
def api(prefect_on_postgres) -> Iterator[str]:
    """The session's PostgreSQL-backed server as this process's Prefect API; the automation removed afterwards
    (its window would crash other tests' long runs, whose heartbeats come every 180 s)."""
    from prefect import get_client

    from deployments.prefect_server import use_api

    with use_api(prefect_on_postgres.api_url):
        try:
            yield prefect_on_postgres.api_url
        finally:
            with get_client(sync_client=True) as client:
                for automation in client.read_automations_by_name(NAME):
                    client.delete_automation(automation.id)


def test_a_run_whose_heartbeat_stops_is_crashed_and_a_heartbeating_one_is_not(api, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_API_URL": api, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    created = subprocess.run(
        [sys.executable, "-m", "deployments.zombies", "--within", str(WITHIN_S)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    assert f"without heartbeat for {WITHIN_S} s" in created.stdout

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    probes: list[subprocess.Popen[str]] = []
    try:
        zombie, zombie_id = start_probe(script, "zombie", env)
        probes.append(zombie)
        healthy, healthy_id = start_probe(script, "healthy", env)
        probes.append(healthy)
        wait_for(lambda: heartbeats_recorded(zombie_id), START_BOUND_S, "the zombie's first heartbeat on the server")
        os.killpg(zombie.pid, signal.SIGKILL)  # the machine died: nothing reports the run's end
        zombie.wait(30)
        assert state_of(zombie_id).type.value == "RUNNING"

        crashed = wait_for(
            lambda: (s := state_of(zombie_id)).type.value == "CRASHED" and s,
            FIRE_BOUND_S,
            "the automation to crash the run without heartbeat",
        )
        assert f"No heartbeat for {WITHIN_S} s" in (crashed.message or "")
        assert state_of(healthy_id).type.value == "RUNNING", "a run that sends heartbeats was crashed"
        assert heartbeats_recorded(healthy_id) >= 2  # it outlived one heartbeat interval and kept beating

        assert healthy.stdin is not None
        healthy.stdin.close()  # let it finish
        assert healthy.wait(120) == 0
        assert state_of(healthy_id).type.value == "COMPLETED"
    finally:
        for proc in probes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
