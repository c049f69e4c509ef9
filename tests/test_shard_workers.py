"""Shards and worker failures against the real thing: a private PostgreSQL, `prefect server start` on it, real
process workers (`python -m deployments.worker`, i.e. `prefect worker start --work-queue shard-<name>`), simulated
tenants (the simulators' Graph, identity and CRM on loopback).

* `python -m deployments.register` puts each tenant's deployments on its shard's queue and removes the deployments
  of a tenant that is no longer registered; `o365sync tenant assign` moves a tenant's files and runs to another
  shard while its runs are held (a manual run waiting on the old queue is re-created on the new one); bad input
  changes nothing.
* A shard's worker killed mid-run (SIGKILL of the whole worker: the machine died; SIGTERM of the worker: Prefect
  interrupts its flow processes): the run is left Running (Prefect has no reaper), the tenant's file locks are
  free (they died with the processes), the shard's next worker marks the run Crashed, a re-run completes, and the
  store is exactly the simulated world's expected matches, nothing doubled.
* The Prefect server and PostgreSQL restarted (PostgreSQL as if it crashed) mid-run: no run stays Running, no slot
  is held (the deployment's next run, limit 1 CANCEL_NEW, runs), the store is exact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deployments.register import register_deployments
from deployments.schedules import EMAIL_SYNC, INITIAL_IMPORT, KINDS, deployment_name
from deployments.shards import assign_shard
from o365sync.settings import load_settings
from o365sync.store import open_store
from o365sync.tenants import load_tenant, registry_dir, tenant_dir
from simulators.world import generate_world
from tests.product import stand_up, stored_matches

pytestmark = pytest.mark.slow  # PostgreSQL, a Prefect server, worker processes

POOL = "o365sync-shards"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
BOUND_S = 300  # a worker plus a flow-run process start in 10-20 s alone, but took minutes on a loaded 2-core box


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.25) -> object:
    started = time.monotonic()
    deadline = started + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    print(f"[{time.monotonic() - started:5.1f} s] {what[:60]}")
    return value


@pytest.fixture(scope="module")
def ops(prefect_on_postgres, tmp_path_factory) -> Iterator[dict]:
    """Three shards (regions a, b, c), three simulated tenants: t0 on shard a (the failure tests), t1 on shard b
    (the move), t2 unsharded (removed later); deployments registered on the PostgreSQL-backed server."""
    from deployments.prefect_server import use_api

    tmp = tmp_path_factory.mktemp("shards")
    world = generate_world(seed=13, tenants=3, users_per_tenant=2, messages_per_user=30, contacts_per_tenant=12)
    regions = {name: str(tmp / f"shard-{name}") for name in ("a", "b", "c")}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_URL", raising=False)
        product = stand_up(world, tmp, mp, features=["email"], O365SYNC_REGIONS=json.dumps(regions))
        settings = load_settings()
        t0, t1, t2 = (t.tid for t in world.tenants)
        assign_shard(settings, t0, "a")  # no Prefect API configured yet: only the files and the config move
        assign_shard(settings, t1, "b")
        mp.setenv("PREFECT_API_URL", prefect_on_postgres.api_url)
        mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
        mp.setenv("PREFECT_WORKER_PREFETCH_SECONDS", "1")
        try:
            # t0's schedules are paused so that no scheduled sync interferes with the runs the tests start
            paused = {deployment_name(kind, t0): True for kind in KINDS}
            with use_api(prefect_on_postgres.api_url):
                register_deployments(settings, POOL, paused=paused)
                yield {
                    "stack": prefect_on_postgres,
                    "product": product,
                    "settings": settings,
                    "tmp": tmp,
                    "paused": paused,
                }
        finally:
            product.running.stop()


def _deployment(client, kind: str, tenant_id: str):
    return client.read_deployment_by_name(f"{kind}/{deployment_name(kind, tenant_id)}")


def test_deployments_go_to_their_shard_queue_and_a_removed_tenant_loses_its_schedules(ops):
    import shutil

    from prefect import get_client

    settings = ops["settings"]
    t0, t1, t2 = (t.tid for t in ops["product"].world.tenants)
    with get_client(sync_client=True) as client:
        assert _deployment(client, EMAIL_SYNC, t0).work_queue_name == "shard-a"
        assert _deployment(client, INITIAL_IMPORT, t1).work_queue_name == "shard-b"
        assert _deployment(client, EMAIL_SYNC, t2).work_queue_name == "default"  # unsharded: the pool's default
        email = _deployment(client, EMAIL_SYNC, t2)
        assert wait_for(lambda: client.read_flow_runs(limit=1, deployment_filter=_by_id(email.id)), 30, "schedules")

    shutil.rmtree(registry_dir(settings, t2))  # the tenant is gone (offboarded)
    register_deployments(settings, POOL, paused=ops["paused"])
    with get_client(sync_client=True) as client:
        from prefect.exceptions import ObjectNotFound

        with pytest.raises(ObjectNotFound):
            _deployment(client, EMAIL_SYNC, t2)
        assert client.read_flow_runs(deployment_filter=_by_id(email.id)) == []  # its scheduled runs went with it
        assert _deployment(client, EMAIL_SYNC, t0).work_queue_name == "shard-a"  # the others are kept


def _by_id(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


def test_assign_moves_files_and_runs_to_the_new_shard_and_bad_input_changes_nothing(ops):
    from prefect import get_client

    from app.cli import app

    settings = ops["settings"]
    t1 = ops["product"].world.tenants[1].tid
    old_dir = tenant_dir(settings, t1)
    files_before = sorted(p.name for p in old_dir.iterdir())
    with get_client(sync_client=True) as client:
        importer = _deployment(client, INITIAL_IMPORT, t1)
        waiting = client.create_flow_run_from_deployment(importer.id, name="requested-import")  # no worker on b
        queue_before = _deployment(client, EMAIL_SYNC, t1).work_queue_name

    for args, expected in (
        (["tenant", "assign", t1, "--shard", "nosuch"], "unknown shard 'nosuch'"),
        (["tenant", "assign", t1, "--shard", "b"], f"tenant {t1} is already on shard b; nothing was changed"),
        (["tenant", "move", t1, "--region", "c"], "Move it with `o365sync tenant assign"),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and expected in " ".join(result.output.split()), result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert load_tenant(settings, t1).shard == "b" and sorted(p.name for p in old_dir.iterdir()) == files_before

    result = CliRunner().invoke(app, ["tenant", "assign", t1, "--shard", "c"])
    assert result.exit_code == 0, result.output
    assert f"tenant {t1} now on shard c (work queue shard-c" in " ".join(result.output.split())
    config = load_tenant(settings, t1)
    assert (config.shard, config.region) == ("c", "c")
    new_dir = tenant_dir(settings, t1)
    assert new_dir.is_relative_to(settings.regions["c"]) and not old_dir.exists()
    assert sorted(p.name for p in new_dir.iterdir() if not p.name.endswith(".lock")) == sorted(
        n for n in files_before if not n.endswith(".lock")
    )
    with get_client(sync_client=True) as client:
        assert queue_before == "shard-b"
        for kind in (EMAIL_SYNC, INITIAL_IMPORT):
            deployment = _deployment(client, kind, t1)
            assert (deployment.work_queue_name, deployment.paused) == ("shard-c", False)
        runs = client.read_flow_runs(deployment_filter=_by_id(importer.id))
        assert [(r.name, r.work_queue_name, r.state_type.value) for r in runs] == [
            ("requested-import", "shard-c", "SCHEDULED")
        ]  # the request that waited on the old shard was re-created on the new one, once
        assert runs[0].id != waiting.id


def _start_worker(ops, shard: str, name: str) -> tuple[subprocess.Popen, Path]:
    log = ops["tmp"] / f"worker-{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.worker", "--pool", POOL, "--shard", shard, "--limit", "2"],
            env=os.environ | {"PREFECT_LOGGING_LEVEL": "INFO"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (Prefect starts each flow run in a session of its own: not in the worker's group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(current := todo.pop())
        todo += children.get(current, [])
    return out


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, *, tree: bool = False) -> list[int]:
    """Signal the worker (`tree`: and every process it started, like a machine that dies); returns the pids."""
    pids = _tree(proc.pid) if tree else [proc.pid]
    if proc.poll() is None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        for pid in _tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _state(run_id) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return run.state_type.value if run.state_type else ""


def _run_email_sync(tenant_id: str):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(_deployment(client, EMAIL_SYNC, tenant_id).id)


def _mailbox_requests(ops, tenant) -> int:
    oids = {u.oid for u in tenant.users}
    return sum(1 for r in list(ops["product"].running.graph.requests) if r.oid in oids)


def _lock_is_free(path: Path) -> bool:
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _assert_nothing_in_progress(tenant) -> None:
    """No run of the tenant Pending or Running, and its email sync's concurrency slot (limit 1) free."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        deployment = _deployment(client, EMAIL_SYNC, tenant.tid)
        in_progress = client.read_flow_runs(
            deployment_filter=_by_id(deployment.id),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))
            ),
        )
        assert in_progress == []
        limit = deployment.global_concurrency_limit
        assert limit is not None and (limit.limit, limit.active_slots) == (1, 0)


def _assert_store_exact(ops, tenant) -> None:
    world = ops["product"].world
    world.now = datetime.now(UTC)
    assert stored_matches(ops["settings"], tenant.tid) == world.expected_matches(tenant.tid)
    with open_store(ops["settings"], tenant.tid, write=False) as con:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT (user_oid, graph_id)) FROM emails").fetchall()[0]
    assert total == distinct > 0


def _stopped_mid_run(ops, sig: int, tree: bool) -> None:
    """Start shard a's worker, start an email sync of t0 and stop the worker with `sig` once the sync is
    fetching mail; then the shard's next worker reconciles and a re-run completes exactly."""
    tenant = ops["product"].world.tenants[0]
    graph = ops["product"].running.graph
    worker, log = _start_worker(ops, "a", f"{sig}")
    try:
        graph.latency_s = 1.5  # slow mailboxes: the run is surely in the middle when the worker dies
        before = _mailbox_requests(ops, tenant)
        run = _run_email_sync(tenant.tid)
        wait_for(lambda: _state(run.id) == "RUNNING", BOUND_S, f"the run to start ({log.read_text()[-2000:]})")
        wait_for(lambda: _mailbox_requests(ops, tenant) > before, BOUND_S, "the run to fetch mail")
        flow_processes = _tree(worker.pid)[1:]
        assert flow_processes, "the worker runs the flow in a process of its own"
        _stop(worker, sig, tree=tree)
        wait_for(lambda: not any(map(_alive, flow_processes)), BOUND_S, "the flow processes to end")
    finally:
        graph.latency_s = 0.0
        _stop(worker, signal.SIGKILL, tree=True)
    assert _state(run.id) == "RUNNING"  # what Prefect leaves behind: no reaper, the slot still taken
    assert _lock_is_free(tenant_dir(ops["settings"], tenant.tid) / "sync-email.lock")  # died with the process

    worker, log = _start_worker(ops, "a", f"{sig}-next")
    try:
        assert wait_for(lambda: _state(run.id) == "CRASHED", BOUND_S, "the next worker to reconcile")
        rerun = _run_email_sync(tenant.tid)  # limit 1 CANCEL_NEW: it would be cancelled if the slot were held
        wait_for(lambda: _state(rerun.id) in TERMINAL, BOUND_S, f"the re-run ({log.read_text()[-2000:]})")
        assert _state(rerun.id) == "COMPLETED", log.read_text()[-3000:]
    finally:
        _stop(worker)
    assert "marked Crashed" in log.read_text()
    _assert_nothing_in_progress(tenant)
    _assert_store_exact(ops, tenant)


def test_a_sigkilled_worker_s_run_is_crashed_by_the_next_worker_and_rerun_exactly(ops):
    _stopped_mid_run(ops, signal.SIGKILL, tree=True)  # the worker and its flow processes: the machine died


def test_a_sigtermed_worker_s_run_is_crashed_by_the_next_worker_and_rerun_exactly(ops):
    _stopped_mid_run(ops, signal.SIGTERM, tree=False)  # `systemctl stop`: Prefect interrupts the flow process


def test_server_and_postgres_restarted_mid_run_leave_no_run_running_and_no_slot_held(ops):
    tenant = ops["product"].world.tenants[0]
    graph = ops["product"].running.graph
    worker, log = _start_worker(ops, "a", "restart")
    try:
        graph.latency_s = 1.0
        before = _mailbox_requests(ops, tenant)
        run = _run_email_sync(tenant.tid)
        wait_for(lambda: _state(run.id) == "RUNNING", BOUND_S, f"the run to start ({log.read_text()[-2000:]})")
        wait_for(lambda: _mailbox_requests(ops, tenant) > before, BOUND_S, "the run to fetch mail")
        ops["stack"].restart(immediate=True)
        graph.latency_s = 0.0
        wait_for(lambda: _state(run.id) in TERMINAL, BOUND_S, f"the run to end ({log.read_text()[-2000:]})")
        print(f"the run in progress during the restart ended {_state(run.id)}")
        rerun = _run_email_sync(tenant.tid)
        wait_for(lambda: _state(rerun.id) in TERMINAL, BOUND_S, f"the next run ({log.read_text()[-2000:]})")
        assert _state(rerun.id) == "COMPLETED", log.read_text()[-3000:]
    finally:
        graph.latency_s = 0.0
        _stop(worker)
    _assert_nothing_in_progress(tenant)
    _assert_store_exact(ops, tenant)
