"""Workers and `serve` against a real Prefect API (the session's test server): a process worker started elsewhere,
without any O365SYNC_* variable, runs the deployments `python -m deployments.register` made from a repo's `.env`;
a run that cannot find its tenant fails with one line naming the data dir it searched; the Prefect UI shows the
tenant's display name; and `serve` and workers refuse to run tenants the other one runs."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deployments.dispatch import job_kind_name
from deployments.ownership import DeploymentOwnerConflict, refuse_foreign
from deployments.prefect_server import _prefect_executable
from deployments.register import main as register_main
from deployments.register import register_deployments
from deployments.schedules import build_deployments, deployment_name
from o365sync.settings import load_settings
from o365sync.tenants import TenantConfig, save_tenant
from tests.product import latest_artifact_rows

pytestmark = pytest.mark.slow  # every test here runs Prefect flows or takes seconds


@pytest.fixture()
def api_url(prefect_server, monkeypatch) -> str:
    """The test server's API URL, also in the environment (as an operator's shell would have it)."""
    from prefect.settings import get_current_settings

    url = str(get_current_settings().api.url)
    monkeypatch.setenv("PREFECT_API_URL", url)
    return url


def _tenant(settings, name: str = "", features=("email", "teams")) -> str:
    tid = f"t-{uuid.uuid4().hex[:12]}"
    save_tenant(settings, TenantConfig(id=tid, name=name, domains=[f"{tid}.example.com"], features=list(features)))
    return tid


def _process_pool() -> str:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    pool = f"pool-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
        )
    return pool


def test_a_worker_started_elsewhere_runs_what_register_made_from_the_repos_env(api_url, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

    from flows._reporting import artifact_key

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".env").write_text("O365SYNC_DATA_DIR=data\n")  # relative: only right from the repo directory
    monkeypatch.chdir(repo)
    settings = load_settings()
    assert settings.data_dir == Path("data")
    tid = _tenant(settings, name="Contoso Ltd")
    pool = _process_pool()
    assert register_main(["--work-pool", pool]) == 0

    elsewhere = tmp_path / "elsewhere"  # the worker's directory has no .env and no ./data
    elsewhere.mkdir()
    other_dir = tmp_path / "other-data"
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(job_kind_name("teams-refresh"))
        env = dep.job_variables["env"]
        assert env["O365SYNC_DATA_DIR"] == str((repo / "data").resolve())
        assert env["PREFECT_HOME"] == str((repo / "data" / "prefect").resolve())  # nothing of a run outside it
        assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "false" and dep.job_variables["working_dir"] == str(repo)
        assert not any("SECRET" in k or "KEY" in k for k in env)
        good = client.create_flow_run_from_deployment(dep.id, parameters={"tenant_id": tid})
        retention = client.read_deployment_by_name(job_kind_name("retention"))
        lost = client.create_flow_run_from_deployment(
            retention.id,
            parameters={"tenant_id": tid},
            job_variables={
                "env": {  # as a worker elsewhere
                    "O365SYNC_DATA_DIR": str(other_dir)
                }
            },
        )

    worker_env = {k: v for k, v in os.environ.items() if not k.startswith("O365SYNC_")}
    worker = subprocess.run(
        [*_prefect_executable(), "worker", "start", "--pool", pool, "--run-once", "--limit", "2"],
        cwd=elsewhere,
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

    with get_client(sync_client=True) as client:
        good_run, lost_run = (client.read_flow_run(r.id) for r in (good, lost))
        assert good_run.state.is_completed(), (good_run.state, worker.stdout[-3000:])
        assert good_run.name == "teams-refresh: Contoso Ltd"
        assert lost_run.state.is_failed()
        message = lost_run.state.message
        assert f"tenant {tid} is not registered in data dir {other_dir}" in message and "\n" not in message
        assert lost_run.name == f"retention: {tid}"  # the name falls back to the id; naming never fails a run
        assert (
            client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[good.id])), task_run_filter=TaskRunFilter()
            )
            == []
        )  # nobody connected yet
        (artifact,) = client.read_artifacts(limit=1, flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[good.id])))
    assert artifact.key == artifact_key("teams-refresh", tid)
    assert artifact.description == f"teams-refresh of Contoso Ltd ({tid}): per-user status and counts"
    assert latest_artifact_rows(artifact.key) == []
    assert not (elsewhere / "data").exists()


def test_serve_refuses_deployments_workers_manage_and_register_refuses_served_ones(api_url, tmp_path, monkeypatch):
    from prefect import get_client

    from app.cli import app

    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    _tenant(settings)
    pool = _process_pool()
    register_deployments(settings, pool, dispatchers_paused=True)

    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1, result.output
    assert f"deployments dispatch/calendar-sync and 3 more are registered for workers (work pool '{pool}'" in " ".join(
        result.output.split()
    )
    assert "Traceback" not in result.output
    with get_client(sync_client=True) as client:  # nothing was taken over
        assert client.read_deployment_by_name("dispatch/email-sync").work_pool_name == pool
        for d in client.read_deployments():  # the dispatchers go: serve on this server is what is tested next
            if d.work_pool_name == pool:
                client.delete_deployment(d.id)

    # the other way round: what serve applied (no work pool) is not registered for workers
    served_tid = _tenant(settings)
    served = [d for d in build_deployments(settings) if d.parameters["tenant_id"] == served_tid]
    for d in served:
        d.apply()
    refuse_foreign(served, None)  # serve restarting over its own deployments is fine
    with pytest.raises(DeploymentOwnerConflict, match=r"managed by `o365sync serve` \(no work pool\)"):
        register_deployments(settings, pool)
    with get_client(sync_client=True) as client:
        assert (
            client.read_deployment_by_name(f"email-sync/{deployment_name('email-sync', served_tid)}").work_pool_name
            is None
        )
    assert register_main(["--work-pool", pool]) == 1
    with get_client(sync_client=True) as client:
        for d in served:
            client.delete_deployment(client.read_deployment_by_name(d.full_name).id)


def test_the_prefect_ui_names_runs_tasks_and_artifacts_after_the_tenant_and_users(
    prefect_server, tmp_path, monkeypatch
):
    """A real email-sync and teams-refresh against the simulated world: flow-run names and artifact descriptions
    carry the tenant's display name, per-user task runs the user's display name next to the object id."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    from flows.email_sync import email_sync
    from flows.teams import teams_refresh
    from simulators.world import generate_world
    from tests.product import stand_up

    world = generate_world(seed=31, users_per_tenant=2, messages_per_user=5, contacts_per_tenant=6, calendars=True)
    product = stand_up(world, tmp_path, monkeypatch, features=["email", "teams"])
    tenant = world.tenants[0]
    assert tenant.name and tenant.name != tenant.tid
    try:
        runs = {
            "email-sync": email_sync(tenant.tid, return_state=True),
            "teams-refresh": teams_refresh(tenant.tid, return_state=True),
        }
    finally:
        product.running.stop()
    expected_tasks = {"email-sync": "sync-mailbox", "teams-refresh": "refresh-teams-channels"}
    with get_client(sync_client=True) as client:
        for kind, state in runs.items():
            assert state.is_completed(), state
            run_id = state.state_details.flow_run_id
            assert client.read_flow_run(run_id).name == f"{kind}: {tenant.name}"
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
            assert artifacts and all(f"of {tenant.name} ({tenant.tid})" in a.description for a in artifacts)
            expected = {f"{expected_tasks[kind]}-{u.oid} {u.display_name}" for u in tenant.users}
            deadline = time.monotonic() + 60  # task runs reach the API as events, recorded in batches
            while True:
                names = {
                    t.name
                    for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
                }
                if expected <= names or time.monotonic() > deadline:
                    break
            assert expected <= names, names
