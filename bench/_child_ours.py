"""Benchmark child: the product's import of one mailbox (`o365sync.sync.mailbox.sync_mailbox_now`), in a fresh
process so its CPU time and peak RSS are the client's alone. Started by bench/import_vs_dlt.py with the O365SYNC_*
settings of the simulated world and BENCH_TENANT_ID / BENCH_USER_OID; BENCH_PROFILE=<path> writes a cProfile of
all the import's threads, merged."""

from __future__ import annotations

import time

T_START = time.perf_counter()

import os  # noqa: E402

from _measure import Meter, emit_measured, imports_done  # noqa: E402

from o365sync.prefect_env import configure_prefect_env  # noqa: E402

configure_prefect_env()  # o365sync imports may pull in Prefect settings; the parent points PREFECT_HOME at a temp dir
from o365sync.settings import load_settings  # noqa: E402
from o365sync.sync.mailbox import sync_mailbox_now  # noqa: E402
from o365sync.tenant_context import resolve_tenant  # noqa: E402

imports_done(T_START)

tenant, user_oid = resolve_tenant(load_settings(), os.environ["BENCH_TENANT_ID"]), os.environ["BENCH_USER_OID"]
profile_path = os.environ.get("BENCH_PROFILE")

meter = Meter()
if profile_path:
    import cProfile
    import pstats
    import threading

    # cProfile sees only the thread it runs in: give every thread the import starts (body senders, read-ahead) its
    # own profiler and merge them, so the profile shows where all of the client's CPU goes.
    thread_profiles: list[cProfile.Profile] = []
    thread_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        thread_profiler = cProfile.Profile()
        thread_profiles.append(thread_profiler)
        thread_profiler.runcall(thread_run, self)

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    profiler = cProfile.Profile()
    counts = profiler.runcall(sync_mailbox_now, tenant, user_oid)
    threading.Thread.run = thread_run  # type: ignore[method-assign]
    stats = pstats.Stats(profiler)
    for thread_profiler in thread_profiles:
        stats.add(thread_profiler)
    stats.dump_stats(profile_path)
else:
    counts = sync_mailbox_now(tenant, user_oid)

emit_measured(
    meter,
    variant="ours",
    rows=counts.scanned,
    scanned=counts.scanned,
    matched=counts.matched,
    imported=counts.imported,
    discarded=counts.discarded,
    page_size=tenant.settings.graph_page_size,
)
