"""Benchmark: snapshot a big CRM from each simulator, load it for matching, and match mail against it.

    uv run --group bench python bench/crm_snapshot.py [--contacts 1000000] [--accounts 100000] [--reps 3]
        [--fetch-reps 1] [--messages 200000] [--crm salesforce,hubspot,pipedrive,files,files-parquet] [--quick]

This (parent) process builds a one-tenant world whose CRM is replaced by a synthetic one (bench/_crm_world.py:
`--contacts` contacts, `--accounts` accounts + 2 trap accounts, `--leads` leads, `--opportunities` deals) and a
batch of `--messages` messages with 3-6 participants each. For each CRM kind it then starts that CRM's simulator
on loopback HTTPS, with no rate limits and no latency, and hosts it while fresh child processes
(bench/_crm_child.py) measure, so each child's CPU and peak RSS are the client's alone:

1. fetch: the adapter's full `fetch_snapshot(conn, http)` through `o365sync.http.make_http_client` (wall, CPU,
   records/s, peak RSS over the post-import RSS), then `open_store` + `replace_crm_snapshot` into a fresh store.
   The simulator's CPU meanwhile (this process) is reported as "sim CPU s". files / files-parquet: the CSVs of
   `simulators.crm_files.write_crm_files` (or the same tables as Parquet) and `crm_adapters.files`.
2. floor: the same requests (endpoints, parameters, page sizes) as a raw httpx loop that only parses each page's
   JSON: what the simulator and the transport cost without the adapter.
3. match: `load_crm_frames` + `o365sync.matching.build_index` from the store (timed separately, reps), a plain-Python
   dict index built from the same frames, then `match_participants` against a plain-Python for-loop with the same
   rules, on the whole batch and per 500-message page (the product matches one Graph page at a time). Both must
   give the same (message, CRM id) pairs before anything is timed.

Counts are checked: every adapter must return exactly the world's people (contacts + unconverted leads),
accounts and open opportunities, by distinct CRM id.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
CHILD = BENCH / "_crm_child.py"
KINDS = ("salesforce", "hubspot", "pipedrive", "files", "files-parquet")
sys.path.insert(0, str(REPO))

from import_vs_dlt import (  # noqa: E402
    _cpu_model,
    bench_parser,
    fail,
    parse_with_quick,
    run_script,
    wall_time_line,
    write_json,
)


def _versions() -> str:
    out = []
    for n in ("duckdb", "polars", "pyarrow", "httpx", "publicsuffixlist"):
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def run_child(env: dict[str, str], timeout_s: float = 1800.0) -> dict:
    """One measurement in a fresh interpreter (import_vs_dlt.run_script)."""
    return run_script(CHILD, env, f"{env['BENCH_MODE']} {env['BENCH_KIND']}", timeout_s)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="o365sync-crm-bench-"))
        self.base_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        for key in [k for k in self.base_env if k.startswith("O365SYNC_")]:
            del self.base_env[key]  # the children get explicit settings

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from _crm_world import build_messages, build_world

        from simulators.tls import create_tls

        a = self.args
        self.tls = create_tls(self.work / "tls")
        t0 = time.perf_counter()
        self.world = build_world(a.contacts, a.accounts, a.leads, a.opportunities, a.seed)
        self.world_s = time.perf_counter() - t0
        self.tenant = self.world.tenants[0]
        crm = self.crm = self.world.crm[self.tenant.tid]
        self.expected = {
            "people_ids": len(crm.contacts) + sum(1 for x in crm.leads if not x.is_converted),
            "account_ids": len(crm.accounts),
            "opportunities": sum(1 for o in crm.opportunities if not o.is_closed),
        }
        t0 = time.perf_counter()
        participants = build_messages(self.world, a.messages, a.seed)
        self.messages_path = self.work / "participants.parquet"
        participants.write_parquet(self.messages_path)
        self.messages_s = time.perf_counter() - t0
        self.participants = participants.height
        print(
            f"world: {len(crm.contacts):,} contacts, {len(crm.leads):,} leads "
            f"({self.expected['people_ids'] - len(crm.contacts):,} unconverted), {len(crm.accounts):,} accounts "
            f"(2 traps), {len(crm.opportunities):,} opportunities ({self.expected['opportunities']:,} open); "
            f"{self.world_s:.1f}s to build. Messages: {a.messages:,} with {participants.height:,} participants "
            f"({self.messages_s:.1f}s). Work dir {self.work}",
            flush=True,
        )

    # ---------------------------------------------------------------------------------------------- one CRM
    def start_sim(self, kind: str):  # noqa: ANN201
        """(simulator or None, env for the children, seconds to build + start it)."""
        tid = self.tenant.tid
        t0 = time.perf_counter()
        if kind == "salesforce":
            from simulators.salesforce import SalesforceSimulator

            sim = SalesforceSimulator(self.world, self.tls).start()  # daily_limit None: never enforced
            secret = sim.refresh_token_for(tid)
        elif kind == "hubspot":
            from simulators.hubspot import HubSpotSimulator

            sim = HubSpotSimulator(self.world, self.tls).start()  # burst_limit / daily_limit None: not enforced
            secret = sim.token_for(tid)
        elif kind == "pipedrive":
            from _crm_world import FastListPipedriveSimulator

            cls = FastListPipedriveSimulator
            if self.args.stock_pipedrive:
                from simulators.pipedrive import PipedriveSimulator as cls  # noqa: N813
            sim = cls(self.world, self.tls, burst_limit=None).start()  # daily_budget None by default
            secret = sim.token_for(tid)
        else:
            from simulators.crm_files import write_crm_files

            directory = self.work / "crm-files"
            if not (directory / "people.csv").exists():
                write_crm_files(self.crm, directory)
            if kind == "files-parquet":
                import polars as pl

                pq = self.work / "crm-parquet"
                pq.mkdir(exist_ok=True)
                for stem in ("people", "accounts", "opportunities"):
                    pl.read_csv(directory / f"{stem}.csv", infer_schema=False).write_parquet(pq / f"{stem}.parquet")
                directory = pq
            return None, {"BENCH_FILES_DIR": str(directory)}, time.perf_counter() - t0
        return (
            sim,
            {"BENCH_BASE_URL": sim.base_url, "BENCH_SECRET": secret, "BENCH_CA": str(self.tls.ca_pem)},
            time.perf_counter() - t0,
        )

    def stock_pipedrive_pages(self, sim) -> dict:  # noqa: ANN001
        """Serve two person pages (the first, and one after the middle) with the stock simulator's `_list` and
        the fast one, on the same records: bodies must be identical; the stock time per page is reported."""
        from simulators.pipedrive import PipedriveSimulator
        from simulators.server import Request

        tid = self.tenant.tid
        route = re.compile(r"/api/v2/(?P<kind>persons|organizations|deals)/?")

        def req(query: dict[str, str], path: str = "/api/v2/persons") -> Request:
            return Request("GET", path, query, {}, b"", match=route.fullmatch(path), base_url=sim.base_url)

        out: dict = {"stock_s": [], "fast_s": []}
        base = {"limit": "500", "sort_by": "id", "sort_direction": "asc"}
        first = sim._list(req(base), tid)
        ids = sorted(sim._records[tid]["persons"])
        import base64

        mid = ids[len(ids) // 2]
        cursor = base64.urlsafe_b64encode(json.dumps({"s": "id", "d": "asc", "v": "", "i": mid}).encode()).decode()
        for query, path in (
            (base, "/api/v2/persons"),
            ({**base, "cursor": cursor}, "/api/v2/persons"),
            (base, "/api/v2/organizations"),
        ):
            t0 = time.perf_counter()
            stock = PipedriveSimulator._list(sim, req(query, path), tid)
            out["stock_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fast = sim._list(req(query, path), tid)
            out["fast_s"].append(time.perf_counter() - t0)
            if stock.encoded() != fast.encoded():
                fail(f"fast Pipedrive list differs from the stock simulator for {path} {query}")
        del first
        return out

    def run_kind(self, kind: str) -> dict:
        a = self.args
        tid = self.tenant.tid
        sim, sim_env, start_s = self.start_sim(kind)
        res: dict = {"kind": kind, "sim_start_s": start_s, "fetch": [], "floor": None}
        try:
            if kind == "pipedrive" and not a.stock_pipedrive:
                res["pipedrive_stock_pages"] = self.stock_pipedrive_pages(sim)
            env = {**self.base_env, **sim_env, "BENCH_KIND": kind, "BENCH_TENANT_ID": tid}
            for rep in range(a.fetch_reps):
                data = self.work / f"{kind}-data-{rep}"
                shutil.rmtree(data, ignore_errors=True)
                n0 = len(sim.requests) if sim is not None else 0
                r = run_child({**env, "BENCH_MODE": "fetch", "BENCH_DATA_DIR": str(data)})
                r["requests"] = (len(sim.requests) - n0) if sim is not None else 3
                r["bad_requests"] = sum(1 for x in sim.requests[n0:] if x.status != 200) if sim is not None else 0
                self.verify(kind, r)
                res["fetch"].append(r)
                res["data_dir"] = str(data)
                print(
                    f"  {kind} fetch rep {rep + 1}: {r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s CPU, "
                    f"{r['requests']:,} requests, sim CPU {r['sim_cpu_s']:.1f}s, peak RSS "
                    f"{r['peak_rss_fetch_mb']:.0f} MB, store write {r['write_s']:.2f}s",
                    flush=True,
                )
            if not a.no_floor:
                n0 = len(sim.requests) if sim is not None else 0
                r = run_child({**env, "BENCH_MODE": "floor", "BENCH_DATA_DIR": str(self.work / "unused")})
                r["requests"] = (len(sim.requests) - n0) if sim is not None else 3
                res["floor"] = r
                if r["requests"] != res["fetch"][-1]["requests"]:
                    print(
                        f"  note: the floor made {r['requests']:,} requests, the adapter "
                        f"{res['fetch'][-1]['requests']:,}",
                        flush=True,
                    )
                print(
                    f"  {kind} transport floor: {r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s CPU, "
                    f"{r['records']:,} records in {r['pages']:,} pages, sim CPU {r['sim_cpu_s']:.1f}s",
                    flush=True,
                )
        finally:
            if sim is not None:
                sim.stop()
            del sim
            gc.collect()
        r = run_child(
            {
                **self.base_env,
                "BENCH_MODE": "match",
                "BENCH_KIND": kind,
                "BENCH_TENANT_ID": tid,
                "BENCH_DATA_DIR": res["data_dir"],
                "BENCH_REPS": str(a.reps),
                "BENCH_OWN_DOMAINS": ",".join(self.tenant.domains),
                "BENCH_MESSAGES": str(self.messages_path),
                "BENCH_PAGE_SIZE": str(a.page_size),
                "BENCH_PAGE_MESSAGES": str(a.page_messages),
            }
        )
        res["match"] = r
        print(
            f"  {kind} load {r['load_s']:.2f}s + build_index {r['index_s']:.2f}s; match {r['messages']:,} msgs: "
            f"polars {r['polars_s']:.2f}s, python {r['python_s']:.2f}s; {r['page_messages']:,} per page: polars "
            f"{r['polars_pages_s']:.2f}s, python {r['python_pages_s']:.2f}s; matched "
            f"{r['matched_messages']:,}",
            flush=True,
        )
        for d in Path(self.work).glob(f"{kind}-data-*"):
            shutil.rmtree(d, ignore_errors=True)
        return res

    def verify(self, kind: str, r: dict) -> None:
        e = self.expected
        got = {"people_ids": r["people_ids"], "account_ids": r["account_ids"], "opportunities": r["opportunities"]}
        if got != e:
            fail(f"{kind}: snapshot {got} != world {e}")
        if r.get("bad_requests"):
            fail(f"{kind}: {r['bad_requests']} non-200 answers (limits should be off)")

    def run(self) -> list[dict]:
        self.setup()
        out = []
        for kind in self.args.crm:
            print(f"{kind}:", flush=True)
            out.append(self.run_kind(kind))
        return out


# ------------------------------------------------------------------------------------------------ report
def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def render(b: Bench, results: list[dict], bench_s: float) -> str:
    a = b.args
    lines = [
        f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {platform.system()} {platform.release()}, CPython "
        f"{platform.python_version()}; {_versions()}; load avg before run {b.load_before}",
        f"CRM: {a.contacts:,} contacts, {a.accounts:,} accounts (+2 traps), {a.leads:,} leads, {a.opportunities:,} "
        f"opportunities; fetch reps {a.fetch_reps} (median), load/match reps {a.reps} (median); limits and latency "
        "off; simulators in the parent, each measurement in a fresh child process",
        "",
        "| CRM | requests | snapshot rows (people / accounts / open opps) | fetch wall s | records/s | client CPU s "
        "| sim CPU s | peak RSS over post-import MB | transport floor wall s (client / sim CPU s) | store write s "
        "| load s | build_index s | peak RSS after load MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for res in results:
        f, m, fl = res["fetch"], res["match"], res["floor"]
        records = f[-1]["people_ids"] + f[-1]["account_ids"] + f[-1]["opportunities"]
        wall = med(f, "wall_s")
        over = statistics.median(r["peak_rss_fetch_mb"] - r["rss_after_import_mb"] for r in f)
        req = "3 files" if res["kind"].startswith("files") else f"{f[-1]['requests']:,}"
        floor = f"{fl['wall_s']:.1f} ({fl['cpu_s']:.1f} / {fl['sim_cpu_s']:.1f})" if fl else "-"
        lines.append(
            f"| {res['kind']} | {req} | {f[-1]['people_rows']:,} / {f[-1]['accounts_rows']:,} / "
            f"{f[-1]['opportunities']:,} | {wall:.1f} | {records / wall:,.0f} | {med(f, 'cpu_s'):.1f} | "
            f"{med(f, 'sim_cpu_s'):.1f} | {over:,.0f} | {floor} | {med(f, 'write_s'):.2f} | {m['load_s']:.2f} | "
            f"{m['index_s']:.2f} | {m['peak_rss_load_mb']:.0f} |"
        )
    m0 = results[0]["match"]
    lines += [
        "",
        f"Matching: {m0['messages']:,} messages, {m0['participants']:,} participants as one batch; per page: the "
        f"first {m0['page_messages']:,} messages in {m0['pages']} calls of {m0['page_size']}. "
        "msgs/s = messages / median wall. Polars / X = X's wall / Polars' wall (above 1: Polars is faster). The "
        "DuckDB SQL row does less: exact address and exact domain joins, no Public Suffix List, no primary.",
        "",
        "| CRM | index people / accounts | matched msgs (pairs) | Python dict index build s | Polars batch s "
        "(CPU s) | Python batch s (CPU s) | DuckDB SQL plain join s (CPU s) | Polars batch msgs/s | Polars / Python "
        "| Polars / DuckDB | Polars per-page ms | Python per-page ms | Polars / Python (per page) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for res in results:
        m = res["match"]
        n, k = m["messages"], m["page_messages"]
        pb, yb, pp, yp = n / m["polars_s"], n / m["python_s"], k / m["polars_pages_s"], k / m["python_pages_s"]
        page_ms = 1000 * m["page_size"] / pp, 1000 * m["page_size"] / yp
        lines.append(
            f"| {res['kind']} | {m['index_people']:,} / {m['index_accounts']:,} | {m['matched_messages']:,} "
            f"({m['pairs']:,}) | {m['py_index_s']:.2f} | {m['polars_s']:.2f} ({m['polars_cpu_s']:.2f}) | "
            f"{m['python_s']:.2f} ({m['python_cpu_s']:.2f}) | {m['duckdb_s']:.2f} ({m['duckdb_cpu_s']:.2f}) | "
            f"{pb:,.0f} | {pb / yb:.2f}x | {m['duckdb_s'] / m['polars_s']:.2f}x | {page_ms[0]:.1f} | "
            f"{page_ms[1]:.1f} | {pp / yp:.2f}x |"
        )
    lines += ["", "Notes:"]
    for res in results:
        m = res["match"]
        if m["primary_mismatch"]:
            lines.append(
                f"- {res['kind']}: {m['primary_mismatch']} messages whose primary link differs between "
                "Polars and Python (same pairs)"
            )
        if "pipedrive_stock_pages" in res:
            s = res["pipedrive_stock_pages"]
            lines.append(
                f"- pipedrive: served by the bench's FastListPipedriveSimulator (bisect instead of sort-per-page; "
                f"identical bodies checked). The stock simulator takes {s['stock_s'][0]:.2f}s / {s['stock_s'][1]:.2f}s"
                f" for a persons page (first / middle) and {s['stock_s'][2]:.2f}s for an organizations page, vs "
                f"{s['fast_s'][0] * 1000:.1f} / {s['fast_s'][1] * 1000:.1f} / {s['fast_s'][2] * 1000:.1f} ms."
            )
        lines.append(
            f"- {res['kind']}: simulator build + start {res['sim_start_s']:.1f}s; fetch walls "
            + ", ".join(f"{r['wall_s']:.1f}" for r in res["fetch"])
            + f"; load walls {', '.join(f'{x:.2f}' for x in m['load_walls'])}; index walls "
            + ", ".join(f"{x:.2f}" for x in m["index_walls"])
            + f"; peak RSS fetch {res['fetch'][-1]['peak_rss_fetch_mb']:.0f} MB (post-import "
            f"{res['fetch'][-1]['rss_after_import_mb']:.0f}), after store write "
            f"{res['fetch'][-1]['peak_rss_write_mb']:.0f} MB"
        )
    lines.append(wall_time_line(bench_s, f"(world {b.world_s:.1f}s, messages {b.messages_s:.1f}s)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--leads", type=int, default=None, help="default: contacts / 20 (every 4th converted)")
    p.add_argument("--opportunities", type=int, default=None, help="default: accounts / 5 (two in three open)")
    p.add_argument("--messages", type=int, default=200_000, help="messages to match (default 200000)")
    p.add_argument("--reps", type=int, default=3, help="reps of load/build_index and of matching (default 3)")
    p.add_argument("--fetch-reps", type=int, default=1, help="reps of each adapter fetch (default 1)")
    p.add_argument("--crm", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--page-size", type=int, default=500, help="messages per page for per-page matching")
    p.add_argument(
        "--page-messages",
        type=int,
        default=25_000,
        help="messages matched page by page (default 25000: 50 pages of 500)",
    )
    p.add_argument("--no-floor", action="store_true", help="skip the raw httpx transport floor")
    p.add_argument(
        "--stock-pipedrive",
        action="store_true",
        help="serve Pipedrive with the stock simulator (O(records) per page: hours at 1M)",
    )
    args = parse_with_quick(
        p, argv, contacts=20_000, accounts=2_000, messages=20_000, page_messages=5_000, reps=1, fetch_reps=1
    )
    args.leads = args.contacts // 20 if args.leads is None else args.leads
    args.opportunities = args.accounts // 5 if args.opportunities is None else args.opportunities
    args.crm = [k.strip() for k in args.crm.split(",") if k.strip()]
    if bad := [k for k in args.crm if k not in KINDS]:
        p.error(f"unknown CRM kind(s) {bad}; choose from {KINDS}")
    b = Bench(args)
    b.load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    started = time.perf_counter()
    try:
        results = b.run()
        text = render(b, results, time.perf_counter() - started)
        print("\n" + text)
        write_json(args, results=results, report=text)
    finally:
        if args.keep:
            print(f"work dir kept: {b.work}")
        else:
            shutil.rmtree(b.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
