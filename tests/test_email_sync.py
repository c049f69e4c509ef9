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


def test_the_same_message_in_two_folders_is_stored_once(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    alice = p.world.tenants[0].users[0]
    sent = p.world.add_message(alice.oid, "sentitems", kind="contact")
    copy = p.world.add_message(alice.oid, "inbox", kind="contact")
    copy.internet_message_id = sent.internet_message_id  # e.g. mail to yourself: one copy per folder
    counts = sync_all(p)[alice.oid]
    with open_store(p.settings, tid, write=False) as con:
        stored = con.execute("SELECT count(*) FROM emails WHERE internet_message_id = ?",
                             [sent.internet_message_id]).fetchall()[0][0]
    assert stored == 1
    assert counts.imported == 1 and dict(counts.excluded).get("duplicate") == 1


def test_blocklists_keep_mail_out(tmp_path, monkeypatch):
    from o365sync.tenants import load_tenant, save_tenant

    world = generate_world(seed=8, users_per_tenant=2, messages_per_user=160, contacts_per_tenant=30)
    p = stand_up(world, tmp_path, monkeypatch)
    try:
        tenant = world.tenants[0]
        first_match = sorted(world.expected_matches(tenant.tid))
        blocked_domain = next(m.sender for m in world.mailboxes[first_match[0][0]]
                              if m.id == first_match[0][1]).address.strip().lower().split("@")[1]
        alice = tenant.users[0].oid
        alice_contact = next(c.email.strip().lower() for c in world.crm[tenant.tid].contacts)
        config = load_tenant(p.settings, tenant.tid)
        save_tenant(p.settings, config.model_copy(update={
            "blocklist": [blocked_domain], "user_blocklists": {alice: [alice_contact]}}))
        refresh_crm_snapshot(p.settings, tenant.tid)
        sync_all(p)
        expected = world.expected_matches(tenant.tid, blocklist=[blocked_domain],
                                          user_blocklists={alice: [alice_contact]})
        assert len(expected) < len(world.expected_matches(tenant.tid))
        assert stored_matches(p.settings, tenant.tid) == expected
    finally:
        p.running.stop()


def test_odd_graph_items_are_imported_or_skipped_as_documented(tmp_path, monkeypatch):
    from simulators.world import add_odd_messages

    world = generate_world(seed=9, users_per_tenant=1, messages_per_user=60, contacts_per_tenant=20)
    odd = add_odd_messages(world, world.tenants[0].users[0].oid)
    p = stand_up(world, tmp_path, monkeypatch)
    try:
        tid = world.tenants[0].tid
        refresh_crm_snapshot(p.settings, tid)
        sync_all(p)
        expected = expected_now(p)
        assert stored_matches(p.settings, tid) == expected
        assert any((world.tenants[0].users[0].oid, m.id) in expected for m in odd)  # some odd items do match
    finally:
        p.running.stop()
