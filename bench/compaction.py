"""Benchmark: copy-compaction (`o365sync.erasure.compact_store`) and snapshot publication
(`o365sync.store.publish_snapshot`) against store size, and the file sizes around a 1 % deletion.

    uv run --group bench python bench/compaction.py [--sizes 100000,1000000] [--reps 3] [--big-reps 1]
        [--body-words 300] [--keep DIR] [--json out.json] [--quick]

For each size N (activities = emails + meetings; 85 % emails, 15 % meetings) a tenant store is created through
`open_store` (the real schema) in a scratch data directory and filled with synthetic rows written by DuckDB SQL:
emails with 4-10-word subjects and plain-text bodies of `--body-words` random words from a 2,000-word vocabulary
(about 2.5 KB at 300 words; random words compress like real text, not like repeated strings), about 3 emails per
conversation, 4 participants (from, 2 to, cc) and 1-2 CRM matches each; meetings with 5 attendees and one match;
a CRM snapshot of N/10 people and N/50 accounts. Then, separately timed (medians; 1M uses `--big-reps`):

1. `publish_snapshot` (since issue 14 a byte copy of the live file + views + fsync + atomic replace; before it,
   COPY FROM DATABASE into a new file — bench/publish.py compares the two): the reps alone, plus the republish
   inside every `compact_store` call (the same function), all in one median;
2. `compact_store` (its compaction part: copy of every file of the live store into a new file + replace; it also
   republishes the snapshot, reported as "compact + publish");
3. a plain copy of the live store's files + fsync (`shutil.copyfile`), the bound both are compared with (ratios);
4. sizes: the live store as built; after DELETE of 1 % of the activities (whole conversations / meetings, with their
   participants and matches) + CHECKPOINT — DuckDB keeps the bytes, so the file does not shrink; after
   `compact_store` — the deleted rows' bytes are gone with the old file;
5. the erasure of one user (`o365sync.erasure.erase(Scope.user(...))`: delete, compaction of the user's bucket and
   the tenant file, publish, audit; issue 14's P6 target is 10 s at 1M activities), with the live files it
   rewrote (changed inode) out of all, against `compact_store`'s rewrite of every file.

Prints one table; the numbers recorded in docs/benchmarks.md ("Compaction and publish (issue 6)") come from it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
from import_vs_dlt import parse_with_quick, write_json

from o365sync.erasure import EMAIL_TABLES, MEETING_TABLES, Scope, compact_store, erase, snapshot_bytes
from o365sync.settings import Settings
from o365sync.store import (
    MIGRATIONS,
    migrate,
    open_store,
    publish_snapshot,
    snapshot_path,
    store_lock,
    store_path,
    transaction,
)
from o365sync.store.partitions import bucket_files, each_bucket
from o365sync.store.schema import PARTITIONED_VERSION
from o365sync.tenants import TenantConfig, save_tenant

TENANT = "bench-tenant"
ONE_FILE_MIGRATIONS = MIGRATIONS[: PARTITIONED_VERSION - 1]  # the schema before the buckets: users' rows included
ACTIVITY_TABLES = (*EMAIL_TABLES, *MEETING_TABLES[:3])  # the activities and their child rows: the store's bytes
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gri", "sto", "ber", "lan", "qui", "zor"]


@contextlib.contextmanager
def one_file_store(settings: Settings) -> Iterator[duckdb.DuckDBPyConnection]:
    """The tenant's store as one DuckDB file, laid out as before the buckets (schema version 3: every user's rows in
    it), under the store's exclusive flock: what the generator writes, and the one-file baseline of the benches."""
    with store_lock(settings, TENANT, write=True) as path:
        con = duckdb.connect(str(path), config={"memory_limit": "1GB", "threads": 2})
        try:
            con.execute("SET TimeZone='UTC'")
            migrate(con, f"the one-file store {path}", ONE_FILE_MIGRATIONS)
            yield con
        finally:
            con.close()


def build(settings: Settings, n: int, body_words: int, users: int = 50, split: bool = True) -> dict[str, int]:
    """Fill a fresh store with `n` activities of `users` mailboxes (activity i belongs to user i % users, so every
    user's rows are spread through the whole file); returns row counts. The rows are written into one file laid
    out as before the buckets; `split`: then the store is opened for writing once, which splits it into the tenant
    file and the users' bucket files (`o365sync.store.partitions`, as an upgraded store is split)."""
    n_emails, n_meetings = int(n * 0.85), n - int(n * 0.85)
    people, accounts = max(n // 10, 100), max(n // 50, 20)
    with one_file_store(settings) as con:
        con.execute("SELECT setseed(0.42)")
        syl = "[" + ", ".join(f"'{s}'" for s in SYLLABLES) + "]"
        # 2,000 pseudo-words of 2-4 syllables.
        con.execute(
            f"CREATE TEMP TABLE vocab AS SELECT list(w) AS words FROM (SELECT "
            f"array_to_string(list_transform(range(2 + (i % 3)::INT), lambda j: {syl}[1 + ((i * 7 + j * 13 + "
            f"(i // 16) * j) % {len(SYLLABLES)})::INT]), '') || (i % 10)::VARCHAR AS w FROM range(2000) t(i))"
        )
        words = "v.words"  # FROM ..., vocab v (lambdas cannot hold subqueries)

        def text(count: str) -> str:
            pick = f"{words}[1 + floor(random() * 2000)::INT]"
            return f"array_to_string(list_transform(range({count}), lambda x: {pick}), ' ')"

        con.execute(f"""INSERT INTO crm_accounts SELECT 'acc' || i, 'Account ' || i, 'company' || i || '.com'
                        FROM range({accounts}) t(i)""")
        con.execute(f"""INSERT INTO crm_people SELECT 'per' || i, CASE WHEN i % 10 = 0 THEN 'lead' ELSE 'contact' END,
                        'person' || i || '@company' || (i % {accounts}) || '.com',
                        CASE WHEN i % 10 = 0 THEN NULL ELSE 'acc' || (i % {accounts}) END, 'Person ' || i
                        FROM range({people}) t(i)""")
        con.execute(f"""INSERT INTO crm_opportunities SELECT 'opp' || i, 'acc' || (i % {accounts}), 'Deal ' || i,
                        i % 3 = 0, TIMESTAMPTZ '2025-01-01' + INTERVAL (i % 400) DAY
                        FROM range({accounts}) t(i)""")
        con.execute(f"""INSERT INTO emails SELECT '{TENANT}', 'user' || (i % {users}),
                        'AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A' || md5(i::VARCHAR),
                        CASE WHEN i % 3 = 0 THEN 'sentitems' ELSE 'inbox' END,
                        '<' || md5('m' || i) || '@mail.example.com>', 'conv' || (i // 3),
                        {text("4 + (i % 7)::INT")}, {text(f"{body_words - 50} + (i % 100)::INT")},
                        'Person ' || (i % {people}), 'person' || (i % {people}) || '@company' ||
                        (i % {people} % {accounts}) || '.com',
                        TIMESTAMPTZ '2024-01-01' + INTERVAL (i * 37 % 31536000) SECOND,
                        TIMESTAMPTZ '2024-01-01' + INTERVAL (i * 37 % 31536000 - 5) SECOND, i % 5 = 0,
                        'https://outlook.office365.com/owa/?ItemID=' || md5(i::VARCHAR), now()
                        FROM range({n_emails}) t(i), vocab v""")
        con.execute("""INSERT INTO email_participants SELECT e.tenant_id, e.user_oid, e.graph_id, r.role,
                        'Name ' || r.k, CASE WHEN r.role = 'from' THEN e.from_address
                        ELSE 'someone' || (hash(e.graph_id, r.k) % 100000) || '@example.com' END
                        FROM emails e, (VALUES ('from', 0), ('to', 1), ('to', 2), ('cc', 3)) r(role, k)""")
        con.execute("""INSERT INTO email_crm_matches SELECT tenant_id, user_oid, graph_id,
                       split_part(split_part(from_address, '@', 1), 'person', 2), 'contact', from_address, true
                       FROM emails""")
        con.execute("UPDATE email_crm_matches SET crm_id = 'per' || crm_id")
        con.execute("""INSERT INTO email_crm_matches SELECT tenant_id, user_oid, graph_id,
                       'acc' || regexp_extract(from_address, 'company(\\d+)', 1), 'account', from_address, false
                       FROM emails WHERE hash(graph_id) % 3 = 0""")
        con.execute(f"""INSERT INTO meetings SELECT '{TENANT}', 'user' || (i % {users}), 'AAMkAGI' || md5('ev' || i),
                        CASE WHEN i % 4 = 0 THEN 'occurrence' ELSE 'singleInstance' END,
                        CASE WHEN i % 4 = 0 THEN 'series' || (i // 8) END, md5('ical' || i), {text("3 + (i % 6)::INT")},
                        TIMESTAMPTZ '2025-01-01' + INTERVAL (i * 60 % 31536000) SECOND, 'UTC',
                        TIMESTAMPTZ '2025-01-01' + INTERVAL (i * 60 % 31536000 + 1800) SECOND, 'UTC', false, true,
                        'https://teams.microsoft.com/l/meetup-join/' || md5('j' || i), 'Person ' || (i % {people}),
                        'person' || (i % {people}) || '@company' || (i % {people} % {accounts}) || '.com', false,
                        'https://outlook.office365.com/calendar/item/' || md5('ev' || i), now(), now()
                        FROM range({n_meetings}) t(i), vocab v""")
        con.execute("""INSERT INTO meeting_attendees SELECT m.tenant_id, m.user_oid, m.event_id,
                       CASE WHEN r.k = 0 THEN 'organizer' WHEN r.k < 4 THEN 'to' ELSE 'cc' END, 'Name ' || r.k,
                       CASE WHEN r.k = 0 THEN m.organizer_address
                       ELSE 'someone' || (hash(m.event_id, r.k) % 100000) || '@example.com' END, 'accepted'
                       FROM meetings m, range(5) r(k)""")
        con.execute("""INSERT INTO meeting_crm_matches SELECT tenant_id, user_oid, event_id,
                       'per' || split_part(split_part(organizer_address, '@', 1), 'person', 2), 'contact',
                       organizer_address, true FROM meetings""")
        con.execute("CHECKPOINT")
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ACTIVITY_TABLES}
    if split:
        with open_store(settings, TENANT, write=True):
            pass
    return counts


def delete_one_percent(settings: Settings) -> int:
    """DELETE 1 % of the activities — whole conversations and meetings — with their child rows (one transaction
    per bucket); CHECKPOINT."""
    with open_store(settings, TENANT, write=True) as con:
        con.execute(
            "CREATE TEMP TABLE gone_e AS SELECT user_oid, graph_id FROM emails WHERE hash(conversation_id) % 100 = 7"
        )
        con.execute(
            "CREATE TEMP TABLE gone_m AS SELECT user_oid, event_id FROM meetings WHERE hash(event_id) % 100 = 7"
        )
        for bucket in each_bucket(con):
            with transaction(con):
                for table in ("emails", "email_participants", "email_crm_matches"):
                    con.execute(
                        f"DELETE FROM {table} WHERE (user_oid, graph_id) IN (SELECT (user_oid, graph_id) FROM gone_e)"
                    )
                for table in ("meetings", "meeting_attendees", "meeting_crm_matches"):
                    con.execute(
                        f"DELETE FROM {table} WHERE (user_oid, event_id) IN (SELECT (user_oid, event_id) FROM gone_m)"
                    )
            con.execute(f"CHECKPOINT b{bucket}")
        return con.execute("SELECT (SELECT count(*) FROM gone_e) + (SELECT count(*) FROM gone_m)").fetchall()[0][0]


def live_files(settings: Settings) -> list[Path]:
    """The live store's files: the tenant file and every bucket."""
    store = store_path(settings, TENANT)
    return [store, *bucket_files(store).values()]


def live_bytes(settings: Settings) -> int:
    return sum(path.stat().st_size for path in live_files(settings))


def erase_one_user(settings: Settings, user: str) -> dict:
    """The product's erasure of `user`: its time and steps, and which live files it rewrote."""
    before = {path: path.stat().st_ino for path in live_files(settings)}
    t = time.perf_counter()
    result = erase(settings, TENANT, Scope.user(user), actor="bench:compaction", reason="admin_request")
    took = time.perf_counter() - t
    rewritten = [path.name for path in live_files(settings) if before.get(path) != path.stat().st_ino]
    print(f"  erase(Scope.user) of {user} ({result.deleted:,} rows): {took:.2f} s {result.extra}, rewrote {rewritten}")
    return {
        "erase_user_s": took,
        "erase_user_rows": result.deleted,
        "erase_user_steps_ms": result.extra,
        "erase_user_rewrote": rewritten,
        "live_files": len(before),
    }


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def run(n: int, reps: int, body_words: int, root: Path) -> dict:
    data = root / f"n{n}"
    shutil.rmtree(data, ignore_errors=True)
    settings = Settings(data_dir=data)
    save_tenant(settings, TenantConfig(id=TENANT, domains=["company0.com"]))  # `erase` needs a registered tenant
    t = time.perf_counter()
    counts = build(settings, n, body_words)
    built_s = time.perf_counter() - t
    size_built = live_bytes(settings)
    print(f"  built {n:,} activities in {built_s:.1f} s: {counts}, {mb(size_built)} MB", flush=True)
    copy = []  # the bound publish and compaction are compared with: a plain copy of the store's files + fsync
    for _ in range(reps):
        t = time.perf_counter()
        for source in live_files(settings):
            dst = root / "copy.duckdb"
            shutil.copyfile(source, dst)
            with open(dst, "rb+") as f:
                os.fsync(f.fileno())
            dst.unlink()
        copy.append(time.perf_counter() - t)
    publish = []
    for _ in range(reps):
        t = time.perf_counter()
        publish_snapshot(settings, TENANT)
        publish.append(time.perf_counter() - t)
    compact, compact_total = [], []
    for _ in range(reps):
        t = time.perf_counter()
        result = compact_store(settings, TENANT)
        compact_total.append(time.perf_counter() - t)
        compact.append(result["compact_seconds"])
        publish.append(result["publish_seconds"])  # compact_store's own republish: the same publish_snapshot
    print(f"  compact_store: compaction {compact}, with publish {[round(x, 2) for x in compact_total]}", flush=True)
    print(f"  publish_snapshot (alone, then inside compact_store): {[round(x, 2) for x in publish]}", flush=True)
    size_compacted = live_bytes(settings)
    gone = delete_one_percent(settings)
    size_deleted = live_bytes(settings)
    t = time.perf_counter()
    after = compact_store(settings, TENANT)
    erase_s = time.perf_counter() - t
    publish.append(after["publish_seconds"])
    size_after = live_bytes(settings)
    row = {
        "n": n,
        "rows": sum(counts.values()),
        "built_s": built_s,
        "size_built": size_built,
        "size_compacted": size_compacted,
        "copy_s": statistics.median(copy),
        "publish_s": statistics.median(publish),
        "compact_s": statistics.median(compact),
        "compact_publish_s": statistics.median(compact_total),
        "deleted": gone,
        "size_deleted": size_deleted,
        "size_after": size_after,
        "snapshot": snapshot_bytes(snapshot_path(settings, TENANT)),
        "erase_compact_s": erase_s,
        "erase_result": after,
        **erase_one_user(settings, "user2"),
    }
    print(
        f"  deleted {gone:,} activities: {mb(size_deleted)} MB after DELETE+CHECKPOINT, {mb(size_after)} MB after "
        f"compact_store ({after['compact_seconds']:.1f} s + publish {after['publish_seconds']:.1f} s)",
        flush=True,
    )
    return row


def add_store_options(ap: argparse.ArgumentParser) -> None:
    """The options of the benches that build synthetic stores (this one and bench/publish.py)."""
    ap.add_argument("--body-words", type=int, default=300)
    ap.add_argument("--keep", type=Path, help="scratch directory to keep (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, help="write the raw results as JSON here")


def for_each_size(args: argparse.Namespace, prefix: str, run_one: Callable[[int, Path], dict]) -> list[dict]:
    """`run_one(n, scratch root)` for each of `--sizes`, in a scratch directory removed afterwards unless `--keep`."""
    root = args.keep or Path(tempfile.mkdtemp(prefix=prefix))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            print(f"N = {n:,} activities (load average {os.getloadavg()[0]:.1f})", flush=True)
            rows.append(run_one(n, root))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def print_report(args: argparse.Namespace, rows: list[dict], lines: list[str]) -> int:
    """Print the table and write it with the raw rows to `--json`; the exit status."""
    text = "\n".join(lines)
    print("\n" + text)
    write_json(args, rows=rows, report=text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--reps", type=int, default=3, help="reps below 1M activities")
    ap.add_argument("--big-reps", type=int, default=1, help="reps at 1M activities and more")
    add_store_options(ap)
    args = parse_with_quick(ap, argv, sizes="20000", reps=1)
    rows = for_each_size(
        args,
        "o365sync-bench-compaction-",
        lambda n, root: run(n, args.reps if n < 1_000_000 else args.big_reps, args.body_words, root),
    )
    lines = [
        "| activities | rows (all tables) | store MB | publish_snapshot s | compact_store: compaction s | "
        "compaction + publish s | 1 % deleted | MB after DELETE + CHECKPOINT | MB after compact_store | "
        "compaction after the delete s | file copy + fsync s | publish / copy | compaction / copy | "
        "erase one user s | files it rewrote | erase one user / compaction + publish |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['rows']:,} | {mb(r['size_compacted'])} | {r['publish_s']:.2f} | "
            f"{r['compact_s']:.2f} | {r['compact_publish_s']:.2f} | {r['deleted']:,} | {mb(r['size_deleted'])} | "
            f"{mb(r['size_after'])} | {r['erase_result']['compact_seconds']:.2f} | {r['copy_s']:.2f} | "
            f"{r['publish_s'] / r['copy_s']:.1f}x | {r['compact_s'] / r['copy_s']:.1f}x | {r['erase_user_s']:.2f} | "
            f"{len(r['erase_user_rewrote'])} of {r['live_files']} | {r['erase_user_s'] / r['compact_publish_s']:.2f}x |"
        )
    return print_report(args, rows, lines)


if __name__ == "__main__":
    sys.exit(main())
