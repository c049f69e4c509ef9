"""Benchmark (P5): peak memory of importing a million-message mailbox, and whether it stays flat with its size.

    uv run --group bench python bench/import_1m.py [--sizes 20000,200000,1000000] [--quick] [--json out.json]

This (parent) process hosts the simulated world as bench/import_vs_dlt.py does (identity, Graph and Salesforce
simulators on loopback HTTPS; the user connected through our /connect + MSAL; the CRM snapshot taken; limits off:
no budget and no concurrency cap of 4 in the simulator, the client's budget off and its cap raised, see
`limits_off_env` in bench/import_vs_dlt.py), except that the user's mailbox is a
`simulators.lazy_mailbox.LazyMailbox` served by its `LazyGraphSimulator`: messages are made when a page is served,
so a mailbox of a million costs the host no memory. For each size, in fresh child processes:

- ours (bench/_child_ours.py): `sync_mailbox_now` on a fresh copy of the snapshot-only store: the whole import
  (delta baseline, listing, exclusions, CRM matching, `$batch` bodies of the matched mail, store writes);
- baseline (bench/_child_ours_listing.py): the product's listing code alone, `$top` 1000, each page's Arrow tables
  inserted into a fresh DuckDB file: what holding one page at a time costs.

Peak RSS is each child's VmHWM (see docs/benchmarks.md, "Why peak RSS is VmHWM"). Flat means the peak does not
grow with the mailbox: pages are released, nothing is kept per message. Each run is checked: every in-window
message handled, and ours imports exactly the world's ground truth.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from import_vs_dlt import Harness, bench_parser, build_world, fail, parse_with_quick, write_json  # noqa: E402

from simulators.lazy_mailbox import LazyGraphSimulator, LazyMailbox  # noqa: E402

LABELS = {
    "ours": "ours: sync_mailbox_now (list + match + $batch bodies + store)",
    "ours-listing": "baseline: listing alone, Arrow pages -> DuckDB",
}


class LazyHarness(Harness):
    graph_class = LazyGraphSimulator
    child_timeout_s = 3600.0

    def __init__(self, args):  # noqa: ANN001
        super().__init__(args)
        self.variants = ("ours", "ours-listing")

    def make_world(self):  # noqa: ANN201
        a = self.args
        world = build_world(1, a.contacts, a.history_days, a.seed, widen=True)  # users, CRM, whole-history window
        self.set_size(world, a.sizes[0])
        return world

    def set_size(self, world, n: int) -> None:  # noqa: ANN001
        a = self.args
        tenant = world.tenants[0]
        oid = tenant.users[0].oid
        first = world.now - timedelta(days=a.history_days) + timedelta(hours=1)
        last = world.now - timedelta(minutes=10)
        world.mailboxes[oid] = LazyMailbox(world, tenant.tid, oid, n, first, last, a.match_share, a.seed)

    def run(self, variant: str, rep: str, fresh_store: bool = True) -> dict:
        """One import of the mailbox; for ours, as many product runs as it takes (a run ends at its time limit,
        `sync_max_seconds`, and the next resumes from the cursors, as in production): wall, CPU and sim CPU summed,
        peak RSS the highest of them."""
        if variant != "ours":
            return super().run(variant, rep, fresh_store)
        runs: list[dict] = []
        while not runs or sum(r["scanned"] for r in runs) < self.expected_scanned:
            if len(runs) == 10:
                fail(f"ours: 10 runs scanned {sum(r['scanned'] for r in runs)} of {self.expected_scanned}")
            runs.append(super().run("ours", f"{rep}.{len(runs) + 1}", fresh_store=not runs))
        summed = {
            k: sum(r[k] for r in runs) for k in ("scanned", "matched", "imported", "wall_s", "cpu_s", "sim_cpu_s")
        }
        combined = {**runs[-1], **summed, "rows": summed["scanned"], "product_runs": len(runs)}
        combined["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        emails = runs[-1]["tables"]["emails"]
        if not (combined["imported"] == emails == self.expected_matched):
            fail(f"ours: imported {combined['imported']}, emails {emails}, ground truth {self.expected_matched}")
        return combined

    def verify(self, variant: str, r: dict, env: dict[str, str]) -> None:
        if variant != "ours":
            return super().verify(variant, r, env)
        from o365sync.store import open_store  # a run that stopped at its time limit is checked as a whole

        with open_store(self.settings, self.tenant.tid, write=False) as con:
            r["tables"] = {"emails": con.execute("SELECT count(*) FROM emails").fetchall()[0][0]}
        if r["scanned"] != r["matched"] + r["discarded"]:
            fail(f"ours: scanned {r['scanned']} != matched {r['matched']} + discarded {r['discarded']}")

    def resize(self, n: int) -> None:
        self.set_size(self.world, n)
        self.measure_mailbox()


def render(h: LazyHarness, rows: list[dict], bench_s: float) -> str:
    a = h.args
    lines = [
        f"Machine: {os.cpu_count()} CPUs, load avg before run {h.load_before}; limits off; CRM {a.contacts:,} "
        f"contacts; match share {a.match_share:.0%} (contacts' mail); product page size 500, baseline $top 1000",
        "",
        "| messages (in window) | variant | wall s | msgs/s | client CPU s | peak RSS MB | RSS after imports MB "
        "| peak over post-import MB | matched / imported | sim CPU s |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        matched = f"{r['matched']:,} / {r['imported']:,}" if r["variant"] == "ours" else "-"
        if r.get("product_runs", 1) > 1:
            matched += f" ({r['product_runs']} product runs)"
        lines.append(
            f"| {r['rows']:,} | {LABELS[r['variant']]} | {r['wall_s']:.1f} | {r['rows'] / r['wall_s']:,.0f} | "
            f"{r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_after_import_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['rss_after_import_mb']:.0f} | {matched} | {r['sim_cpu_s']:.1f} |"
        )
    by = {(r["variant"], r["size"]): r for r in rows}
    small, big = a.sizes[0], a.sizes[-1]
    lines.append("")
    for v in ("ours", "ours-listing"):
        s, b = by[(v, small)], by[(v, big)]
        lines.append(
            f"- {v}: peak RSS at {big:,} / at {small:,} messages = {b['peak_rss_mb'] / s['peak_rss_mb']:.2f}x "
            f"({b['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} MB); over post-import "
            f"{(b['peak_rss_mb'] - b['rss_after_import_mb']):.0f} / "
            f"{(s['peak_rss_mb'] - s['rss_after_import_mb']):.0f} MB"
        )
    for n in a.sizes:
        o, li = by[("ours", n)], by[("ours-listing", n)]
        lines.append(f"- {n:,} messages: ours / baseline peak RSS {o['peak_rss_mb'] / li['peak_rss_mb']:.2f}x")
    lines.append(f"- Benchmark wall time: {bench_s:.0f}s (ground truth and setup included)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[20_000, 200_000, 1_000_000],
        help="mailbox sizes, smallest first (default 20000,200000,1000000)",
    )
    p.add_argument("--contacts", type=int, default=2000, help="CRM contacts (default 2000)")
    p.add_argument("--match-share", type=float, default=0.03, help="share of mail with a CRM contact (default 0.03)")
    p.add_argument("--history-days", type=int, default=60, help="age of the oldest message (default 60)")
    args = parse_with_quick(p, argv, sizes="5000,20000", contacts=300)
    if isinstance(args.sizes, str):  # the --quick default arrives as text
        args.sizes = [int(x) for x in args.sizes.split(",")]
    # what the shared Harness reads from the command line of bench/import_vs_dlt.py
    args.ours_page_size, args.no_listing_ref, args.listing_page_size, args.no_widen = 0, False, 1000, False
    args.messages = args.sizes[0]
    h = LazyHarness(args)
    h.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    os.environ["O365SYNC_SYNC_MAX_SECONDS"] = "780"  # the longest run the product allows: one run imports it all
    started = time.perf_counter()
    rows: list[dict] = []
    try:
        h.setup()
        for n in args.sizes:
            if n != args.sizes[0]:
                h.resize(n)
            print(f"{n:,} messages ({h.expected_scanned:,} in window, {h.expected_matched:,} to import):", flush=True)
            for variant in h.variants:
                r = h.run(variant, f"{n}")
                r["size"] = n
                rows.append(r)
        text = render(h, rows, time.perf_counter() - started)
        print("\n" + text)
        write_json(args, results=rows, report=text)
    finally:
        h.close(keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
