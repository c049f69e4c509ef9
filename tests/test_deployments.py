"""Scheduling: per-tenant deployments from the registry, prefect.yaml, `o365sync serve`, and one real local Prefect
server that registers the deployments and enforces the per-tenant concurrency (no flow is run)."""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from deployments.prefect_server import PrefectApiError, _pick_port
from deployments.schedules import (
    CALENDAR_SYNC,
    EMAIL_SYNC,
    RETENTION,
    SYNC_INTERVAL_S,
    TEAMS_REFRESH,
    build_deployments,
    deployment_name,
    schedule_anchor,
    schedule_offset_s,
)
from deployments.serve import describe
from deployments.user_import import user_import_deployments
from o365sync.settings import load_settings
from o365sync.tenants import TenantConfig, save_tenant

ROOT = Path(__file__).resolve().parent.parent
BANNED = set("/%&<>")


def _email_flow():
    """The lead's `flows.email_sync.email_sync` when present; until then `initial_import` stands in (same
    `tenant_id: str` signature), so the deployment wiring is tested either way."""
    try:
        from flows.email_sync import email_sync
    except ImportError:
        from flows.initial_import import initial_import

        return initial_import
    return email_sync


@pytest.fixture()
def settings(tmp_path):
    s = load_settings(data_dir=tmp_path / "data")
    save_tenant(s, TenantConfig(id="6513270e-269e-4d37-b2a7-4de452e6b438", domains=["contoso.com"]))
    save_tenant(s, TenantConfig(id="fabrikam", domains=["fabrikam.com"], features=[]))
    return s


@pytest.fixture()
def every_deployment(settings):
    """(tenant id, deployments) of a tenant with every feature: all five deployments."""
    tid = "6513270e-269e-4d37-b2a7-4de452e6b438"
    save_tenant(settings, TenantConfig(id=tid, domains=["contoso.com"], features=["email", "calendar", "teams"]))
    flow = _email_flow()
    return tid, build_deployments(
        settings, email_flow=flow, import_flow=flow, calendar_flow=flow, teams_flow=flow, retention_flow=flow
    )


def test_one_scheduled_sync_and_one_manual_import_per_email_tenant(settings):
    tid = "6513270e-269e-4d37-b2a7-4de452e6b438"
    sync, manual, calendar, retention = build_deployments(
        settings, email_flow=_email_flow(), calendar_flow=_email_flow(), retention_flow=_email_flow()
    )  # fabrikam has no email feature
    assert retention.name == f"retention-{tid}" and retention.schedules[0].schedule.interval == timedelta(days=1)
    assert calendar.name == f"calendar-sync-{tid}" and calendar.parameters == {"tenant_id": tid}
    (hourly,) = calendar.schedules
    assert hourly.schedule.interval == timedelta(seconds=3600)
    assert str(calendar.concurrency_options.collision_strategy.value) == "CANCEL_NEW"

    assert sync.name == f"email-sync-{tid}" and manual.name == f"initial-import-{tid}"
    for d in (sync, manual):
        assert d.parameters == {"tenant_id": tid}
        assert tid in d.tags
        assert d.concurrency_limit == 1
        assert d.entrypoint.startswith("flows.") and ":" not in d.entrypoint  # module path: any working directory
    assert "email-sync" in sync.tags and "initial-import" in manual.tags

    (schedule,) = sync.schedules
    assert schedule.active
    assert schedule.schedule.interval == timedelta(seconds=900)
    assert schedule.schedule.timezone == "UTC"
    offset = (schedule.schedule.anchor_date - datetime(2026, 1, 1, tzinfo=UTC)).total_seconds()
    assert offset == schedule_offset_s(tid)
    assert str(sync.concurrency_options.collision_strategy.value) == "CANCEL_NEW"

    assert not manual.schedules  # on demand only
    assert str(manual.concurrency_options.collision_strategy.value) == "ENQUEUE"


def test_no_email_tenant_means_nothing_to_serve(tmp_path, monkeypatch):
    settings = load_settings(data_dir=tmp_path)
    assert build_deployments(settings) == []
    save_tenant(settings, TenantConfig(id="fabrikam", domains=["fabrikam.com"], features=[]))
    assert build_deployments(settings) == []

    from app.cli import app

    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1
    assert "No tenant with the email feature" in result.output
    assert not (tmp_path / "prefect").exists()  # no server was started


def test_start_offsets_are_deterministic_and_spread():
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(200)]
    offsets = [schedule_offset_s(t) for t in ids]
    assert offsets == [schedule_offset_s(t) for t in ids]
    assert all(0 <= o < SYNC_INTERVAL_S for o in offsets)
    # 200 tenants over 900 s: no second holds more than a handful, and every 5-minute third gets some
    assert max(offsets.count(o) for o in offsets) <= 4
    assert {o // 300 for o in offsets} == {0, 1, 2}


TENANT_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
RECURRING = {EMAIL_SYNC: 900, CALENDAR_SYNC: 3600, TEAMS_REFRESH: 86400, RETENTION: 86400}


@given(TENANT_IDS)
@hyp_settings(max_examples=500, deadline=None)
def test_hourly_and_daily_runs_never_start_on_the_same_second_as_the_email_sync(tenant_id):
    """Every interval is a multiple of 15 minutes: a start at offset o recurs at o mod 900 in every quarter hour,
    so two kinds start on the same second some day iff their offsets agree mod 900."""
    offsets = {kind: schedule_offset_s(tenant_id, kind, interval) for kind, interval in RECURRING.items()}
    assert all(0 <= offsets[kind] < interval for kind, interval in RECURRING.items())
    assert len({o % SYNC_INTERVAL_S for o in offsets.values()}) == len(RECURRING)
    assert offsets[EMAIL_SYNC] == schedule_offset_s(tenant_id)


def test_hourly_and_daily_starts_spread_over_tenants_and_the_deployments_use_them(every_deployment):
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(400)]
    calendar = [schedule_offset_s(t, CALENDAR_SYNC, 3600) for t in ids]
    assert {o // 900 for o in calendar} == {0, 1, 2, 3}  # every quarter of the hour
    for kind in (TEAMS_REFRESH, RETENTION):
        daily = [schedule_offset_s(t, kind, 86400) for t in ids]
        assert len({o // 3600 for o in daily}) == 24 and max(daily.count(o) for o in daily) <= 3

    tid, built = every_deployment
    anchors = {d.name: d.schedules[0].schedule.anchor_date for d in built if d.schedules}
    assert anchors == {deployment_name(k, tid): schedule_anchor(tid, k, i) for k, i in RECURRING.items()}


def test_the_serve_table_shows_each_deployments_own_interval_and_next_starts(every_deployment):
    tid, built = every_deployment
    now = datetime(2026, 3, 4, 10, 0, 0, tzinfo=UTC)
    rows = {name.split("/")[1]: when for _, name, when in describe(built, now=now)}

    def starts(kind, interval, count=3):
        first = now + timedelta(seconds=(schedule_offset_s(tid, kind, interval) - now.timestamp()) % interval)
        return [first + timedelta(seconds=k * interval) for k in range(count)]

    fmt = lambda t: t.strftime("%H:%M:%S" if t.date() == now.date() else "%b %d %H:%M:%S")  # noqa: E731
    for kind, label in (
        (EMAIL_SYNC, "every 15 min"),
        (CALENDAR_SYNC, "hourly"),
        (TEAMS_REFRESH, "daily"),
        (RETENTION, "daily"),
    ):
        expected = f"{label}, next {', '.join(fmt(t) for t in starts(kind, RECURRING[kind]))} UTC"
        assert rows[deployment_name(kind, tid)] == expected
    assert rows[deployment_name("initial-import", tid)] == "on demand"
    assert "Mar 05" in rows[deployment_name(RETENTION, tid)] and "Mar 06" in rows[deployment_name(RETENTION, tid)]


def _port_in_time_wait() -> int:
    """A loopback port whose only socket is the server side of a closed connection in TIME_WAIT (the state a
    restarted `serve` finds its last port in): the accepted socket closes first, then the client."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()
        assert client.recv(1) == b""  # our FIN arrived; the client's FIN below moves us to TIME_WAIT
        client.close()
    deadline = time.monotonic() + 5
    while "06" not in _tcp_states(port):  # the kernel's table, read until it shows TIME_WAIT (no sleep)
        assert time.monotonic() < deadline, _tcp_states(port)
    return port


def _tcp_states(port: int) -> list[str]:
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [f[3] for f in (row.split() for row in rows) if int(f[1].rsplit(":", 1)[1], 16) == port]


def test_a_port_in_time_wait_is_free_for_the_server():
    said: list[str] = []
    port = _port_in_time_wait()
    assert _pick_port(port, said.append) == port
    assert _pick_port(None, said.append, default=port) == port
    assert said == []


def test_a_port_another_program_listens_on_is_refused_or_announced():
    said: list[str] = []
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(PrefectApiError, match=f"port {port} on 127.0.0.1 is in use by another program"):
            _pick_port(port, said.append)
        chosen = _pick_port(None, said.append, default=port)
    assert chosen != port
    assert said == [
        f"Port {port} on 127.0.0.1 is in use by another program, so the Prefect UI is on port {chosen} "
        f"for this run (free port {port}, or pass --port)."
    ]


@pytest.mark.parametrize(
    "tenant_id",
    [
        "a/b",
        "x%y",
        "<script>&",
        "tenant.py",
        "..",
        "",
        " ",
        "ünïcode",
        "a" * 300,
        "-lead",
        "a b",
    ],
)
def test_any_tenant_id_gives_a_valid_distinct_deployment_name(tenant_id, settings):
    name = deployment_name("email-sync", tenant_id)
    assert not BANNED & set(name) and not name.endswith(".py")
    assert re.fullmatch(r"email-sync-[A-Za-z0-9._-]+", name) and len(name) <= 80
    assert name != deployment_name("email-sync", tenant_id + "x")
    # the registry refuses such ids; built from an unvalidated config anyway, Prefect accepts the names
    bad = TenantConfig.model_construct(id=tenant_id, domains=["x.com"], features=["email"])
    names = [
        d.name
        for d in build_deployments(settings, email_flow=_email_flow(), tenants=[bad], retention_flow=_email_flow())
    ]
    assert names == [name, deployment_name("initial-import", tenant_id), deployment_name("retention", tenant_id)]


def test_registry_ids_are_used_verbatim():
    assert (
        deployment_name("email-sync", "6513270e-269e-4d37-b2a7-4de452e6b438")
        == "email-sync-6513270e-269e-4d37-b2a7-4de452e6b438"
    )
    assert deployment_name("email-sync", "contoso.onmicrosoft.com") == "email-sync-contoso.onmicrosoft.com"


def _load_prefect_yaml(text: str):
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(text)
    return raw, PrefectYamlModel.model_validate(raw)


def test_prefect_yaml_has_a_15_minute_cancel_new_email_sync_and_keeps_initial_import():
    from prefect.cli.deploy._models import ConcurrencyLimitSpec, RawScheduleConfig

    text = (ROOT / "prefect.yaml").read_text()
    _, model = _load_prefect_yaml(text)
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {
        "initial-import",
        "email-sync",
        "calendar-sync",
        "teams-refresh",
        "retention",
        "offboard-user",
        "end-subscription",
    }
    assert by_name["retention"].schedules[0].interval == timedelta(days=1)
    assert by_name["calendar-sync"].schedules[0].interval == timedelta(seconds=3600)
    assert by_name["calendar-sync"].concurrency_limit.collision_strategy == "CANCEL_NEW"
    assert by_name["initial-import"].entrypoint == "flows/initial_import.py:initial_import"

    sync = by_name["email-sync"]
    assert sync.entrypoint == "flows/email_sync.py:email_sync"
    (schedule,) = sync.schedules
    assert isinstance(schedule, RawScheduleConfig) and schedule.interval == timedelta(seconds=900)
    assert isinstance(sync.concurrency_limit, ConcurrencyLimitSpec)
    assert (sync.concurrency_limit.limit, sync.concurrency_limit.collision_strategy) == (1, "CANCEL_NEW")
    assert sync.work_pool.name == "o365sync" and sync.paused  # a template without tenant_id never runs alone

    # the per-tenant recipe documented in the file's comments parses and inherits schedule + concurrency
    recipe = re.search(r"^#   - <<: \*email-sync\n(?:#     .*\n)+", text, re.M).group(0)
    tenant_entry = "\n".join(line[2:] for line in recipe.splitlines()).replace("<tenant-id>", "t-1")
    _, model = _load_prefect_yaml(text + tenant_entry + "\n")
    copy = {d.name: d for d in model.deployments}["email-sync-t-1"]
    assert copy.parameters == {"tenant_id": "t-1"} and copy.paused is False
    assert copy.schedules == sync.schedules and copy.concurrency_limit == sync.concurrency_limit


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_local_server_registers_the_deployments_and_cancels_overlapping_syncs(tmp_path, monkeypatch):
    """The one integration test: a real `prefect server start` (fresh SQLite: ~20-40 s on 2 cores)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Cancelled, Pending

    from deployments.prefect_server import ensure_prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = load_settings(data_dir=tmp_path / "data")
    tenants = ["tenant-a", "tenant-b"]
    for t in tenants:
        save_tenant(settings, TenantConfig(id=t, domains=[f"{t}.example.com"]))
    deployments = build_deployments(settings, email_flow=_email_flow())
    flow_name = _email_flow().name

    port = _port_in_time_wait()  # a restart finds its port like this: the UI must stay there
    started = time.monotonic()
    pid = None
    with ensure_prefect_api(settings, port=port, startup_timeout_s=300, echo=None) as api:
        ready_s = time.monotonic() - started
        pid = api.pid
        assert api.local and _alive(pid)
        assert api.ui_url == f"http://127.0.0.1:{port}"
        assert os.environ["PREFECT_API_URL"] == api.api_url
        assert api.prefect_home == (tmp_path / "data" / "prefect").resolve()
        assert (api.prefect_home / "prefect.db").exists()
        assert httpx.get(api.ui_url, timeout=30, trust_env=False).status_code == 200  # the UI is served

        for d in deployments:
            d.apply()
        with get_client(sync_client=True) as client:
            syncs = {t: client.read_deployment_by_name(f"{flow_name}/email-sync-{t}") for t in tenants}
            for t, dep in syncs.items():
                assert dep.parameters == {"tenant_id": t} and t in dep.tags and not dep.paused
                (sched,) = dep.schedules
                assert sched.active and sched.schedule.interval == timedelta(seconds=900)
                assert dep.global_concurrency_limit.limit == 1
                assert dep.concurrency_options.collision_strategy.value == "CANCEL_NEW"
                manual = client.read_deployment_by_name(f"initial-import/initial-import-{t}")
                assert not manual.schedules and manual.parameters == {"tenant_id": t}

            # the server computes the runs from the spread anchor: every start at offset + k * 15 min
            dep = syncs["tenant-a"]
            httpx.post(
                f"{api.api_url}/deployments/{dep.id}/schedule", json={"min_runs": 3}, timeout=60, trust_env=False
            ).raise_for_status()
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            assert len(runs) >= 3
            for run in runs:
                assert run.parameters == {"tenant_id": "tenant-a"}
                assert (
                    run.expected_start_time.timestamp() % 900
                    == (datetime(2026, 1, 1, tzinfo=UTC).timestamp() + schedule_offset_s("tenant-a")) % 900
                )

            # a second sync of the same tenant while one holds the slot is cancelled; another tenant is not held up
            first = client.create_flow_run_from_deployment(dep.id)
            overlap = client.create_flow_run_from_deployment(dep.id)
            other = client.create_flow_run_from_deployment(syncs["tenant-b"].id)
            assert client.set_flow_run_state(first.id, Pending()).state.is_pending()
            cancelled = client.set_flow_run_state(overlap.id, Pending()).state
            assert cancelled.is_cancelled() and cancelled.message == "Deployment concurrency limit reached."
            assert client.read_flow_run(overlap.id).state.message == "Deployment concurrency limit reached."
            assert client.set_flow_run_state(other.id, Pending()).state.is_pending()
            for run in (first, other):
                client.set_flow_run_state(run.id, Cancelled(), force=True)
    print(f"local Prefect server healthy after {ready_s:.1f} s")

    assert "PREFECT_API_URL" not in os.environ
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the local Prefect server outlived ensure_prefect_api"


def test_the_readme_lists_every_deployment_serve_builds(every_deployment, settings):
    tid, built = every_deployment
    readme = (ROOT / "README.md").read_text()
    section = " ".join(readme[readme.index("## Running on a schedule") :].split())
    on_demand = user_import_deployments(settings, flow=_email_flow())  # `serve` adds them to the five
    kinds = [d.name.removesuffix(f"-{tid}") for d in built + on_demand]
    assert len(kinds) == 6 and "six Prefect deployments per tenant" in section
    for kind in kinds:
        assert f"`{kind}/{kind}-<tenant-id>`" in section
    assert "the two deployments" not in section
