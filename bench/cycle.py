"""Benchmark P4: one 15-minute email cycle of many simulated tenants on a Prefect server on PostgreSQL with two
process workers on loopback, and where its time goes (Prefect overhead vs Graph).

    uv run python bench/cycle.py --quick                      # CI: 2 tenants x 2 mailboxes, ~1 min
    uv run python bench/cycle.py --tenants 100 --mailboxes 10 --new 10            # (a) a busy cycle
    uv run python bench/cycle.py --tenants 1000 --mailboxes 10 --new 0 --spread 0  # (b) a quiet cycle

Setup (untimed): a private PostgreSQL cluster and `prefect server start` on it (`deployments.postgres.prefect_stack`),
a generated world of --tenants x --mailboxes, the simulators (`simulators.running.start_world`), every tenant
registered and its users connected through our /connect + MSAL (`app.demo.register_and_connect`), each tenant's CRM
snapshot and mailboxes brought up to date by the library directly (no Prefect: the cycle measured is a steady-state
one), then --new messages per mailbox added to the world. From then on Graph answers every mailbox request after a
random 50-150 ms (`--latency-ms`), slept while holding the mailbox's slot, as the simulator's fixed latency does.

The cycle: one `email-sync` deployment (process work pool, one queue per shard) and, per tenant, a flow run of it
scheduled at t0 + the tenant's offset (`--spread` seconds spread by the tenant's schedule digest; 0 = all due at
t0), on the queue of the tenant's shard (tenant index mod 2). Two `prefect worker start` processes, one per shard,
`--limit` runs each. The bench waits until every run is final, then reads each run's state history:

* pickup = Pending - scheduled (the worker's poll interval and its limit), process start = Running - Pending (a new
  Python process importing Prefect and the product), in-run = end - Running;
* Graph time of a run = the union of its tenant's Graph request intervals (latency sleeps) while it ran; in-run
  overhead = in-run - Graph time (Prefect task runs and API calls, DuckDB, token cache);
* Prefect overhead share = (process start + in-run overhead) / (process start + in-run), summed over the runs;
* CPU seconds over the cycle of the server (all its services) + PostgreSQL, of the workers with their flow-run
  processes, and of this process (it runs the simulators; production has no such cost).

Checks: every run Completed, every mailbox's new mail stored (the store holds exactly the world's matches).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POOL = "o365sync-bench"
SHARDS = ("shard-0", "shard-1")
LATENCY_MS = (50.0, 150.0)
T_START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f} s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ Graph latency
class GraphClock:
    """Random per-request latency for the Graph simulator, and the interval each request slept, per mailbox."""

    def __init__(self, lo_ms: float, hi_ms: float, seed: int = 0) -> None:
        import random

        self.lo, self.hi = lo_ms / 1000, hi_ms / 1000
        self.rng = random.Random(seed)
        self.on = False
        self.local = threading.local()
        self.lock = threading.Lock()
        self.intervals: dict[str, list[tuple[float, float]]] = {}

    def install(self, graph: object) -> None:
        """Make `graph` (a running GraphSimulator) sleep through this clock: `_admit(oid)` is called right before
        the simulator reads `latency_s` (twice: `if self.latency_s: time.sleep(self.latency_s)`)."""
        clock, base = self, type(graph)

        class Latent(base):  # type: ignore[misc, valid-type]
            def _admit(self, oid: str) -> bool:
                ok = base._admit(self, oid)  # type: ignore[attr-defined]
                clock.local.oid, clock.local.reads = (oid if ok else None), 0
                return ok

            @property
            def latency_s(self) -> float:
                return clock.next_latency()

            @latency_s.setter
            def latency_s(self, value: float) -> None:
                pass

        graph.__class__ = Latent

    def next_latency(self) -> float:
        oid = getattr(self.local, "oid", None)
        if not self.on or oid is None:
            return 0.0
        self.local.reads = getattr(self.local, "reads", 0) + 1
        if self.local.reads == 1:
            return 1.0  # the truth test
        with self.lock:
            value = self.rng.uniform(self.lo, self.hi)
            self.intervals.setdefault(oid, []).append((time.time(), value))
        self.local.oid = None
        return value

    def busy_s(self, oids: set[str], start: float, end: float) -> float:
        """Wall seconds within [start, end] during which at least one request of `oids` was in Graph."""
        spans = sorted(
            (max(s, start), min(s + d, end))
            for oid in oids
            for s, d in self.intervals.get(oid, [])
            if s < end and s + d > start
        )
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s  # type: ignore[operator]
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s  # type: ignore[operator]
        return total

    def requests(self) -> int:
        return sum(len(v) for v in self.intervals.values())


# ------------------------------------------------------------------------------------------------ CPU meters
def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its live descendants and the children it has reaped."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------------------------ workers
@contextlib.contextmanager
def workers(env: dict[str, str], limit: int, home: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One `prefect worker start` per shard queue (process type), stopped (SIGINT, then SIGKILL) on exit."""
    procs = []
    try:
        for shard in SHARDS:
            log = open(home / f"worker-{shard}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "prefect",
                        "worker",
                        "start",
                        "--pool",
                        POOL,
                        "--work-queue",
                        shard,
                        "--type",
                        "process",
                        "--limit",
                        str(limit),
                    ],
                    env=env | {"PREFECT_HOME": str(home / shard)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for_workers(len(procs))
        say("workers polling")
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def wait_for_workers(count: int, timeout: float = 180.0) -> None:
    """Until `count` workers have polled the pool (so their start-up CPU is not counted as the cycle's)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if len(client.read_workers_for_work_pool(POOL)) >= count:
                return
            time.sleep(1)
    raise SystemExit(f"FAIL: {count} workers did not come up within {timeout:.0f} s")


# ------------------------------------------------------------------------------------------------ the cycle
@dataclass
class RunTimes:
    tenant: str
    state: str
    scheduled: float
    pending: float | None
    running: float | None
    end: float | None
    graph_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def setup_world(args: argparse.Namespace, work: Path) -> tuple:
    """World, simulators, settings env, tenants connected and brought up to date (untimed)."""
    from app.demo import register_and_connect
    from o365sync.settings import load_settings
    from o365sync.sync.mailbox import sync_mailbox_now
    from o365sync.tenant_context import resolve_tenant
    from simulators.running import start_world
    from simulators.world import generate_world
    from tasks.crm_snapshot import refresh_crm_snapshot
    from tests.product import free_port

    world = generate_world(
        seed=args.seed,
        tenants=args.tenants,
        users_per_tenant=args.mailboxes,
        messages_per_user=args.messages,
        contacts_per_tenant=20,
    )
    port = free_port()
    redirect = f"http://localhost:{port}/auth/callback"
    running = start_world(world, work / "tls", redirect_uris=[redirect])
    say(f"world generated, simulators up: {len(world.tenants)} tenants")
    env = running.settings_env(work / "data", redirect)
    os.environ.update(env)
    settings = load_settings()
    for tenant in world.tenants:
        register_and_connect(settings, running, tenant, port)

    def catch_up(tenant) -> None:  # noqa: ANN001
        refresh_crm_snapshot(settings, tenant.tid)
        for user in tenant.users:
            sync_mailbox_now(resolve_tenant(settings, tenant.tid), user.oid)

    say("tenants registered, users connected")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(catch_up, world.tenants))
    say("every mailbox caught up (library, no Prefect)")
    for tenant in world.tenants:
        for user in tenant.users:
            for i in range(args.new):
                world.add_message(user.oid, "inbox", kind=("contact", "stranger", "account", "newsletter")[i % 4])
    return world, running, settings, env


def register_cycle_deployment() -> object:
    """The `email-sync` deployment on the bench's process pool, and one queue per shard; returns its id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType

    from flows.email_sync import email_sync

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
        for shard in SHARDS:
            with contextlib.suppress(Exception):
                client.create_work_queue(name=shard, work_pool_name=POOL)
    dep = email_sync.to_deployment(name="cycle", entrypoint_type=EntrypointType.MODULE_PATH)
    return dep.apply(work_pool_name=POOL)


def offset_s(tenant_id: str, spread: float) -> float:
    from deployments.schedules import SYNC_INTERVAL_S, schedule_offset_s

    return schedule_offset_s(tenant_id) / SYNC_INTERVAL_S * spread if spread else 0.0


def schedule_cycle(deployment_id: object, tenant_ids: list[str], t0: datetime, spread: float) -> dict[str, str]:
    """One scheduled flow run per tenant at t0 + offset on its shard's queue; flow run id -> tenant id."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    out = {}
    with get_client(sync_client=True) as client:
        for i, tid in enumerate(tenant_ids):
            run = client.create_flow_run_from_deployment(
                deployment_id,  # type: ignore[arg-type]
                parameters={"tenant_id": tid},
                state=Scheduled(scheduled_time=t0 + timedelta(seconds=offset_s(tid, spread))),
                work_queue_name=SHARDS[i % len(SHARDS)],
                idempotency_key=f"{tid}:{t0.isoformat()}",
            )
            out[str(run.id)] = tid
    return out


def wait_final(run_ids: dict[str, str], timeout: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
    ids = list(run_ids)
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            done = 0
            for i in range(0, len(ids), 200):
                flt = FlowRunFilter(
                    id=FlowRunFilterId(any_=ids[i : i + 200]),  # type: ignore[arg-type]
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=final)),
                )
                done += client.count_flow_runs(flow_run_filter=flt)
            if done == len(ids):
                return
            if int(time.monotonic()) % 30 < 2:
                say(f"{done} of {len(ids)} runs final")
            time.sleep(2)
    raise SystemExit(f"FAIL: {len(ids) - done} of {len(ids)} runs not final after {timeout:.0f} s")


def read_runs(run_ids: dict[str, str]) -> list[RunTimes]:
    from prefect.client.orchestration import get_client

    out = []
    with get_client(sync_client=True) as client:
        for rid, tid in run_ids.items():
            run = client.read_flow_run(rid)  # type: ignore[arg-type]
            states = client.read_flow_run_states(rid)  # type: ignore[arg-type]
            first = {}
            for s in sorted(states, key=lambda s: s.timestamp):
                first.setdefault(s.type.value, s.timestamp)
            out.append(
                RunTimes(
                    tid,
                    run.state.type.value if run.state else "?",
                    _ts(run.expected_start_time) or 0.0,
                    _ts(first.get("PENDING")),
                    _ts(first.get("RUNNING")),
                    _ts(run.end_time),
                )
            )
    return out


def pg_bytes(stack: object) -> int:
    return int(stack.pg.query("SELECT pg_database_size('prefect')").strip())  # type: ignore[attr-defined]


def pg_rows(stack: object) -> dict[str, int]:
    tables = ("flow_run", "flow_run_state", "task_run", "task_run_state", "log", "events", "artifact")
    sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in tables)
    out = {}
    for line in stack.pg.query(sql).strip().splitlines():  # type: ignore[attr-defined]
        name, _, count = line.partition("|")
        out[name.strip()] = int(count.strip())
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: 2 tenants x 2 mailboxes, 3 new each")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--mailboxes", type=int, default=10)
    parser.add_argument("--messages", type=int, default=20, help="messages per mailbox before the cycle")
    parser.add_argument("--new", type=int, default=10, help="new messages per mailbox in the cycle (0: quiet)")
    parser.add_argument("--spread", type=float, default=0.0, help="due times spread over this many seconds")
    parser.add_argument("--limit", type=int, default=8, help="concurrent flow runs per worker")
    parser.add_argument("--latency-ms", type=float, nargs=2, default=LATENCY_MS)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--cycles", type=int, default=1, help="cycles on the same setup; after the first: quiet")
    parser.add_argument("--json", type=Path, help="write the run's arguments, machine and outcome as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tenants, args.mailboxes, args.new, args.messages, args.limit = 2, 2, 3, 10, 2
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    work = Path(tempfile.mkdtemp(prefix="o365sync-cycle-"))
    os.environ["PREFECT_HOME"] = str(work / "client")
    from o365sync.prefect_env import configure_prefect_env

    configure_prefect_env()
    try:
        rc = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from import_vs_dlt import write_json

    write_json(args, exit_status=rc)
    return rc


def run(args: argparse.Namespace, work: Path) -> int:
    from deployments.postgres import prefect_stack
    from deployments.prefect_server import use_api
    from o365sync.prefect_env import PRIVACY_DEFAULTS

    t_setup = time.perf_counter()
    with prefect_stack() as stack, use_api(stack.api_url):
        world, running, settings, env = setup_world(args, work)
        dep_id = register_cycle_deployment()
        setup_s = time.perf_counter() - t_setup
        clock = GraphClock(*args.latency_ms, seed=args.seed)
        clock.install(running.graph)
        clock.on = True
        worker_env = {**os.environ, **env, **PRIVACY_DEFAULTS, "PREFECT_API_URL": stack.api_url}
        server_pid, pg_pid = stack.server._proc.pid, stack.pg._proc.pid  # type: ignore[union-attr]
        results = []
        with workers(worker_env, args.limit, work) as procs:
            for cycle in range(args.cycles):
                bytes0, rows0, req0 = pg_bytes(stack), pg_rows(stack), clock.requests()
                t0 = datetime.now(UTC) + timedelta(seconds=15 if not args.quick else 5)
                cpu0 = (
                    tree_cpu_s(server_pid) + tree_cpu_s(pg_pid),
                    sum(tree_cpu_s(p.pid) for p in procs),
                    self_cpu_s(),
                )
                w0 = time.time()
                run_ids = schedule_cycle(dep_id, [t.tid for t in world.tenants], t0, args.spread)
                create_s = time.time() - w0
                say(f"cycle {cycle + 1}: {len(run_ids)} runs scheduled")
                wait_final(run_ids, args.timeout)
                wall_end = time.time()
                cpu1 = (
                    tree_cpu_s(server_pid) + tree_cpu_s(pg_pid),
                    sum(tree_cpu_s(p.pid) for p in procs),
                    self_cpu_s(),
                )
                bytes1, rows1 = pg_bytes(stack), pg_rows(stack)
                runs = read_runs(run_ids)
                results.append(
                    (
                        runs,
                        t0.timestamp(),
                        wall_end,
                        cpu0,
                        cpu1,
                        bytes1 - bytes0,
                        rows0,
                        rows1,
                        create_s,
                        clock.requests() - req0,
                    )
                )
                if cycle == 0:
                    ok = check_store(settings, world)  # the new mail is in (later cycles are quiet)
        running.stop()
    users = {t.tid: {u.oid for u in t.users} for t in world.tenants}
    failed = []
    for cycle, (runs, t0s, wall_end, cpu0, cpu1, db, rows0, rows1, create_s, requests) in enumerate(results):
        for r in runs:
            if r.running and r.end:
                r.graph_s = clock.busy_s(users[r.tenant], r.running, r.end)
        failed += [r for r in runs if r.state != "COMPLETED"]
        new = args.new if cycle == 0 else 0
        report(args, new, runs, requests, t0s, wall_end, cpu0, cpu1, db, rows0, rows1, setup_s, create_s)
    if failed or not ok:
        print(f"FAIL: {len(failed)} runs not Completed ({sorted({r.state for r in failed})}); store exact: {ok}")
        return 1
    return 0


def check_store(settings: object, world: object) -> bool:
    from tests.product import stored_matches

    return all(
        stored_matches(settings, t.tid) == world.expected_matches(t.tid)  # type: ignore[attr-defined]
        for t in world.tenants  # type: ignore[attr-defined]
    )


def report(args, new, runs, requests, t0, wall_end, cpu0, cpu1, db_bytes, rows0, rows1, setup_s, create_s) -> None:  # noqa: ANN001, PLR0913
    done = [r for r in runs if r.running and r.end and r.pending]
    pickup = [r.pending - r.scheduled for r in done]  # type: ignore[operator]
    start_lag = [r.running - r.scheduled for r in done]  # type: ignore[operator]
    proc = [r.running - r.pending for r in done]  # type: ignore[operator]
    inrun = [r.end - r.running for r in done]  # type: ignore[operator]
    graph = [r.graph_s for r in done]
    overhead_in = [i - g for i, g in zip(inrun, graph, strict=True)]
    last_end = max((r.end for r in done), default=t0) - t0  # type: ignore[type-var]
    server_cpu, worker_cpu, self_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    window = max(1e-9, wall_end - (t0 - 15))
    share = (sum(proc) + sum(overhead_in)) / max(1e-9, sum(proc) + sum(inrun))
    n = len(runs)
    print(
        f"\nbench/cycle.py  {n} tenants x {args.mailboxes} mailboxes, {new} new msgs/mailbox, "
        f"Graph latency {args.latency_ms[0]:.0f}-{args.latency_ms[1]:.0f} ms, spread {args.spread:.0f} s, "
        f"2 workers x --limit {args.limit}"
    )
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"setup {setup_s:.0f} s (untimed), {n} runs created in {create_s:.1f} s"
    )
    print("\n| per run (s) | median | p95 | max |")
    print("|---|---|---|---|")
    for name, vals in (
        ("start lag (scheduled -> Running)", start_lag),
        ("  pickup (scheduled -> Pending)", pickup),
        ("  process start (Pending -> Running)", proc),
        ("in-run (Running -> end)", inrun),
        ("  Graph time (union of request intervals)", graph),
        ("  in-run overhead (Prefect tasks/API, DuckDB)", overhead_in),
    ):
        print(
            f"| {name} | {statistics.median(vals) if vals else float('nan'):.2f} | {pct(vals, 0.95):.2f} | "
            f"{max(vals) if vals else float('nan'):.2f} |"
        )
    print("\n| cycle | value |")
    print("|---|---|")
    rows = [
        ("runs Completed", f"{sum(r.state == 'COMPLETED' for r in runs)} / {n}"),
        ("cycle wall (first due -> last run final)", f"{last_end:.1f} s"),
        ("runs started within 60 s of due", f"{sum(x <= 60 for x in start_lag)} / {n}"),
        ("Graph requests", f"{requests}"),
        ("Prefect overhead share of run time (process start + in-run overhead)", f"{share:.0%}"),
        ("server + PostgreSQL CPU", f"{server_cpu:.0f} s = {server_cpu / window:.2f} cores avg"),
        ("workers + flow-run processes CPU", f"{worker_cpu:.0f} s = {worker_cpu / window:.2f} cores avg"),
        ("workers CPU per run", f"{worker_cpu / max(1, n):.2f} s"),
        ("simulators (this process) CPU", f"{self_cpu:.0f} s = {self_cpu / window:.2f} cores avg"),
        ("PostgreSQL growth this cycle", f"{db_bytes / 1e6:.1f} MB = {db_bytes / max(1, n) / 1e3:.0f} kB per run"),
        ("rows per run", ", ".join(f"{k} {(rows1[k] - rows0[k]) / max(1, n):.1f}" for k in rows1)),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(
        f"\ncycle_wall_s={last_end:.1f} overhead_share={share:.3f} server_cores={server_cpu / window:.3f} "
        f"worker_cpu_per_run_s={worker_cpu / max(1, n):.2f} db_bytes_per_run={db_bytes / max(1, n):.0f}"
    )


if __name__ == "__main__":
    sys.exit(main())
