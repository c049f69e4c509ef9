"""A record deleted in the CRM stops matching mail from the next refresh on (an incremental one), end to end:
simulated CRM + Graph, real adapters, the store and the mailbox sync. Mail imported before the deletion stays."""

from __future__ import annotations

import copy

import pytest

from o365sync.store import open_store
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.crm_helpers import delete_in_crm
from tests.product import expected_for_crm, stand_up, stored_matches


@pytest.mark.slow
@pytest.mark.parametrize("crm_kind", ["salesforce", "hubspot", "pipedrive"])
def test_a_deleted_contact_stops_matching_after_the_next_refresh(tmp_path, monkeypatch, crm_kind):
    world = generate_world(seed=23, users_per_tenant=1, messages_per_user=60, contacts_per_tenant=30)
    p = stand_up(world, tmp_path, monkeypatch, crm_kind=crm_kind)
    try:
        tid, user = world.tenants[0].tid, world.tenants[0].users[0]
        assert refresh_crm_snapshot(p.settings, tid)["mode"] == "full"
        sync_mailbox_now(resolve_tenant(p.settings, tid), user.oid)
        before = stored_matches(p.settings, tid)

        # New mail arrives from CRM contacts; pick one contact it links to and delete that contact in the CRM.
        new = [world.add_message(user.oid, "inbox", kind="contact") for _ in range(12)]
        truth = world.expected_matches(tid)
        contact_ids = {c.id for c in world.crm[tid].contacts}
        victim = next(i for m in new for i in sorted(truth.get((user.oid, m.id), ())) if i in contact_ids)
        delete_in_crm(p.running, crm_kind, tid, victim)
        world.crm[tid] = crm = copy.deepcopy(world.crm[tid])
        crm.contacts = [c for c in crm.contacts if c.id != victim]

        refreshed = refresh_crm_snapshot(p.settings, tid)
        assert refreshed["mode"] == "incremental" and refreshed["changed"] >= 1
        sync_mailbox_now(resolve_tenant(p.settings, tid), user.oid)

        expected = expected_for_crm(world, tid, p.running, crm_kind)  # the CRM without the deleted contact
        stored = stored_matches(p.settings, tid)
        new_keys = {(user.oid, m.id) for m in new}
        assert {k: v for k, v in stored.items() if k in new_keys} == {
            k: v for k, v in expected.items() if k in new_keys
        }
        victim_id = expected_for_crm_id(p.running, crm_kind, tid, victim)
        assert all(victim_id not in stored.get(k, ()) for k in new_keys)
        assert {k: v for k, v in stored.items() if k in before} == before  # imported mail keeps its links
        with open_store(p.settings, tid, write=False) as con:
            assert con.execute("SELECT count(*) FROM crm_people WHERE crm_id = ?", [victim_id]).fetchone()[0] == 0
    finally:
        p.running.stop()


def expected_for_crm_id(running, crm_kind: str, tid: str, world_id: str) -> str:
    if crm_kind == "hubspot":
        return running.hubspot.hs_id(tid, world_id)
    if crm_kind == "pipedrive":
        return str(running.pipedrive.ids[tid]["persons"][world_id])
    return world_id


def test_a_converted_lead_matches_only_through_its_contact(tmp_path, monkeypatch):
    """Salesforce sim -> adapter (incremental refresh) -> store -> matcher: after conversion, mail from the lead's
    address (any case) links to the new contact, never to the lead."""
    import polars as pl

    from o365sync.crm_index import crm_index_for
    from o365sync.matching import match_participants
    from o365sync.tenants import load_tenant

    world = generate_world(seed=29, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=20)
    p = stand_up(world, tmp_path, monkeypatch)
    try:
        tid = world.tenants[0].tid
        refresh_crm_snapshot(p.settings, tid)
        lead = next(x for x in world.crm[tid].leads if not x.is_converted)
        address = lead.email.strip().upper()
        parts = pl.DataFrame({"graph_id": ["m1"], "address": [f"  {address} "], "role": ["from"]})
        tenant = load_tenant(p.settings, tid)
        before = match_participants(parts, crm_index_for(p.settings, tenant)[0])
        assert before.select("crm_id", "crm_kind").rows() == [(lead.id, "lead")]

        contact_id = p.running.salesforce.convert_lead(tid, lead.id)
        assert refresh_crm_snapshot(p.settings, tid)["mode"] == "incremental"
        after = match_participants(parts, crm_index_for(p.settings, tenant)[0])
        assert after.select("crm_id", "crm_kind", "is_primary").rows() == [(contact_id, "contact", True)]
    finally:
        p.running.stop()
