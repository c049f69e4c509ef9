"""Saved sync positions that cannot be used (issue 10, item 5): after O365SYNC_GRAPH_URL points at another Graph
endpoint (here a second simulator of the same world on another port), mail and calendar resync by themselves,
never send the token to the old endpoint, tell people why, and end exactly as the oracle says; and the operator's
`o365sync tenant resync` validates before it changes anything."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from app.cli import app
from o365sync.settings import load_settings
from o365sync.store import open_store, read_sync_states
from o365sync.sync.calendar import anchored_window
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.sync.runner import run_user_sync
from o365sync.tenant_context import resolve_tenant
from simulators.graph import GraphSimulator
from simulators.world import generate_world
from tasks.calendar_task import calendar_run_counts
from tests.product import stand_up_with_crm, stored_matches

pytestmark = pytest.mark.slow  # every test here runs Prefect flows or takes seconds

log = logging.getLogger("test")


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=23, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30, calendars=True)
    yield from stand_up_with_crm(
        world, tmp_path, monkeypatch, features=["email", "calendar"], O365SYNC_GRAPH_PAGE_SIZE="25"
    )


def sync_everything(settings, tid: str, users) -> dict:
    out = {}
    tenant = resolve_tenant(settings, tid)
    for u in users:
        out[(u.oid, "email")] = run_user_sync(tenant, "email", u.oid, sync_mailbox_now, log)
        out[(u.oid, "calendar")] = run_user_sync(tenant, "calendar", u.oid, calendar_run_counts, log)
    return out


def assert_store_is_the_oracle(p, settings) -> None:
    tenant = p.world.tenants[0]
    p.world.now = datetime.now(UTC)
    assert stored_matches(settings, tenant.tid) == p.world.expected_matches(tenant.tid)
    with open_store(settings, tenant.tid, write=False) as con:
        meetings = con.execute("SELECT user_oid, event_id, count(*) FROM meetings GROUP BY ALL").fetchall()
        doubled = con.execute("SELECT count(*) - count(DISTINCT (user_oid, graph_id)) FROM emails").fetchone()[0]
    assert doubled == 0 and all(n == 1 for *_k, n in meetings)
    expected = p.world.calendars.expected_meetings(tenant.tid, *anchored_window(datetime.now(UTC)))
    assert {(oid, eid) for oid, eid, _n in meetings} == set(expected)


def states(settings, tid: str) -> dict[tuple[str, str], dict]:
    with open_store(settings, tid, write=False) as con:
        return {(s["user_oid"], f): s for f in ("email", "calendar") for s in read_sync_states(con, tid, f)}


def cursors(settings, tid: str) -> tuple[list, list]:
    with open_store(settings, tid, write=False) as con:
        return (
            con.execute(
                "SELECT user_oid, folder, received_watermark, backfill_done, delta_link FROM mail_cursor ORDER BY ALL"
            ).fetchall(),
            con.execute("SELECT user_oid, window_start, delta_link FROM calendar_cursor ORDER BY ALL").fetchall(),
        )


def test_a_new_graph_endpoint_resyncs_by_itself_and_ends_as_the_oracle(product, monkeypatch):
    p, tenant = product, product.world.tenants[0]
    old = p.running.graph
    sync_everything(p.settings, tenant.tid, tenant.users)
    assert_store_is_the_oracle(p, p.settings)

    alice = tenant.users[0]
    new_mail = p.world.add_message(alice.oid, "inbox", kind="contact")
    new_meeting = p.world.calendars.add_event(alice.oid, kind="customer_call")
    with GraphSimulator(p.world, p.running.tls, p.running.tokens) as moved:
        assert moved.base_url != old.base_url
        monkeypatch.setenv("O365SYNC_GRAPH_URL", moved.base_url)
        settings = load_settings()
        old.reset_stats()
        rows = sync_everything(settings, tenant.tid, tenant.users)
        assert old.requests == []  # the saved links were never followed: no token went to the old endpoint
        assert all(r["status"] == "ok" for r in rows.values())
        assert_store_is_the_oracle(p, settings)
        assert (alice.oid, new_mail.id) in stored_matches(settings, tenant.tid)
        with open_store(settings, tenant.tid, write=False) as con:
            assert con.execute("SELECT count(*) FROM meetings WHERE event_id = ?", [new_meeting.id]).fetchone()[0]
        for u in tenant.users:
            assert "delta_resync_other_endpoint=2" in rows[(u.oid, "email")]["excluded"]  # inbox and sent items
            assert "delta_resync_other_endpoint=1" in rows[(u.oid, "calendar")]["excluded"]
        for (_oid, _feature), st in states(settings, tenant.tid).items():
            assert st["stage"] == "idle" and st["consecutive_failures"] == 0
            assert "saved sync position belongs to another Graph endpoint" in st["last_error"]
            assert "resynced" in st["last_error"]

        sync_everything(settings, tenant.tid, tenant.users)  # settled: plain delta rounds on the new endpoint
        assert all(st["last_error"] is None for st in states(settings, tenant.tid).values())
        assert_store_is_the_oracle(p, settings)


def test_tenant_resync_validates_first_then_resets_what_it_names(product):
    p, tenant = product, product.world.tenants[0]
    sync_everything(p.settings, tenant.tid, tenant.users)
    alice, bob = tenant.users
    before = cursors(p.settings, tenant.tid)
    runner = CliRunner()

    for args in (
        ["tenant", "resync", "nosuch-tenant"],
        ["tenant", "resync", tenant.tid, "--user", "nobody"],
        ["tenant", "resync", tenant.tid, "--feature", "teams"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and not isinstance(result.exception, Exception)  # no traceback
        assert "Traceback" not in result.output
        assert cursors(p.settings, tenant.tid) == before  # nothing changed
    assert "is not registered" in runner.invoke(app, ["tenant", "resync", "nosuch-tenant"]).output
    assert "is not a user of tenant" in runner.invoke(app, ["tenant", "resync", tenant.tid, "--user", "x"]).output

    result = runner.invoke(app, ["tenant", "resync", tenant.tid, "--user", alice.oid, "--feature", "email"])
    assert result.exit_code == 0, result.output
    assert f"reset {alice.oid} email inbox" in result.output and f"reset {alice.oid} email sentitems" in result.output
    mail, calendar = cursors(p.settings, tenant.tid)
    assert {r[1] for r in mail if r[0] == alice.oid and r[4] is None} == {"inbox", "sentitems"}
    assert all(r[4] is not None for r in mail if r[0] == bob.oid) and all(r[2] is not None for r in calendar)

    result = runner.invoke(app, ["tenant", "resync", tenant.tid, "--feature", "calendar"])
    assert result.exit_code == 0 and f"reset {bob.oid} calendar" in result.output
    assert all(r[2] is None for r in cursors(p.settings, tenant.tid)[1])

    p.world.add_message(alice.oid, "inbox", kind="contact")
    counts = sync_mailbox_now(resolve_tenant(p.settings, tenant.tid), alice.oid)
    window = [m for m in p.world.mailboxes[alice.oid] if m.received >= p.world.scan_start(tenant.tid)]
    assert counts.scanned < len(window) / 2  # bounded: about a day of mail re-listed, not the whole window
    sync_everything(p.settings, tenant.tid, tenant.users)
    assert_store_is_the_oracle(p, p.settings)
