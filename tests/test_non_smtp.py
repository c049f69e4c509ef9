"""Participants with an X500/EX address, or only a name, instead of SMTP: resolved through their display name only
when the names we know (connected users, CRM people) give exactly one address — in the resolver itself, in the
oracle, and end to end against the simulators (the stored mail equals the oracle's, and the run counts each case
by reason)."""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from o365sync.participants import AMBIGUOUS, UNRESOLVED, build_name_index, resolve_non_smtp
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from simulators.world import add_non_smtp_participants, generate_world, x500_address
from tests.product import stand_up_with_crm, stored_matches

X500 = x500_address("someone")


def _participants(*rows: tuple[str | None, str | None]) -> pl.DataFrame:
    return pl.DataFrame(
        [{"graph_id": f"m{i}", "role": "from", "name": n, "address": a} for i, (n, a) in enumerate(rows)],
        schema={"graph_id": pl.String, "role": pl.String, "name": pl.String, "address": pl.String},
    )


def test_a_unique_name_resolves_two_candidates_never_do():
    names = build_name_index(
        [("Ada Lovelace", "ada@contoso.com")],
        [("Grace Hopper", "Grace@Navy.example"), ("Alan Turing", "alan@a.example"), ("alan  TURING", "at@b.example")],
    )
    out, reasons = resolve_non_smtp(
        _participants(
            ("Grace  hopper", X500.upper()),
            ("Alan Turing", X500),
            ("Ada Lovelace", X500),
            ("Nobody Known", X500),
            (None, X500),
            ("Grace Hopper", "grace@elsewhere.example"),  # an SMTP address is never touched
            ("Grace Hopper", None),  # a name only: resolved
            ("Sales Team", None),  # a name only, unknown: dropped
        ),
        names,
    )
    assert out["address"].to_list() == [
        "grace@navy.example",
        X500,
        "ada@contoso.com",
        X500,
        X500,
        "grace@elsewhere.example",
        "grace@navy.example",
    ]
    assert reasons == Counter(
        {
            "non_smtp_resolved_by_crm_name": 2,
            "non_smtp_resolved_by_directory": 1,
            AMBIGUOUS: 1,
            UNRESOLVED: 3,
        }
    )


def test_a_name_in_the_directory_and_the_crm_with_two_addresses_is_ambiguous():
    names = build_name_index([("Sam Lee", "sam@contoso.com")], [("Sam Lee", "sam@customer.example")])
    assert names.resolve("Sam Lee") == (None, AMBIGUOUS)
    same = build_name_index([("Sam Lee", "sam@contoso.com")], [("Sam Lee", " SAM@contoso.com")])
    assert same.resolve("sam lee") == ("sam@contoso.com", "non_smtp_resolved_by_directory")


@given(st.lists(st.tuples(st.sampled_from(["A B", "a  b", "C D", "E"]), st.sampled_from(["x@1.io", "y@2.io"]))))
def test_resolution_never_picks_between_candidates(pairs):
    names = build_name_index([], pairs)
    for name in ("A B", "C D", "E", "F"):
        address, reason = names.resolve(name)
        candidates = {a for n, a in pairs if " ".join(n.split()).casefold() == " ".join(name.split()).casefold()}
        assert (address is not None) == (len(candidates) == 1)
        assert address is None or address in candidates
        assert reason == (AMBIGUOUS if len(candidates) > 1 else reason)


def test_the_oracle_resolves_x500_only_by_a_unique_name():
    world = generate_world(seed=3, users_per_tenant=2, messages_per_user=40, contacts_per_tenant=20)
    owner = world.tenants[0].users[0]
    added = add_non_smtp_participants(world, owner.oid)
    expected = world.expected_matches(world.tenants[0].tid)
    exclusions = world.exclusions(world.tenants[0].tid)
    assert (owner.oid, added["crm_unique"].id) in expected
    assert (owner.oid, added["name_only_crm"].id) in expected
    for label in ("crm_ambiguous", "unknown", "directory", "name_only_unknown"):
        if label in added:
            assert exclusions[(owner.oid, added[label].id)] == "internal_only"


@pytest.mark.slow
def test_x500_participants_are_imported_exactly_as_the_oracle_says(tmp_path, monkeypatch):
    world = generate_world(seed=5, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30)
    tenant, owner = world.tenants[0], world.tenants[0].users[0]
    added = add_non_smtp_participants(world, owner.oid)
    assert "directory" in added
    for p in stand_up_with_crm(world, tmp_path, monkeypatch):
        counts = {u.oid: sync_mailbox_now(resolve_tenant(p.settings, tenant.tid), u.oid) for u in tenant.users}
        stored = stored_matches(p.settings, tenant.tid)
        assert stored == world.expected_matches(tenant.tid)
        assert {(owner.oid, added[k].id) for k in ("crm_unique", "name_only_crm")} <= stored.keys()
        unresolved = ("crm_ambiguous", "unknown", "directory", "name_only_unknown")
        assert all((owner.oid, added[k].id) not in stored for k in unresolved)
        reasons = dict(counts[owner.oid].excluded)
        assert reasons["non_smtp_resolved_by_crm_name"] == 2  # the X500 one and the name-only one
        assert reasons["non_smtp_resolved_by_directory"] == 1
        assert reasons[AMBIGUOUS] == 1 and reasons[UNRESOLVED] == 2
