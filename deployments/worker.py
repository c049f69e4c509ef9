"""Start the worker of one shard: `python -m deployments.worker --pool o365sync --shard a [--limit 4]`.

It runs `prefect worker start --pool <pool> --work-queue shard-<name> --work-queue dispatch` (a Prefect process
worker, replacing this process: the shard's tenants' runs, and the dispatchers' runs, which any worker may take
since the tenant registry is shared; `deployments.dispatch`), after two steps that make a dead worker's runs
recoverable:

1. **One worker per shard.** It takes an exclusive lock file in the shard's storage root (on the worker's machine);
   the `prefect worker` process inherits and holds it, so the kernel releases it when that process dies, however.
   A second worker for the same shard on the same machine is refused (one line).
2. **Reconcile.** Holding that lock proves the shard's previous worker is gone. Open-source Prefect does not reap
   the runs of a dead worker: a SIGKILLed worker (or a machine that died) leaves its runs Running or Pending, and a
   worker that gets SIGTERM interrupts its flow processes and also leaves their runs Running, holding work-queue
   concurrency slots. So every Pending or Running run on the shard's queue is set to **Crashed**
   through the Prefect API, which releases its slots; the tenants' file locks were released by the kernel when
   the flow processes ended. The next scheduled run (or a re-run) then resumes from the store's cursors: nothing
   is lost or imported twice.

A worker that never comes back is covered by the zombie-run automation (`deployments.zombies`), which crashes runs
whose heartbeat stopped. The worker's flow runs send heartbeats every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (30
here, unless set).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path
from typing import Any

from deployments.dispatch_plan import DISPATCH_QUEUE
from deployments.shards import shard_queue
from o365sync.settings import Settings

HEARTBEAT_S = 30
LOCK_NAME = ".o365sync-worker-{pool}.lock"


class WorkerRefused(RuntimeError):
    pass


def shard_root(settings: Settings, shard: str) -> Path:
    if shard not in settings.regions:
        raise WorkerRefused(
            f"unknown shard {shard!r}: a shard is a storage location of O365SYNC_REGIONS on this machine "
            f"(configured: {', '.join(sorted(settings.regions)) or 'none'})"
        )
    return settings.regions[shard]


def take_shard_lock(settings: Settings, pool: str, shard: str) -> int:
    """The locked file descriptor (inheritable, so the worker process keeps the lock); WorkerRefused if held."""
    root = shard_root(settings, shard)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME.format(pool=pool)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text().strip() or "another process"
        raise WorkerRefused(
            f"shard {shard} of work pool {pool} already has a worker on this machine ({holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}\n".encode())
    os.set_inheritable(fd, True)
    return fd


def crash_orphaned_runs(pool: str, shard: str, reason: str | None = None) -> list[Any]:
    """Set every Pending or Running flow run on the shard's work queue to Crashed (forced); returns them.

    Only call it while holding the shard's lock: it assumes no live worker runs that queue."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
        WorkQueueFilter,
        WorkQueueFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    queue = shard_queue(shard)
    message = reason or f"the worker of shard {shard} stopped while this run was in progress; the next run resumes it"
    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            work_queue_filter=WorkQueueFilter(name=WorkQueueFilterName(any_=[queue] if queue else [])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))
            ),
        )
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed.append(run)
    return crashed


def worker_command(pool: str, shard: str, limit: int | None, extra: list[str]) -> list[str]:
    from deployments.prefect_server import _prefect_executable

    cmd = [*_prefect_executable(), "worker", "start", "--pool", pool, "--work-queue", str(shard_queue(shard))]
    cmd += ["--work-queue", DISPATCH_QUEUE]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", required=True, help="the process work pool (e.g. o365sync)")
    parser.add_argument("--shard", required=True, help="the shard this machine runs (a key of O365SYNC_REGIONS)")
    parser.add_argument("--limit", type=int, default=None, help="flow runs at once (prefect worker --limit)")
    args, extra = parser.parse_known_args(argv)
    from o365sync.prefect_env import configure_prefect_env
    from o365sync.startup import make_new_files_private

    make_new_files_private()  # the shard root and lock it creates, and everything its flow runs write: 0600/0700
    configure_prefect_env()
    from deployments.prefect_server import healthy, require_api_url
    from o365sync.settings import load_settings

    api = require_api_url("the worker needs")
    if not api:
        return 1
    if not healthy(api):
        print(f"the Prefect server at {api} does not answer (is it running?)", file=sys.stderr)
        return 1
    try:
        take_shard_lock(load_settings(), args.pool, args.shard)
    except WorkerRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    for run in crash_orphaned_runs(args.pool, args.shard):
        print(f"run {run.name} ({run.id}) was left in progress by the shard's previous worker: marked Crashed")
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    cmd = worker_command(args.pool, args.shard, args.limit, extra)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the worker keeps the lock's descriptor; it dies with the worker


if __name__ == "__main__":
    sys.exit(main())
