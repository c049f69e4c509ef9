"""The local PostgreSQL-backed Prefect server (deployments/postgres.py): the server's database really is the private
cluster (rows written through the API are in PostgreSQL), retention is configured (flow runs, logs and events are
vacuumed), and both can be restarted (PostgreSQL as if it crashed) without losing what was stored."""

from __future__ import annotations

import httpx
import pytest

from deployments.postgres import LocalPostgres, postgres_bin_dir

pytestmark = pytest.mark.slow  # starts PostgreSQL and a Prefect server


def _flow_run_count(stack) -> int:
    return int(stack.pg.query("SELECT count(*) FROM flow_run"))


def test_the_server_stores_in_postgres_with_retention_and_survives_a_restart(prefect_on_postgres):
    from prefect import get_client

    from deployments.prefect_server import use_api

    stack = prefect_on_postgres
    assert stack.pg.url.startswith("postgresql+asyncpg://prefect:") and f":{stack.pg.port}/prefect" in stack.pg.url
    settings = httpx.get(f"{stack.api_url}/admin/settings", timeout=10).json()
    vacuum = settings["server"]["services"]["db_vacuum"]
    assert set(vacuum["enabled"]) == {"events", "flow_runs"}
    assert vacuum["retention_period"] == "P14D"
    assert settings["server"]["events"]["retention_period"] == "P2D"
    assert "pg_trgm" in stack.pg.query("SELECT extname FROM pg_extension").split()

    before = _flow_run_count(stack)
    with use_api(stack.api_url), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("pg-check")
    created = httpx.post(
        f"{stack.api_url}/flow_runs/", json={"flow_id": str(flow_id), "name": "stored-in-postgres"}, timeout=10
    ).json()
    assert _flow_run_count(stack) == before + 1

    stack.restart(immediate=True)  # PostgreSQL killed as if it crashed, the server stopped; both started again
    assert httpx.get(f"{stack.api_url}/health", timeout=10).status_code == 200
    with use_api(stack.api_url), get_client(sync_client=True) as client:
        assert client.read_flow_run(created["id"]).name == "stored-in-postgres"


def test_postgres_binaries_are_found_and_a_second_start_reuses_the_cluster(tmp_path):
    assert (postgres_bin_dir() / "postgres").exists()
    pg = LocalPostgres()
    try:
        pg.start()
        pg.query("CREATE TABLE kept (n int)")
        pg.stop()
        assert not pg.running
        pg.start()  # same directory, same port: the data is still there
        assert pg.query("SELECT count(*) FROM kept") == "0"
    finally:
        pg.close()
    assert not pg.root.exists()
