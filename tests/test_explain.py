"""`explain` against the simulated world's oracle: for one message (and one calendar event) of every exclusion
reason and every match kind of the world, the decision is the oracle's, the CRM records are the oracle's, the
primary is the one the pipeline stored, stored/not-stored agrees with the store after a real sync, and no file of
the data dir changes."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from o365sync.explain import EVENT_REASONS, explain_message
from o365sync.store import open_store
from o365sync.sync.calendar import sync_calendar_now
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import UserPreferences, load_tenant, save_tenant
from simulators.world import generate_world
from tests.product import stand_up_with_crm


def _hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def synced(tmp_path, monkeypatch):
    world = generate_world(seed=5, users_per_tenant=1, messages_per_user=160, contacts_per_tenant=30)
    for p in stand_up_with_crm(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="50"):
        tenant = world.tenants[0]
        oid = tenant.users[0].oid
        blocked = next(c.email.strip().lower() for c in world.crm[tenant.tid].contacts)  # the blocklisted case
        config = load_tenant(p.settings, tenant.tid)
        save_tenant(p.settings, config.model_copy(update={"blocklist": [blocked]}))
        sync_mailbox_now(resolve_tenant(p.settings, tenant.tid), oid)
        yield p, oid, [blocked]


@pytest.mark.slow
def test_explain_agrees_with_the_oracle_and_the_store(synced):
    p, oid, blocklist = synced
    world, tid = p.world, p.world.tenants[0].tid
    expected = world.expected_matches(tid, blocklist=blocklist)
    excluded = world.exclusions(tid, blocklist=blocklist)
    by_id = {m.id: m for m in world.mailboxes[oid]}
    cases: dict[str, str] = {}  # case label -> message id
    for (_o, mid), reason in sorted(excluded.items()):
        if mid in by_id:
            cases.setdefault(f"excluded:{reason}", mid)
    for _o, mid in sorted(expected):
        cases.setdefault(f"matched:{by_id[mid].kind}", mid)
    present = {f"excluded:{r}" for (_o, mid), r in excluded.items() if mid in by_id}
    assert present == {k for k in cases if k.startswith("excluded:")}
    assert {"excluded:no_crm_match", "excluded:blocklisted", "excluded:internal_only"} <= present
    assert sum(k.startswith("matched:") for k in cases) >= 2

    with open_store(p.settings, tid, write=False) as con:
        stored = {gid for (gid,) in con.execute("SELECT graph_id FROM emails").fetchall()}
        primary = dict(con.execute("SELECT graph_id, crm_id FROM email_crm_matches WHERE is_primary").fetchall())
    before = _hashes(p.settings.data_dir)
    tenant = resolve_tenant(p.settings, tid)
    for label, mid in cases.items():
        # by Graph id, and (for every other case) by internetMessageId: the same answer
        key = by_id[mid].internet_message_id if hash(label) % 2 else mid
        got = explain_message(tenant, oid, key)
        assert got.graph_id == mid, label
        assert got.stored == (mid in stored), label
        assert not got.erased
        if label.startswith("matched:"):
            assert got.decision == "matched", label
            assert {m.crm_id for m in got.matches} == expected[(oid, mid)], label
            assert [m.crm_id for m in got.matches if m.is_primary] == [primary[mid]], label
            assert got.matches[0].is_primary and got.primary_why
            assert got.stored
        else:
            assert got.decision == excluded[(oid, mid)], label
            assert not got.matches and not got.stored

    _cli_explains_a_stored_match(tid, oid, "--message", next(v for k, v in cases.items() if k.startswith("matched:")))
    assert _hashes(p.settings.data_dir) == before


def _cli_explains_a_stored_match(tid: str, oid: str, option: str, item: str) -> None:
    """`o365sync explain` prints the decision, the primary record and that the store holds the item."""
    from app.cli import app

    out = CliRunner().invoke(app, ["explain", "--tenant", tid, "--user", oid, option, item])
    assert out.exit_code == 0, out.output
    assert "decision: matched" in out.output and "primary: " in out.output and "stored now: yes" in out.output


@pytest.mark.slow
def test_an_erased_message_is_explained_as_erased(synced):
    from o365sync.erasure import Scope, erase

    p, oid, blocklist = synced
    tid = p.world.tenants[0].tid
    mid = sorted(p.world.expected_matches(tid, blocklist=blocklist))[0][1]
    erase(p.settings, tid, Scope.message(mid, user_oid=oid), actor="test:explain", reason="user_request")
    got = explain_message(resolve_tenant(p.settings, tid), oid, mid)
    assert got.decision == "matched" and got.erased and not got.stored


@pytest.fixture
def calendars_synced(tmp_path, monkeypatch):
    """Two users' calendars imported; the second user keeps internal meetings."""
    world = generate_world(seed=31, users_per_tenant=2, messages_per_user=5, contacts_per_tenant=30, calendars=True)
    for p in stand_up_with_crm(world, tmp_path, monkeypatch, features=["email", "calendar"]):
        tenant = world.tenants[0]
        config = load_tenant(p.settings, tenant.tid)
        config.user_preferences[tenant.users[1].oid] = UserPreferences(internal_meetings=True)
        save_tenant(p.settings, config)
        for user in tenant.users:
            sync_calendar_now(resolve_tenant(p.settings, tenant.tid), user.oid)
        yield p


def _oracle_decision(inst, expected_ids: frozenset[str] | None, own: set[str]) -> str:
    """The decision the world's own data implies for one instance (`expected_ids`: the oracle's CRM ids, None when
    the oracle does not import it)."""
    ev = inst.event
    if ev.is_cancelled:
        return "cancelled"
    if ev.sensitivity == "private":
        return "private"
    if expected_ids is not None:
        return "matched" if expected_ids else "internal_kept"
    addresses = [(a.address or "").lower() for a in inst.participants()]
    external = [a for a in addresses if "@" in a and a.rpartition("@")[2] not in own]
    return "no_crm_match" if external else "internal_only"


@pytest.mark.slow
def test_explain_event_agrees_with_the_calendar_oracle(calendars_synced):
    from o365sync.explain import explain_event

    p = calendars_synced
    tenant = p.world.tenants[0]
    tid, cal = tenant.tid, p.world.calendars
    with open_store(p.settings, tid, write=False) as con:
        lo, hi = con.execute("SELECT min(window_start), min(window_end) FROM calendar_cursor").fetchone()
        stored = {eid for (eid,) in con.execute("SELECT event_id FROM meetings").fetchall()}
        primary = dict(con.execute("SELECT event_id, crm_id FROM meeting_crm_matches WHERE is_primary").fetchall())
    expected = cal.expected_meetings(tid, lo, hi, include_internal_for={tenant.users[1].oid})
    own = {d.lower() for d in load_tenant(p.settings, tid).domains}
    cases: dict[str, tuple[str, str, str]] = {}  # label -> (user oid, event id, expected decision)
    for user in tenant.users:
        for inst in cal.instances(user.oid, lo, hi):
            want = _oracle_decision(inst, expected.get((user.oid, inst.id)), own)
            cases.setdefault(f"{want}:{inst.event.kind}:{inst.type}", (user.oid, inst.id, want))
        master = next(ev for ev in cal.events[user.oid] if ev.recurrence is not None)
        cases.setdefault("series_master", (user.oid, master.id, "series_master"))
        later = cal.instances(user.oid, hi, hi + timedelta(days=120))
        if later:
            cases.setdefault("outside_window", (user.oid, later[0].id, "outside_window"))
    decisions = {want for _o, _e, want in cases.values()}
    assert set(EVENT_REASONS) == decisions, "the world lacks a case"
    assert {k.split(":")[1] for k in cases if k.startswith("matched:")} >= {"customer_call", "lead"}

    before = _hashes(p.settings.data_dir)
    for label, (oid, eid, want) in sorted(cases.items()):
        got = explain_event(resolve_tenant(p.settings, tid), oid, eid)
        assert (got.event_id, got.decision) == (eid, want), label
        assert got.stored == (eid in stored) == (want in ("matched", "internal_kept")), label
        assert not got.erased, label
        if want == "matched":
            assert {m.crm_id for m in got.matches} == expected[(oid, eid)], label
            assert [m.crm_id for m in got.matches if m.is_primary] == [primary[eid]], label
            assert got.primary_why, label
        else:
            assert not got.matches, label

    oid, eid, _want = cases[next(k for k in cases if k.startswith("matched:"))]
    _cli_explains_a_stored_match(tid, oid, "--event", eid)
    assert _hashes(p.settings.data_dir) == before


@pytest.mark.slow
def test_an_erased_meeting_is_explained_as_erased(calendars_synced):
    from o365sync.erasure import Scope, erase
    from o365sync.explain import explain_event

    p = calendars_synced
    tid, oid = p.world.tenants[0].tid, p.world.tenants[0].users[0].oid
    with open_store(p.settings, tid, write=False) as con:
        (eid,) = con.execute(
            "SELECT event_id FROM meeting_crm_matches WHERE user_oid = ? ORDER BY event_id LIMIT 1", [oid]
        ).fetchone()
    erase(p.settings, tid, Scope.meeting(eid, user_oid=oid), actor="test:explain", reason="user_request")
    got = explain_event(resolve_tenant(p.settings, tid), oid, eid)
    assert got.decision == "matched" and got.erased and not got.stored
