"""Benchmark: the product's import of one big mailbox against the strongest dlt peer, same run, same mailbox.

    uv run --group bench python bench/import_vs_dlt.py [--messages 50000] [--reps 3] [--quick]

This (parent) process generates a one-tenant, one-user world, starts the simulators (identity, Graph, Salesforce on
loopback HTTPS) and hosts them for the whole run, registers the tenant and connects the user through our real web
endpoints + MSAL (`register_and_connect`), and takes the CRM snapshot. Each measured variant then runs in a FRESH
CHILD PROCESS, so its CPU time and peak RSS are the client's alone (the simulators' CPU stays in this process and is
reported separately as "sim CPU s"):

- ours (bench/_child_ours.py): `sync_mailbox_now` on a fresh store (a copy of the store holding just the CRM
  snapshot): header-first listing of inbox + sent items, Polars CRM matching, `$batch` body fetch for matched mail,
  three DuckDB tables (emails, participants, matches) plus cursors.
- dlt (bench/_child_dlt.py): dlt RESTClient + JSONLinkPaginator paging the same two folders with the same
  `$select`, `$filter` and `$top=1000`, one Arrow table per page, loaded into DuckDB as parquet. Headers only.
- reference, unless --no-listing-ref (bench/_child_ours_listing.py): the product's own token + GraphClient +
  `iter_header_pages` code doing exactly dlt's job (same folders, query and `$top`), Arrow pages inserted into a
  fresh DuckDB file: the like-for-like row.

The simulator's per-message JSON cache is warmed by one untimed run of each variant first. Variant order rotates
across reps; medians are reported. Both variants must see exactly the number of in-window messages the world holds,
or the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from importlib import metadata
from pathlib import Path

from _measure import rss_mb

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
VARIANTS = ("ours", "dlt", "ours-listing")
CHILD = {
    "ours": BENCH / "_child_ours.py",
    "dlt": BENCH / "_child_dlt.py",
    "ours-listing": BENCH / "_child_ours_listing.py",
}
LABELS = {
    "ours": "ours: sync_mailbox_now (list + match + $batch bodies + 3 tables)",
    "dlt": "dlt: RESTClient + JSONLinkPaginator, Arrow per page, parquet (headers only)",
    "ours-listing": "reference: ours' listing path only, $top 1000, Arrow -> DuckDB (headers only)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def _versions() -> str:
    names = ("dlt", "duckdb", "polars", "pyarrow", "httpx", "msgspec", "msal", "prefect", "requests")
    out = []
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


class BenchFailure(SystemExit):
    pass


def fail(msg: str) -> None:
    raise BenchFailure(f"BENCHMARK FAILED: {msg}")


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a benchmark (its docstring as help) with the options they all have: --seed, --json
    (see `write_json`) and --keep (the temporary work directory)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--json", type=Path, help="write the raw results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    return p


def wall_time_line(bench_s: float, detail: str) -> str:
    """The report's last line: how long the benchmark took (`detail` says what the time covers) and the RSS of this
    simulator-hosting parent now."""
    return f"Benchmark wall time: {bench_s:.0f}s {detail}; parent RSS now {rss_mb():.0f} MB"


def parse_with_quick(p: argparse.ArgumentParser, argv: list[str] | None, **sizes: object) -> argparse.Namespace:
    """Add `--quick` to `p` and parse `argv`: with it, `sizes` (option dest -> value) replace the defaults, so the
    bench finishes in under a minute on 2 cores (the size `.ci/run` runs through bench/run_quick.py); options given
    explicitly still win."""
    shown = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sizes.items())
    p.add_argument("--quick", action="store_true", help=f"CI smoke size, under a minute: {shown}")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**sizes)
        args = p.parse_args(argv)
    return args


def machine() -> dict[str, object]:
    """Where and on what a run happened: git commit (with `+dirty` when the tree has changes), CPU, cores, RAM, load."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "commit": commit,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(_mem_gb(), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_avg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def write_json(args: argparse.Namespace, **results: object) -> None:
    """--json: the run's arguments (as text), the machine and commit (`machine`) and its raw results, when the
    option was given. A `report` result (the printed tables) is what bench/report.py puts into docs/benchmarks.md."""
    if args.json:
        data = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), **results}
        args.json.write_text(json.dumps(data, indent=2, default=str))


LIMITS_OFF_IN_FLIGHT = 8  # requests per mailbox in flight with the limits off: two `$batch` of 4 running at once


def limits_off_env(env: dict[str, str]) -> None:
    """A limits-off run: the product's client switches its own per-mailbox request budget off explicitly
    (`O365SYNC_GRAPH_REQUEST_BUDGET=0`), else a mailbox needing more than 9,500 requests waits out a 10-minute
    window against a simulator that has no budget; and it raises its concurrency cap explicitly
    (`O365SYNC_MAX_REQUESTS_PER_MAILBOX`), so that more than one `$batch` is in flight against a simulator without
    Outlook's 4. Under limits neither is set: the product's 9,500 and 4 apply."""
    env["O365SYNC_GRAPH_REQUEST_BUDGET"] = "0"
    env["O365SYNC_MAX_REQUESTS_PER_MAILBOX"] = str(LIMITS_OFF_IN_FLIGHT)


def limits_on_env(env: dict[str, str]) -> None:
    """Undo `limits_off_env`: the product's own budget and concurrency cap, as configured."""
    env.pop("O365SYNC_GRAPH_REQUEST_BUDGET", None)
    env.pop("O365SYNC_MAX_REQUESTS_PER_MAILBOX", None)


# --------------------------------------------------------------------------- world
def build_world(messages: int, contacts: int, history_days: int, seed: int, widen: bool):
    """One tenant, one user with >= `messages` messages in Inbox + Sent Items (the folders the product syncs; the
    generator's realistic noise puts ~6 % of a mailbox into drafts, junk, deleted items and archive on top); with
    `widen`, an open opportunity older than the whole history makes the tenant's scan window (min(oldest open
    opportunity, now - 7 d)) cover every message."""
    from simulators.world import MAIL_FOLDERS, CrmOpportunity, generate_world

    n = messages + messages * 7 // 100 + 10  # noise folders, and a few skipped replies (no thread yet / window edge)
    for _ in range(5):
        world = generate_world(
            seed=seed,
            tenants=1,
            users_per_tenant=1,
            messages_per_user=n,
            contacts_per_tenant=contacts,
            history_days=history_days,
        )
        user = world.tenants[0].users[0]
        if sum(1 for m in world.mailboxes[user.oid] if m.folder in MAIL_FOLDERS) >= messages:
            break
        n += messages // 50 + 10
    else:
        fail(f"could not generate a mailbox of {messages} messages in {MAIL_FOLDERS}")
    tid = world.tenants[0].tid
    if widen:
        crm = world.crm[tid]
        crm.opportunities.append(
            CrmOpportunity(
                id="006BENCHWINDOW1",
                account_id=crm.accounts[0].id,
                name="Benchmark - whole-history window",
                is_closed=False,
                created=world.now - timedelta(days=history_days, hours=12),
            )
        )
    return world


# --------------------------------------------------------------------------- children
def run_script(script: Path, env: dict[str, str], label: str, timeout_s: float = 900.0) -> dict:
    """Run one measurement script in a fresh interpreter; returns its last RESULT dict plus this process's CPU
    meanwhile (this process = the simulators, plus an idle wait) and the child's wall time."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    outer_wall = time.perf_counter() - t0
    sim_cpu = time.process_time() - c0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-8000:])
        fail(f"{label} child exited with {proc.returncode} (stderr above)")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        fail(f"{label} child printed no RESULT line")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["sim_cpu_s"] = sim_cpu
    result["process_wall_s"] = outer_wall
    return result


def run_child(
    variant: str,
    env: dict[str, str],
    running,
    timeout_s: float = 900.0,  # noqa: ANN001
    script: Path | None = None,
) -> dict:
    """Run one variant (`script`, default `CHILD[variant]`) in a fresh interpreter (see `run_script`)."""
    return run_script(script or CHILD[variant], env, variant, timeout_s)


class Harness:
    graph_class: type | None = None  # another Graph simulator (e.g. simulators.lazy_mailbox.LazyGraphSimulator)
    child_timeout_s = 900.0

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.variants = tuple(v for v in VARIANTS if not (v == "ours-listing" and args.no_listing_ref))
        self.work = Path(tempfile.mkdtemp(prefix="o365sync-bench-"))
        self.running = None

    # ---------------------------------------------------------------- setup
    def close(self, keep: bool) -> None:
        """Stop the simulators and remove the work dir (unless asked to keep it)."""
        if self.running is not None:
            self.running.stop()
        if keep:
            print(f"work dir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def make_world(self):  # noqa: ANN201
        """The world the simulators will serve (a hook for benchmarks that reshape it before the start)."""
        a = self.args
        return build_world(a.messages, a.contacts, a.history_days, a.seed, not a.no_widen)

    def setup(self) -> None:
        os.environ["PREFECT_HOME"] = str(self.work / "prefect")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
        from o365sync.prefect_env import configure_prefect_env

        configure_prefect_env()
        from app.demo import register_and_connect
        from o365sync.auth import TokenProvider, scopes_for
        from o365sync.mail import HEADER_FIELDS, graph_datetime
        from o365sync.settings import load_settings
        from o365sync.store import store_path
        from o365sync.store.partitions import bucket_files
        from simulators.running import start_world
        from tasks.crm_snapshot import refresh_crm_snapshot

        a = self.args
        t0 = time.perf_counter()
        self.world = world = self.make_world()
        tenant = self.tenant = world.tenants[0]
        user = self.user = tenant.users[0]
        gen_s = time.perf_counter() - t0

        port = _free_port()
        redirect = f"http://localhost:{port}/auth/callback"
        extra = {"graph_class": self.graph_class} if self.graph_class else {}
        self.running = start_world(world, self.work / "tls", redirect_uris=[redirect], **extra)
        os.environ.update(self.running.settings_env(self.work / "data", redirect))
        if a.ours_page_size:
            os.environ["O365SYNC_GRAPH_PAGE_SIZE"] = str(a.ours_page_size)
        self.settings = settings = load_settings()
        register_and_connect(settings, self.running, tenant, port)  # real /connect + MSAL auth code + PKCE
        snap = refresh_crm_snapshot(settings, tenant.tid)

        from datetime import datetime

        scan_start = datetime.fromisoformat(str(snap["scan_start"]))
        since = graph_datetime(scan_start)  # what both variants send (whole seconds, floored)
        world_start = world.scan_start(tenant.tid)
        if abs((world_start - scan_start).total_seconds()) > 120:
            fail(f"product scan start {scan_start} differs from the world's {world_start}")
        self.scan_start = since
        self.measure_mailbox()

        # A fresh store per ours-rep = this CRM-snapshot-only store, copied back before each run.
        self.store = store_path(settings, tenant.tid)
        self.template = self.work / "store_template.duckdb"
        shutil.copyfile(self.store, self.template)
        if Path(f"{self.store}.wal").exists() or bucket_files(self.store):
            fail("store has a WAL or users' buckets after the snapshot; copy would not be faithful")

        with TokenProvider(settings, tenant.tid, user.oid, scopes_for(["email"])) as provider:
            token = provider()
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "BENCH_TENANT_ID": tenant.tid,
            "BENCH_USER_OID": user.oid,
            "BENCH_GRAPH_TOKEN": token,
            "BENCH_SELECT": ",".join(HEADER_FIELDS),
            "BENCH_SINCE": since,
            "BENCH_LISTING_PAGE_SIZE": str(a.listing_page_size),
        }
        # Limits off: no budget on either side (the simulator's 10,000 / 600 s and the client's 9,500 / 600 s would
        # make a 20k-body import wait 10 minutes) and no concurrency cap of 4 on either side (the client's is raised
        # to LIMITS_OFF_IN_FLIGHT, so two `$batch` requests run at once), as in import_under_limits.py part B.
        self.running.graph.budget_requests = None
        self.running.graph.max_in_flight = 10**9
        limits_off_env(self.env)
        print(
            f"world: seed {a.seed}, 1 tenant, 1 user, {self.mailbox_size} messages over "
            f"{self.history_days:.1f} days ({gen_s:.1f}s to generate), {a.contacts} contacts; scan start {since}; "
            f"in window {self.expected_scanned} (inbox {self.by_folder['inbox']}, sent "
            f"{self.by_folder['sentitems']}); ground-truth matches {self.expected_matched}",
            flush=True,
        )
        if self.expected_scanned < a.messages and not a.no_widen:
            fail(f"only {self.expected_scanned} messages in the scan window (< {a.messages})")

    def measure_mailbox(self) -> None:
        """The user's mailbox as the variants must see it: messages in the scan window per folder (Inbox and Sent
        Items: drafts, junk, deleted items and archive are never read) and the world's ground-truth matches.
        Streams over the mailbox (a lazy one is never held in memory)."""
        from collections import Counter
        from datetime import datetime

        world, tenant = self.world, self.tenant
        mailbox = world.mailboxes[self.user.oid]
        since_dt = datetime.fromisoformat(self.scan_start.replace("Z", "+00:00"))
        in_window = Counter(m.folder for m in mailbox if m.received >= since_dt)
        self.by_folder = {f: in_window[f] for f in ("inbox", "sentitems")}
        self.expected_scanned = sum(self.by_folder.values())
        self.expected_matched = len(world.expected_matches(tenant.tid))
        self.mailbox_size = len(mailbox)
        self.history_days = (world.now - min(m.received for m in mailbox)).total_seconds() / 86400

    # ---------------------------------------------------------------- one run
    def run(self, variant: str, rep: str, fresh_store: bool = True) -> dict:
        env = dict(self.env)
        if variant == "ours" and fresh_store:
            for suffix in ("", ".wal"):
                Path(f"{self.store}{suffix}").unlink(missing_ok=True)
            from o365sync.store.partitions import parts_dir

            shutil.rmtree(parts_dir(self.store), ignore_errors=True)  # the users' buckets of the previous run
            shutil.copyfile(self.template, self.store)
            if rep == "profile":
                env["BENCH_PROFILE"] = str(self.work / "ours.prof")
        elif variant == "dlt":
            run_dir = self.work / f"dlt-{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            env["BENCH_DLT_DB"] = str(run_dir / "dlt_headers.duckdb")
            env["BENCH_DLT_PIPELINES_DIR"] = str(run_dir / "pipelines")
        else:
            run_dir = self.work / f"listing-{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            env["BENCH_LISTING_DB"] = str(run_dir / "listing.duckdb")
        r = run_child(variant, env, self.running, self.child_timeout_s)
        r["rep"] = rep
        self.verify(variant, r, env)
        print(
            f"  [{rep}] {variant:12s} rows {r['rows']:>6} wall {r['wall_s']:6.2f}s cpu {r['cpu_s']:6.2f}s "
            f"peak {r['peak_rss_mb']:6.0f} MB (ru_maxrss {r['ru_maxrss_mb']:.0f}, "
            f"post-import {r['rss_after_import_mb']:.0f} MB) "
            f"sim cpu {r['sim_cpu_s']:5.2f}s"
            + (
                f" matched {r['matched']} imported {r['imported']}"
                if variant == "ours"
                else f" pages {r.get('pages')}" + (f" steps {r['steps']}" if "steps" in r else "")
            ),
            flush=True,
        )
        return r

    def verify(self, variant: str, r: dict, env: dict[str, str]) -> None:
        import duckdb

        if r["rows"] != self.expected_scanned:
            fail(f"{variant} handled {r['rows']} messages, the scan window holds {self.expected_scanned}")
        if variant == "ours":
            from o365sync.store import open_store

            with open_store(self.settings, self.tenant.tid, write=False) as con:
                counts = {
                    t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                    for t in ("emails", "email_participants", "email_crm_matches")
                }
                distinct = con.execute("SELECT count(DISTINCT graph_id) FROM emails").fetchall()[0][0]
            r["tables"] = counts
            if r["scanned"] != r["matched"] + r["discarded"]:
                fail(f"ours: scanned {r['scanned']} != matched {r['matched']} + discarded {r['discarded']}")
            if not (r["imported"] == r["matched"] == counts["emails"] == distinct):
                fail(
                    f"ours: matched {r['matched']}, imported {r['imported']}, emails rows {counts['emails']} "
                    f"(distinct {distinct}) should all be equal on a fresh store"
                )
            if r["matched"] != self.expected_matched:
                fail(f"ours matched {r['matched']} messages, the world's ground truth is {self.expected_matched}")
        elif variant == "dlt":
            with duckdb.connect(env["BENCH_DLT_DB"], read_only=True) as con:
                n, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM graph.messages").fetchall()[0]
            r["tables"] = {"graph.messages": n}
            if not (n == distinct == r["rows"]):
                fail(f"dlt: trace says {r['rows']} rows, DuckDB holds {n} ({distinct} distinct ids)")
        else:
            with duckdb.connect(env["BENCH_LISTING_DB"], read_only=True) as con:
                n, distinct = con.execute("SELECT count(*), count(DISTINCT graph_id) FROM messages").fetchall()[0]
                parts = con.execute("SELECT count(*) FROM participants").fetchall()[0][0]
            r["tables"] = {"messages": n, "participants": parts}
            if not (n == distinct == r["rows"]):
                fail(f"ours-listing: counted {r['rows']} rows, DuckDB holds {n} ({distinct} distinct ids)")

    # ---------------------------------------------------------------- whole benchmark
    def bench(self) -> dict:
        a = self.args
        started = time.perf_counter()
        print("warm-up (untimed; fills the Graph simulator's per-message JSON cache, listing and bodies):", flush=True)
        variants = self.variants
        warm = [self.run(v, "warm") for v in variants]
        results: list[dict] = []
        for i in range(a.reps):
            k = i % len(variants)
            order = variants[k:] + variants[:k]
            print(f"rep {i + 1}/{a.reps}, order {' -> '.join(order)}:", flush=True)
            for v in order:
                results.append(self.run(v, str(i + 1)))
        profile = None
        if a.profile:
            print("profile (untimed, cProfile of the ours child):", flush=True)
            self.run("ours", "profile")
            profile = self.work / "ours.prof"
            if a.profile_out:
                shutil.copyfile(profile, a.profile_out)
        total = time.perf_counter() - started
        return {"warm": warm, "results": results, "bench_s": total, "profile": str(profile) if profile else None}


# --------------------------------------------------------------------------- report
def median_of(rows: list[dict], key) -> float:  # noqa: ANN001
    return statistics.median(key(r) for r in rows)


def run_medians(rows: list[dict], *fields: str) -> dict[str, float]:
    """What every variant's runs report, as medians (plus `fields`): rows, wall and CPU time, messages per second
    of each, peak RSS, RSS after imports, import time and the simulators' CPU."""
    same = ("rows", "wall_s", "cpu_s", "peak_rss_mb", "rss_after_import_mb", "import_s", "sim_cpu_s", *fields)
    return {
        "runs": len(rows),
        **{name: median_of(rows, lambda r, name=name: r[name]) for name in same},
        "msgs_per_s": median_of(rows, lambda r: r["rows"] / r["wall_s"]),
        "msgs_per_cpu_s": median_of(rows, lambda r: r["rows"] / r["cpu_s"]),
    }


def summarise(results: list[dict]) -> dict[str, dict]:
    out = {}
    for v in VARIANTS:
        rows = [r for r in results if r["variant"] == v]
        if not rows:
            continue
        s = run_medians(rows, "ru_maxrss_mb", "ru_maxrss_at_start_mb")
        s["rss_over_baseline_mb"] = median_of(rows, lambda r: r["peak_rss_mb"] - r["rss_after_import_mb"])
        if v == "ours":
            s["matched"] = median_of(rows, lambda r: r["matched"])
            s["imported"] = median_of(rows, lambda r: r["imported"])
            s["tables"] = rows[-1]["tables"]
            s["page_size"] = rows[-1].get("page_size")
        else:
            s["pages"] = median_of(rows, lambda r: r["pages"])
            s["tables"] = rows[-1]["tables"]
            s["page_size"] = rows[-1].get("page_size", 1000)
        if v == "dlt":
            s["steps"] = {k: median_of(rows, lambda r, k=k: r["steps"].get(k, 0.0)) for k in rows[-1]["steps"]}
        out[v] = s
    return out


def render(h: Harness, summary: dict[str, dict], bench_s: float) -> str:
    a = h.args
    o, d, ref = summary["ours"], summary["dlt"], summary.get("ours-listing")
    lines = [
        f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {_mem_gb():.0f} GB RAM, {platform.system()} "
        f"{platform.release()}, CPython {platform.python_version()}, load avg before run {h.load_before}",
        f"Versions: {_versions()}",
        f"Mailbox: {h.mailbox_size:,} messages, {h.expected_scanned:,} in the scan window (inbox "
        f"{h.by_folder['inbox']:,}, sent items {h.by_folder['sentitems']:,}), scan start {h.scan_start}, "
        f"{a.contacts} CRM contacts; {a.reps} reps per variant, medians; page size: ours {o['page_size']} "
        f"(product setting), dlt 1000" + (f", reference {ref['page_size']}" if ref else ""),
        "",
        "| variant | messages handled | wall s | msgs/s (wall) | client CPU s | msgs / CPU-s | peak RSS MB "
        "| RSS after imports MB | peak over post-import MB | import s | sim CPU s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in VARIANTS:
        s = summary.get(name)
        if s is None:
            continue
        lines.append(
            f"| {LABELS[name]} | {s['rows']:,.0f} | {s['wall_s']:.2f} | {s['msgs_per_s']:,.0f} | "
            f"{s['cpu_s']:.2f} | {s['msgs_per_cpu_s']:,.0f} | {s['peak_rss_mb']:.0f} | "
            f"{s['rss_after_import_mb']:.0f} | {s['rss_over_baseline_mb']:.0f} | {s['import_s']:.2f} | "
            f"{s['sim_cpu_s']:.2f} |"
        )
    steps = {k: round(v, 2) for k, v in d["steps"].items()}
    lines += [
        "",
        f"ours: scanned {o['rows']:,.0f}, matched {o['matched']:,.0f}, imported {o['imported']:,.0f} "
        f"(world ground truth {h.expected_matched:,}); store rows {o['tables']}",
        f"dlt: rows loaded {d['rows']:,.0f} in {d['pages']:.0f} pages (equals ours' scanned count: "
        f"{'yes' if d['rows'] == o['rows'] else 'NO'}); DuckDB {d['tables']}; dlt steps, median s: {steps}",
    ]
    if ref:
        lines.append(f"reference: rows {ref['rows']:,.0f} in {ref['pages']:.0f} pages; DuckDB {ref['tables']}")
    lines += [
        "",
        f"Ratio ours/dlt: msgs/s (wall) {o['msgs_per_s'] / d['msgs_per_s']:.2f}x; "
        f"msgs per CPU-s {o['msgs_per_cpu_s'] / d['msgs_per_cpu_s']:.2f}x; "
        f"peak RSS {o['peak_rss_mb'] / d['peak_rss_mb']:.2f}x; "
        f"peak over post-import {o['rss_over_baseline_mb'] / d['rss_over_baseline_mb']:.2f}x",
    ]
    if ref:
        lines.append(
            f"Ratio reference/dlt (same work): msgs/s (wall) {ref['msgs_per_s'] / d['msgs_per_s']:.2f}x; "
            f"msgs per CPU-s {ref['msgs_per_cpu_s'] / d['msgs_per_cpu_s']:.2f}x; "
            f"peak RSS {ref['peak_rss_mb'] / d['peak_rss_mb']:.2f}x; "
            f"peak over post-import {ref['rss_over_baseline_mb'] / d['rss_over_baseline_mb']:.2f}x"
        )
    lines += [
        "",
        "Peak RSS = the child's VmHWM (its own address space's high-water mark). getrusage(RUSAGE_SELF).ru_maxrss is "
        "not usable here: on Linux it keeps the high-water mark of the address space the child was forked from, i.e. "
        "this simulator-hosting parent (medians, MB: "
        + ", ".join(
            f"{n} {summary[n]['ru_maxrss_mb']:.0f} at exit / {summary[n]['ru_maxrss_at_start_mb']:.0f} before any "
            "import"
            for n in VARIANTS
            if n in summary
        )
        + f"; parent RSS now {rss_mb():.0f}).",
        "Work is not identical: ours also matches every page against the CRM snapshot, fetches plain-text bodies "
        f"for the {o['matched']:,.0f} matched messages via $batch (20 per request, two batches in flight) and writes "
        "emails, participants and matches (+ cursors) transactionally; dlt only lands the header rows. "
        "'sim CPU s' is the simulators' CPU (this process) during the child's run: Graph's server-side cost.",
        f"Benchmark wall time (warm-up + reps): {bench_s:.0f}s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument(
        "--messages", type=int, default=50_000, help="minimum messages in Inbox + Sent Items (default 50000)"
    )
    p.add_argument("--reps", type=int, default=3, help="measured runs per variant (default 3)")
    p.add_argument("--contacts", type=int, default=2000, help="CRM contacts in the tenant (default 2000)")
    p.add_argument("--history-days", type=int, default=60, help="age of the oldest message (default 60)")
    p.add_argument(
        "--no-widen",
        action="store_true",
        help="keep the generator's own scan window (otherwise it covers the whole history)",
    )
    p.add_argument(
        "--ours-page-size",
        type=int,
        default=0,
        help="O365SYNC_GRAPH_PAGE_SIZE for ours (default: the product's setting)",
    )
    p.add_argument(
        "--no-listing-ref",
        action="store_true",
        help="skip the reference row (the product's listing code doing exactly dlt's job)",
    )
    p.add_argument("--listing-page-size", type=int, default=1000, help="$top of the reference row (default 1000)")
    p.add_argument("--profile", action="store_true", help="after the reps, one untimed cProfile run of ours")
    p.add_argument("--profile-out", type=Path, help="copy the .prof file here")
    args = parse_with_quick(p, argv, messages=3000, contacts=300, reps=1)
    if args.reps < 1:
        p.error("--reps must be >= 1")

    h = Harness(args)
    h.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        h.setup()
        out = h.bench()
        summary = summarise(out["results"])
        text = render(h, summary, out["bench_s"])
        print("\n" + text)
        if out["profile"]:
            import pstats

            print("\nTop of the ours-child profile (cumulative):")
            pstats.Stats(out["profile"]).sort_stats("cumulative").print_stats(30)
        write_json(args, summary=summary, report=text, **out)
    finally:
        h.close(keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
