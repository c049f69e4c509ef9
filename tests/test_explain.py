"""`explain` against the simulated world's oracle: for one message of every exclusion reason and every match kind
of the world, the decision is the oracle's, the CRM records are the oracle's, the primary is the one the pipeline
stored, stored/not-stored agrees with the store after a real sync, and no file of the data dir changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from o365sync.explain import explain_message
from o365sync.store import open_store
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import load_tenant, save_tenant
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

    from app.cli import app

    mid = next(v for k, v in cases.items() if k.startswith("matched:"))
    out = CliRunner().invoke(app, ["explain", "--tenant", tid, "--user", oid, "--message", mid])
    assert out.exit_code == 0, out.output
    assert "decision: matched" in out.output and "primary" in out.output and "stored now: yes" in out.output
    assert _hashes(p.settings.data_dir) == before


@pytest.mark.slow
def test_an_erased_message_is_explained_as_erased(synced):
    from o365sync.erasure import Scope, erase

    p, oid, blocklist = synced
    tid = p.world.tenants[0].tid
    mid = sorted(p.world.expected_matches(tid, blocklist=blocklist))[0][1]
    erase(p.settings, tid, Scope.message(mid, user_oid=oid), actor="test:explain", reason="user_request")
    got = explain_message(resolve_tenant(p.settings, tid), oid, mid)
    assert got.decision == "matched" and got.erased and not got.stored
