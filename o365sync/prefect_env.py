"""Prefect settings the product relies on, applied before Prefect is imported.

Prefect stores flow parameters, logs, artifacts, exception messages and (if enabled) task results in its
database/storage; mail content must never reach any of them, so result persistence and caching are off by
default, and telemetry is off because this runs offline. Explicit environment values win.

Prefect's home (its database in ephemeral mode, the local result storage where a failed flow's exception would be
pickled, its logs) is `<data dir>/prefect`, inside the data dir and private like the rest of it, unless
PREFECT_HOME is set. Profiles are still read from where Prefect keeps them by default (`~/.prefect/profiles.toml`),
so a `prefect config set PREFECT_API_URL=...` keeps working.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVACY_DEFAULTS = {
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
    "PREFECT_TASKS_DEFAULT_NO_CACHE": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Fresh ephemeral databases run migrations that can exceed the 20 s default on 2 cores (18-23 s measured).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # SQLite server ingest is the bottleneck (measured); batch it.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "500",
}


def prefect_home_for(data_dir: Path) -> Path:
    return (data_dir / "prefect").resolve()


def configure_prefect_env(prefect_home: str | None = None) -> None:
    for key, value in PRIVACY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if prefect_home and "PREFECT_HOME" not in os.environ:
        os.environ.setdefault("PREFECT_PROFILES_PATH", str(Path.home() / ".prefect" / "profiles.toml"))
        os.environ["PREFECT_HOME"] = prefect_home
        with contextlib.suppress(OSError):  # Prefect creates only the last level (and warns if it cannot)
            Path(prefect_home).mkdir(parents=True, exist_ok=True)
