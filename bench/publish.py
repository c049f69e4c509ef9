"""Benchmark: publishing the analysts' snapshot of the partitioned live store (a tenant file + users' bucket files)
after a sync of one mailbox, at store size N: the product's `publish` against a plain copy of every live file, the
bound of a publish that copies the whole store, as every publish did before issue 14's buckets (P7).

    uv run --group bench python bench/publish.py [--sizes 1000000] [--new 1000] [--reps 3] [--json out.json]
        [--quick]

For each size N a tenant store is built exactly as bench/compaction.py builds it (85 % emails with ~2.7 KB bodies,
15 % meetings, 50 users interleaved, a CRM snapshot; written as one file, then split by the product into the
tenant file and its buckets on the first write open, as an upgraded store is) and the tenant registered. Then, in
one run:

1. **cp**: a plain copy + fsync of every live file (`shutil.copyfile`), the bound of a whole-store publish;
2. **first publish**: `o365sync.store.publish` with no earlier generation, which copies every file;
3. **publish after a sync of one mailbox** (`--reps` times): `--new` activities of one user are written into the
   live store (emails with participants and matches, meetings with attendees and matches; 85/15; one transaction
   in the user's bucket), then `publish`: its total time, how long it held the live store's shared lock (the
   copies), the bytes and files it copied (the tenant file and the synced user's bucket);
4. **publish with nothing written**: the tenant file alone.

Prints one table with ratios against the plain copy; docs/benchmarks.md ("Publishing the analysts' snapshot
(issue 14)") records the runs.
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

from o365sync.settings import Settings
from o365sync.store import fsync_path, open_store, publish, snapshot_path, store_path
from o365sync.store.partitions import bucket_files
from o365sync.tenants import TenantConfig, save_tenant

SYNCED_USER = "user7"


def live_files(settings: Settings) -> list[Path]:
    store = store_path(settings, TENANT)
    return [store, *bucket_files(store).values()]


def file_copy(settings: Settings) -> float:
    """A plain copy of every live file + fsync: the bound of a publish that copies the whole store."""
    folder = snapshot_path(settings, TENANT).with_name("plain-copy")
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for path in live_files(settings):
        shutil.copyfile(path, folder / path.name)
        fsync_path(folder / path.name)
    took = time.perf_counter() - t
    shutil.rmtree(folder)
    return took


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
    """Write `new` activities of one user (85 % emails, 15 % meetings, with their child rows) into the live store,
    as a sync of that mailbox would (one transaction, in the user's bucket); returns its seconds."""
    n_emails, n_meetings = int(new * 0.85), new - int(new * 0.85)
    tag = f"sync{round_}-"
    t = time.perf_counter()
    with open_store(settings, TENANT, write=True, user_oid=SYNCED_USER) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute(
            f"""INSERT INTO emails SELECT '{TENANT}', '{SYNCED_USER}', '{tag}' || md5(i::VARCHAR), 'inbox',
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
            f"""INSERT INTO meetings SELECT '{TENANT}', '{SYNCED_USER}', '{tag}ev' || i, 'singleInstance', NULL,
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


def run(n: int, new: int, reps: int, body_words: int, root: Path) -> dict:
    data = root / f"n{n}"
    shutil.rmtree(data, ignore_errors=True)
    settings = Settings(data_dir=data)
    save_tenant(settings, TenantConfig(id=TENANT, domains=["company0.com"]))
    t = time.perf_counter()
    counts = build(settings, n, body_words)
    files = live_files(settings)
    size = sum(p.stat().st_size for p in files)
    print(f"  built {n:,} activities in {time.perf_counter() - t:.1f} s: {len(files)} files, {size / 1e6:,.1f} MB")
    copy_s = file_copy(settings)
    print(f"  plain copy + fsync of every live file: {copy_s:.2f} s", flush=True)
    first = publish(settings, TENANT)
    print(f"  first publish (every file): {first.seconds:.2f} s, {len(first.copied_files)} files", flush=True)
    syncs, publishes, locks, cpus, copied, copied_files = [], [], [], [], [], []
    for i in range(reps):
        syncs.append(small_sync(settings, new, i))
        cpu = time.process_time()
        done = publish(settings, TENANT)
        cpus.append(time.process_time() - cpu)
        publishes.append(done.seconds)
        locks.append(done.lock_seconds)
        copied.append(done.bytes_copied)
        copied_files.append(len(done.copied_files))
    print(f"  publish after a sync of {new:,}: {[round(x, 3) for x in publishes]} s, files {copied_files}", flush=True)
    idle = publish(settings, TENANT)
    assert idle.copied_files == (store_path(settings, TENANT),)
    with duckdb.connect(str(snapshot_path(settings, TENANT)), read_only=True) as con:
        snapshot_rows = con.execute("SELECT count(*) FROM activities").fetchall()[0][0]
    assert snapshot_rows == counts["emails"] + counts["meetings"] + reps * new, snapshot_rows
    return {
        "n": n,
        "rows": sum(counts.values()),
        "live_files": len(files),
        "store_bytes": size,
        "new": new,
        "copy_s": copy_s,
        "first_publish_s": first.seconds,
        "first_publish_bytes": first.bytes_copied,
        "sync_s": statistics.median(syncs),
        "publish_s": statistics.median(publishes),
        "publish_cpu_s": statistics.median(cpus),
        "publish_lock_s": statistics.median(locks),
        "publish_bytes": statistics.median(copied),
        "publish_files": statistics.median(copied_files),
        "publish_runs": publishes,
        "idle_publish_s": idle.seconds,
        "idle_publish_bytes": idle.bytes_copied,
        "load_avg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000")
    ap.add_argument("--new", type=int, default=1000, help="activities written by the one-mailbox sync")
    ap.add_argument("--reps", type=int, default=3, help="sync + publish rounds")
    add_store_options(ap)
    args = parse_with_quick(ap, argv, sizes="20000", reps=2)
    rows = for_each_size(
        args, "o365sync-bench-publish-", lambda n, root: run(n, args.new, args.reps, args.body_words, root)
    )
    lines = [
        "| activities | live files / MB | copy of every file s | first publish s | sync of one mailbox "
        f"(+{args.new:,}) s | publish after it s [CPU s] | its lock s | its MB (files) | publish / copy | "
        "publish with nothing written s (MB) | load avg (1 min) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['live_files']} / {r['store_bytes'] / 1e6:,.1f} | {r['copy_s']:.2f} | "
            f"{r['first_publish_s']:.2f} | {r['sync_s']:.2f} | {r['publish_s']:.2f} [{r['publish_cpu_s']:.2f}] | "
            f"{r['publish_lock_s']:.3f} | {r['publish_bytes'] / 1e6:,.1f} ({r['publish_files']:.0f}) | "
            f"{r['publish_s'] / r['copy_s']:.2f}x | {r['idle_publish_s']:.2f} ({r['idle_publish_bytes'] / 1e6:,.1f}) | "
            f"{r['load_avg'][0]:.1f} |"
        )
    return print_report(args, rows, lines)


if __name__ == "__main__":
    sys.exit(main())
