"""Benchmark: publishing the analysts' snapshot after a small sync, and erasing one user, at store size N — the
product's paths against the ones they replaced (issue 14, P6/P7), with a plain file copy as the bound.

    uv run --group bench python bench/publish.py [--sizes 1000000] [--new 1000] [--reps 3] [--json out.json]
        [--quick]

For each size N a tenant store is built exactly as bench/compaction.py builds it (85 % emails with ~2.7 KB bodies,
15 % meetings, 50 users, a CRM snapshot) and the tenant registered. Then, in one run:

1. **cp**: a plain copy of the live file + fsync (`shutil.copyfile`), the bound of any whole-file publish;
2. **old publish** (what `publish_snapshot` did before issue 14, reproduced here): under the live store's
   exclusive lock, `COPY FROM DATABASE` into a new file + views + fsync + rename — the lock is held throughout;
3. **publish after a small sync** (`--reps` times): `--new` activities are written into the live store (emails with
   participants and matches, meetings with attendees and matches; 85/15), then `o365sync.store.publish`: its total
   time and how long it held the live store's lock (the copy of the file);
4. **erasure of one user** (1/50 of the activities, spread over the whole file as syncs interleave users):
   the old path (DELETE of the user's rows + compaction by `COPY FROM DATABASE` with DuckDB's default compression +
   the old publish) on one user, then `o365sync.erasure.erase(Scope.user(...))` — delete + compaction + publish +
   audit — on another user. Both leave the store without the user's rows (checked).

Prints one table with ratios against the old paths and the file copy; docs/benchmarks.md ("Publishing the
analysts' snapshot (issue 14)") records a 1M run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import duckdb
from compaction import TENANT, add_store_options, build, for_each_size, print_report
from import_vs_dlt import parse_with_quick

from o365sync.erasure import USER_TABLES, Scope, erase
from o365sync.settings import Settings
from o365sync.store import (
    fsync_path,
    open_store,
    publish,
    snapshot_path,
    store_lock,
    store_path,
)
from o365sync.store.views import create_views
from o365sync.tenants import TenantConfig, save_tenant


def file_copy(settings: Settings) -> float:
    """A plain copy of the live file + fsync: the bound of a whole-file publish."""
    dst = snapshot_path(settings, TENANT).with_name("plain-copy.duckdb")
    t = time.perf_counter()
    shutil.copyfile(store_path(settings, TENANT), dst)
    fsync_path(dst)
    took = time.perf_counter() - t
    dst.unlink()
    return took


def old_publish(settings: Settings) -> float:
    """`publish_snapshot` before issue 14: a DuckDB rewrite of the live store under its exclusive lock."""
    target = snapshot_path(settings, TENANT)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".old-tmp")
    tmp.unlink(missing_ok=True)
    t = time.perf_counter()
    with open_store(settings, TENANT, write=True) as con:
        con.execute("ATTACH '" + str(tmp).replace("'", "''") + "' AS snap")
        try:
            con.execute("COPY FROM DATABASE store TO snap")
            create_views(con, "snap", tenant_id=TENANT)
        finally:
            con.execute("DETACH snap")
    fsync_path(tmp)
    os.replace(tmp, target)
    return time.perf_counter() - t


def old_compaction(settings: Settings) -> float:
    """`compact_store`'s rewrite before issue 14 (DuckDB's default compression), without its publish."""
    t = time.perf_counter()
    with store_lock(settings, TENANT, write=True) as path:
        compact_file(path)
    return time.perf_counter() - t


def compact_file(path: Path) -> None:
    """Rewrite the DuckDB file `path` into a new file (`COPY FROM DATABASE`, DuckDB's default compression) and
    replace it; the caller holds the file's exclusive lock. bench/store_layout.py compacts partition files with it."""
    tmp = path.with_name(path.name + ".compact")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(path), config={"memory_limit": "1GB", "threads": 2})
    try:
        live = con.execute("SELECT current_database()").fetchall()[0][0]
        con.execute("ATTACH '" + str(tmp).replace("'", "''") + "' AS compacted")
        con.execute(f'COPY FROM DATABASE "{live}" TO compacted')
        con.execute("DETACH compacted")
    finally:
        con.close()
    fsync_path(tmp)
    Path(f"{path}.wal").unlink(missing_ok=True)
    os.replace(tmp, path)
    fsync_path(path.parent)


def small_sync(settings: Settings, new: int, round_: int) -> float:
    """Write `new` activities (85 % emails, 15 % meetings, with their child rows) into the live store, as a sync
    that imported them would (one transaction); returns its seconds."""
    n_emails, n_meetings = int(new * 0.85), new - int(new * 0.85)
    tag = f"sync{round_}-"
    t = time.perf_counter()
    with open_store(settings, TENANT, write=True) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute(
            f"""INSERT INTO emails SELECT '{TENANT}', 'user' || (i % 50), '{tag}' || md5(i::VARCHAR), 'inbox',
            '<{tag}' || i || '@mail.example.com>', '{tag}conv' || (i // 3), 'New subject ' || i,
            repeat('fresh body words ' || i || ' ', 150), 'Person ' || i, 'person' || i || '@company1.com',
            now(), now(), false, 'https://outlook.office365.com/owa/?ItemID={tag}' || i, now()
            FROM range({n_emails}) t(i)"""
        )
        con.execute(
            f"""INSERT INTO email_participants SELECT tenant_id, user_oid, graph_id, r.role, 'Name', from_address
            FROM emails, (VALUES ('from'), ('to'), ('to'), ('cc')) r(role) WHERE graph_id LIKE '{tag}%'"""
        )
        con.execute(
            f"""INSERT INTO email_crm_matches SELECT tenant_id, user_oid, graph_id, 'per1', 'contact', from_address,
            true FROM emails WHERE graph_id LIKE '{tag}%'"""
        )
        con.execute(
            f"""INSERT INTO meetings SELECT '{TENANT}', 'user' || (i % 50), '{tag}ev' || i, 'singleInstance', NULL,
            md5('{tag}' || i), 'New meeting ' || i, now(), 'UTC', now(), 'UTC', false, true, NULL, 'Person',
            'person1@company1.com', false, NULL, now(), now() FROM range({n_meetings}) t(i)"""
        )
        con.execute(
            f"""INSERT INTO meeting_attendees SELECT tenant_id, user_oid, event_id, 'to', 'Name', organizer_address,
            'accepted' FROM meetings, range(5) WHERE event_id LIKE '{tag}%'"""
        )
        con.execute(
            f"""INSERT INTO meeting_crm_matches SELECT tenant_id, user_oid, event_id, 'per1', 'contact',
            organizer_address, true FROM meetings WHERE event_id LIKE '{tag}%'"""
        )
        con.execute("COMMIT")
    return time.perf_counter() - t


def user_rows(settings: Settings, user: str) -> int:
    with open_store(settings, TENANT, write=False) as con:
        return sum(
            con.execute(f"SELECT count(*) FROM {table} WHERE user_oid = ?", [user]).fetchall()[0][0]
            for table in USER_TABLES
        )


def old_erasure(settings: Settings, user: str) -> dict[str, float]:
    """DELETE the user's rows, then the old compaction and the old publish."""
    t = time.perf_counter()
    with open_store(settings, TENANT, write=True) as con:
        con.execute("BEGIN TRANSACTION")
        for table in USER_TABLES:
            con.execute(f"DELETE FROM {table} WHERE tenant_id = ? AND user_oid = ?", [TENANT, user])
        con.execute("COMMIT")
    deleted = time.perf_counter() - t
    compacted = old_compaction(settings)
    published = old_publish(settings)
    return {"delete_s": deleted, "compact_s": compacted, "publish_s": published, "total_s": time.perf_counter() - t}


def run(n: int, new: int, reps: int, body_words: int, root: Path) -> dict:
    data = root / f"n{n}"
    shutil.rmtree(data, ignore_errors=True)
    settings = Settings(data_dir=data)
    save_tenant(settings, TenantConfig(id=TENANT, domains=["company0.com"]))
    t = time.perf_counter()
    counts = build(settings, n, body_words)
    size = store_path(settings, TENANT).stat().st_size
    print(f"  built {n:,} activities in {time.perf_counter() - t:.1f} s, {size / 1e6:,.1f} MB", flush=True)
    publish(settings, TENANT)  # a first snapshot, as after the initial import
    copy_s = file_copy(settings)
    print(f"  plain file copy + fsync: {copy_s:.2f} s", flush=True)
    cpu = time.process_time()
    old_s = old_publish(settings)
    old_cpu = time.process_time() - cpu
    print(f"  old publish (COPY FROM DATABASE under the exclusive lock): {old_s:.2f} s", flush=True)
    syncs, publishes, locks, cpus = [], [], [], []
    for i in range(reps):
        syncs.append(small_sync(settings, new, i))
        cpu = time.process_time()
        done = publish(settings, TENANT)
        cpus.append(time.process_time() - cpu)
        publishes.append(done.seconds)
        locks.append(done.lock_seconds)
    print(f"  publish after a sync of {new:,}: {[round(x, 2) for x in publishes]} s, lock {locks}", flush=True)
    gone_old = user_rows(settings, "user1")
    cpu = time.process_time()
    old_erase = old_erasure(settings, "user1")
    old_erase["cpu_s"] = time.process_time() - cpu
    assert user_rows(settings, "user1") == 0
    print(f"  old erasure of user1 ({gone_old:,} rows): {old_erase}", flush=True)
    gone_new = user_rows(settings, "user2")
    t, cpu = time.perf_counter(), time.process_time()
    result = erase(settings, TENANT, Scope.user("user2"), actor="bench:publish", reason="admin_request")
    new_erase_s, new_erase_cpu = time.perf_counter() - t, time.process_time() - cpu
    assert user_rows(settings, "user2") == 0 and result.deleted == gone_new
    print(f"  erase(Scope.user) of user2 ({gone_new:,} rows): {new_erase_s:.2f} s {result.extra}", flush=True)
    return {
        "n": n,
        "rows": sum(counts.values()),
        "store_bytes": size,
        "new": new,
        "copy_s": copy_s,
        "old_publish_s": old_s,
        "old_publish_cpu_s": old_cpu,
        "publish_cpu_s": statistics.median(cpus),
        "sync_s": statistics.median(syncs),
        "publish_s": statistics.median(publishes),
        "publish_lock_s": statistics.median(locks),
        "publish_runs": publishes,
        "erased_rows_old": gone_old,
        "old_erasure": old_erase,
        "erased_rows_new": gone_new,
        "erasure_s": new_erase_s,
        "erasure_cpu_s": new_erase_cpu,
        "erasure_audit_s": result.seconds,
        "erasure_steps_ms": result.extra,
        "load_avg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000")
    ap.add_argument("--new", type=int, default=1000, help="activities written by the small sync before a publish")
    ap.add_argument("--reps", type=int, default=3, help="small sync + publish rounds")
    add_store_options(ap)
    args = parse_with_quick(ap, argv, sizes="20000", reps=2)
    rows = for_each_size(
        args, "o365sync-bench-publish-", lambda n, root: run(n, args.new, args.reps, args.body_words, root)
    )
    lines = [
        "| activities | store MB | file copy s | old publish s (= lock) [CPU s] | publish after +"
        f"{args.new:,} s [CPU s] | its lock s | old / new publish | new publish / copy | old erasure s (delete + "
        "compaction + publish) [CPU s] | erasure s [CPU s] | old / new erasure | load avg (1 min) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        o = r["old_erasure"]
        lines.append(
            f"| {r['n']:,} | {r['store_bytes'] / 1e6:,.1f} | {r['copy_s']:.2f} | {r['old_publish_s']:.2f} "
            f"[{r['old_publish_cpu_s']:.1f}] | {r['publish_s']:.2f} [{r['publish_cpu_s']:.2f}] | "
            f"{r['publish_lock_s']:.2f} | {r['old_publish_s'] / r['publish_s']:.1f}x | "
            f"{r['publish_s'] / r['copy_s']:.1f}x | {o['total_s']:.1f} ({o['delete_s']:.1f} + {o['compact_s']:.1f}"
            f" + {o['publish_s']:.1f}) [{o['cpu_s']:.1f}] | {r['erasure_s']:.1f} [{r['erasure_cpu_s']:.1f}] | "
            f"{o['total_s'] / r['erasure_s']:.1f}x | {r['load_avg'][0]:.1f} |"
        )
    return print_report(args, rows, lines)


if __name__ == "__main__":
    sys.exit(main())
