"""Stdlib-only measuring helpers shared by the benchmark's child processes (imported first, before anything heavy, so
the post-import RSS baseline is the variant's own). A child imports this, then its variant's modules, calls
`imports_done(T_START)`, and reports each measurement with `emit_measured(meter, ...)` (or `emit(...)`): every line
carries the import time and the RSS after imports."""

from __future__ import annotations

import json
import resource
import time


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    """Current resident set size of this process (VmRSS), MB."""
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """This process's own RSS high-water mark (VmHWM, per address space, so it starts afresh at exec), MB."""
    return _status_mb("VmHWM:")


def maxrss_mb() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss, MB. On Linux it is NOT the child's own peak when the parent is big: at
    fork the child's address space counts the parent's resident pages, and execve() keeps that high-water mark in
    the process's signal struct, so ru_maxrss >= the parent's RSS at spawn time. Reported for transparency only."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Taken at import of this module (the child's first import), before the variant imports anything heavy.
MAXRSS_AT_START_MB = maxrss_mb()
HWM_AT_START_MB = peak_rss_mb()
_AFTER_IMPORTS: dict[str, float] = {}


def imports_done(started: float) -> None:
    """Mark the end of the variant's imports, begun at perf_counter() `started` (the child's first line): every
    later result line says how long they took (`import_s`) and the RSS they left (`rss_after_import_mb`)."""
    _AFTER_IMPORTS.update(import_s=time.perf_counter() - started, rss_after_import_mb=rss_mb())


def cpu_s() -> float:
    """User + system CPU of this process, all threads (DuckDB's and dlt's worker threads included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Meter:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.c0 = cpu_s()

    def done(self) -> tuple[float, float]:
        return time.perf_counter() - self.t0, cpu_s() - self.c0


def emit(**fields: object) -> None:
    """One machine-readable line for the parent (the only stdout line it parses)."""
    for name, value in _AFTER_IMPORTS.items():
        fields.setdefault(name, value)
    fields.setdefault("ru_maxrss_mb", maxrss_mb())
    fields.setdefault("ru_maxrss_at_start_mb", MAXRSS_AT_START_MB)
    fields.setdefault("vmhwm_at_start_mb", HWM_AT_START_MB)
    print("RESULT " + json.dumps(fields), flush=True)


def emit_measured(meter: Meter, **fields: object) -> None:
    """`emit` with the meter's wall and CPU time so far (`wall_s`, `cpu_s`) and this process's peak RSS
    (`peak_rss_mb`)."""
    wall, cpu = meter.done()
    emit(wall_s=wall, cpu_s=cpu, peak_rss_mb=peak_rss_mb(), **fields)
