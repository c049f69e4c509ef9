"""pytest fixtures for tests against the simulated Microsoft 365 + CRM world (docs/SIMULATORS.md).

Installed with the package as a `pytest11` entry point, so any project that depends on o365sync gets them; a test
module or conftest overrides one by defining a fixture of the same name (e.g. its own `world`). Module-scoped
servers keep a test module fast; `sim` resets the Graph simulator's faults and request log before each test.
Nothing here imports the product: the simulators are a test kit of their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from simulators.graph import GraphSimulator
from simulators.running import RunningWorld, start_world
from simulators.tls import SimulatorTLS, create_tls
from simulators.tokens import TokenAuthority
from simulators.world import SimUser, World, generate_world


@pytest.fixture(scope="module")
def world() -> World:
    """One tenant, two users with 300 messages each; seed 7, so every run builds the same mail and CRM."""
    return generate_world(tenants=1, users_per_tenant=2, messages_per_user=300)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SimulatorTLS:
    """A throwaway CA and a loopback server certificate signed by it."""
    return create_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tokens() -> TokenAuthority:
    """Issues and checks the simulators' access tokens (`issue_access_token`, `revoke_access_tokens(oid)`)."""
    return TokenAuthority()


@pytest.fixture(scope="module")
def running_sim(world: World, tls: SimulatorTLS, tokens: TokenAuthority) -> Iterator[GraphSimulator]:
    """The Graph simulator serving `world` over loopback HTTPS for the whole module."""
    with GraphSimulator(world, tls, tokens) as sim:
        yield sim


@pytest.fixture()
def sim(running_sim: GraphSimulator) -> GraphSimulator:
    """The running Graph simulator with faults, counters and request log reset (the world is not reset)."""
    running_sim.reset()
    return running_sim


@pytest.fixture(scope="module")
def http(tls: SimulatorTLS) -> Iterator[httpx.Client]:
    """An httpx client that trusts the simulators' CA and ignores proxy/CA environment variables."""
    with httpx.Client(verify=tls.client_context(), trust_env=False, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def user(world: World) -> SimUser:
    """The first user of the first tenant."""
    return world.tenants[0].users[0]


@pytest.fixture(scope="module")
def running_world(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWorld]:
    """Every simulator (identity platform, Graph, Salesforce, HubSpot, Pipedrive) serving `world`; its own TLS."""
    with start_world(world, tmp_path_factory.mktemp("world-tls")) as running:
        yield running
