"""Helpers that stand the whole product up against a simulated world, for end-to-end tests."""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.demo import register_and_connect
from o365sync.settings import Settings, load_settings
from o365sync.store import open_store
from simulators.running import RunningWorld, start_world
from simulators.world import World


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Product:
    settings: Settings
    running: RunningWorld
    world: World


def stand_up(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    crm_kind: str = "salesforce",
    features: list[str] | None = None,
    explicit_consent: bool = False,
    **env: str,
) -> Product:
    """Start the simulators, point the product at them by settings only, register every tenant, connect users."""
    port = free_port()
    redirect = f"http://localhost:{port}/auth/callback"
    running = start_world(world, tmp_path / "tls", redirect_uris=[redirect])
    for key, value in {**running.settings_env(tmp_path / "data", redirect), **env}.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    for tenant in world.tenants:
        register_and_connect(
            settings, running, tenant, port, crm_kind=crm_kind, features=features, explicit_consent=explicit_consent
        )
    return Product(settings, running, world)


def stand_up_with_crm(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> Iterator[Product]:
    """For a fixture to `yield from`: the product stood up (`stand_up` with `options`) and the first tenant's CRM
    snapshot taken; the simulators stop when the test is done."""
    from tasks.crm_snapshot import refresh_crm_snapshot

    p = stand_up(world, tmp_path, monkeypatch, **options)
    try:
        refresh_crm_snapshot(p.settings, world.tenants[0].tid)
        yield p
    finally:
        p.running.stop()


def stored_matches(settings: Settings, tenant_id: str) -> dict[tuple[str, str], frozenset[str]]:
    with open_store(settings, tenant_id, write=False) as con:
        rows = con.execute("SELECT user_oid, graph_id, crm_id FROM email_crm_matches").fetchall()
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for oid, gid, crm_id in rows:
        out[(oid, gid)].add(crm_id)
    return {k: frozenset(v) for k, v in out.items()}


def table_counts(settings: Settings, tenant_id: str) -> dict[str, int]:
    with open_store(settings, tenant_id, write=False) as con:
        return {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in ("emails", "email_participants", "email_crm_matches")
        }


def expected_for_crm(world, tid: str, running, crm_kind: str) -> dict:
    """The ground truth in the CRM's own ids (HubSpot and Pipedrive number records themselves). Pipedrive has no
    domain field: only organizations whose website the simulator exposes can match by domain."""
    import copy

    from simulators.pipedrive import website_exposed

    if crm_kind == "pipedrive":
        world = copy.copy(world)
        crm = copy.deepcopy(world.crm[tid])
        for account in crm.accounts:
            if not website_exposed(account.id):
                account.website = None
        world.crm = {**world.crm, tid: crm}
    expected = world.expected_matches(tid)
    if crm_kind == "hubspot":
        return {k: frozenset(running.hubspot.hs_id(tid, i) for i in v) for k, v in expected.items()}
    if crm_kind == "pipedrive":
        ids = running.pipedrive.ids[tid]
        flat = {w: str(n) for kind in ("persons", "organizations") for w, n in ids[kind].items()}
        return {k: frozenset(flat[i] for i in v) for k, v in expected.items()}
    return expected


def latest_artifact_rows(key: str) -> list[dict]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data
