"""Run every benchmark at its `--quick` size (what `.ci/run` does after the tests).

    uv run --group bench python bench/run_quick.py [--out DIR] [--only NAME,...] [--timeout-s 600]

A benchmark is every `bench/*.py` not starting with `_` whose `--help` offers `--quick` (add the option with
`parse_with_quick` from bench/import_vs_dlt.py and the bench joins without an edit here). Each runs in its own
process as `python bench/NAME.py --quick --json DIR/NAME.json`, its output streamed, so its tables and ratios are
printed; the numbers are not asserted (the machine is noisy). The run fails only if a benchmark crashes (non-zero exit,
or no JSON written) or exceeds `--timeout-s`. bench/report.py puts the JSON reports into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
_QUICK_OPTION = re.compile(r"^\s+--quick\b", re.MULTILINE)


def discover() -> list[str]:
    """Names of the benchmarks that accept `--quick`, sorted."""
    names = []
    for path in sorted(BENCH.glob("*.py")):
        if path.name.startswith("_") or path.resolve() == Path(__file__).resolve():
            continue
        helped = subprocess.run(
            [sys.executable, str(path), "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        if helped.returncode == 0 and _QUICK_OPTION.search(helped.stdout):
            names.append(path.stem)
    return names


def run_all(out: Path, only: list[str] | None = None, timeout_s: float = 600.0) -> dict[str, dict]:
    """Run each benchmark's `--quick` into `out`/NAME.json; returns NAME -> {ok, wall_s, why}."""
    out.mkdir(parents=True, exist_ok=True)
    names = discover()
    if only:
        if unknown := sorted(set(only) - set(names)):
            raise SystemExit(f"no benchmark with --quick named {', '.join(unknown)} (found: {', '.join(names)})")
        names = [n for n in names if n in only]
    status: dict[str, dict] = {}
    for name in names:
        target = out / f"{name}.json"
        target.unlink(missing_ok=True)
        print(f"\n===== bench/{name}.py --quick", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(
                [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--json", str(target)],
                cwd=REPO,
                timeout=timeout_s,
            ).returncode
            why = f"exit status {rc}" if rc else ("" if target.exists() else "no --json output")
        except subprocess.TimeoutExpired:
            why = f"over {timeout_s:.0f} s"
        status[name] = {"ok": not why, "wall_s": time.perf_counter() - t0, "why": why}
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for the JSON reports (default: a temporary one)")
    p.add_argument("--only", help="comma-separated benchmark names (default: all)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per benchmark (default 600)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="o365sync-bench-quick-") as tmp:
        status = run_all(args.out or Path(tmp), args.only.split(",") if args.only else None, args.timeout_s)
    print("\n===== quick benchmarks (numbers printed above, not asserted)")
    for name, s in status.items():
        print(f"  {name:<24} {s['wall_s']:7.1f} s  {'ok' if s['ok'] else 'FAILED: ' + s['why']}")
    return 0 if all(s["ok"] for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
