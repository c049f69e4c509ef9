"""Benchmark: the initial import of one 100k-message mailbox under Graph's limits, against the minimum those limits
allow; and the same import with the limits off, side by side with a plain-Python baseline.

    uv run --group bench python bench/import_under_limits.py [--messages 100000] [--latency-ms 50] [--reps 3] [--quick]

Setup (parent, untimed; `Harness` from import_vs_dlt.py): one tenant, one user with >= --messages messages, an open
opportunity older than the whole history so the scan window covers every message, then the CRM is cut down to a
random --crm-share of its accounts (with their contacts) and of its leads, so that a few % of the mail matches (this
generator draws every contact/lead/account message from the CRM, so the CRM's size alone does not change the
share). The parent starts the simulators (`start_world`), connects the user through our /connect + MSAL
(`register_and_connect`), takes the CRM snapshot and keeps the snapshot-only store as a template. Each measured run
is a fresh child process on a fresh copy of that store.

A. Limits on: the Graph simulator with Outlook's real limits (4 concurrent requests per mailbox, 10,000 requests per
   600 s sliding window) and --latency-ms per request (slept while the request holds its mailbox slot; each inner
   request of a `$batch` too). `sync_mailbox_now` (bench/_child_ours.py). From the simulator's request log: the
   requests the run had to make, and the lower bound
       T_min = max(critical path, N x L / 4, budget bound)
   (see `limits_model`), reported with actual / T_min. Checks: store == World.expected_matches (ids and CRM links),
   simulator peak in flight <= 4, 429s by cause, Retry-After violations.
B. Limits off: latency 0, no concurrency cap, no budget (the simulator's, and the client's own:
   `O365SYNC_GRAPH_REQUEST_BUDGET=0`, and its concurrency cap raised, see `limits_off_env`). ours
   (`sync_mailbox_now`) and naive (bench/_child_naive.py: requests + json + dict matching + one GET per matched
   body + DuckDB executemany) in rotating order, medians of --reps; both must end with exactly the ground-truth
   matched set.
One untimed run of ours (limits off) first warms the simulator's per-message JSON caches for both parts.
"""

from __future__ import annotations

import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

from import_vs_dlt import (
    BENCH,
    Harness,
    _cpu_model,
    _mem_gb,
    _versions,
    bench_parser,
    build_world,
    fail,
    limits_off_env,
    limits_on_env,
    parse_with_quick,
    run_child,
    run_medians,
    wall_time_line,
    write_json,
)

T0 = time.perf_counter()
CHILD_NAIVE = BENCH / "_child_naive.py"
WIDEN_OPPORTUNITY = "006BENCHWINDOW1"  # build_world's whole-history opportunity
_FOLDER_PATH = re.compile(r"/me/mailfolders(?:\('([^']+)'\)|/([^/]+))/messages(/delta)?$", re.IGNORECASE)


# --------------------------------------------------------------------------- the T_min model
def limits_model(
    log: list, oid: str, folder_ids: dict[str, str], latency_s: float, max_in_flight: int, budget: int, window_s: float
) -> dict:
    """Classify the mailbox's requests in the simulator's log and compute the lower bound the limits allow.

    Outlook requests (what the limits count): list pages and delta pages (GET, one per nextLink) and the inner
    requests of `$batch` (one GET per body); the `$batch` envelope is neither counted nor holding a slot. With a
    latency L per request (the time a request holds its mailbox slot):
    - critical path: a folder's pages form a chain (each nextLink comes from the previous page), so
      T >= (longest chain + 1) x L, the +1 being the body fetch that needs the last page's ids. Chains of
      different folders, and a folder's delta baseline and its list backfill, are independent as far as Graph is
      concerned (the product runs them one after the other: that is design, not a limit);
    - concurrency: at most `max_in_flight` requests hold a slot at once, so T >= N x L / max_in_flight;
    - budget: at most `budget` requests start in any `window_s` window, so the N-th cannot start before
      floor((N - 1) / budget) x window_s, and T >= that + L (binding only when N > budget).
    T_min = the largest of the three. `batch_sizes` groups the inner requests logged before each envelope, so it
    is exact only while one `$batch` is in flight at a time (the product's body fetcher may overlap two small
    ones)."""
    pages: Counter[tuple[str, str]] = Counter()
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    batches: list[int] = []
    current = 0
    names = {v: k for k, v in folder_ids.items()}
    for e in log:
        if e.oid != oid:
            continue
        path = unquote(e.path)
        if path.lower().endswith("/$batch"):
            kinds["batch envelopes"] += 1
            batches.append(current)
            current = 0
            continue
        statuses[e.status] += 1
        if e.status != 200:
            kinds[f"status {e.status}"] += 1
            continue
        m = _FOLDER_PATH.search(path)
        if e.inner and "/me/messages/" in path.lower():
            kinds["body (inner $batch GET)"] += 1
            current += 1
        elif m:
            folder = m.group(2).lower() if m.group(2) else names.get(m.group(1), m.group(1))
            kind = "delta" if m.group(3) else "list"
            pages[(kind, folder)] += 1
            kinds[f"{kind} pages"] += 1
        else:
            kinds["other"] += 1
    if current:
        batches.append(current)
    n = sum(pages.values()) + kinds["body (inner $batch GET)"] + kinds["other"]
    L = latency_s
    longest = max(pages.values(), default=0)
    critical = (longest + (1 if kinds["body (inner $batch GET)"] else 0)) * L
    concurrency = n * L / max_in_flight
    budget_bound = (math.floor((n - 1) / budget) * window_s + L) if n > budget else 0.0
    t_min = max(critical, concurrency, budget_bound)
    binding = max(
        (("critical path", critical), ("concurrency", concurrency), ("budget", budget_bound)), key=lambda kv: kv[1]
    )[0]
    return {
        "pages": {f"{k} {f}": v for (k, f), v in sorted(pages.items())},
        "kinds": dict(kinds),
        "statuses": dict(statuses),
        "requests": n,
        "longest_chain": longest,
        "batches": len(batches),
        "batch_sizes": dict(sorted(Counter(batches).items())),
        "critical_s": critical,
        "concurrency_s": concurrency,
        "budget_s": budget_bound,
        "t_min_s": t_min,
        "binding": binding,
    }


def slot_occupancy(sent: list, latency_s: float, max_in_flight: int) -> dict:
    """How full the mailbox's slots were, from the simulator's own response log (`GraphSimulator.sent`: every
    Outlook request of the mailbox, inner `$batch` requests included, with the time its response was sent).

    A request that got a slot held it for the latency L just before its response (the simulator's service time
    is not in the log, so this is a slight undercount); throttled answers held none. Returns the seconds spent
    with k = 0..max_in_flight requests in flight between the first request's start and the last response
    (`span_s`), and the slot-seconds left idle, split at the last listing page's response: while listing ran
    (`idle_listing_s`) and after it, while the last bodies drained (`idle_drain_s`). With N requests,
    span = N x L / 4 + (idle slot-seconds) / 4, so wall = T_min + idle / 4 + time outside the span."""
    held = [x for x in sent if x.status not in (429, 503, 504)]
    if not held:
        return {"span_s": 0.0, "at_level_s": {}, "idle_listing_s": 0.0, "idle_drain_s": 0.0}
    listing_end = max((x.at for x in held if _FOLDER_PATH.search(unquote(x.key[1]))), default=min(x.at for x in held))
    events = sorted([(x.at - latency_s, 1) for x in held] + [(x.at, -1) for x in held])
    at_level = dict.fromkeys(range(max_in_flight + 1), 0.0)
    idle = {"listing": 0.0, "drain": 0.0}
    level, last = 0, events[0][0]
    for t, step in events:
        if t > last:
            at_level[min(level, max_in_flight)] += t - last
            # the slot-seconds idle in [last, t), split at the end of the listing
            before = max(0.0, min(t, listing_end) - last)
            idle["listing"] += (max_in_flight - level) * before
            idle["drain"] += (max_in_flight - level) * (t - last - before)
        level += step
        last = max(last, t)
    return {
        "span_s": events[-1][0] - events[0][0],
        "at_level_s": at_level,
        "idle_listing_s": idle["listing"],
        "idle_drain_s": idle["drain"],
    }


# --------------------------------------------------------------------------- harness
class LimitsHarness(Harness):
    def make_world(self):  # noqa: ANN201
        """build_world (whole-history window), then keep a random `crm_share` of the accounts (with their contacts)
        and of the unconverted/converted leads, before any simulator starts: the Salesforce simulator serves this
        CRM and World.expected_matches reads it, so the ground truth stays consistent."""
        a = self.args
        world = build_world(a.messages, a.contacts, a.history_days, a.seed, True)
        crm = world.crm[world.tenants[0].tid]
        self.crm_before = (len(crm.contacts), len(crm.leads), len(crm.accounts))
        rng = random.Random(f"{a.seed}:crm-share")
        traps = crm.accounts[-2:]  # build_world's free-mail and own-domain accounts: keep them (they must not match)
        kept = [acc for acc in crm.accounts[:-2] if rng.random() < a.crm_share]
        if not kept:
            fail("--crm-share keeps no account")
        ids = {acc.id for acc in kept}
        crm.accounts = kept + traps
        crm.contacts = [c for c in crm.contacts if c.account_id in ids]
        crm.leads = [lead for lead in crm.leads if rng.random() < a.crm_share]
        for opp in crm.opportunities:
            if opp.id == WIDEN_OPPORTUNITY:
                opp.account_id = kept[0].id
        crm.opportunities = [o for o in crm.opportunities if o.account_id in ids]
        self.crm_after = (len(crm.contacts), len(crm.leads), len(crm.accounts))
        return world

    def setup(self) -> None:
        super().setup()
        from o365sync import mail
        from o365sync.domains import FREE_MAIL_DOMAINS

        tid, oid = self.tenant.tid, self.user.oid
        self.expected = {gid: ids for (owner, gid), ids in self.world.expected_matches(tid).items() if owner == oid}
        self.env.update(
            {
                "BENCH_CRM_DB": str(self.template),
                "BENCH_OWN_DOMAINS": ",".join(self.tenant.domains),
                "BENCH_FREE_MAIL": " ".join(sorted(FREE_MAIL_DOMAINS)),
                "BENCH_NAIVE_PAGE_SIZE": str(self.settings.graph_page_size),
                # the product's listing query, whatever it is at the time of the run
                "BENCH_SELECT": ",".join(mail.HEADER_FIELDS),
                "BENCH_EXPAND": getattr(mail, "SENSITIVITY_EXPAND", ""),
            }
        )
        self.folder_ids = {f: self.running.graph.folder_id(oid, f) for f in ("inbox", "sentitems")}
        c0, l0, a0 = self.crm_before
        c1, l1, a1 = self.crm_after
        print(
            f"CRM cut to {self.args.crm_share:.0%} of accounts and leads: contacts {c0} -> {c1}, leads {l0} -> {l1}, "
            f"accounts {a0} -> {a1}; ground truth {len(self.expected):,} of {self.expected_scanned:,} in-window "
            f"messages match ({len(self.expected) / self.expected_scanned:.2%})",
            flush=True,
        )

    # ---------------------------------------------------------------- simulator knobs
    def limits(self, on: bool) -> None:
        g = self.running.graph
        g.reset()  # knobs back to the constructor's (4 in flight, 10,000 / 600 s), no latency, logs and budgets cleared
        if on:
            if (g.max_in_flight, g.budget_requests, g.budget_window_s) != (4, 10_000, 600.0):
                fail(f"simulator limits are not Outlook's: {g.max_in_flight}, {g.budget_requests}, {g.budget_window_s}")
            g.latency_s = self.args.latency_ms / 1000
            limits_on_env(self.env)  # the product's own budget and concurrency cap, as configured
        else:
            g.max_in_flight = 10**9
            g.budget_requests = None
            limits_off_env(self.env)

    # ---------------------------------------------------------------- runs
    def stored_matches(self, db: str, product: bool) -> dict[str, frozenset[str]]:
        import duckdb

        from o365sync.store.partitions import connect

        where = f" WHERE user_oid = '{self.user.oid}'" if product else ""
        opened = connect(Path(db), False, None, 1) if product else duckdb.connect(db, read_only=True)
        with opened as con:  # the product's store: its tenant file and buckets as one database
            emails = {r[0] for r in con.execute(f"SELECT graph_id FROM emails{where}").fetchall()}
            links: dict[str, set[str]] = {}
            for gid, crm_id in con.execute(f"SELECT graph_id, crm_id FROM email_crm_matches{where}").fetchall():
                links.setdefault(gid, set()).add(crm_id)
        return {gid: frozenset(links.get(gid, ())) for gid in emails}

    def check_store(self, variant: str, stored: dict[str, frozenset[str]]) -> None:
        if stored != self.expected:
            missing, extra = self.expected.keys() - stored.keys(), stored.keys() - self.expected.keys()
            wrong = sum(1 for k in stored.keys() & self.expected.keys() if stored[k] != self.expected[k])
            fail(
                f"{variant}: store differs from World.expected_matches: {len(missing)} missing, {len(extra)} extra, "
                f"{wrong} with other CRM links"
            )

    def run_ours(self, rep: str, profile: bool = False) -> dict:
        r = self.run("ours", "profile" if profile else rep)  # fresh store, child, count checks (import_vs_dlt)
        r["rep"] = rep
        self.check_store("ours", self.stored_matches(str(self.store), product=True))
        return r

    def run_naive(self, rep: str) -> dict:
        run_dir = self.work / f"naive-{rep}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        env = dict(self.env, BENCH_NAIVE_DB=str(run_dir / "naive.duckdb"))
        r = run_child("naive", env, self.running, script=CHILD_NAIVE)
        r["rep"] = rep
        if r["rows"] != self.expected_scanned:
            fail(f"naive handled {r['rows']} messages, the scan window holds {self.expected_scanned}")
        self.check_store("naive", self.stored_matches(env["BENCH_NAIVE_DB"], product=False))
        print(
            f"  [{rep}] naive        rows {r['rows']:>6} wall {r['wall_s']:6.2f}s cpu {r['cpu_s']:6.2f}s "
            f"peak {r['peak_rss_mb']:6.0f} MB (post-import {r['rss_after_import_mb']:.0f} MB) sim cpu "
            f"{r['sim_cpu_s']:5.2f}s matched {r['matched']} body GETs {r['body_requests']} stages (wall s) "
            f"{r['stages']}",
            flush=True,
        )
        return r

    def limited_run(self, rep: str, profile: bool = False) -> dict:
        """Part A: one import under the limits; its request log gives T_min."""
        self.limits(on=True)
        g = self.running.graph
        r = self.run_ours(rep, profile)
        oid = self.user.oid
        log, sent, peak = list(g.requests), list(g.sent.get(oid, ())), g.peak_in_flight.get(oid, 0)  # child is done
        model = limits_model(
            log, oid, self.folder_ids, g.latency_s, g.max_in_flight, g.budget_requests, g.budget_window_s
        )
        concurrency_ra = float(g.throttle_retry_after)
        throttled = [s for s in sent if s.status == 429]
        r.update(
            model=model,
            peak_in_flight=peak,
            throttled_concurrency=sum(1 for s in throttled if s.retry_after == concurrency_ra),
            throttled_budget=sum(1 for s in throttled if s.retry_after != concurrency_ra),
            retry_violations=len(g.retry_violations(oid, mailbox_wide=True)),
            occupancy=slot_occupancy(sent, g.latency_s, g.max_in_flight),
        )
        if peak > 4:
            fail(f"the simulator saw {peak} concurrent requests for the mailbox")
        print(
            f"  [{rep}] limits on: N {model['requests']} requests, T_min {model['t_min_s']:.1f}s "
            f"({model['binding']}), actual {r['wall_s']:.1f}s ({r['wall_s'] / model['t_min_s']:.2f}x), slot use "
            f"{model['concurrency_s'] / r['wall_s']:.0%}; peak in flight {peak}, 429s {len(throttled)}",
            flush=True,
        )
        return r


# --------------------------------------------------------------------------- report
def summarise(rows: list[dict]) -> dict:
    return run_medians(rows, "matched")


def render(h: LimitsHarness, part_a: list[dict], part_b: dict[str, list[dict]], bench_s: float) -> str:
    a = h.args
    lines = [
        f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {_mem_gb():.0f} GB RAM, {platform.system()} "
        f"{platform.release()}, CPython {platform.python_version()}, load avg before run {h.load_before}",
        f"Versions: {_versions()}",
        f"Mailbox: {h.mailbox_size:,} messages, {h.expected_scanned:,} in the scan window (inbox "
        f"{h.by_folder['inbox']:,}, sent items {h.by_folder['sentitems']:,}), scan start {h.scan_start}; CRM "
        f"{h.crm_after[0]} contacts, {h.crm_after[1]} leads, {h.crm_after[2]} accounts; ground truth "
        f"{len(h.expected):,} matched ({len(h.expected) / h.expected_scanned:.2%}); product page size "
        f"{h.settings.graph_page_size}",
        "",
    ]
    if part_a:
        r = sorted(part_a, key=lambda x: x["wall_s"])[len(part_a) // 2]  # the median run, with its own model
        m = r["model"]
        L = a.latency_ms / 1000
        lines += [
            f"A. Limits on: 4 concurrent / 10,000 per 600 s per mailbox, latency {a.latency_ms:g} ms per request "
            f"({len(part_a)} run{'s' if len(part_a) > 1 else ''}" + (", median shown" if len(part_a) > 1 else "") + ")",
            "",
            "| requests the import made (simulator log, status 200) | count |",
            "|---|--:|",
        ]
        for k, v in m["pages"].items():
            lines.append(f"| {k} pages | {v:,} |")
        lines += [
            f"| body GETs (inner $batch requests) | {m['kinds'].get('body (inner $batch GET)', 0):,} |",
            f"| **N: Outlook requests (counted by the limits)** | **{m['requests']:,}** |",
            f"| $batch envelopes (not counted) | {m['kinds'].get('batch envelopes', 0):,}; sizes {m['batch_sizes']} |",
            "",
            "| bound | formula | s |",
            "|---|---|--:|",
            f"| critical path | (longest page chain {m['longest_chain']} + 1 body) x L | {m['critical_s']:.1f} |",
            f"| concurrency | N x L / 4 = {m['requests']:,} x {L:g} / 4 | {m['concurrency_s']:.1f} |",
            f"| budget | N <= 10,000: not binding; else floor((N-1)/10,000) x 600 + L | {m['budget_s']:.1f} |",
            f"| **T_min** = max (binding: {m['binding']}) | | **{m['t_min_s']:.1f}** |",
            "",
            "| measured | value |",
            "|---|--:|",
            f"| actual wall s (sync_mailbox_now; the child's clock around the call) | {r['wall_s']:.1f} |",
            f"| **actual / T_min** | **{r['wall_s'] / m['t_min_s']:.2f}x** |",
            f"| slot utilisation N x L / (4 x actual) | {m['requests'] * L / 4 / r['wall_s']:.0%} |",
            f"| msgs/s (scanned / wall) | {r['rows'] / r['wall_s']:,.0f} |",
            f"| client CPU s / sim CPU s | {r['cpu_s']:.1f} / {r['sim_cpu_s']:.1f} |",
            f"| peak RSS MB (VmHWM) | {r['peak_rss_mb']:.0f} |",
            f"| scanned / matched / imported | {r['scanned']:,} / {r['matched']:,} / {r['imported']:,} |",
            f"| store == World.expected_matches (ids and CRM links) | yes ({len(h.expected):,}) |",
            f"| simulator peak in flight for the mailbox | {r['peak_in_flight']} |",
            f"| 429s: concurrency / budget | {r['throttled_concurrency']} / {r['throttled_budget']} |",
            f"| Retry-After violations (mailbox-wide) | {r['retry_violations']} |",
            "",
        ]
        o = r["occupancy"]
        levels = ", ".join(f"{k}: {v:.1f}" for k, v in o["at_level_s"].items())
        outside = r["wall_s"] - o["span_s"]
        lines += [
            f"Seconds with k requests in flight (simulator response log, k: s): {levels}",
            "",
            "| where the wall time goes | s | share |",
            "|---|--:|--:|",
            f"| all 4 slots busy: N x L / 4 (T_min if concurrency binds) | {m['concurrency_s']:.1f} | "
            f"{m['concurrency_s'] / r['wall_s']:.0%} |",
            f"| slots idle while the listing ran: idle slot-s / 4 | {o['idle_listing_s'] / 4:.1f} | "
            f"{o['idle_listing_s'] / 4 / r['wall_s']:.0%} |",
            f"| slots idle after the last listing page (last bodies): idle slot-s / 4 | {o['idle_drain_s'] / 4:.1f} | "
            f"{o['idle_drain_s'] / 4 / r['wall_s']:.0%} |",
            f"| before the first and after the last Graph request (CRM index, token, last write) | {outside:.1f} | "
            f"{outside / r['wall_s']:.0%} |",
            "",
        ]
        if len(part_a) > 1:
            lines.append(
                "All limits-on runs: "
                + ", ".join(f"{x['wall_s']:.1f}s (T_min {x['model']['t_min_s']:.1f}s)" for x in part_a)
            )
            lines.append("")
    if part_b:
        s = {v: summarise(rows) for v, rows in part_b.items()}
        o, n = s["ours"], s["naive"]
        labels = {
            "ours": "ours: sync_mailbox_now (delta baseline + list + Polars match + $batch bodies + 3 tables)",
            "naive": "naive: requests + json.loads + dict match + 1 GET per body + DuckDB executemany",
        }
        lines += [
            f"B. Limits off: latency 0, no concurrency cap, no budget; {a.reps} reps per variant, rotating order, "
            "medians",
            "",
            "| variant | messages | matched | wall s | msgs/s | client CPU s | msgs / CPU-s | peak RSS MB "
            "| RSS after imports MB | import s | sim CPU s |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for v in ("ours", "naive"):
            x = s[v]
            lines.append(
                f"| {labels[v]} | {x['rows']:,.0f} | {x['matched']:,.0f} | {x['wall_s']:.2f} | "
                f"{x['msgs_per_s']:,.0f} | {x['cpu_s']:.2f} | {x['msgs_per_cpu_s']:,.0f} | "
                f"{x['peak_rss_mb']:.0f} | {x['rss_after_import_mb']:.0f} | {x['import_s']:.2f} | "
                f"{x['sim_cpu_s']:.2f} |"
            )
        lines += [
            "",
            f"Ratio ours/naive: msgs/s (wall) **{o['msgs_per_s'] / n['msgs_per_s']:.2f}x**; msgs per CPU-s "
            f"{o['msgs_per_cpu_s'] / n['msgs_per_cpu_s']:.2f}x; peak RSS {o['peak_rss_mb'] / n['peak_rss_mb']:.2f}x",
            "naive's time by stage (wall s, medians): "
            + ", ".join(
                f"{k} {statistics.median(r['stages'][k] for r in part_b['naive']):.1f}"
                for k in part_b["naive"][0]["stages"]
            ),
            "Both ended with exactly the ground-truth matched set (ids and CRM links) in every run.",
            "Runs: "
            + "; ".join(
                f"{v} " + ", ".join(f"{r['wall_s']:.1f}s/{r['cpu_s']:.1f} CPU" for r in rows)
                for v, rows in part_b.items()
            ),
            "",
        ]
    in_all = f"{time.perf_counter() - T0:.0f}s in all (world, simulators, connect, CRM snapshot included)"
    lines.append(wall_time_line(bench_s, f"for warm-up + runs, {in_all}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument(
        "--messages",
        type=int,
        default=100_000,
        help="minimum messages in Inbox + Sent Items, the folders synced (default 100000)",
    )
    p.add_argument("--latency-ms", type=float, default=50.0, help="simulated Graph latency per request (default 50)")
    p.add_argument(
        "--crm-share",
        type=float,
        default=0.10,
        help="share of the generated CRM accounts (with their contacts) and leads kept (default 0.10)",
    )
    p.add_argument("--contacts", type=int, default=3000, help="CRM contacts generated before the cut (default 3000)")
    p.add_argument("--reps", type=int, default=3, help="part B runs per variant (default 3)")
    p.add_argument("--limits-reps", type=int, default=1, help="part A runs (default 1)")
    p.add_argument("--history-days", type=int, default=60)
    p.add_argument("--skip-a", action="store_true", help="skip part A (limits on)")
    p.add_argument("--skip-b", action="store_true", help="skip part B (limits off, ours vs naive)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the runs, one untimed cProfile run of ours (all threads) with the limits on (off with --skip-a)",
    )
    p.add_argument("--profile-out", type=Path, help="copy the .prof file here")
    args = parse_with_quick(p, argv, messages=3000, contacts=600, reps=1, crm_share=0.5)
    # what import_vs_dlt's Harness reads
    args.no_widen, args.ours_page_size, args.listing_page_size, args.no_listing_ref = False, 0, 1000, True
    if args.reps < 1 or args.limits_reps < 1 or not 0 < args.crm_share <= 1:
        p.error("--reps/--limits-reps must be >= 1 and --crm-share in (0, 1]")

    h = LimitsHarness(args)
    h.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    part_a: list[dict] = []
    part_b: dict[str, list[dict]] = {}
    try:
        h.setup()
        started = time.perf_counter()
        print("warm-up (untimed, limits off; fills the Graph simulator's per-message JSON caches):", flush=True)
        h.limits(on=False)
        warm = h.run_ours("warm")
        if not args.skip_b:
            print("B. limits off, latency 0:", flush=True)
            part_b = {"ours": [], "naive": []}
            order = ["ours", "naive"]
            for i in range(args.reps):
                for v in order[i % 2 :] + order[: i % 2]:
                    h.limits(on=False)
                    part_b[v].append(h.run_ours(str(i + 1)) if v == "ours" else h.run_naive(str(i + 1)))
            for v in part_b:
                if len({r["matched"] for r in part_b[v]}) != 1:
                    fail(f"{v}: matched counts differ between runs")
        if not args.skip_a:
            print(f"A. limits on (4 in flight, 10,000 / 600 s), latency {args.latency_ms:g} ms:", flush=True)
            part_a = [h.limited_run(str(i + 1)) for i in range(args.limits_reps)]
        profile = None
        if args.profile:
            limits = "off" if args.skip_a else "on"
            print(f"profile (untimed, cProfile of the ours child, limits {limits}):", flush=True)
            if args.skip_a:
                h.limits(on=False)
                h.run_ours("profile", profile=True)
            else:
                h.limited_run("profile", profile=True)
            profile = h.work / "ours.prof"
            if args.profile_out:
                shutil.copyfile(profile, args.profile_out)
        bench_s = time.perf_counter() - started
        text = render(h, part_a, part_b, bench_s)
        print("\n" + text)
        if profile:
            import pstats

            print(f"\nTop of the ours-child profile, limits {'off' if args.skip_a else 'on'} (cumulative):")
            pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(35)
        write_json(args, warm=warm, part_a=part_a, part_b=part_b, bench_s=bench_s, report=text)
    finally:
        h.close(keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
