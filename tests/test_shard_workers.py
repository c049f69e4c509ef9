"""Shards and worker failures against the real thing: a private PostgreSQL, `prefect server start` on it, real
process workers (`python -m deployments.worker`, i.e. `prefect worker start --work-queue shard-<name> --work-queue
dispatch`), simulated tenants (the simulators' Graph, identity and CRM on loopback).

* `python -m deployments.register` registers one deployment per job kind and the dispatchers, and deletes the
  per-tenant deployments an earlier version registered; a dispatcher run creates one run per tenant with the
  feature on its shard's queue at the window's start + the tenant's offset; the same window again creates
  nothing; a tenant added later is in the next window, a removed one is not, one whose earlier run is not final
  is skipped; `o365sync tenant assign` moves a tenant's files and runs to another shard while its runs are held
  (a manual run waiting on the old queue is re-created on the new one); bad input changes nothing.
* A shard's worker killed mid-run (SIGKILL of the whole worker: the machine died; SIGTERM of the worker: Prefect
  interrupts its flow processes): the run is left Running (Prefect has no reaper), the tenant's file locks are
  free (they died with the processes), the shard's next worker marks the run Crashed, a re-run completes, and the
  store is exactly the simulated world's expected matches, nothing doubled; the shard's worker leaves another
  shard's run alone.
* The Prefect server and PostgreSQL restarted (PostgreSQL as if it crashed) mid-run: no run stays Running, the
  tenant's next run runs, the store is exact.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deployments.dispatch import dispatch, dispatch_window, job_kind_name, run_now
from deployments.dispatch_plan import JOB_KINDS, SCHEDULED, window_of
from deployments.register import register_deployments
from deployments.schedules import EMAIL_SYNC, INITIAL_IMPORT, build_deployments, schedule_offset_s
from deployments.shards import assign_shard, shard_queue
from o365sync.settings import load_settings
from o365sync.store import open_store
from o365sync.tenants import TenantConfig, list_tenants, load_tenant, registry_dir, save_tenant, tenant_dir
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
    (the move), t2 unsharded; deployments registered on the PostgreSQL-backed server, the dispatchers paused (the
    tests dispatch by hand, so that no scheduled sync interferes with their runs)."""
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
            with use_api(prefect_on_postgres.api_url):
                register_deployments(settings, POOL, dispatchers_paused=True)
                yield {"stack": prefect_on_postgres, "product": product, "settings": settings, "tmp": tmp}
        finally:
            product.running.stop()


def _deployment(client, kind: str):
    return client.read_deployment_by_name(job_kind_name(kind))


def _runs(client, kind: str, tenant_id: str | None = None) -> list:
    """The runs of the kind's deployment (of one tenant)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    tags = FlowRunFilter(tags=FlowRunFilterTags(all_=[tenant_id])) if tenant_id else None
    return client.read_flow_runs(deployment_filter=_by_id(_deployment(client, kind).id), flow_run_filter=tags)


def test_register_replaces_per_tenant_deployments_by_job_kinds_and_dispatchers(ops):
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    settings = ops["settings"]
    earlier = build_deployments(settings)  # what an earlier version registered: per tenant, scheduled
    with get_client(sync_client=True) as client:
        ids = [d.apply(work_pool_name=POOL) for d in earlier]
        assert wait_for(lambda: client.read_flow_runs(limit=1, deployment_filter=_by_id(ids[0])), 30, "schedules")
    register_deployments(settings, POOL, dispatchers_paused=True)
    with get_client(sync_client=True) as client:
        for deployment_id in ids:
            with pytest.raises(ObjectNotFound):
                client.read_deployment(deployment_id)
        assert client.read_flow_runs(deployment_filter=_by_id(ids[0])) == []  # their scheduled runs went with them
        queues = {q.name for q in client.read_work_queues(work_pool_name=POOL)}
        assert {"shard-a", "shard-b", "shard-c", "dispatch"} <= queues  # every configured shard's, before any run
        for kind in JOB_KINDS:
            d = _deployment(client, kind)
            assert (d.work_pool_name, d.schedules, d.global_concurrency_limit) == (POOL, [], None)
        for kind in SCHEDULED:
            d = client.read_deployment_by_name(f"dispatch/{kind}")
            (schedule,) = d.schedules
            assert schedule.schedule.interval.total_seconds() == JOB_KINDS[kind].interval_s
            assert (d.work_queue_name, d.paused, d.parameters) == ("dispatch", True, {"kind": kind})


def test_the_dispatcher_creates_each_tenants_run_once_per_window_on_its_shard_queue(ops):
    """Windows far in the future, so no worker of the other tests takes these runs; they are deleted after."""
    import shutil

    from prefect import get_client
    from prefect.states import Cancelled

    settings = ops["settings"]
    t0 = ops["product"].world.tenants[0].tid
    window = window_of(datetime(2099, 1, 1, tzinfo=UTC), 900)

    def expected(at: datetime, skip: frozenset[str] = frozenset()) -> set[tuple]:
        return {
            (t.id, shard_queue(t.shard) or "default", at + timedelta(seconds=schedule_offset_s(t.id)), "SCHEDULED")
            for t in list_tenants(settings)
            if "email" in t.features and t.id not in skip
        }

    def dispatched(client, at: datetime) -> set[tuple]:
        runs = [r for r in _runs(client, EMAIL_SYNC) if at <= r.expected_start_time < at + timedelta(seconds=900)]
        assert len({r.parameters["tenant_id"] for r in runs}) == len(runs)  # one run per tenant
        return {(r.parameters["tenant_id"], r.work_queue_name, r.expected_start_time, r.state_type.value) for r in runs}

    newcomer = TenantConfig(id="newcomer", domains=["newcomer.example"], features=["email"], shard="b", region="b")
    try:
        with get_client(sync_client=True) as client:
            counts = dispatch(EMAIL_SYNC, window=window.isoformat())  # the dispatcher's flow, run here
            assert dispatched(client, window) == expected(window) and counts["created"] == len(expected(window))
            before = {r.id for r in _runs(client, EMAIL_SYNC)}
            again = dispatch_window(settings, EMAIL_SYNC, window)
            assert (again["created"], again["existing"]) == (0, counts["created"])
            assert {r.id for r in _runs(client, EMAIL_SYNC)} == before

            save_tenant(settings, newcomer)  # registered after `register`: no re-registration
            second = window + timedelta(seconds=900)
            dispatch_window(settings, EMAIL_SYNC, second)
            assert ("newcomer", "shard-b") in {row[:2] for row in dispatched(client, second)}
            assert dispatched(client, second) == expected(second)

            for run in _runs(client, EMAIL_SYNC):  # the first windows' runs ran, except t0's second one
                if not (run.parameters["tenant_id"] == t0 and run.expected_start_time >= second):
                    client.set_flow_run_state(run.id, Cancelled(), force=True)
            shutil.rmtree(registry_dir(settings, "newcomer"))  # removed: simply not dispatched any more
            fourth = window + timedelta(seconds=2700)
            counts = dispatch_window(settings, EMAIL_SYNC, fourth)
            assert dispatched(client, fourth) == expected(fourth, skip=frozenset({t0}))  # t0's earlier run is not final
            assert counts["skipped"] == 1 and "newcomer" not in {row[0] for row in dispatched(client, fourth)}

            now = dispatch(EMAIL_SYNC)  # as scheduled: the window after the run's scheduled time (now)
            assert now["created"] == len(expected(window)), now
    finally:
        shutil.rmtree(registry_dir(settings, "newcomer"), ignore_errors=True)
        with get_client(sync_client=True) as client:
            for run in _runs(client, EMAIL_SYNC):
                if run.idempotency_key and run.state_type.value in ("SCHEDULED", "CANCELLED"):
                    client.delete_flow_run(run.id)  # dispatched here


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
    window = window_of(datetime(2098, 1, 1, tzinfo=UTC), 900)  # far ahead: no worker takes it
    with get_client(sync_client=True) as client:
        waiting = run_now(client, INITIAL_IMPORT, load_tenant(settings, t1), name="requested-import")  # no worker on b
        dispatch_window(settings, EMAIL_SYNC, window, tenants=[load_tenant(settings, t1)])
        (scheduled,) = [r for r in _runs(client, EMAIL_SYNC, t1) if r.expected_start_time >= window]

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
        assert (waiting.work_queue_name, scheduled.work_queue_name) == ("shard-b", "shard-b")
        runs = _runs(client, INITIAL_IMPORT, t1)
        assert [(r.name, r.work_queue_name, r.state_type.value) for r in runs] == [
            ("requested-import", "shard-c", "SCHEDULED")
        ]  # the request that waited on the old shard was re-created on the new one, once
        assert runs[0].id != waiting.id
        (moved,) = [r for r in _runs(client, EMAIL_SYNC, t1) if r.expected_start_time >= window]
        assert (moved.work_queue_name, moved.expected_start_time, moved.idempotency_key) == (
            "shard-c",
            scheduled.expected_start_time,
            scheduled.idempotency_key,
        )  # the dispatched run of the next window too, at its time, under its key
        client.delete_flow_run(moved.id)


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
        return run_now(client, EMAIL_SYNC, load_tenant(load_settings(), tenant_id))


FAR = datetime(2097, 1, 1, tzinfo=UTC)  # a window no worker reaches during the tests


def _run_dispatcher_by_hand(window: datetime):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"dispatch/{EMAIL_SYNC}")  # paused: its schedule, not its runs
        return client.create_flow_run_from_deployment(
            deployment.id, parameters={"kind": EMAIL_SYNC, "window": window.isoformat()}
        )


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
    """No run of the tenant Pending or Running."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        assert [r for r in _runs(client, EMAIL_SYNC, tenant.tid) if r.state_type.value in ("PENDING", "RUNNING")] == []


def _assert_store_exact(ops, tenant) -> None:
    world = ops["product"].world
    world.now = datetime.now(UTC)
    assert stored_matches(ops["settings"], tenant.tid) == world.expected_matches(tenant.tid)
    with open_store(ops["settings"], tenant.tid, write=False) as con:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT (user_oid, graph_id)) FROM emails").fetchall()[0]
    assert total == distinct > 0


def _stopped_mid_run(ops, sig: int, tree: bool) -> None:
    """Start shard a's worker, start an email sync of t0 and stop the worker with `sig` once the sync is
    fetching mail; then the shard's next worker reconciles and a re-run completes exactly, while a run of a tenant
    on another shard waits for its own shard's worker."""
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
    assert _state(run.id) == "RUNNING"  # what Prefect leaves behind: no reaper
    assert _lock_is_free(tenant_dir(ops["settings"], tenant.tid) / "sync-email.lock")  # died with the process

    from prefect import get_client

    worker, log = _start_worker(ops, "a", f"{sig}-next")
    elsewhere = None
    try:
        assert wait_for(lambda: _state(run.id) == "CRASHED", BOUND_S, "the next worker to reconcile")
        elsewhere = _run_email_sync(ops["product"].world.tenants[1].tid)  # shard b (or c, once moved)
        rerun = _run_email_sync(tenant.tid)
        dispatcher = _run_dispatcher_by_hand(FAR)  # a shard's worker also runs the dispatchers (queue `dispatch`)
        wait_for(lambda: _state(rerun.id) in TERMINAL, BOUND_S, f"the re-run ({log.read_text()[-2000:]})")
        assert _state(rerun.id) == "COMPLETED", log.read_text()[-3000:]
        assert elsewhere.work_queue_name != "shard-a" and _state(elsewhere.id) == "SCHEDULED"  # not shard a's
        wait_for(lambda: _state(dispatcher.id) in TERMINAL, BOUND_S, f"the dispatcher ({log.read_text()[-2000:]})")
        assert _state(dispatcher.id) == "COMPLETED", log.read_text()[-3000:]
        with get_client(sync_client=True) as client:
            far = [r for r in _runs(client, EMAIL_SYNC) if r.expected_start_time >= FAR]
            dispatched = {r.parameters["tenant_id"] for r in far}
        # t2 has no other run; t0 (its re-run) and t1 (`elsewhere`) may be skipped: an earlier run was not final
        assert ops["product"].world.tenants[2].tid in dispatched <= {t.id for t in list_tenants(ops["settings"])}
    finally:
        _stop(worker)
        with get_client(sync_client=True) as client:
            for run in [r for r in _runs(client, EMAIL_SYNC) if r.expected_start_time >= FAR]:
                client.delete_flow_run(run.id)
            if elsewhere is not None:
                client.delete_flow_run(elsewhere.id)
    assert "marked Crashed" in log.read_text()
    _assert_nothing_in_progress(tenant)
    _assert_store_exact(ops, tenant)


def test_a_sigkilled_worker_s_run_is_crashed_by_the_next_worker_and_rerun_exactly(ops):
    _stopped_mid_run(ops, signal.SIGKILL, tree=True)  # the worker and its flow processes: the machine died


def test_a_sigtermed_worker_s_run_is_crashed_by_the_next_worker_and_rerun_exactly(ops):
    _stopped_mid_run(ops, signal.SIGTERM, tree=False)  # `systemctl stop`: Prefect interrupts the flow process


def test_server_and_postgres_restarted_mid_run_leave_no_run_running(ops):
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
