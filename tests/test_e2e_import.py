"""End to end: a generated world, real MSAL sign-in, the real Prefect flow, and the store against ground truth."""

from __future__ import annotations

import pytest

from flows.initial_import import initial_import
from o365sync.store import open_store, snapshot_path
from simulators.world import generate_world
from tests.product import stand_up, stored_matches, table_counts


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
        assert len(rows) == len({(r[0], r[1]) for r in rows}) == len(expected)
        by_id = {m.id: m for u in tenant.users for m in world.mailboxes[u.oid]}
        for oid, gid, subject, body, sender in rows:
            msg = by_id[gid]
            assert (msg.owner_oid, msg.subject, msg.body, msg.sender.address) == (oid, subject, body, sender)
        # Tenant isolation: only this tenant's users appear in this tenant's store.
        assert users <= {u.oid for u in tenant.users}
        assert stages == [("idle",)]
        assert snapshot_path(settings, tenant.tid).exists()


def test_second_run_adds_and_duplicates_nothing(prefect_server, product):
    tenant = product.world.tenants[0]
    initial_import(tenant.tid)
    before = table_counts(product.settings, tenant.tid)
    totals = initial_import(tenant.tid)
    assert totals["imported"] == 0
    assert table_counts(product.settings, tenant.tid) == before
    assert stored_matches(product.settings, tenant.tid) == product.world.expected_matches(tenant.tid)
