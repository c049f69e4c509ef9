"""Incremental sync against the simulator: delta after new/updated/moved/deleted mail, token eviction, injected
faults, and the Prefect email-sync flow. Sync semantics are driven through `sync_mailbox_now` (the task's body)
to keep runs short; one test goes through the real flow."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from o365sync.store import open_store
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tasks.mailbox_sync import sync_mailbox_now
from tests.product import stand_up, stored_matches


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=5, users_per_tenant=2, messages_per_user=160, contacts_per_tenant=30)
    p = stand_up(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="20")
    refresh_crm_snapshot(p.settings, world.tenants[0].tid)
    yield p
    p.running.stop()


def sync_all(p) -> dict:
    tenant = p.world.tenants[0]
    return {u.oid: sync_mailbox_now(p.settings, tenant.tid, u.oid) for u in tenant.users}


def expected_now(p) -> dict:
    p.world.now = datetime.now(UTC)
    return p.world.expected_matches(p.world.tenants[0].tid)


def emails(p) -> list[tuple]:
    with open_store(p.settings, p.world.tenants[0].tid, write=False) as con:
        return con.execute("SELECT user_oid, graph_id, subject, folder FROM emails ORDER BY ALL").fetchall()


def test_delta_after_new_updated_moved_and_deleted_mail(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    first = expected_now(p)
    assert stored_matches(p.settings, tid) == first

    world, (alice, bob) = p.world, p.world.tenants[0].users
    new_inbox = world.add_message(alice.oid, "inbox", kind="contact")
    new_sent = world.add_message(bob.oid, "sentitems", kind="account")
    stranger = world.add_message(alice.oid, "inbox", kind="stranger")
    kept = sorted(k for k in first if k[0] == alice.oid)
    renamed, moved, deleted = kept[0][1], kept[1][1], kept[2][1]
    world.update_message(renamed, subject="Renamed after import")
    world.move_message(moved, "archive")
    world.delete_message(deleted)

    counts = sync_all(p)
    now = expected_now(p)
    assert (alice.oid, new_inbox.id) in now and (bob.oid, new_sent.id) in now
    assert (alice.oid, stranger.id) not in now
    # Moved-out and deleted mail stays imported; new matched mail arrives; nothing else changes.
    assert stored_matches(p.settings, tid) == {**first, **now}
    rows = emails(p)
    assert len(rows) == len({(r[0], r[1]) for r in rows})
    assert next(r for r in rows if r[1] == renamed)[2] == "Renamed after import"
    assert dict(counts[alice.oid].excluded).get("removed", 0) >= 2
    assert counts[alice.oid].imported == 1 and counts[bob.oid].imported == 1


def test_evicted_delta_token_resyncs_without_duplicates(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    alice = p.world.tenants[0].users[0]
    added = [p.world.add_message(alice.oid, "inbox", kind="contact") for _ in range(3)]
    p.running.graph.evict_delta_tokens(alice.oid)
    counts = sync_all(p)
    expected = expected_now(p)
    assert all((alice.oid, m.id) in expected for m in added)
    assert stored_matches(p.settings, tid) == expected
    rows = emails(p)
    assert len(rows) == len({(r[0], r[1]) for r in rows})
    assert dict(counts[alice.oid].excluded).get("delta_resync") == 2  # both folders
    # Bounded: the resync re-listed about a day of mail, not the whole window.
    window = [m for m in p.world.mailboxes[alice.oid] if m.received >= p.world.scan_start(tid)]
    assert counts[alice.oid].scanned < len(window) / 2


def test_injected_faults_never_break_the_import_or_the_limits(product):
    p, tid = product, product.world.tenants[0].tid
    graph = p.running.graph
    graph.fault_share = 0.10
    graph.latency_s = 0.002
    sync_all(p)
    assert stored_matches(p.settings, tid) == expected_now(p)
    for user in p.world.tenants[0].users:
        assert graph.retry_violations(user.oid) == []
        assert graph.peak_in_flight.get(user.oid, 0) <= 4
    assert sum(1 for r in graph.requests if r.status in (429, 503, 504)) > 0
