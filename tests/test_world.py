"""The world generator's realistic noise, the exclusion oracle, the odd-items corpus and the mutation API."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from simulators.world import (
    ALL_FOLDERS,
    EXCLUSION_REASONS,
    MEETING_REQUEST_TYPE,
    NOISE_KINDS,
    World,
    add_odd_messages,
    generate_world,
)

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
# the reason each noise kind must be excluded for (bcc_only: bcc is never a participant, so whatever the to says)
NOISE_REASON = {
    "draft": {"not_synced_folder"},
    "junk": {"not_synced_folder"},
    "deleted": {"not_synced_folder"},
    "archived": {"not_synced_folder"},
    "meeting": {"meeting_message"},
    "sensitive": {"sensitive"},
    "automated": {"automated_sender"},
    "bcc_only": {"internal_only", "no_crm_match"},
}


@pytest.fixture(scope="module")
def noisy() -> World:
    return generate_world(seed=11, tenants=1, users_per_tenant=2, messages_per_user=3000, now=NOW)


def in_window(world: World, tid: str) -> list:
    start = world.scan_start(tid)
    return [m for u in world.tenant(tid).users for m in world.mailboxes[u.oid] if start <= m.received <= world.now]


def test_noise_kinds_present_with_realistic_shares(noisy: World) -> None:
    for user in noisy.tenants[0].users:
        msgs = noisy.mailboxes[user.oid]
        kinds = Counter(m.kind for m in msgs)
        for kind in NOISE_KINDS:
            assert 0.005 <= kinds[kind] / len(msgs) <= 0.03, (kind, kinds[kind])
        assert {m.folder for m in msgs} == set(ALL_FOLDERS)
        for m in msgs:
            assert (m.folder == "drafts") == m.is_draft == (m.kind == "draft")
            assert (m.odata_type == MEETING_REQUEST_TYPE) == (m.kind == "meeting")
            assert (m.sensitivity != "normal") == (m.kind == "sensitive")
            assert bool(m.bcc) == (m.kind == "bcc_only")
            if m.kind == "bcc_only":
                assert m.folder == "sentitems" and m.sender.address == user.upn
            if m.kind in ("meeting", "automated"):
                assert m.folder == "inbox"
        unread = sum(not m.is_read for m in msgs if m.folder == "inbox")
        assert 0.2 < unread / sum(m.folder == "inbox" for m in msgs) < 0.45
        assert all(m.is_read for m in msgs if m.folder == "sentitems")


def test_oracle_excludes_noise_with_the_right_reason(noisy: World) -> None:
    tid = noisy.tenants[0].tid
    crm = noisy.crm[tid]
    contacts = {c.email.strip().lower() for c in crm.contacts}
    expected = noisy.expected_matches(tid)
    reasons = noisy.exclusions(tid)
    window = in_window(noisy, tid)
    assert len(expected) + len(reasons) == len(window)
    assert set(expected).isdisjoint(reasons)
    seen: Counter[str] = Counter()
    for m in window:
        if m.kind in NOISE_KINDS:
            assert reasons[(m.owner_oid, m.id)] in NOISE_REASON[m.kind], m.kind
            seen[m.kind] += 1
        if m.kind == "bcc_only":
            assert m.bcc[0].address.strip().lower() in contacts  # would match, if bcc counted
    assert set(seen) == set(NOISE_KINDS)
    counts = noisy.excluded_reasons(tid)
    assert counts == Counter(reasons.values())
    assert set(counts) <= set(EXCLUSION_REASONS) and counts["no_crm_match"] and counts["internal_only"]
    synced = noisy.excluded_reasons(tid, synced_folders_only=True)
    assert (
        "not_synced_folder" not in synced and sum(synced.values()) == sum(counts.values()) - counts["not_synced_folder"]
    )
    # the noise-free part still matches: contacts, leads and accounts
    assert Counter(m.kind for m in window if (m.owner_oid, m.id) in expected).keys() >= {"contact", "lead", "account"}


def test_blocklists(noisy: World) -> None:
    tid = noisy.tenants[0].tid
    owner, other = (u.oid for u in noisy.tenants[0].users)
    expected = noisy.expected_matches(tid)
    key, victim = next(
        (k, m)
        for m in in_window(noisy, tid)
        if (k := (m.owner_oid, m.id)) in expected and m.kind == "account" and m.owner_oid == owner
    )
    ext = next(p.address for p in victim.participants() if not p.address.endswith(noisy.tenant(tid).domains[0]))
    domain = ext.strip().rpartition("@")[2]
    for blocklist in ([f"  @{domain.upper()} "], [ext.upper()]):
        assert key not in noisy.expected_matches(tid, blocklist)
        assert noisy.exclusions(tid, blocklist)[key] == "blocklisted"
    by_user = noisy.expected_matches(tid, user_blocklists={owner: [domain]})
    assert key not in by_user
    assert by_user.keys() >= {k for k in expected if k[0] == other}  # the other user's mail is untouched
    assert noisy.expected_matches(tid, user_blocklists={other: [domain]}).keys() >= {key}


def test_noise_off_and_determinism() -> None:
    a = generate_world(seed=5, users_per_tenant=1, messages_per_user=800, now=NOW)
    b = generate_world(seed=5, users_per_tenant=1, messages_per_user=800, now=NOW)
    assert [(m.id, m.kind, m.folder, m.is_read, m.sensitivity) for m in next(iter(a.mailboxes.values()))] == [
        (m.id, m.kind, m.folder, m.is_read, m.sensitivity) for m in next(iter(b.mailboxes.values()))
    ]
    quiet = generate_world(seed=5, users_per_tenant=1, messages_per_user=800, now=NOW, realistic_noise=False)
    msgs = next(iter(quiet.mailboxes.values()))
    assert not {m.kind for m in msgs} & set(NOISE_KINDS) and {m.folder for m in msgs} == {"inbox", "sentitems"}
    tid = quiet.tenants[0].tid
    assert set(quiet.excluded_reasons(tid)) <= {"automated_sender", "internal_only", "no_crm_match"}


@pytest.mark.slow
def test_generator_at_benchmark_scale() -> None:
    """The benchmarks' 50k mailbox generates (its speed is measured in bench/, never asserted in a test)."""
    world = generate_world(seed=3, users_per_tenant=1, messages_per_user=50_000, now=NOW)
    assert len(next(iter(world.mailboxes.values()))) > 49_000


def test_odd_items_and_the_oracle() -> None:
    world = generate_world(seed=9, users_per_tenant=1, messages_per_user=200, now=NOW)
    tid, oid = world.tenants[0].tid, world.tenants[0].users[0].oid
    odd = {m.kind.removeprefix("odd:"): m for m in add_odd_messages(world, oid)}
    assert set(odd) == {
        "missing_from",
        "empty_address",
        "x500_only",
        "x500_contact",
        "unicode",
        "idn",
        "name_only",
        "big_body",
    }
    expected, reasons = world.expected_matches(tid), world.exclusions(tid)
    crm = world.crm[tid]
    jose = next(c.id for c in crm.contacts if c.email == "José@Bücher.de")
    idn_account = next(a.id for a in crm.accounts if a.website == "xn--bcher-kva.de")
    assert odd["missing_from"].sender is None and (oid, odd["missing_from"].id) in expected
    assert odd["empty_address"].to[-1].address is None and (oid, odd["empty_address"].id) in expected
    assert reasons[(oid, odd["x500_only"].id)] == "internal_only"
    assert (oid, odd["x500_contact"].id) in expected
    assert expected[(oid, odd["unicode"].id)] == frozenset({jose})  # not the punycode account
    assert expected[(oid, odd["idn"].id)] == frozenset({idn_account})
    assert (oid, odd["name_only"].id) in expected
    assert len(odd["big_body"].body) == 1_000_000 and (oid, odd["big_body"].id) in expected


def test_mutations_and_change_tracking() -> None:
    world = generate_world(seed=4, users_per_tenant=1, messages_per_user=300, now=NOW)
    tid, oid = world.tenants[0].tid, world.tenants[0].users[0].oid
    assert world.change_seq == 0
    new = world.add_message(oid, "inbox", "contact")
    assert (new.version, new.arrived_seq, new.is_read, new.received) == (1, 1, False, NOW)
    assert world.message(new.id) is new and world.mailboxes[oid][-1] is new
    assert (oid, new.id) in world.expected_matches(tid)  # consistent with the CRM
    sent = world.add_message(oid, "sentitems", "lead")
    assert sent.sender.address == world.user(oid).upn and sent.is_read
    meeting = world.add_message(oid, "inbox", "meeting")
    assert world.exclusions(tid)[(oid, meeting.id)] == "meeting_message"

    world.update_message(new.id, is_read=True)
    world.update_message(new.id, subject="Changed")
    assert new.version == 5 and world.changed_fields(new.id, 3) == {"is_read", "subject"}
    assert world.changed_fields(new.id, 4) == {"subject"} and world.change_log[-1] == new.id
    with pytest.raises(ValueError):
        world.update_message(new.id, folder="archive")

    old_mutable = new.mutable_id()
    world.move_message(new.id, "archive")
    assert (new.folder, new.move_count, new.arrived_seq, new.past_folders) == ("archive", 1, 6, ("inbox",))
    assert new.mutable_id() != old_mutable
    assert world.tombstones[(oid, "inbox")][-1] == (new.id, 6, "deleted", old_mutable)
    assert (oid, new.id) in world.expected_matches(tid)  # imported while in the inbox: kept
    assert (oid, new.id) not in world.expected_matches(tid, keep_removed=False)

    victim = next(m for m in world.mailboxes[oid] if m.folder == "sentitems" and m.kind == "contact")
    world.delete_message(victim.id)
    assert victim not in world.mailboxes[oid] and world.removed[oid] == [victim]
    assert world.tombstones[(oid, "sentitems")][-1][:3] == (victim.id, 7, "deleted")
    with pytest.raises(KeyError):
        world.message(victim.id)
    assert world.change_seq == 7 and world.mailbox_seq[oid] == 7
