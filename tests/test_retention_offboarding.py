"""Retention, offboarding and subscription end through the real Prefect flows, against real DuckDB files: markers
seeded into synced mail are found by the byte scan before (positive control) and in no file after; retention
spares conversations of open opportunities; the audit log holds ids and counts only."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.email_sync import email_sync
from flows.offboarding import end_subscription, offboard_user
from flows.retention import retention
from o365sync.auth import connected_users, token_path
from o365sync.conversations import export_conversation
from o365sync.erasure import USER_TABLES, audit_path, read_audit
from o365sync.offboarding import complete_due_offboardings, offboarding_status
from o365sync.store import bucket_files, open_store, publish_snapshot, snapshot_path, store_path
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import load_tenant, registry_dir, save_tenant, tenant_dir
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.product import stand_up_with_crm
from tests.test_erasure import hits, in_live_bucket, in_snapshot_copy, tenant_files

pytestmark = pytest.mark.slow  # every test here runs Prefect flows or takes seconds


def sync_all(p) -> None:
    tenant = p.world.tenants[0]
    for u in connected_users(p.settings, tenant.tid):
        sync_mailbox_now(resolve_tenant(p.settings, tenant.tid), u.oid)
    publish_snapshot(p.settings, tenant.tid)


def seed(world, oid: str, received: datetime | None = None) -> tuple[str, list[str]]:
    tag = uuid.uuid4().hex
    m = world.add_message(oid, "inbox", kind="contact", received=received)
    markers = [f"SUBJMARK{tag}", f"BODYMARK{tag}"]
    world.update_message(m.id, subject=f"Offer {markers[0]}", body=f"Hi,\n{markers[1]}\n" + f"{markers[1]} " * 20)
    return m.id, markers


def user_rows(settings, tid: str, oid: str) -> dict[str, int]:
    with open_store(settings, tid, write=False) as con:
        return {
            t: con.execute(f"SELECT count(*) FROM {t} WHERE user_oid = ?", [oid]).fetchone()[0] for t in USER_TABLES
        }


def assert_audit_has_no_content(settings, tid: str, needles: list[str], region=None) -> list[dict]:
    log = audit_path(settings, tid, region)
    text = log.read_text().lower()
    assert not any(n.lower() in text for n in needles), "content in the audit log"
    assert "@" not in text.replace("flow:", "").replace("cli:", ""), "an address in the audit log"
    return read_audit(settings, tid, region)


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=47, users_per_tenant=2, messages_per_user=80, contacts_per_tenant=25)
    yield from stand_up_with_crm(
        world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="50", O365SYNC_CRM_RECONCILE_HOURS="0"
    )


def _conversation_accounts(con, conv: str) -> set[str]:
    """Accounts a conversation is linked to: matched accounts, and the accounts of matched people."""
    rows = con.execute(
        "SELECT c.crm_id, p.account_id FROM emails e JOIN email_crm_matches c USING (tenant_id, "
        "user_oid, graph_id) LEFT JOIN crm_people p ON p.crm_id = c.crm_id WHERE e.conversation_id = ?",
        [conv],
    ).fetchall()
    return {r[1] or r[0] for r in rows}


def test_shortening_retention_purges_on_the_next_run_and_spares_open_opportunities(prefect_server, product):
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    now = datetime.now(UTC)
    gid, markers = seed(p.world, alice.oid, received=now - timedelta(days=20))
    sync_all(p)
    with open_store(p.settings, tid, write=False) as con:
        conv = con.execute("SELECT conversation_id FROM emails WHERE graph_id = ?", [gid]).fetchone()[0]
        marker_accounts = _conversation_accounts(con, conv)
    # The marker's conversation is linked to no open opportunity (close them in the CRM); others stay open.
    for opp in p.world.crm[tid].opportunities:
        if opp.account_id in marker_accounts and not opp.is_closed:
            p.running.salesforce.close_opportunity(tid, opp.id)
    refresh_crm_snapshot(p.settings, tid)
    cutoff = now - timedelta(days=10)
    with open_store(p.settings, tid, write=False) as con:
        open_accounts = {
            r[0] for r in con.execute("SELECT account_id FROM crm_opportunities WHERE NOT is_closed").fetchall()
        }
        old = con.execute(
            "SELECT conversation_id, count(*) FROM emails GROUP BY 1 HAVING max(coalesce(received_at, sent_at)) < ?",
            [cutoff],
        ).fetchall()
        exempt = {c: n for c, n in old if _conversation_accounts(con, c) & open_accounts}
        total = con.execute("SELECT count(*) FROM emails").fetchone()[0]
        young = con.execute(
            "SELECT count(*) FROM emails WHERE coalesce(received_at, sent_at) >= ?", [cutoff]
        ).fetchone()[0]
    assert open_accounts and exempt and conv not in exempt, "the world should have exempt old conversations"

    first = retention(tid)  # default 1095 days: nothing is that old
    assert first["emails_deleted"] == 0 and first["users_erased"] == 0
    before = hits(tenant_files(p.settings, tid), markers)
    assert in_live_bucket(before) and in_snapshot_copy(before)

    tenant = load_tenant(p.settings, tid)
    tenant.retention_days = 10
    save_tenant(p.settings, tenant)
    buckets = {path: path.stat().st_ino for path in bucket_files(store_path(p.settings, tid)).values()}
    second = retention(tid)
    assert second["emails_deleted"] > 0 and second["emails_exempt"] >= sum(exempt.values())
    # every bucket is rewritten (also the bytes of rows the syncs replaced go), one at a time
    assert len(buckets) == 2 and all(path.stat().st_ino != inode for path, inode in buckets.items())
    assert hits(tenant_files(p.settings, tid), markers) == []
    with open_store(p.settings, tid, write=False) as con:
        assert con.execute("SELECT count(*) FROM emails WHERE graph_id = ?", [gid]).fetchone()[0] == 0
        kept = dict(con.execute("SELECT conversation_id, count(*) FROM emails GROUP BY 1").fetchall())
        left_old = con.execute(
            "SELECT count(*) FROM emails WHERE coalesce(received_at, sent_at) < ?", [cutoff]
        ).fetchone()[0]
        remaining = con.execute("SELECT count(*) FROM emails").fetchone()[0]
    assert all(kept.get(c) == n for c, n in exempt.items()), "open-opportunity conversations are spared"
    assert remaining == total - second["emails_deleted"] and remaining >= young
    assert left_old == second["emails_exempt"]
    entries = assert_audit_has_no_content(p.settings, tid, markers)
    assert [e["reason"] for e in entries] == ["retention", "retention"]
    assert entries[1]["rows"]["emails"] == second["emails_deleted"] and entries[1]["ids"] == {}


def test_offboarded_user_is_erased_from_every_file_and_not_synced_again(prefect_server, product):
    p, tid = product, product.world.tenants[0].tid
    alice, bob = p.world.tenants[0].users
    gid, markers = seed(p.world, bob.oid)
    sync_all(p)
    export_conversation(p.settings, tid, graph_id=gid, user_oid=bob.oid)
    alice_before = user_rows(p.settings, tid, alice.oid)
    assert user_rows(p.settings, tid, bob.oid)["emails"] > 0
    with open_store(p.settings, tid, write=False) as con:
        addresses = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT address FROM email_participants WHERE user_oid = ?", [bob.oid]
            ).fetchall()
        ]
    assert in_live_bucket(hits(tenant_files(p.settings, tid), markers))

    out = offboard_user(tid, bob.oid)  # default policy: delete, no grace period
    assert out["deleted"] == 1 and out["deleted_rows"] > 0
    assert hits(tenant_files(p.settings, tid), markers) == []
    assert not token_path(p.settings, tid, bob.oid).exists()
    assert [u.oid for u in connected_users(p.settings, tid)] == [alice.oid]
    assert sum(user_rows(p.settings, tid, bob.oid).values()) == 0
    assert user_rows(p.settings, tid, alice.oid) == alice_before
    assert offboarding_status(p.settings, tid)[bob.oid]["deleted_at"]

    p.world.add_message(bob.oid, "inbox", kind="contact")
    email_sync(tid)  # the real sync flow: bob has no token, nothing of his comes back
    assert sum(user_rows(p.settings, tid, bob.oid).values()) == 0
    assert hits(tenant_files(p.settings, tid), markers) == []
    entries = assert_audit_has_no_content(p.settings, tid, markers + addresses)
    assert [(e["action"], e.get("reason")) for e in entries] == [("offboard", None), ("erase", "offboarding")]
    assert entries[1]["ids"] == {"user_oids": [bob.oid]} and entries[1]["rows"]["emails"] > 0
    assert entries[1]["token_caches_removed"] == 0 and entries[0]["token_caches_removed"] == 1


def test_grace_period_then_retention_completes_the_deletion_and_retain_keeps_data(prefect_server, product):
    p, tid = product, product.world.tenants[0].tid
    alice, bob = p.world.tenants[0].users
    sync_all(p)
    tenant = load_tenant(p.settings, tid)
    tenant.offboarding_grace_days = 2
    save_tenant(p.settings, tenant)
    kept = user_rows(p.settings, tid, bob.oid)

    out = offboard_user(tid, bob.oid)
    assert out == {"deleted_rows": 0, "deleted": 0}
    assert not token_path(p.settings, tid, bob.oid).exists()  # sync stops during the grace period
    assert user_rows(p.settings, tid, bob.oid) == kept
    assert retention(tid)["users_erased"] == 0  # not due yet
    record = offboarding_status(p.settings, tid)[bob.oid]
    assert record["policy"] == "delete" and record["deleted_at"] is None
    done = complete_due_offboardings(p.settings, tid, now=datetime.now(UTC) + timedelta(days=3))
    assert [d["user_oid"] for d in done] == [bob.oid] and done[0]["deleted_rows"] == sum(kept.values())
    assert sum(user_rows(p.settings, tid, bob.oid).values()) == 0

    tenant.offboarding = "retain"
    save_tenant(p.settings, tenant)
    alice_rows = user_rows(p.settings, tid, alice.oid)
    assert offboard_user(tid, alice.oid) == {"deleted_rows": 0, "deleted": 0}
    assert not token_path(p.settings, tid, alice.oid).exists() and connected_users(p.settings, tid) == []
    assert user_rows(p.settings, tid, alice.oid) == alice_rows
    assert offboarding_status(p.settings, tid)[alice.oid] | {"offboarded_at": ""} == {
        "policy": "retain",
        "offboarded_at": "",
        "delete_after": None,
        "deleted_at": None,
    }
    assert retention(tid)["users_erased"] == 0
    assert user_rows(p.settings, tid, alice.oid) == alice_rows


def test_end_of_subscription_leaves_only_the_audit_log(prefect_server, product):
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    gid, markers = seed(p.world, alice.oid)
    sync_all(p)
    export_conversation(p.settings, tid, graph_id=gid)
    folder, snap, registry = tenant_dir(p.settings, tid), snapshot_path(p.settings, tid), registry_dir(p.settings, tid)
    assert (folder / "crm.secret").exists() and (folder / "connections").exists() and snap.exists()
    before = {f for f in p.settings.data_dir.rglob("*") if f.is_file()}

    totals = end_subscription(tid)
    assert totals["users"] == 2 and totals["rows"] > 0 and totals["files"] > 0
    assert not folder.exists() and not snap.exists() and not registry.exists()
    after = {f for f in p.settings.data_dir.rglob("*") if f.is_file()}
    log = audit_path(p.settings, tid, None)
    assert after - before == {log}
    assert {f.relative_to(p.settings.data_dir) for f in after} == {Path("audit") / f"{tid}.jsonl", Path("secret.key")}
    assert hits(sorted(after), markers) == []
    entries = assert_audit_has_no_content(p.settings, tid, markers)
    assert entries[-1]["scope"] == "tenant" and entries[-1]["reason"] == "subscription_end"
    assert entries[-1]["rows"]["emails"] > 0 and sorted(entries[-1]["ids"]["user_oids"]) == sorted(
        u.oid for u in p.world.tenants[0].users
    )
