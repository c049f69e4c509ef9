"""Calendar import and hourly sync against the simulated Graph calendar: the store equals the oracle for the window
(recurrences expanded, private/unmatched absent, internal meetings only for users who opted in), after
reschedules, attendee changes and cancellations, after a window re-anchor, and after an evicted delta token."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from o365sync.store import open_store
from o365sync.sync.calendar import ConsentNeeded, anchored_window, sync_calendar_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import UserPreferences, load_tenant, save_tenant
from simulators.world import generate_world
from simulators.world_calendar import Attendee
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.bounded import ends_by_itself
from tests.product import stand_up


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=31, users_per_tenant=2, messages_per_user=10, contacts_per_tenant=30, calendars=True)
    p = stand_up(world, tmp_path, monkeypatch, features=["email", "calendar"], O365SYNC_GRAPH_PAGE_SIZE="25")
    tid = world.tenants[0].tid
    tenant = load_tenant(p.settings, tid)
    opted_in = world.tenants[0].users[1].oid
    tenant.user_preferences[opted_in] = UserPreferences(internal_meetings=True)
    save_tenant(p.settings, tenant)
    refresh_crm_snapshot(p.settings, tid)
    yield p
    p.running.stop()


def stored(p, tid: str) -> dict[tuple[str, str], frozenset[str]]:
    with open_store(p.settings, tid, write=False) as con:
        ids = con.execute("SELECT user_oid, event_id, count(*) FROM meetings GROUP BY ALL").fetchall()
        links = con.execute("SELECT user_oid, event_id, crm_id FROM meeting_crm_matches").fetchall()
    assert all(n == 1 for *_k, n in ids), "an instance is stored twice"
    out: dict[tuple[str, str], set[str]] = {(oid, eid): set() for oid, eid, _n in ids}
    for oid, eid, crm_id in links:
        out[(oid, eid)].add(crm_id)
    return {k: frozenset(v) for k, v in out.items()}


def sync_all(p, now: datetime | None = None) -> dict:
    tenant = p.world.tenants[0]
    return {u.oid: sync_calendar_now(resolve_tenant(p.settings, tenant.tid), u.oid, now=now) for u in tenant.users}


def expected(p, now: datetime | None = None) -> dict:
    tenant = p.world.tenants[0]
    lo, hi = anchored_window(now or datetime.now(UTC))
    return p.world.calendars.expected_meetings(tenant.tid, lo, hi, include_internal_for={tenant.users[1].oid})


def test_import_equals_the_oracle_and_stores_no_bodies(product):
    p, tid = product, product.world.tenants[0].tid
    counts = sync_all(p)
    truth = expected(p)
    assert stored(p, tid) == truth
    kinds = defaultdict(int)
    for ids in truth.values():
        kinds["internal" if not ids else "matched"] += 1
    assert kinds["internal"] > 0 and kinds["matched"] > 0
    assert all(c.baseline and c.discarded > 0 and c.private > 0 for c in counts.values())
    with open_store(p.settings, tid, write=False) as con:
        types = {r[0] for r in con.execute("SELECT DISTINCT event_type FROM meetings").fetchall()}
        assert {"occurrence", "singleInstance"} <= types and "seriesMaster" not in types
        tz = con.execute("SELECT count(*) FROM meetings WHERE start_tz IS NULL OR ical_uid IS NULL").fetchone()[0]
        assert tz == 0
        columns = {
            r[0]
            for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name LIKE 'meeting%'"
            ).fetchall()
        }
        assert not any("body" in c for c in columns)
    # Internal meetings only for the user who opted in.
    first = p.world.tenants[0].users[0].oid
    assert all(ids for (oid, _e), ids in stored(p, tid).items() if oid == first)


@pytest.mark.slow
def test_hourly_sync_applies_reschedules_attendee_changes_and_cancellations(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    cal, user = p.world.calendars, p.world.tenants[0].users[0]
    before = stored(p, tid)
    mine = sorted(eid for (oid, eid) in before if oid == user.oid)
    single = next(eid for eid in mine if cal.find(user.oid, eid)[1] is None)
    occurrence = next(eid for eid in mine if cal.find(user.oid, eid)[1] is not None)
    master = cal.find(user.oid, occurrence)[0].id
    cal.reschedule(single, datetime.now(UTC).replace(microsecond=0) + timedelta(days=20, hours=3))
    other_occurrence = next(
        eid
        for eid in mine
        if eid != occurrence and cal.find(user.oid, eid)[1] is not None and cal.find(user.oid, eid)[0].id == master
    )
    cal.cancel(other_occurrence)  # one occurrence cancelled: Graph's delta may not even report it
    stranger = cal.add_event(user.oid, kind="stranger")
    crm = p.world.crm[tid]
    contact = crm.contacts[0]
    cal.change_attendees(stranger.id, add=[Attendee("New Contact", contact.email.strip())])
    cancelled = next(
        eid for eid in mine if eid not in (single, occurrence, other_occurrence) and cal.find(user.oid, eid)[1] is None
    )
    cal.cancel(cancelled, delete=True)
    counts = sync_all(p)
    truth = expected(p)
    assert stored(p, tid) == truth
    assert (user.oid, stranger.id) in truth and (user.oid, other_occurrence) not in truth
    assert not counts[user.oid].baseline and counts[user.oid].removed >= 2


@pytest.mark.slow
def test_a_reanchored_window_adds_newly_in_range_meetings_without_duplicates(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    later = datetime.now(UTC) + timedelta(days=3)
    counts = sync_all(p, now=later)
    assert all(c.baseline for c in counts.values())
    lo, _hi = anchored_window(later)
    now_stored = stored(p, tid)
    truth = expected(p, later)
    assert {k: v for k, v in now_stored.items() if k in truth} == truth
    assert set(truth) - set(expected(p)), "the later window should reach meetings the first one did not"
    with open_store(p.settings, tid, write=False) as con:
        outside = con.execute("SELECT count(*) FROM meetings WHERE end_at <= ?", [lo]).fetchone()[0]
    assert len(now_stored) == len(truth) + outside  # everything else is history from before the new window


@pytest.mark.slow
def test_an_evicted_delta_token_starts_a_new_baseline(product):
    p, tid = product, product.world.tenants[0].tid
    sync_all(p)
    user = p.world.tenants[0].users[0]
    p.running.graph.calendar.evict_delta_tokens(user.oid)
    p.world.calendars.add_event(user.oid, kind="external")
    assert sync_calendar_now(resolve_tenant(p.settings, tid), user.oid).baseline
    assert stored(p, tid) == expected(p)


def test_half_an_emoji_in_an_event_subject_is_counted_not_fatal(product):
    from tasks.calendar_task import calendar_run_counts

    p, tid = product, product.world.tenants[0].tid
    user = p.world.tenants[0].users[0]
    truth = expected(p)
    single = next(
        eid for (oid, eid) in sorted(truth) if oid == user.oid and p.world.calendars.find(oid, eid)[1] is None
    )
    occurrence = next(
        eid for (oid, eid) in sorted(truth) if oid == user.oid and p.world.calendars.find(oid, eid)[1] is not None
    )
    series = p.world.calendars.find(user.oid, occurrence)[0].id
    p.running.graph.lone_surrogate_ids = frozenset({single, series})
    counts = calendar_run_counts(resolve_tenant(p.settings, tid), user.oid)
    instances = sum(1 for (oid, eid) in truth if oid == user.oid and p.world.calendars.find(oid, eid)[0].id == series)
    assert dict(counts.excluded)["odd_text"] >= 1 + instances  # counted per imported/discarded meeting
    with open_store(p.settings, tid, write=False) as con:
        subjects = dict(con.execute("SELECT event_id, subject FROM meetings WHERE user_oid = ?", [user.oid]).fetchall())
    assert subjects[single].endswith("\ufffd") and subjects[occurrence].endswith("\ufffd")
    assert {k for k in stored(p, tid) if k[0] == user.oid} == {k for k in truth if k[0] == user.oid}


@pytest.mark.slow
def test_a_delta_round_that_never_ends_is_cut_off_and_replayed_next_run(product, monkeypatch):
    from o365sync.settings import load_settings

    p, tid = product, product.world.tenants[0].tid
    user = p.world.tenants[0].users[0]
    sync_all(p)
    added = p.world.calendars.add_event(user.oid, kind="customer_call")
    monkeypatch.setenv("O365SYNC_SYNC_MAX_PAGES", "5")
    settings = load_settings()
    graph = p.running.graph
    graph.endless_next_links = True
    graph.reset_stats()
    counts = ends_by_itself(
        lambda: sync_calendar_now(resolve_tenant(settings, tid), user.oid),
        lambda: setattr(graph, "endless_next_links", False),
    )
    assert counts.stopped == "stopped_at_page_limit" and not counts.baseline
    assert sum("calendarView/delta" in r.path for r in graph.requests) == 5
    assert (user.oid, added.id) in stored(p, tid)  # what the cut round read is kept ...
    with open_store(settings, tid, write=False) as con:
        link = con.execute("SELECT delta_link FROM calendar_cursor WHERE user_oid = ?", [user.oid]).fetchone()[0]
    assert not graph.endless_next_links  # switched off once the cut run had ended
    # ... and the round is replayed from the old deltaLink
    counts = sync_calendar_now(resolve_tenant(settings, tid), user.oid)
    assert counts.stopped is None and not counts.baseline
    with open_store(settings, tid, write=False) as con:
        assert con.execute("SELECT delta_link FROM calendar_cursor WHERE user_oid = ?", [user.oid]).fetchone()[
            0
        ] not in (None, link)
    assert stored(p, tid) == expected(p)


def test_a_user_connected_before_calendar_was_enabled_needs_consent(tmp_path, monkeypatch):
    world = generate_world(seed=32, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=10, calendars=True)
    p = stand_up(world, tmp_path, monkeypatch, features=["email"])
    try:
        tid, user = world.tenants[0].tid, world.tenants[0].users[0]
        refresh_crm_snapshot(p.settings, tid)
        tenant = load_tenant(p.settings, tid)
        tenant.features = ["email", "calendar"]
        save_tenant(p.settings, tenant)
        seen = len(p.running.graph.requests)
        with pytest.raises(ConsentNeeded) as err:
            sync_calendar_now(resolve_tenant(p.settings, tid), user.oid)
        assert "Calendars.Read" in err.value.missing
        assert len(p.running.graph.requests) == seen  # nothing was asked of Graph (nor of MSAL)
    finally:
        p.running.stop()


@pytest.mark.slow
def test_notetaker_lists_and_explicit_consent_mode_writes_only_to_matched_external_meetings(tmp_path, monkeypatch):
    world = generate_world(seed=33, users_per_tenant=2, messages_per_user=5, contacts_per_tenant=30, calendars=True)
    p = stand_up(world, tmp_path, monkeypatch, features=["email", "calendar", "notetaker"], explicit_consent=True)
    try:
        tid, (alice, bob) = world.tenants[0].tid, world.tenants[0].users
        tenant = load_tenant(p.settings, tid)
        tenant.user_preferences[bob.oid] = UserPreferences(notetaker=False)
        save_tenant(p.settings, tenant)
        refresh_crm_snapshot(p.settings, tid)
        now = datetime.now(UTC)
        cal = world.calendars
        # Alice organizes only online meetings in this world: take the link off one series and one single meeting.
        organized = {}
        for (oid, iid), ids in expected_for(world, now).items():
            ev, inst = cal.find(oid, iid)
            if oid == alice.oid and ids and (ev.organizer.address or "").lower() == alice.upn.lower():
                organized.setdefault(inst is None, ev.id)
        for event_id in organized.values():
            cal.update(event_id, is_online=False, join_url=None)
        truth = expected_for(world, now)
        # What Explicit Consent Mode must change: upcoming matched external meetings Alice organizes, without a link
        # (the series master for an occurrence); never Bob's (Notetaker off), internal, unmatched or private ones.
        targets = set()
        for (oid, iid), ids in truth.items():
            ev, inst = cal.find(oid, iid)
            if (
                oid == alice.oid
                and ids
                and not ev.is_online
                and (ev.organizer.address or "").lower() == alice.upn.lower()
                and (inst.end if inst else ev.end) > now
            ):
                targets.add(ev.id)
        assert targets, "the generated calendar should have meetings for Explicit Consent Mode"
        counts = sync_calendar_now(resolve_tenant(p.settings, tid), alice.oid, now=now)
        sync_calendar_now(resolve_tenant(p.settings, tid), bob.oid, now=now)
        writes = list(cal.writes)
        assert {w.event_id for w in writes} == targets and len(writes) == len(targets)
        assert counts.links_added == len(targets)
        assert all(
            "o365sync-notetaker-consent" in w.fields["body"]["content"] and set(w.fields) == {"body"} for w in writes
        )
        assert len(cal.online_meetings) == len(targets)
        # Again (and again after the PATCHes came back through delta): nothing more is written.
        sync_calendar_now(resolve_tenant(p.settings, tid), alice.oid, now=now)
        sync_calendar_now(resolve_tenant(p.settings, tid), alice.oid, now=now)
        assert len(cal.writes) == len(targets) and len(cal.online_meetings) == len(targets)
        with open_store(p.settings, tid, write=False) as con:
            listed = con.execute("SELECT user_oid, event_id FROM notetaker_queue WHERE status = 'to_record'").fetchall()
            stored_ids = {r[0] for r in con.execute("SELECT event_id FROM meetings").fetchall()}
        want = set()
        for (oid, iid), ids in truth.items():
            ev, inst = cal.find(oid, iid)
            if oid == alice.oid and ids and (inst.end if inst else ev.end) > now and (ev.is_online or ev.id in targets):
                want.add((oid, iid))
        assert set(listed) == want and all(e in stored_ids for _o, e in listed)
    finally:
        p.running.stop()


def expected_for(world, now: datetime, include_internal=()) -> dict:
    lo, hi = anchored_window(now)
    return world.calendars.expected_meetings(world.tenants[0].tid, lo, hi, include_internal_for=set(include_internal))


@pytest.mark.slow
def test_the_hourly_flow_imports_and_reports_consent_needed(prefect_server, tmp_path, monkeypatch):
    """The calendar-sync Prefect flow: one task per user, a keyed artifact; a user who connected before calendar
    import was enabled is reported as consent_needed while the others are imported."""
    from flows._reporting import artifact_key
    from flows.calendar_sync import calendar_sync
    from o365sync.auth import connection_info
    from tests.product import latest_artifact_rows

    world = generate_world(seed=34, users_per_tenant=2, messages_per_user=5, contacts_per_tenant=30, calendars=True)
    p = stand_up(world, tmp_path, monkeypatch, features=["email", "calendar"])
    try:
        tid, (alice, bob) = world.tenants[0].tid, world.tenants[0].users
        # Bob's connection predates calendar import: his granted scopes lack Calendars.Read.
        meta_path = next(p.settings.data_dir.rglob(f"{bob.oid}.json"))
        meta = connection_info(p.settings, tid, bob.oid)
        meta["scopes"] = [s for s in meta["scopes"] if s != "Calendars.Read"]
        meta_path.write_text(json.dumps(meta))
        totals = calendar_sync(tid)
        truth = {k: v for k, v in expected_for(world, datetime.now(UTC)).items() if k[0] == alice.oid}
        assert stored(p, tid) == truth and totals["calendar_imported"] == len(truth)
        assert totals["calendar_consent_needed"] == 1 and totals["calendar_failed"] == 0
        rows = {r["user_oid"]: r for r in latest_artifact_rows(artifact_key("calendar-sync-calendar", tid))}
        assert rows[bob.oid]["stage"] == "consent_needed" and rows[alice.oid]["stage"] == "idle"
    finally:
        p.running.stop()
