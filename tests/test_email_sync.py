"""Incremental sync against the simulator: delta after new/updated/moved/deleted mail, token eviction, injected
faults, and the Prefect email-sync flow. Sync semantics are driven through `sync_mailbox_now` (the task's body)
to keep runs short; one test goes through the real flow."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from o365sync.store import open_store
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.bounded import ends_by_itself
from tests.product import stand_up, stand_up_with_crm, stored_matches


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=5, users_per_tenant=2, messages_per_user=160, contacts_per_tenant=30)
    yield from stand_up_with_crm(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="20")


def sync_all(p) -> dict:
    tenant = p.world.tenants[0]
    return {u.oid: sync_mailbox_now(resolve_tenant(p.settings, tenant.tid), u.oid) for u in tenant.users}


def expected_now(p) -> dict:
    p.world.now = datetime.now(UTC)
    return p.world.expected_matches(p.world.tenants[0].tid)


def emails(p) -> list[tuple]:
    with open_store(p.settings, p.world.tenants[0].tid, write=False) as con:
        return con.execute("SELECT user_oid, graph_id, subject, folder FROM emails ORDER BY ALL").fetchall()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_same_message_in_two_folders_is_stored_once(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    alice = p.world.tenants[0].users[0]
    sent = p.world.add_message(alice.oid, "sentitems", kind="contact")
    copy = p.world.add_message(alice.oid, "inbox", kind="contact")
    copy.internet_message_id = sent.internet_message_id  # e.g. mail to yourself: one copy per folder
    counts = sync_all(p)[alice.oid]
    with open_store(p.settings, tid, write=False) as con:
        stored = con.execute(
            "SELECT count(*) FROM emails WHERE internet_message_id = ?", [sent.internet_message_id]
        ).fetchall()[0][0]
    assert stored == 1
    assert counts.imported == 1 and dict(counts.excluded).get("duplicate") == 1


@pytest.mark.slow
def test_blocklists_keep_mail_out(tmp_path, monkeypatch):
    from o365sync.tenants import load_tenant, save_tenant

    world = generate_world(seed=8, users_per_tenant=2, messages_per_user=160, contacts_per_tenant=30)
    p = stand_up(world, tmp_path, monkeypatch)
    try:
        tenant = world.tenants[0]
        first_match = sorted(world.expected_matches(tenant.tid))
        blocked_domain = (
            next(m.sender for m in world.mailboxes[first_match[0][0]] if m.id == first_match[0][1])
            .address.strip()
            .lower()
            .split("@")[1]
        )
        alice = tenant.users[0].oid
        alice_contact = next(c.email.strip().lower() for c in world.crm[tenant.tid].contacts)
        config = load_tenant(p.settings, tenant.tid)
        save_tenant(
            p.settings,
            config.model_copy(update={"blocklist": [blocked_domain], "user_blocklists": {alice: [alice_contact]}}),
        )
        refresh_crm_snapshot(p.settings, tenant.tid)
        sync_all(p)
        expected = world.expected_matches(
            tenant.tid, blocklist=[blocked_domain], user_blocklists={alice: [alice_contact]}
        )
        assert len(expected) < len(world.expected_matches(tenant.tid))
        assert stored_matches(p.settings, tenant.tid) == expected
    finally:
        p.running.stop()


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------- bounded inputs
def run_and_record(p, settings, oid: str) -> dict:
    """One mailbox sync as the Prefect task runs it (sync state recorded), without Prefect."""
    import logging

    from o365sync.sync.runner import run_user_sync

    tid = p.world.tenants[0].tid
    return run_user_sync(resolve_tenant(settings, tid), "email", oid, sync_mailbox_now, logging.getLogger("test"))


def state_of(settings, tid: str, oid: str) -> dict:
    from o365sync.store import read_sync_states

    with open_store(settings, tid, write=False) as con:
        return next(s for s in read_sync_states(con, tid, "email") if s["user_oid"] == oid)


def no_doubles(p) -> None:
    rows = emails(p)
    assert len(rows) == len({(r[0], r[1]) for r in rows})


@pytest.mark.slow
def test_half_an_emoji_in_a_subject_or_sender_name_is_counted_not_fatal(product):
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    expected = expected_now(p)
    broken = sorted(gid for oid, gid in expected if oid == alice.oid)[:2]
    p.running.graph.lone_surrogate_ids = frozenset(broken)
    row = run_and_record(p, p.settings, alice.oid)
    assert row["status"] == "ok" and "odd_text=2" in row["excluded"]
    with open_store(p.settings, tid, write=False) as con:
        got = con.execute("SELECT subject, from_name FROM emails WHERE graph_id IN (?, ?)", broken).fetchall()
    assert len(got) == 2 and all(s.endswith("\ufffd") and n.endswith("\ufffd") for s, n in got)
    assert {k for k in stored_matches(p.settings, tid) if k[0] == alice.oid} == {
        k for k in expected if k[0] == alice.oid
    }
    no_doubles(p)


@pytest.mark.slow
def test_a_mailbox_bigger_than_the_page_limit_catches_up_over_runs(product, monkeypatch):
    p, tid = product, product.world.tenants[0].tid
    from o365sync.settings import load_settings

    monkeypatch.setenv("O365SYNC_SYNC_MAX_PAGES", "1")  # 20 messages a page: a run lists 20 per folder
    settings = load_settings()
    alice = p.world.tenants[0].users[0]
    stages, imported = [], []
    for _ in range(20):
        row = run_and_record(p, settings, alice.oid)
        state = state_of(settings, tid, alice.oid)
        stages.append(state["stage"])
        assert state["stage"] == "idle" or "O365SYNC_SYNC_MAX_PAGES" in state["last_error"]
        imported.append(row["imported"])
        no_doubles(p)
        if stages[-1] == "idle":
            break
    assert stages[0] == "catching_up" and stages[-1] == "idle" and len(stages) >= 2
    assert {k for k in stored_matches(settings, tid) if k[0] == alice.oid} == {
        k for k in expected_now(p) if k[0] == alice.oid
    }
    assert sum(imported) == len({k for k in expected_now(p) if k[0] == alice.oid})  # each message imported once


@pytest.mark.slow
@pytest.mark.parametrize("limit", [{"O365SYNC_SYNC_MAX_PAGES": "6"}, {"O365SYNC_SYNC_MAX_SECONDS": "1"}])
def test_a_server_that_pages_forever_is_cut_off_and_the_next_run_finishes(product, monkeypatch, limit):
    p, tid = product, product.world.tenants[0].tid
    from o365sync.settings import load_settings

    alice = p.world.tenants[0].users[0]
    run_and_record(p, p.settings, alice.oid)
    new = [p.world.add_message(alice.oid, "inbox", kind="contact") for _ in range(2)]
    graph = p.running.graph
    graph.endless_next_links = True  # every delta round now ends in a fresh nextLink to an empty page, forever
    for key, value in limit.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    graph.reset_stats()
    row = ends_by_itself(
        lambda: run_and_record(p, settings, alice.oid), lambda: setattr(graph, "endless_next_links", False)
    )
    reason = "stopped_at_page_limit" if "O365SYNC_SYNC_MAX_PAGES" in limit else "stopped_at_time_limit"
    assert row["status"] == "catching_up" and f"{reason}=2" in row["excluded"]  # both folders, and it ended
    state = state_of(settings, tid, alice.oid)
    assert state["stage"] == "catching_up" and state["consecutive_failures"] == 0 and state["next_retry_at"] is None
    assert "next run continues" in state["last_error"]
    if "O365SYNC_SYNC_MAX_PAGES" in limit:
        assert len([r for r in graph.requests if "delta" in r.path]) == 12
    assert all((alice.oid, m.id) in stored_matches(settings, tid) for m in new)  # read before the cut: committed

    assert not graph.endless_next_links  # switched off once the cut run had ended
    row = run_and_record(p, settings, alice.oid)  # replays the rounds from the committed deltaLinks
    assert row["status"] == "ok" and state_of(settings, tid, alice.oid)["last_error"] is None
    assert {k for k in stored_matches(settings, tid) if k[0] == alice.oid} == {
        k for k in expected_now(p) if k[0] == alice.oid
    }
    no_doubles(p)


def test_a_user_sync_ends_itself_before_the_next_mail_slot():
    """The run's own deadline plus one request's timeout stays inside the 15-minute slot (a Prefect task timeout
    cannot interrupt our worker-thread tasks, so it is not what bounds them)."""
    from pydantic import ValidationError

    from o365sync.settings import SYNC_MAX_SECONDS_LIMIT, SYNC_SLOT_SECONDS, Settings
    from tasks.calendar_task import sync_calendar
    from tasks.mailbox_task import sync_mailbox

    assert sync_mailbox.timeout_seconds is None and sync_calendar.timeout_seconds is None  # would only warn
    defaults = Settings()
    assert defaults.sync_max_seconds + defaults.http_timeout_s < SYNC_SLOT_SECONDS
    assert SYNC_MAX_SECONDS_LIMIT + defaults.http_timeout_s < SYNC_SLOT_SECONDS
    with pytest.raises(ValidationError):
        Settings(sync_max_seconds=SYNC_MAX_SECONDS_LIMIT + 1)
