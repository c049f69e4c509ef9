"""Ops signals: which state changes become which Prefect events (pure), that a real tenant sync on a real Prefect
server emits exactly those events with ids/counts/names only, the dashboard artifact, and the automations command
against the same server (created, updated in place, and firing a real webhook)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from o365sync.tenants import TenantConfig
from tasks.ops_dashboard import dashboard_markdown
from tasks.ops_signals import (
    CONSENT_NEEDED,
    CRM_QUOTA_EXHAUSTED,
    RECONNECT_NEEDED,
    SIGNALS,
    SYNC_FAILED,
    THROTTLED,
    crm_signals,
    user_signals,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def state(stage: str, failures: int = 0, error: str | None = None, success_ago: float | None = 5, at: datetime = T0):
    return {
        "stage": stage,
        "consecutive_failures": failures,
        "last_error": error,
        "last_run_at": at,
        "last_success_at": at - timedelta(minutes=success_ago) if success_ago is not None else None,
        "next_retry_at": None,
        "imported": 2,
        "total_imported": 9,
    }


def events(before, after, minutes=60, runs=3):
    return [(s.event, s.user_oid) for s in user_signals("email", before, after, minutes, runs)]


def test_a_condition_is_signalled_once_when_it_starts():
    ok = {"u": state("idle")}
    assert events(ok, ok) == []
    gone = {"u": state("reconnect_needed", 1, "invalid_grant")}
    assert events(ok, gone) == [(RECONNECT_NEEDED, "u")]
    assert events(gone, {"u": state("reconnect_needed", 2, "invalid_grant")}) == []  # still gone: silent
    assert events({}, {"u": state("consent_needed", 1, "consent_needed")}) == [(CONSENT_NEEDED, "u")]


def test_failures_signal_when_the_count_reaches_the_threshold_and_not_after():
    assert events({"u": state("failed", 1, "X")}, {"u": state("failed", 2, "X")}, runs=3) == []
    assert events({"u": state("failed", 2, "X")}, {"u": state("failed", 3, "X")}, runs=3) == [(SYNC_FAILED, "u")]
    assert events({"u": state("failed", 3, "X")}, {"u": state("failed", 4, "X")}, runs=3) == []
    # reconnect needed counts failures too, but has its own signal
    assert events({"u": state("reconnect_needed", 2)}, {"u": state("reconnect_needed", 3)}, runs=3) == []


def test_throttling_signals_once_the_user_has_gone_without_success_long_enough():
    throttled = "GraphThrottled"
    young = {"u": state("failed", 1, throttled, success_ago=30)}
    old = {"u": state("failed", 2, throttled, success_ago=61)}
    assert events({"u": state("idle")}, young, minutes=60, runs=9) == []
    assert events(young, old, minutes=60, runs=9) == [(THROTTLED, "u")]
    assert events(old, {"u": state("failed", 3, throttled, success_ago=76)}, minutes=60, runs=9) == []
    other = {"u": state("failed", 2, "GraphUnavailable", success_ago=90)}
    assert events(young, other, minutes=60, runs=9) == []
    [signal] = user_signals("email", young, old, 60, 9)
    assert signal.payload["throttled_minutes"] == 61 and signal.payload["error"] == throttled


def test_crm_signals_on_a_change_of_state():
    assert [s.event for s in crm_signals({"status": "ok"}, {"status": "quota_exhausted"}, "salesforce")] == [
        CRM_QUOTA_EXHAUSTED
    ]
    assert crm_signals({"status": "quota_exhausted"}, {"status": "quota_exhausted"}, "salesforce") == []
    assert [s.event for s in crm_signals({}, {"status": "reconnect_needed"}, "hubspot")] == [RECONNECT_NEEDED]
    assert crm_signals({"status": "quota_exhausted"}, {"status": "ok"}, "salesforce") == []


def test_the_dashboard_names_people_and_says_what_to_do():
    from o365sync.auth import ConnectedUser

    tenant = TenantConfig(id="t1", name="Contoso | EU", domains=["contoso.example"])
    users = [ConnectedUser("t1", "o1", "a@contoso.example", "Alice Adams"), ConnectedUser("t1", "o2", "", "Bob")]
    states = {
        "email": {
            "o1": state("idle", success_ago=4),
            "o2": state("action_needed", 2, "GraphForbidden: an admin must grant", success_ago=125),
        },
        "calendar": {"o1": state("reconnect_needed", 1, "invalid_grant", success_ago=None)},
    }
    md = dashboard_markdown(tenant, users, states, {"status": "ok", "last_success_at": T0}, {"taken_at": T0}, T0)
    assert md.startswith("# Contoso / EU (t1)")
    assert "2 users · 2 need a person · 0 failing · largest lag never" in md
    alice = next(line for line in md.splitlines() if "Alice Adams" in line)
    assert "idle (4m)" in alice and "reconnect needed (never)" in alice and "the user must connect again" in alice
    bob = next(line for line in md.splitlines() if "**Bob**" in line)
    assert "action needed (2h05m) ×2" in bob and "an admin must grant" in bob and "2 / 9" in bob
    assert "a@contoso.example" not in md  # names, not addresses


# ------------------------------------------------------------------------------------------ against Prefect
def _events_of(tenant_id: str, since: datetime) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventOccurredFilter, EventResourceFilter

    flt = EventFilter(
        occurred=EventOccurredFilter(since=since),
        resource=EventResourceFilter(id=[f"o365sync.tenant.{tenant_id}"]),
    )
    out = []
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=flt, limit=50)
        out += page.events
        while page.next_page:
            page = client.read_events_page(page.next_page)
            out += page.events
    return out


def _settled_events(tenant_id: str, since: datetime, timeout: float = 60.0) -> list:
    """The tenant's events once a marker event sent after them is stored (the same client sends both, in order)."""
    from prefect.events import emit_event
    from prefect.events.clients import get_events_client  # noqa: F401 - the worker flushes on its own

    marker = emit_event(event="test.marker", resource={"prefect.resource.id": f"o365sync.tenant.{tenant_id}"})
    assert marker is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _events_of(tenant_id, since)
        if any(e.id == marker.id for e in got):
            return [e for e in got if e.event != "test.marker"]
        time.sleep(0.5)
    raise AssertionError("the marker event never reached the server")


PAYLOAD_KEYS = {"tenant_id", "tenant", "feature", "user_oid", "user", "stage", "consecutive_failures", "error"}


@pytest.mark.slow
def test_a_tenant_sync_emits_each_signal_once_with_ids_and_names_only(prefect_server, tmp_path, monkeypatch):
    from flows.initial_import import initial_import
    from o365sync.auth import connection_info
    from simulators.world import generate_world
    from tests.product import stand_up

    world = generate_world(seed=5, users_per_tenant=4, messages_per_user=8, contacts_per_tenant=20, calendars=True)
    p = stand_up(
        world,
        tmp_path,
        monkeypatch,
        features=["email", "calendar"],
        O365SYNC_OPS_FAILED_RUNS="1",
        O365SYNC_OPS_THROTTLED_MINUTES="0.0001",
    )
    try:
        tenant = world.tenants[0]
        tid, (gone, no_consent, throttled, _fine) = tenant.tid, tenant.users
        start = datetime.now(UTC) - timedelta(seconds=5)
        initial_import(tid)  # everyone succeeds: no signal
        assert [e.event for e in _settled_events(tid, start) if e.event.startswith("o365sync.")] == []

        p.running.identity.revoke(gone.oid)
        p.running.tokens.revoke_access_tokens(gone.oid)
        meta_path = next(p.settings.data_dir.rglob(f"{no_consent.oid}.json"))
        meta = connection_info(p.settings, tid, no_consent.oid)
        meta["scopes"] = [s for s in meta["scopes"] if s != "Calendars.Read"]
        meta_path.write_text(json.dumps(meta))
        p.running.salesforce.daily_limit = 0

        def run_with_throttling() -> None:
            p.running.graph.inject(throttled.oid, 429, count=50, retry_after="0", path_contains="messages")
            state = initial_import(tid, return_state=True)
            assert state.is_failed()  # the throttled user's sync failed

        second = datetime.now(UTC) - timedelta(seconds=1)
        run_with_throttling()
        got = [e for e in _settled_events(tid, second) if e.event.startswith("o365sync.")]
        seen = sorted((e.event, e.payload.get("user_oid"), e.payload.get("feature")) for e in got)
        assert seen == sorted(
            [
                (RECONNECT_NEEDED, gone.oid, "email"),
                (RECONNECT_NEEDED, gone.oid, "calendar"),
                (CONSENT_NEEDED, no_consent.oid, "calendar"),
                (THROTTLED, throttled.oid, "email"),
                (SYNC_FAILED, throttled.oid, "email"),
                (CRM_QUOTA_EXHAUSTED, None, None),
            ]
        )
        secrets = {u.upn for u in tenant.users} | {
            text for m in world.mailboxes[throttled.oid] for text in (m.subject, m.body, m.sender.address)
        }
        for e in got:
            assert e.resource.id == f"o365sync.tenant.{tid}" and e.resource.name == (tenant.name or tid)
            [related] = [r for r in e.related if r.id.startswith("o365sync.")]
            if e.event == CRM_QUOTA_EXHAUSTED:
                assert related.role == "crm" and e.payload["crm_state"] == "quota_exhausted"
                assert set(e.payload) == {"tenant_id", "tenant", "crm", "crm_state", "error", "last_success"}
            else:
                user = next(u for u in tenant.users if u.oid == e.payload["user_oid"])
                assert related.id == f"o365sync.user.{tid}.{user.oid}" and related.role == "user"
                assert related.name == e.payload["user"] == user.display_name
                extra = {"throttled_minutes"} if e.event == THROTTLED else set()
                assert set(e.payload) == PAYLOAD_KEYS | {"last_success"} | extra
            blob = json.dumps(e.model_dump(mode="json"))
            assert not [s for s in secrets if len(s) >= 12 and s in blob]

        # The same conditions on the next run: nothing new.
        third = datetime.now(UTC)
        run_with_throttling()
        assert [e.event for e in _settled_events(tid, third) if e.event.startswith("o365sync.")] == []

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        from flows._reporting import artifact_key

        with get_client(sync_client=True) as client:
            [art] = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("dashboard", tid)])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
        md = str(art.data)
        for u in tenant.users:
            assert u.display_name in md
        assert "reconnect needed" in md and "consent needed" in md and "quota exhausted" in md
    finally:
        p.running.stop()


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Hook.received.append({"path": self.path, **json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_the_automations_command_creates_updates_and_they_fire(prefect_server, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.settings import get_current_settings
    from typer.testing import CliRunner

    from app.cli import app

    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    monkeypatch.setenv("PREFECT_API_URL", str(get_current_settings().api.url))
    try:
        runner = CliRunner()
        first = runner.invoke(app, ["ops", "automations", "create", "--webhook", url + "-old"])
        assert first.exit_code == 0, first.output
        assert first.output.count("created automation") == len(SIGNALS)
        again = runner.invoke(app, ["ops", "automations", "create", "--webhook", url])
        assert again.exit_code == 0 and again.output.count("updated automation") == len(SIGNALS), again.output

        with get_client(sync_client=True) as client:
            ours = [a for a in client.read_automations() if a.name.startswith("o365sync: ")]
        assert sorted(a.name for a in ours) == sorted(f"o365sync: {w}" for w in SIGNALS.values())
        assert sorted(next(iter(a.trigger.expect)) for a in ours) == sorted(SIGNALS)
        assert all(a.actions[0].type == "call-webhook" for a in ours)

        emit_event(
            event=RECONNECT_NEEDED,
            resource={"prefect.resource.id": "o365sync.tenant.hook-test", "prefect.resource.name": 'Fabrikam "EU"'},
            payload={"tenant_id": "hook-test", "user_oid": "o1", "feature": "email"},
        )
        deadline = time.monotonic() + 90
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.5)
        [call] = _Hook.received
        assert call["path"] == "/hook"  # the second run's URL: the block was updated
        assert call["signal"] == RECONNECT_NEEDED and call["what"] == "reconnect needed"
        assert call["tenant"] == 'Fabrikam "EU"' and call["payload"]["user_oid"] == "o1"
    finally:
        server.shutdown()
