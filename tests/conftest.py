"""Shared fixtures. Prefect is configured for privacy (no result persistence) and pointed at a throwaway
PREFECT_HOME before anything imports it; flow tests share one `prefect_test_harness` server per session.
The simulator fixtures (`world`, `tls`, `tokens`, `running_sim`, `sim`, `http`, `user`, `running_world`) come from
the package's pytest plugin, simulators/pytest_plugin.py (docs/SIMULATORS.md)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from o365sync.prefect_env import configure_prefect_env

# Loaded by its `pytest11` entry point when the package is installed; named here too so that the suite also runs
# with plugin autoloading off (PYTEST_DISABLE_PLUGIN_AUTOLOAD). The entry point has this module's name, so pytest
# registers it once.
pytest_plugins = ["simulators.pytest_plugin"]

PREFECT_HOME = Path(tempfile.mkdtemp(prefix="o365sync-prefect-home-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
configure_prefect_env()
for key in [k for k in os.environ if k.startswith("O365SYNC_")]:
    del os.environ[key]  # tests configure the product explicitly


@pytest.fixture(scope="session")
def prefect_server():
    """A real (temporary) Prefect API for flow tests; yields the harness's database URL."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = get_current_settings().server.database.connection_url
        yield url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)


@pytest.fixture(scope="session")
def prefect_on_postgres():
    """A private PostgreSQL cluster and a real `prefect server start` on it (`deployments.postgres.prefect_stack`),
    shared by the session; yields the `PrefectStack`. Tests point their client at it with
    `deployments.prefect_server.use_api(stack.api_url)`. Needs PostgreSQL installed (`.ci/run` installs it)."""
    from deployments.postgres import prefect_stack

    with prefect_stack() as stack:
        yield stack
