"""bench/report.py replaces only its own marked section of docs/benchmarks.md, and renders a bench's report as
Markdown (the benches themselves run in `.ci/run` through bench/run_quick.py, not here)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402


def _result(commit: str) -> dict:
    return {
        "args": {"quick": "True", "messages": "3000", "json": "x.json"},
        "machine": {"commit": commit, "cpu": "CPU", "cores": 2, "ram_gb": 24.0, "load_avg": "1 1 1"},
        "report": "Machine: x\n\n| a | b |\n|--:|--:|\n| 1 | 2 |\nRatio 2.0x",
    }


def test_report_replaces_only_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.txt"
    doc.write_text("# Hand-written\n\nanalysis stays\n")
    report.update(doc, report.section({"import_vs_dlt": _result("aaa1111")}, "loaded"))
    first = doc.read_text()
    assert first.startswith("# Hand-written\n\nanalysis stays\n") and "aaa1111" in first
    assert "`import_vs_dlt.py --quick` resolved to `--messages 3000`" in first
    assert "| 1 | 2 |\n\n- Ratio 2.0x" in first and "- Machine: x\n\n| a | b |" in first
    doc.write_text(first + "\n# Later section by hand\n")
    report.update(doc, report.section({"import_vs_dlt": _result("bbb2222")}, ""))
    second = doc.read_text()
    assert "aaa1111" not in second and "bbb2222" in second and second.count(report.BEGIN) == 1
    assert second.startswith("# Hand-written\n\nanalysis stays\n") and second.endswith("\n# Later section by hand\n")
