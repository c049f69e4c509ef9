"""End to end: a generated world, real MSAL sign-in, the real Prefect flow, and the store against ground truth."""

from __future__ import annotations

from datetime import timedelta

import pytest

from flows.initial_import import initial_import
from o365sync.graph import GraphBadRequest
from o365sync.store import open_store, snapshot_path
from simulators.world import generate_world
from tests.product import expected_for_crm, latest_artifact_rows, stand_up, stored_matches, table_counts

pytestmark = pytest.mark.slow  # every test here runs Prefect flows or takes seconds


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=11, tenants=2, users_per_tenant=3, messages_per_user=150, contacts_per_tenant=40)
    # Small pages so every mailbox spans several pages and several store batches.
    p = stand_up(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="25")
    yield p
    p.running.stop()


def test_initial_import_stores_exactly_the_ground_truth(prefect_server, product):
    settings, world = product.settings, product.world
    for tenant in world.tenants:
        expected = world.expected_matches(tenant.tid)
        totals = initial_import(tenant.tid)
        assert stored_matches(settings, tenant.tid) == expected
        assert totals["imported"] == totals["matched"] == len(expected)
        assert totals["scanned"] == totals["matched"] + totals["discarded"]

        with open_store(settings, tenant.tid, write=False) as con:
            rows = con.execute("SELECT user_oid, graph_id, subject, body_text, from_address FROM emails").fetchall()
            users = {r[0] for r in con.execute("SELECT DISTINCT user_oid FROM email_participants").fetchall()}
            stages = con.execute("SELECT DISTINCT stage FROM sync_state").fetchall()
            primaries = con.execute(
                "SELECT DISTINCT count(*) FILTER (WHERE is_primary) FROM email_crm_matches GROUP BY user_oid, graph_id"
            ).fetchall()
        assert len(rows) == len({(r[0], r[1]) for r in rows}) == len(expected)
        by_id = {m.id: m for u in tenant.users for m in world.mailboxes[u.oid]}
        for oid, gid, subject, body, sender in rows:
            msg = by_id[gid]
            assert (msg.owner_oid, msg.subject, msg.body, msg.sender.address) == (oid, subject, body, sender)
        # Tenant isolation: only this tenant's users appear in this tenant's store.
        assert users <= {u.oid for u in tenant.users}
        assert stages == [("idle",)]
        assert primaries == [(1,)]  # one primary CRM link per stored email
        assert snapshot_path(settings, tenant.tid).exists()


def test_second_run_adds_and_duplicates_nothing(prefect_server, product):
    tenant = product.world.tenants[0]
    initial_import(tenant.tid)
    before = table_counts(product.settings, tenant.tid)
    totals = initial_import(tenant.tid)
    assert totals["imported"] == 0
    assert table_counts(product.settings, tenant.tid) == before
    assert stored_matches(product.settings, tenant.tid) == product.world.expected_matches(tenant.tid)

    from typer.testing import CliRunner

    from app.cli import app

    status = CliRunner().invoke(app, ["status", "--tenant", tenant.tid], env={"COLUMNS": "300"})
    assert status.exit_code == 0
    assert all(u.oid in status.output for u in tenant.users) and "idle" in status.output


def test_a_failed_run_is_finished_by_the_next_without_loss_or_duplicates(prefect_server, product):
    from flows.initial_import import ImportIncomplete

    tenant = product.world.tenants[0]
    victim = tenant.users[0].oid
    # Inbox completes, then Sent Items answers a permanent error: the user's import dies half way.
    product.running.graph.inject(victim, 400, count=1, code="ErrorInvalidRequest", path_contains="sentitems")
    with pytest.raises(ImportIncomplete):
        initial_import(tenant.tid)
    with open_store(product.settings, tenant.tid, write=False) as con:
        stage, error, failures = con.execute(
            "SELECT stage, last_error, consecutive_failures FROM sync_state WHERE user_oid = ?", [victim]
        ).fetchall()[0]
        partial = con.execute("SELECT count(*) FROM emails WHERE user_oid = ?", [victim]).fetchall()[0][0]
    assert (stage, error, failures) == ("action_needed", f"GraphBadRequest: {GraphBadRequest.action}", 1)
    expected = product.world.expected_matches(tenant.tid)
    victim_expected = {k for k in expected if k[0] == victim}
    assert 0 < partial < len(victim_expected)

    totals = initial_import(tenant.tid)
    assert stored_matches(product.settings, tenant.tid) == expected
    assert totals["imported"] == len(victim_expected) - partial  # only what was missing
    with open_store(product.settings, tenant.tid, write=False) as con:
        stage, failures, scanned = con.execute(
            "SELECT stage, consecutive_failures, scanned FROM sync_state WHERE user_oid = ?", [victim]
        ).fetchall()[0]
    window = [m for m in product.world.mailboxes[victim] if m.received >= product.world.scan_start(tenant.tid)]
    assert (stage, failures) == ("idle", 0)
    assert scanned < len(window)  # the inbox resumed from its cursor instead of being re-listed


def test_one_users_dead_token_does_not_fail_the_tenant(prefect_server, product):
    tenant = product.world.tenants[0]
    dead, alive = tenant.users[0].oid, [u.oid for u in tenant.users[1:]]
    product.running.identity.revoke(dead)  # refresh token revoked (AADSTS50173) ...
    product.running.tokens.revoke_access_tokens(dead)  # ... and Graph rejects the cached access token

    totals = initial_import(tenant.tid)
    assert (totals["reconnect_needed"], totals["failed"]) == (1, 0)
    with open_store(product.settings, tenant.tid, write=False) as con:
        states = dict(con.execute("SELECT user_oid, stage FROM sync_state").fetchall())
        errors = dict(con.execute("SELECT user_oid, last_error FROM sync_state").fetchall())
    assert states == {dead: "reconnect_needed", **{oid: "idle" for oid in alive}}
    assert errors[dead] == "invalid_grant"
    expected = {k: v for k, v in product.world.expected_matches(tenant.tid).items() if k[0] in alive}
    assert stored_matches(product.settings, tenant.tid) == expected


def test_the_run_artifact_shows_each_users_state(prefect_server, product):
    from flows._reporting import artifact_key

    tenant = product.world.tenants[0]
    dead = tenant.users[0].oid
    product.running.identity.revoke(dead)
    product.running.tokens.revoke_access_tokens(dead)
    initial_import(tenant.tid)
    rows = {r["user_oid"]: r for r in latest_artifact_rows(artifact_key("initial-import", tenant.tid))}
    assert set(rows) == {u.oid for u in tenant.users}
    assert rows[dead]["stage"] == "reconnect_needed" and rows[dead]["last_error"] == "invalid_grant"
    alive = rows[tenant.users[1].oid]
    assert alive["stage"] == "idle" and alive["imported"] > 0 and alive["last_success"]
    assert "no_crm_match" in alive["excluded"]


def test_a_crm_outage_keeps_mail_syncing_against_the_last_snapshot(prefect_server, product):
    tenant = product.world.tenants[0]
    initial_import(tenant.tid)
    product.running.salesforce.daily_limit = 0  # every CRM call now answers 403 REQUEST_LIMIT_EXCEEDED
    added = product.world.add_message(tenant.users[0].oid, "inbox", kind="contact")
    totals = initial_import(tenant.tid)
    assert totals["crm_refreshed"] == 0 and totals["failed"] == 0
    assert (tenant.users[0].oid, added.id) in stored_matches(product.settings, tenant.tid)
    from flows._reporting import artifact_key

    [crm] = latest_artifact_rows(artifact_key("initial-import-crm", tenant.tid))
    assert crm["state"] == "quota_exhausted" and "REQUEST_LIMIT_EXCEEDED" in crm["last_error"]
    assert crm["last_success"] and crm["refreshed_now"] == "no"

    # A scheduled run does not ask a used-up CRM again within the hour (no crash loop, no allowance wasted).
    from prefect import flow

    from flows.tenant_sync import sync_tenant

    @flow
    def scheduled(tid: str) -> dict:
        return sync_tenant(tid, "scheduled", crm_max_age=timedelta(0))

    calls = len(product.running.salesforce.requests)
    totals = scheduled(tenant.tid)
    assert totals["crm_refreshed"] == 0 and len(product.running.salesforce.requests) == calls


@pytest.mark.parametrize("crm_kind", ["hubspot", "pipedrive", "files"])
def test_initial_import_with_each_crm(prefect_server, tmp_path, monkeypatch, crm_kind):
    world = generate_world(seed=17, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30)
    p = stand_up(world, tmp_path, monkeypatch, crm_kind=crm_kind)
    try:
        tid = world.tenants[0].tid
        totals = initial_import(tid)
        expected = expected_for_crm(world, tid, p.running, crm_kind)
        assert stored_matches(p.settings, tid) == expected
        assert totals["imported"] == len(expected) and totals["failed"] == 0
    finally:
        p.running.stop()
