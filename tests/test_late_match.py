"""Late matches against the simulators: a person or account domain added to the CRM after the import brings exactly
the oracle's newly matched mail (searched with Graph `$search`, imported by the normal pipeline), once; a run cut
off mid-search or failing between searches neither repeats a finished search nor loses one; an erased conversation
never comes back; `o365sync status` counts the work waiting and done (never a term). Driven through the library
(`sync_mailbox_now`, `late_match_mailbox`) to keep runs short; the Prefect flow's hook is covered by
tests/test_privacy.py."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from datetime import UTC, datetime

import pytest

from app.console.data import users_view
from o365sync.backfill import MAX_SEARCH_CHARS, SEARCH_RESULT_CAP, batch_terms, search_query, split_point
from o365sync.erasure import Scope, erase
from o365sync.store import late_match_summary, open_store
from o365sync.sync.late_match import late_match_mailbox
from o365sync.sync.mailbox import MAIL_FOLDERS, sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import load_tenant
from simulators.world import CrmAccount, CrmContact, Mailbox, World, generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.product import stand_up_with_crm, stored_matches
from tests.test_cli_status_sql import plain, run
from tests.test_email_sync import expected_now, no_doubles

pytestmark = pytest.mark.slow  # simulators, MSAL and DuckDB files


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=5, users_per_tenant=2, messages_per_user=160, contacts_per_tenant=30)
    yield from stand_up_with_crm(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="20")


def strangers(world: World) -> list[str]:
    """Addresses of strangers (no CRM match) who wrote in-window mail to a synced folder, most mail first."""
    tid = world.tenants[0].tid
    start = world.scan_start(tid)
    seen: Counter[str] = Counter()
    for user in world.tenants[0].users:
        for m in world.mailboxes[user.oid]:
            if m.kind == "stranger" and m.folder in MAIL_FOLDERS and start <= m.received and m.sender is not None:
                for box in (m.sender, *m.to):
                    if box.address and "stranger" in (box.name or "").lower():
                        seen[box.address.strip().lower()] += 1
    return [a for a, _ in seen.most_common()]


def add_to_crm(p, address: str | None = None, domain: str | None = None) -> None:
    """Add a contact and/or an account to the Salesforce simulator and to the oracle's CRM, with the same ids."""
    tid, sim, crm = p.world.tenants[0].tid, p.running.salesforce, p.world.crm[p.world.tenants[0].tid]
    if address is not None:
        cid = sim.add_contact(tid, "Late", "Match", address)
        crm.contacts.append(CrmContact(cid, "Late", "Match", address, None))
    if domain is not None:
        website = f"https://www.{domain}/"
        aid = sim.add_account(tid, "Late Account", website)
        crm.accounts.append(CrmAccount(aid, "Late Account", website))


def sync_all(p) -> None:
    tenant = p.world.tenants[0]
    for u in tenant.users:
        sync_mailbox_now(resolve_tenant(p.settings, tenant.tid), u.oid)


def late_match_all(p, settings=None, **options):
    tenant = p.world.tenants[0]
    return {
        u.oid: late_match_mailbox(resolve_tenant(settings or p.settings, tenant.tid), u.oid, **options)
        for u in tenant.users
    }


def shown_by_status(settings, tid: str) -> tuple[str, dict | None]:
    """What `o365sync status` shows of the late matches: the table's line (wrapped lines joined) and the JSON; the
    console's admin page shows the same line."""
    table = run(dict(os.environ), "status", "--tenant", tid)
    as_json = run(dict(os.environ), "status", "--tenant", tid, "--json")
    assert table.exit_code == 0 and as_json.exit_code == 0, table.output + as_json.output
    line = re.search(r"late matches: (.*? imported)", " ".join(plain(table.output).split()))
    _, crm = users_view(settings, load_tenant(settings, tid))
    assert crm["late_match"] == (line[1] if line else None)
    return (line[1] if line else ""), json.loads(as_json.output)["tenants"][0]["late_match"]


def first_pages(p) -> Counter:
    """Searches started (first pages served), per (mailbox, folder, query)."""
    return Counter((oid, folder, kql) for oid, folder, kql, offset in p.running.graph.searches if offset == 0)


def test_a_contact_and_a_domain_added_after_the_import_bring_exactly_their_mail_and_status_counts_them(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    before = expected_now(p)
    assert stored_matches(p.settings, tid) == before
    address, other = strangers(p.world)[:2]
    add_to_crm(p, address=address, domain=other.rpartition("@")[2])
    refreshed = refresh_crm_snapshot(p.settings, tid)
    assert refreshed["late_match_terms"] == 2
    assert shown_by_status(p.settings, tid) == (
        "2 addresses/domains waiting in 2 mailboxes, 0 done, 0 capped, 0 messages imported",
        {"terms_open": 2, "mailboxes_open": 2, "terms_done": 0, "terms_capped": 0, "imported": 0},
    )

    outcomes = late_match_all(p)
    after = expected_now(p)
    new = after.keys() - before.keys()
    assert new, "the added contact and domain should match mail that was unmatched before"
    assert stored_matches(p.settings, tid) == after  # new mail, and new links on mail stored before
    no_doubles(p)
    with open_store(p.settings, tid, write=False) as con:
        assert con.execute("SELECT count(*) FROM emails").fetchall()[0][0] == len(after)
    assert sum(o.counts.imported for o in outcomes.values()) == len(new)
    assert all(o.terms_open == 0 and o.stopped is None for o in outcomes.values())
    with open_store(p.settings, tid, write=False) as con:
        summary = late_match_summary(con, tid)
    assert summary["terms_done"] == 2 and summary["terms_open"] == 0 and summary["imported"] == len(new)
    assert shown_by_status(p.settings, tid) == (
        f"0 addresses/domains waiting in 0 mailboxes, 2 done, 0 capped, {len(new)} messages imported",
        {"terms_open": 0, "mailboxes_open": 0, "terms_done": 2, "terms_capped": 0, "imported": len(new)},
    )
    assert address not in str(shown_by_status(p.settings, tid))  # counts only, never a CRM address

    # Nothing left: the next run makes no search; the next refresh without changes queues nothing.
    p.running.graph.searches.clear()
    assert all(o.searches == 0 for o in late_match_all(p).values()) and not p.running.graph.searches
    assert refresh_crm_snapshot(p.settings, tid).get("late_match_terms", 0) == 0


def test_a_run_cut_off_or_failing_resumes_without_repeating_a_finished_search(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    for address in strangers(p.world)[:6]:
        add_to_crm(p, address=address)
    add_to_crm(p, domain=strangers(p.world)[6].rpartition("@")[2])
    refresh_crm_snapshot(p.settings, tid)
    alice, bob = p.world.tenants[0].users

    # Alice: one page of two results per listing, so her first search stops after its first page (cut off).
    short = p.settings.model_copy(update={"sync_max_pages": 1, "graph_page_size": 2})
    cut = late_match_mailbox(resolve_tenant(short, tid), alice.oid)
    assert cut.searches == 1 and cut.stopped == "PageCap" and cut.terms_open == 7
    # Bob: one search finishes, then the next run's first request fails (a crash between searches).
    assert late_match_mailbox(resolve_tenant(p.settings, tid), bob.oid, max_searches=1).stopped == "SearchCap"
    p.running.graph.inject(bob.oid, 403, count=1, code="ErrorAccessDenied", path_contains="/messages")
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises, the work must stay queued
        late_match_mailbox(resolve_tenant(p.settings, tid), bob.oid)

    done = late_match_all(p)
    assert all(o.terms_open == 0 for o in done.values())
    assert stored_matches(p.settings, tid) == expected_now(p)
    no_doubles(p)
    started = first_pages(p)
    repeated = {k: n for k, n in started.items() if n > 1}
    # Only the search cut off mid-way ran twice; every other search ran once (one per folder of each mailbox).
    assert len(repeated) == 1 and next(iter(repeated))[0] == alice.oid and set(repeated.values()) == {2}
    assert {(oid, folder) for oid, folder, _ in started} == {(u.oid, f) for u in (alice, bob) for f in MAIL_FOLDERS}


def test_an_erased_conversation_is_not_brought_back_by_a_late_match(tmp_path, monkeypatch):
    world = generate_world(seed=5, users_per_tenant=2, messages_per_user=160, contacts_per_tenant=30)
    address = strangers(world)[0]
    user = next(u for u in world.tenants[0].users if any(_has(m, address) for m in world.mailboxes[u.oid]))
    start = world.scan_start(world.tenants[0].tid)
    victim = next(
        m for m in world.mailboxes[user.oid] if _has(m, address) and m.folder in MAIL_FOLDERS and m.received >= start
    )
    contact = world.crm[world.tenants[0].tid].contacts[0]
    victim.cc.append(Mailbox(f"{contact.first_name} {contact.last_name}", contact.email))  # matched from the start
    for p in stand_up_with_crm(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="20"):
        tid = world.tenants[0].tid
        sync_all(p)
        assert (user.oid, victim.id) in stored_matches(p.settings, tid)
        erase(p.settings, tid, Scope.message(victim.id, user.oid), actor="test", reason="user_request")
        assert (user.oid, victim.id) not in stored_matches(p.settings, tid)

        add_to_crm(p, address=address)
        refresh_crm_snapshot(p.settings, tid)
        late_match_all(p)
        assert any(address in kql for _, _, kql in first_pages(p))  # the search did find the erased message
        erased = {(m.owner_oid, m.id) for m in world.mailboxes[user.oid] if m.conversation_id == victim.conversation_id}
        expected = {k: v for k, v in expected_now(p).items() if k not in erased}
        assert stored_matches(p.settings, tid) == expected


def _has(m, address: str) -> bool:
    return any((b.address or "").strip().lower() == address for b in m.participants())


def test_searches_stay_within_the_query_limit_and_windows_halve_to_a_day():
    start = datetime(2026, 10, 1, 9, 30, tzinfo=UTC)
    terms = [f"person{i}@company{i}.example.com" for i in range(70)]
    batches = batch_terms(terms, start, None)
    assert [t for b in batches for t in b] == terms
    assert all(len(search_query(b, start, None)) <= MAX_SEARCH_CHARS and len(b) <= 20 for b in batches)
    assert search_query(["a@b.com", "b.com"], start, datetime(2026, 11, 1, tzinfo=UTC)) == (
        '"(participants:a@b.com OR participants:b.com) AND received>=2026-10-01 AND received<2026-11-01"'
    )
    assert split_point(start, datetime(2026, 10, 11, tzinfo=UTC)) == datetime(2026, 10, 6, tzinfo=UTC)
    assert split_point(start, datetime(2026, 10, 2, 23, tzinfo=UTC)) is None


def test_a_search_over_the_result_cap_is_narrowed_until_every_result_is_seen(tmp_path, monkeypatch):
    world = generate_world(seed=11, users_per_tenant=1, messages_per_user=80, contacts_per_tenant=20)
    tid, user = world.tenants[0].tid, world.tenants[0].users[0]
    start, quiet = world.scan_start(tid), strangers(world)[0]
    busy = Mailbox("Busy Stranger", "busy@prolific-stranger.example")
    n = SEARCH_RESULT_CAP + 100
    for i in range(n):  # more mail from one address than one search can return, spread over the scan window
        m = world.add_message(user.oid, "inbox", "stranger", received=start + (world.now - start) * (i + 0.5) / n)
        m.sender, m.to, m.cc = busy, [Mailbox(user.display_name, user.upn)], []
    for p in stand_up_with_crm(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="500"):
        sync_all(p)
        add_to_crm(p, address=busy.address)
        add_to_crm(p, address=quiet)
        refresh_crm_snapshot(p.settings, tid)
        (outcome,) = late_match_all(p).values()
        assert outcome.terms_open == 0 and outcome.terms_capped == 0
        assert stored_matches(p.settings, tid) == expected_now(p)
        inbox = [kql for (_, folder, kql), k in first_pages(p).items() if folder == "inbox" and k == 1]
        # Both terms together hit the cap; then each alone; the busy one's window is halved once.
        assert len(inbox) == 5 and sum(" OR " in q for q in inbox) == 1
        assert sum("received<" in q for q in inbox) == 1 and len(first_pages(p)) == 6  # sentitems: one search
