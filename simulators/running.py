"""Start the whole simulated world (identity platform, Graph, Salesforce, HubSpot, Pipedrive) and describe how
to point the product at it. Used by `o365sync demo`, `o365sync simulate`, the tests and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from simulators.graph import GraphSimulator
from simulators.hubspot import HubSpotSimulator
from simulators.identity import IdentitySimulator
from simulators.pipedrive import PipedriveSimulator
from simulators.salesforce import SalesforceSimulator
from simulators.tls import SimulatorTLS, create_tls
from simulators.tokens import TokenAuthority
from simulators.world import World

SIM_CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SIM_CLIENT_SECRET = "sim-client-secret"


@dataclass
class RunningWorld:
    world: World
    tls: SimulatorTLS
    tokens: TokenAuthority
    identity: IdentitySimulator
    graph: GraphSimulator
    salesforce: SalesforceSimulator
    hubspot: HubSpotSimulator
    pipedrive: PipedriveSimulator

    def settings_env(self, data_dir: Path, redirect_uri: str) -> dict[str, str]:
        """The O365SYNC_* settings that point the product at this world (nothing else changes)."""
        return {
            "O365SYNC_DATA_DIR": str(data_dir),
            "O365SYNC_AUTHORITY_URL": self.identity.base_url,
            "O365SYNC_GRAPH_URL": self.graph.base_url,
            "O365SYNC_CA_BUNDLE": str(self.tls.ca_pem),
            "O365SYNC_CLIENT_ID": SIM_CLIENT_ID,
            "O365SYNC_CLIENT_SECRET": SIM_CLIENT_SECRET,
            "O365SYNC_REDIRECT_URI": redirect_uri,
        }

    def stop(self) -> None:
        for server in (self.identity, self.graph, self.salesforce, self.hubspot, self.pipedrive):
            server.stop()

    def __enter__(self) -> RunningWorld:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_world(
    world: World,
    tls_dir: Path,
    redirect_uris: list[str] | None = None,
    graph_latency_s: float = 0.0,
    graph_class: type[GraphSimulator] = GraphSimulator,
) -> RunningWorld:
    tls = create_tls(tls_dir)
    tokens = TokenAuthority()
    clients = None if redirect_uris is None else {SIM_CLIENT_ID: (SIM_CLIENT_SECRET, redirect_uris)}
    identity = IdentitySimulator(world, tls, tokens, clients=clients).start()
    graph = graph_class(world, tls, tokens)
    if graph_latency_s:
        graph.latency_s = graph_latency_s
    graph.start()
    salesforce = SalesforceSimulator(world, tls).start()
    hubspot = HubSpotSimulator(world, tls).start()
    pipedrive = PipedriveSimulator(world, tls).start()
    return RunningWorld(world, tls, tokens, identity, graph, salesforce, hubspot, pipedrive)
