"""Shared fixtures. Prefect is configured for privacy (no result persistence) and pointed at a throwaway
PREFECT_HOME before anything imports it; flow tests share one `prefect_test_harness` server per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from o365sync.prefect_env import configure_prefect_env
from simulators.graph import GraphSimulator
from simulators.tls import SimulatorTLS, create_tls
from simulators.tokens import TokenAuthority
from simulators.world import SimUser, World, generate_world

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


# Graph simulator + client tests: one small world and one running simulator per module, reset between tests.
@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(tenants=1, users_per_tenant=2, messages_per_user=300)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SimulatorTLS:
    return create_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tokens() -> TokenAuthority:
    return TokenAuthority()


@pytest.fixture(scope="module")
def running_sim(world: World, tls: SimulatorTLS, tokens: TokenAuthority) -> Iterator[GraphSimulator]:
    with GraphSimulator(world, tls, tokens) as s:
        yield s


@pytest.fixture()
def sim(running_sim: GraphSimulator) -> GraphSimulator:
    running_sim.reset()
    return running_sim


@pytest.fixture(scope="module")
def http(tls: SimulatorTLS) -> Iterator[httpx.Client]:
    with httpx.Client(verify=tls.client_context(), trust_env=False, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def user(world: World) -> SimUser:
    return world.tenants[0].users[0]
