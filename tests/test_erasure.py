"""Provable erasure: a conversation seeded with unique markers is synced, snapshotted and exported; after
`conversation delete` no byte of it remains in any file under the tenant's folder or the region's analytics/ (raw
bytes and base64 of the live store's tenant file and bucket files, their WALs, the snapshot's views file and every
generation of its copies, exports), it stays gone after the next sync (tombstone), and the audit log holds ids and
counts only. A positive control proves the same grep finds the markers first. Erasing one user rewrites only that
user's bucket; an erasure that dies midway is finished by running it again."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import duckdb
import pytest

import o365sync.erasure
from o365sync.conversations import export_conversation, export_meeting
from o365sync.erasure import ErasureError, Scope, compact_store, erase, read_audit
from o365sync.store import open_store, publish_snapshot, snapshot_leftovers, snapshot_path, store_path
from o365sync.store.partitions import bucket_files, bucket_of, bucket_path, use_bucket
from o365sync.store.publishing import snapshot_parts
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import region_root, tenant_dir
from simulators.world import generate_world
from tests.product import stand_up_with_crm
from tests.traces import file_hits


def tenant_files(settings, tid: str) -> list[Path]:
    """Every file we keep for the tenant: its folder (store, WAL, exports, tokens, ...) and the region's
    analytics/ folder (snapshots)."""
    roots = [tenant_dir(settings, tid), snapshot_path(settings, tid).parent]
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def hits(files: list[Path], needles: list[str]) -> list[str]:
    return sorted({f"{path.name}: {n.decode()}" for path, n in file_hits(files, [n.encode() for n in needles])})


def in_live_bucket(found: list[str]) -> bool:
    """Whether `hits` found something in a live bucket file (`parts/b<k>.duckdb`)."""
    return any(re.match(r"b\d+\.duckdb: ", h) for h in found)


def in_snapshot_copy(found: list[str]) -> bool:
    """Whether `hits` found something in a snapshot generation's copy of a bucket (`<tenant>.parts/b<k>.g<N>...`)."""
    return any(re.match(r"b\d+\.g\d+\.duckdb: ", h) for h in found)


def users_bucket(settings, tid: str, oid: str) -> Path:
    with open_store(settings, tid, write=False) as con:
        (buckets,) = con.execute("SELECT buckets FROM store_layout").fetchone()
    return bucket_path(store_path(settings, tid), bucket_of(oid, buckets))


def inodes(files: dict[int, Path]) -> dict[int, int]:
    return {k: path.stat().st_ino for k, path in files.items()}


def snapshot_files_of(settings, tid: str) -> list[Path]:
    """The views file and every generation's copies."""
    return [p for p in snapshot_path(settings, tid).parent.rglob("*") if p.is_file()]


def sync_all(p) -> None:
    tenant = p.world.tenants[0]
    for u in tenant.users:
        sync_mailbox_now(resolve_tenant(p.settings, tenant.tid), u.oid)
    publish_snapshot(p.settings, tenant.tid)


def seed_marker(world, oid: str, tag: str):
    """A new CRM-matched message with markers in subject and body (long and repeated, so that the store's
    compression keeps a grep-able copy: see the positive controls)."""
    m = world.add_message(oid, "inbox", kind="contact")
    subject, body = f"SUBJMARK{tag}", f"BODYMARK{tag}"
    world.update_message(m.id, subject=f"Proposal {subject}", body=f"Hello,\n{body}\n" + f"{body} " * 20)
    return m, [subject, body]


def count(con, rows: str, *params: str) -> int:
    """How many rows `rows` ("<table> WHERE <condition>") has."""
    return con.execute(f"SELECT count(*) FROM {rows}", list(params)).fetchone()[0]


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=41, users_per_tenant=2, messages_per_user=60, contacts_per_tenant=25)
    yield from stand_up_with_crm(world, tmp_path, monkeypatch, O365SYNC_GRAPH_PAGE_SIZE="50")


@pytest.mark.slow
def test_compaction_removes_deleted_bytes_that_delete_leaves(product):
    """The DuckDB fact this design rests on, checked on our store: DELETE leaves the bytes, the copy does not."""
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    msg, markers = seed_marker(p.world, alice.oid, uuid.uuid4().hex)
    sync_all(p)
    store = users_bucket(p.settings, tid, alice.oid)
    assert hits([store], markers), "positive control: the marker is in the user's bucket file"
    with open_store(p.settings, tid, write=True) as con, use_bucket(con, alice.oid) as bucket:
        for table in ("emails", "email_participants", "email_crm_matches"):
            con.execute(f"DELETE FROM {table} WHERE graph_id = ?", [msg.id])
        con.execute(f"CHECKPOINT b{bucket}")
        con.execute("VACUUM")
    assert hits([store], markers), "DELETE + CHECKPOINT + VACUUM left the bytes (DuckDB keeps them)"
    publish_snapshot(p.settings, tid)
    assert hits(snapshot_files_of(p.settings, tid), markers), "a publish copies the file, dead bytes included"
    sizes = compact_store(p.settings, tid)
    assert hits([store, *snapshot_files_of(p.settings, tid)], markers) == []
    assert not Path(f"{store}.wal").exists()
    assert sizes["bytes_after"] > 0 and sizes["snapshot_bytes"] > 0
    with open_store(p.settings, tid, write=False) as con:  # the compacted store is complete and usable
        assert con.execute("SELECT count(*) FROM emails").fetchone()[0] > 0
        assert con.execute("SELECT count(*) FROM crm_people").fetchone()[0] > 0


@pytest.mark.slow
def test_deleted_conversation_is_in_no_file_and_stays_gone(product):
    p, tid = product, product.world.tenants[0].tid
    alice, bob = p.world.tenants[0].users
    tag = uuid.uuid4().hex
    msg, markers = seed_marker(p.world, alice.oid, tag)
    sync_all(p)
    with open_store(p.settings, tid, write=False) as con:
        (conv,) = con.execute("SELECT conversation_id FROM emails WHERE graph_id = ?", [msg.id]).fetchone()
        addresses = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT address FROM email_participants WHERE graph_id = ?", [msg.id]
            ).fetchall()
        ]
        in_conv = count(con, "emails WHERE conversation_id = ?", conv)
        others = count(con, "emails WHERE conversation_id <> ?", conv)
    exported = export_conversation(p.settings, tid, graph_id=msg.id, user_oid=alice.oid)
    assert exported.items == in_conv and exported.files == in_conv + 1
    doc = json.loads((exported.path / "conversation.json").read_text())
    mine = next(m for m in doc["messages"] if m["graph_id"] == msg.id)
    assert markers[0] in mine["subject"] and markers[1] in mine["body_text"] and mine["crm_links"]
    assert {x["address"] for x in mine["participants"]} == set(addresses)
    eml = next(f.read_bytes() for f in (exported.path / "messages").iterdir() if markers[0].encode() in f.read_bytes())
    assert b"Message-ID:" in eml and b"From:" in eml and b"Date:" in eml and markers[1].encode() in eml

    # Positive control: the same scan finds the markers in the live store, the snapshot and the export.
    files = tenant_files(p.settings, tid)
    before = hits(files, markers)
    assert in_live_bucket(before) and in_snapshot_copy(before)
    assert any(h.startswith("conversation.json") for h in before)

    result = erase(p.settings, tid, Scope.message(msg.id, user_oid=alice.oid), actor="cli:test", reason="user_request")
    assert result.rows["emails"] == in_conv and result.tombstones == 1 and result.exports_removed == exported.files
    assert hits(tenant_files(p.settings, tid), markers) == []
    assert not (tenant_dir(p.settings, tid) / "exports").exists()
    with open_store(p.settings, tid, write=False) as con:
        assert count(con, "emails WHERE conversation_id = ? AND user_oid = ?", conv, alice.oid) == 0
        assert count(con, "emails WHERE conversation_id <> ?", conv) == others
        assert count(con, "email_participants WHERE graph_id = ?", msg.id) == 0

    # The next sync does not bring it back — not even a new reply in the same conversation.
    reply = p.world.add_message(alice.oid, "inbox", kind="contact")
    reply.conversation_id = conv
    p.world.update_message(reply.id, subject=f"Re: Proposal {markers[0]}")
    p.world.update_message(msg.id, is_read=False)  # a change Graph's delta reports
    sync_all(p)
    with open_store(p.settings, tid, write=False) as con:
        assert count(con, "emails WHERE conversation_id = ? AND user_oid = ?", conv, alice.oid) == 0
    assert hits(tenant_files(p.settings, tid), markers) == []

    # The audit log: outside the tenant folder, ids and counts only.
    log = Path(result.audit_path)
    assert log.parent == region_root(p.settings, None) / "audit" and tenant_dir(p.settings, tid) not in log.parents
    entries = read_audit(p.settings, tid)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["scope"] == "message" and entry["ids"]["conversation_ids"] == [conv]
    assert entry["ids"]["user_oids"] == [alice.oid] and entry["rows"]["emails"] == in_conv
    assert entry["actor"] == "cli:test" and entry["complete"] is True
    assert entry["bytes_before"] > 0 and entry["bytes_after"] > 0
    text = log.read_text().lower()
    assert hits([log], markers) == [] and not any(a.lower() in text for a in addresses)


@pytest.mark.slow
def test_a_conversation_deleted_tenant_wide_leaves_other_users_and_exports_nothing(product):
    p, tid = product, product.world.tenants[0].tid
    alice, bob = p.world.tenants[0].users
    sync_all(p)
    with open_store(p.settings, tid, write=False) as con:
        conv, n = con.execute(
            "SELECT conversation_id, count(*) FROM emails WHERE user_oid = ? GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1",
            [bob.oid],
        ).fetchone()
        total = con.execute("SELECT count(*) FROM emails").fetchone()[0]
        holders = [
            r[0]
            for r in con.execute("SELECT DISTINCT user_oid FROM emails WHERE conversation_id = ?", [conv]).fetchall()
        ]
    export_conversation(p.settings, tid, conversation_id=conv)
    buckets = inodes(bucket_files(store_path(p.settings, tid)))
    result = erase(p.settings, tid, Scope.conversation(conv), actor="admin:ops", reason="admin_request")
    assert result.rows["emails"] >= n and result.exports_removed == 1 + result.rows["emails"]
    rewritten = {users_bucket(p.settings, tid, oid) for oid in holders}  # the buckets of the users who had it
    after = bucket_files(store_path(p.settings, tid))
    assert {path for k, path in after.items() if path.stat().st_ino != buckets[k]} == rewritten
    with open_store(p.settings, tid, write=False) as con:
        assert con.execute("SELECT count(*) FROM emails").fetchone()[0] == total - result.rows["emails"]
        assert con.execute("SELECT user_oid FROM erased WHERE key = ?", [conv]).fetchall() == [(None,)]
    with pytest.raises(LookupError):
        export_conversation(p.settings, tid, conversation_id=conv)
    # Idempotent: erasing again deletes nothing, adds no tombstone, still compacts and audits.
    again = erase(p.settings, tid, Scope.conversation(conv), actor="admin:ops", reason="admin_request")
    assert again.deleted == 0 and again.tombstones == 0
    assert [e["rows"].get("emails", 0) for e in read_audit(p.settings, tid)] == [result.rows["emails"], 0]


@pytest.mark.slow
def test_actor_and_reason_are_ids_not_free_text(product):
    tid = product.world.tenants[0].tid
    with pytest.raises(ValueError):
        erase(product.settings, tid, Scope.conversation("x"), actor="Alice <alice@example.com>", reason="user_request")
    with pytest.raises(ValueError):
        erase(product.settings, tid, Scope.conversation("x"), actor="cli:a", reason="because the subject said so")


@pytest.fixture
def calendar_product(tmp_path, monkeypatch):
    world = generate_world(seed=43, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=30, calendars=True)
    yield from stand_up_with_crm(
        world, tmp_path, monkeypatch, features=["email", "calendar"], O365SYNC_GRAPH_PAGE_SIZE="25"
    )


@pytest.mark.slow
def test_deleted_meeting_series_is_in_no_file_and_stays_gone(calendar_product):
    from o365sync.sync.calendar import sync_calendar_now

    p, tid = calendar_product, calendar_product.world.tenants[0].tid
    user = p.world.tenants[0].users[0]
    sync_calendar_now(resolve_tenant(p.settings, tid), user.oid)
    with open_store(p.settings, tid, write=False) as con:
        series, n = con.execute(
            "SELECT series_master_id, count(*) FROM meetings WHERE series_master_id IS NOT NULL "
            "AND event_id IN (SELECT event_id FROM meeting_crm_matches) GROUP BY 1 ORDER BY 2 DESC "
            "LIMIT 1"
        ).fetchone()
    tag = uuid.uuid4().hex
    marker = f"MEETMARK{tag}"
    p.world.calendars.update(series, subject=f"Quarterly review {marker}")
    sync_calendar_now(resolve_tenant(p.settings, tid), user.oid)
    publish_snapshot(p.settings, tid)
    exported = export_meeting(p.settings, tid, series_id=series)
    assert exported.items == n and marker in (exported.path / "meeting.json").read_text()
    assert in_live_bucket(hits(tenant_files(p.settings, tid), [marker]))

    result = erase(p.settings, tid, Scope.series(series), actor="cli:test", reason="user_request")
    assert result.rows["meetings"] == n and result.tombstones == 1
    assert hits(tenant_files(p.settings, tid), [marker]) == []
    p.world.calendars.update(series, subject=f"Quarterly review {marker} (moved)")
    sync_calendar_now(resolve_tenant(p.settings, tid), user.oid)
    with open_store(p.settings, tid, write=False) as con:
        assert (
            con.execute(
                "SELECT count(*) FROM meetings WHERE series_master_id = ? OR event_id = ?", [series, series]
            ).fetchone()[0]
            == 0
        )
    assert hits(tenant_files(p.settings, tid), [marker]) == []
    assert read_audit(p.settings, tid)[-1]["ids"] == {"series_ids": [series]}


@pytest.mark.slow
def test_erasure_removes_the_copy_a_dead_publish_left_beside_the_snapshot(product):
    """A publish killed after copying the live file leaves that copy (`<tenant>.duckdb.tmp`) with every row of the
    moment; the erasure's own publish removes it before anything else."""
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    msg, markers = seed_marker(p.world, alice.oid, uuid.uuid4().hex)
    sync_all(p)
    tmp, tmp_wal = snapshot_leftovers(snapshot_path(p.settings, tid))
    shutil.copyfile(users_bucket(p.settings, tid, alice.oid), tmp)
    shutil.copyfile(tmp, tmp_wal)  # a stand-in for the WAL a dead writer left, copied beside it
    assert hits([tmp], markers) and hits([tmp_wal], markers), "positive control: the leftovers hold the markers"
    erase(p.settings, tid, Scope.message(msg.id, user_oid=alice.oid), actor="cli:test", reason="user_request")
    assert hits(tenant_files(p.settings, tid), markers) == []
    assert not tmp.exists() and not tmp_wal.exists()


def test_compaction_of_a_fresh_store_and_unknown_message(product):
    p, tid = product, product.world.tenants[0].tid
    sizes = compact_store(p.settings, tid)
    assert sizes["bytes_after"] > 0
    with pytest.raises(LookupError):
        erase(p.settings, tid, Scope.message("no-such-id"), actor="cli:test", reason="user_request")
    assert (
        duckdb.connect(str(snapshot_path(p.settings, tid)), read_only=True)
        .execute("SELECT count(*) FROM erased")
        .fetchone()[0]
        == 0
    )


@pytest.mark.slow
def test_cli_conversation_export_and_delete(product):
    import typer
    from typer.testing import CliRunner

    from app.cli_data import conversation_app, meeting_app, offboard_app, retention_app

    app = typer.Typer()
    for sub, name in (
        (conversation_app, "conversation"),
        (meeting_app, "meeting"),
        (retention_app, "retention"),
        (offboard_app, "offboard"),
    ):
        app.add_typer(sub, name=name)
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    msg, markers = seed_marker(p.world, alice.oid, uuid.uuid4().hex)
    sync_all(p)
    run = CliRunner().invoke
    out = run(app, ["conversation", "export", "--tenant", tid, "--message", msg.id], env={"COLUMNS": "300"})
    assert out.exit_code == 0 and "Exported" in out.output and markers[0] not in out.output
    out = run(
        app,
        ["conversation", "delete", "--tenant", tid, "--message", msg.id, "--actor", "cli:tester"],
        env={"COLUMNS": "300"},
    )
    assert out.exit_code == 0 and "Erased message" in out.output and markers[0] not in out.output
    assert hits(tenant_files(p.settings, tid), markers) == []
    assert run(app, ["conversation", "delete", "--tenant", tid]).exit_code == 1
    assert run(app, ["offboard", "tenant", "--tenant", tid]).exit_code == 1  # needs --yes
    assert read_audit(p.settings, tid)[-1]["actor"] == "cli:tester"


@pytest.mark.slow
def test_erasing_one_user_rewrites_only_that_users_bucket(product):
    """P6 (issue 14): the user's bucket and the small tenant file are rewritten; every other bucket file stays the
    same file (same inode), so the erasure costs one bucket's compaction, not the whole store's."""
    p, tid = product, product.world.tenants[0].tid
    alice, bob = p.world.tenants[0].users
    msg, markers = seed_marker(p.world, alice.oid, uuid.uuid4().hex)
    sync_all(p)
    store = store_path(p.settings, tid)
    mine, theirs = users_bucket(p.settings, tid, alice.oid), users_bucket(p.settings, tid, bob.oid)
    assert mine != theirs, "the fixture's two users hash to different buckets"
    before, tenant_inode = inodes(bucket_files(store)), store.stat().st_ino
    assert hits([mine], markers) and not hits([theirs], markers), "positive control: the markers are in alice's"
    copies = snapshot_parts(snapshot_path(p.settings, tid))
    bobs_copies = {path: path.stat().st_ino for path in copies.glob(f"{theirs.stem}.g*.duckdb")}
    assert bobs_copies, "the snapshot has a copy of bob's bucket"
    with open_store(p.settings, tid, write=False) as con:
        bobs = count(con, "emails WHERE user_oid = ?", bob.oid)

    result = erase(p.settings, tid, Scope.user(alice.oid), actor="cli:test", reason="admin_request")
    assert result.rows["emails"] > 0 and result.rows["mail_cursor"] > 0
    after = inodes(bucket_files(store))
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {int(mine.name[1 : -len(".duckdb")])}
    assert store.stat().st_ino != tenant_inode, "the tenant file is compacted too (Teams rows, shares)"
    # the new snapshot generation still reads the copy of bob's bucket made before: nothing of his was copied again
    assert {path: path.stat().st_ino for path in copies.glob(f"{theirs.stem}.g*.duckdb")} == bobs_copies
    assert hits(tenant_files(p.settings, tid), markers) == []
    with open_store(p.settings, tid, write=False) as con:
        assert count(con, "emails WHERE user_oid = ?", alice.oid) == 0
        assert count(con, "emails WHERE user_oid = ?", bob.oid) == bobs


@pytest.mark.slow
def test_an_erasure_that_died_before_its_compaction_is_finished_by_running_it_again(product, monkeypatch):
    """A conversation erased tenant-wide: the tenant file's tombstone and the bucket's DELETE commit, then the
    process fails before the compaction. The rows are gone but their bytes are not; running the erasure again finds
    no row any more, yet compacts that bucket (recorded as pending) and leaves no byte of them anywhere."""
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    msg, markers = seed_marker(p.world, alice.oid, uuid.uuid4().hex)
    sync_all(p)
    with open_store(p.settings, tid, write=False) as con:
        (conv,) = con.execute("SELECT conversation_id FROM emails WHERE graph_id = ?", [msg.id]).fetchone()
    compact = o365sync.erasure.compact_live_store

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(o365sync.erasure, "compact_live_store", dies)
    with pytest.raises(ErasureError, match="run the erasure again"):
        erase(p.settings, tid, Scope.conversation(conv), actor="cli:test", reason="user_request")
    assert read_audit(p.settings, tid)[-1]["complete"] is False
    with open_store(p.settings, tid, write=False) as con:
        assert count(con, "emails WHERE conversation_id = ?", conv) == 0
    assert in_live_bucket(hits(tenant_files(p.settings, tid), markers)), "deleted, but the bytes are still there"

    monkeypatch.setattr(o365sync.erasure, "compact_live_store", compact)
    again = erase(p.settings, tid, Scope.conversation(conv), actor="cli:test", reason="user_request")
    assert again.deleted == 0 and again.tombstones == 0
    assert hits(tenant_files(p.settings, tid), markers) == []
    assert read_audit(p.settings, tid)[-1]["complete"] is True
    assert not (tenant_dir(p.settings, tid) / o365sync.erasure.PENDING_FILE).exists()


@pytest.mark.slow
def test_an_erasure_that_died_between_the_tenant_file_and_the_bucket_is_finished_by_running_it_again(
    product, monkeypatch
):
    """The tenant file's transaction (tombstone) committed, the bucket's DELETE did not: the rows are still stored,
    and running the erasure again (the id counts as matched: it is tombstoned) deletes and compacts them."""
    p, tid = product, product.world.tenants[0].tid
    alice = p.world.tenants[0].users[0]
    msg, markers = seed_marker(p.world, alice.oid, uuid.uuid4().hex)
    sync_all(p)
    delete = o365sync.erasure._delete_bucket_rows

    def dies(*args, **kwargs):
        raise OSError("killed")  # stands in for a process that dies here

    monkeypatch.setattr(o365sync.erasure, "_delete_bucket_rows", dies)
    scope = Scope.message(msg.id, user_oid=alice.oid)
    with pytest.raises(ErasureError):
        erase(p.settings, tid, scope, actor="cli:test", reason="user_request")
    with open_store(p.settings, tid, write=False) as con:
        assert count(con, "emails WHERE graph_id = ?", msg.id) == 1
        assert count(con, "erased WHERE user_oid = ?", alice.oid) == 1
    monkeypatch.setattr(o365sync.erasure, "_delete_bucket_rows", delete)
    done = erase(p.settings, tid, scope, actor="cli:test", reason="user_request")
    assert done.rows["emails"] >= 1 and done.tombstones == 0
    assert hits(tenant_files(p.settings, tid), markers) == []
