"""The analyst views over a published snapshot, checked against the store's own tables and the simulated world,
and the Parquet export of them (read from the snapshot, never the live store; atomic)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import duckdb
import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from app.cli_analytics import export
from o365sync.analytics import DEFAULT_EXPORT, VIEW_NAMES, create_views, export_views, open_snapshot
from o365sync.store import (
    open_store,
    publish_snapshot,
    record_sync_state,
    snapshot_parts,
    snapshot_path,
    store_lock,
    store_path,
)
from o365sync.sync.calendar import sync_calendar_now
from o365sync.sync.mailbox import sync_mailbox_now
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import tenant_dir
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.product import stand_up


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    """One synced tenant (mail + calendar of two users), its sync states, and a published snapshot."""
    world = generate_world(seed=23, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30, calendars=True)
    with pytest.MonkeyPatch.context() as mp:
        p = stand_up(world, tmp_path_factory.mktemp("analytics"), mp, features=["email", "calendar"])
        tid = world.tenants[0].tid
        refresh_crm_snapshot(p.settings, tid)
        alice, bob = world.tenants[0].users
        for u in (alice, bob):
            sync_mailbox_now(resolve_tenant(p.settings, tid), u.oid)
            sync_calendar_now(resolve_tenant(p.settings, tid), u.oid)
        with open_store(p.settings, tid, write=True) as con:
            record_sync_state(con, tid, alice.oid, "idle", feature="email")
            record_sync_state(con, tid, alice.oid, "idle", feature="calendar")
            record_sync_state(con, tid, bob.oid, "reconnect_needed", error="invalid_grant", feature="email")
            record_sync_state(con, tid, bob.oid, "consent_needed", error="consent_needed", feature="calendar")
        publish_snapshot(p.settings, tid)
        yield p
        p.running.stop()


def analyst(p) -> duckdb.DuckDBPyConnection:
    """What an analyst opens: the published snapshot, read-only (views added to a copy until publish does it)."""
    tid = p.world.tenants[0].tid
    path = snapshot_path(p.settings, tid)
    with duckdb.connect(str(path), read_only=True) as con:
        has_views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()} >= set(VIEW_NAMES)
    if not has_views:
        copy = path.with_name(f"{tid}.with-views-{path.stat().st_ino}.duckdb")
        if not copy.exists():
            copy.write_bytes(path.read_bytes())
            with duckdb.connect(str(copy)) as con:
                create_views(con, tenant_id=tid)
        path = copy
    con = duckdb.connect(str(path), read_only=True)
    con.execute("SET TimeZone='UTC'")
    return con


@pytest.mark.slow
def test_activities_has_one_row_per_email_and_meeting_with_its_primary_crm_link(product):
    con = analyst(product)
    emails = con.execute("SELECT user_oid, graph_id FROM emails").fetchall()
    meetings = con.execute("SELECT user_oid, event_id FROM meetings").fetchall()
    rows = con.execute("SELECT kind, user_oid, activity_id FROM activities").fetchall()
    assert len(emails) > 20 and len(meetings) > 5
    assert sorted(rows) == sorted([("email", *e) for e in emails] + [("meeting", *m) for m in meetings])
    primaries = dict(
        ((k, o, a), (c, ck))
        for k, o, a, c, ck in con.execute(
            "SELECT 'email', user_oid, graph_id, crm_id, crm_kind FROM email_crm_matches WHERE is_primary UNION ALL "
            "SELECT 'meeting', user_oid, event_id, crm_id, crm_kind FROM meeting_crm_matches WHERE is_primary"
        ).fetchall()
    )
    got = {
        (k, o, a): (c, ck)
        for k, o, a, c, ck in con.execute(
            "SELECT kind, user_oid, activity_id, primary_crm_id, primary_crm_kind FROM activities"
        ).fetchall()
    }
    assert got == primaries
    # Every email is a matched one; the thread id is the conversation (mail) or the series (meetings).
    assert (
        con.execute(
            "SELECT count(*) FROM activities WHERE crm_match_count = 0 OR occurred_at IS NULL OR thread_id IS NULL"
        ).fetchall()[0][0]
        == 0
    )
    assert (
        con.execute(
            "SELECT count(*) FROM activities a JOIN meetings m ON m.event_id = a.activity_id "
            "WHERE a.thread_id <> coalesce(m.series_master_id, m.event_id)"
        ).fetchall()[0][0]
        == 0
    )


def test_the_crm_account_is_resolved_through_the_matched_person(product):
    world, tid = product.world, product.world.tenants[0].tid
    crm = world.crm[tid]
    account_of = {c.id: c.account_id for c in crm.contacts} | {a.id: a.id for a in crm.accounts}
    names = {a.id: a.name for a in crm.accounts}
    con = analyst(product)
    rows = con.execute(
        "SELECT primary_crm_id, primary_crm_kind, crm_account_id, crm_account_name FROM activities"
    ).fetchall()
    kinds = {kind for _c, kind, _a, _n in rows}
    assert {"contact", "account"} <= kinds
    for crm_id, kind, account_id, account_name in rows:
        if kind in ("contact", "account"):
            assert account_id == account_of[crm_id]
            assert account_name == (names[account_id] if account_id else None)
        elif kind == "lead":
            assert account_id is None  # an unconverted lead belongs to no account yet
    # An account's activities: its own domain matches plus its contacts' mail.
    per_account = dict(
        con.execute(
            "SELECT crm_account_id, count(*) FROM activities WHERE crm_account_id IS NOT NULL GROUP BY ALL"
        ).fetchall()
    )
    assert sum(per_account.values()) == sum(1 for _c, _k, a, _n in rows if a is not None)


def test_crm_matches_unions_every_email_and_meeting_link(product):
    con = analyst(product)
    links = con.execute(
        "SELECT 'email', user_oid, graph_id, crm_id, crm_kind, matched_address, is_primary "
        "FROM email_crm_matches UNION ALL SELECT 'meeting', user_oid, event_id, crm_id, crm_kind, "
        "matched_address, is_primary FROM meeting_crm_matches"
    ).fetchall()
    view = con.execute(
        "SELECT kind, user_oid, activity_id, crm_id, crm_kind, matched_address, is_primary FROM crm_matches"
    ).fetchall()
    assert sorted(view) == sorted(links)
    assert {r[0] for r in view} == {"email", "meeting"}
    assert (
        con.execute("SELECT count(*) FROM crm_matches WHERE occurred_at IS NULL OR crm_name IS NULL").fetchall()[0][0]
        == 0
    )
    one_primary = con.execute(
        "SELECT DISTINCT count(*) FILTER (WHERE is_primary) FROM crm_matches GROUP BY kind, user_oid, activity_id"
    ).fetchall()
    assert one_primary == [(1,)]


def test_email_and_meeting_activity_carry_their_own_columns(product):
    con = analyst(product)
    tid = product.world.tenants[0].tid
    by_id = {m.id: m for u in product.world.tenants[0].users for m in product.world.mailboxes[u.oid]}
    for gid, direction, to, cc, occurred in con.execute(
        "SELECT activity_id, direction, to_addresses, cc_addresses, occurred_at FROM email_activity"
    ).fetchall():
        msg = by_id[gid]
        assert direction == ("outbound" if msg.folder == "sentitems" else "inbound")
        assert to == sorted({a.address.strip().lower() for a in msg.to if a.address and a.address.strip()})
        assert cc == sorted({a.address.strip().lower() for a in msg.cc if a.address and a.address.strip()})
        assert occurred == (msg.sent if msg.folder == "sentitems" else msg.received)
    bad = con.execute(
        "SELECT count(*) FROM meeting_activity WHERE duration_minutes < 0 OR attendee_count < 0 "
        "OR occurred_at <> start_at OR tenant_id <> ?",
        [tid],
    ).fetchall()[0][0]
    assert bad == 0


def test_sync_status_shows_stage_lag_failures_and_who_must_reconnect(product):
    alice, bob = product.world.tenants[0].users
    con = analyst(product)
    rows = {
        (r[0], r[1]): r[2:]
        for r in con.execute(
            "SELECT user_oid, feature, stage, lag_seconds, consecutive_failures, next_retry_at, needs_reconnect, "
            "needs_consent FROM sync_status"
        ).fetchall()
    }
    assert set(rows) == {(alice.oid, "email"), (alice.oid, "calendar"), (bob.oid, "email"), (bob.oid, "calendar")}
    stage, lag, failures, retry, reconnect, consent = rows[(alice.oid, "email")]
    assert (stage, failures, retry, reconnect, consent) == ("idle", 0, None, False, False) and 0 <= lag < 3600
    assert rows[(bob.oid, "email")][0::4][:2] == ("reconnect_needed", True)
    assert rows[(bob.oid, "email")][1] is None  # never succeeded: no lag
    assert rows[(bob.oid, "calendar")][-1] is True and rows[(bob.oid, "calendar")][2] == 1


def test_views_work_attached_beside_other_databases_and_load_into_polars(product):
    """An analyst ATTACHes snapshots under names of their choice; the views read their own snapshot's tables."""
    plain = analyst(product)
    path = plain.execute("SELECT path FROM duckdb_databases() WHERE NOT internal").fetchall()[0][0]
    expected = plain.execute("SELECT count(*) FROM activities").fetchall()[0][0]
    con = duckdb.connect()
    con.execute("CREATE TABLE emails AS SELECT 1 AS decoy")  # a same-named table in the analyst's own database
    con.execute(f"ATTACH '{path}' AS acme (READ_ONLY)")
    assert con.execute("SELECT count(*) FROM acme.activities").fetchall()[0][0] == expected
    for view in VIEW_NAMES:
        frame = con.sql(f"SELECT * FROM acme.{view}").pl()
        assert isinstance(frame, pl.DataFrame) and frame.width > 3


def test_the_snapshot_reads_its_own_copies_never_the_live_store(product):
    """The users' tables of the views file are views over the snapshot's copies of the bucket files (in its private
    folder), and `create_views` binds to them: no view names a live file, and the counts are the live ones."""
    tid = product.world.tenants[0].tid
    snap = snapshot_path(product.settings, tid)
    with open_store(product.settings, tid, write=False) as con:
        live = con.execute("SELECT count(*) FROM emails").fetchall()[0][0]
    with duckdb.connect(str(snap), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM email_activity").fetchall()[0][0] == live > 0
        assert con.execute("SELECT tenant_id, analytics_version FROM snapshot_info").fetchall() == [(tid, 1)]
        bodies = [r[0] for r in con.execute("SELECT sql FROM duckdb_views() WHERE NOT internal").fetchall()]
    assert not [b for b in bodies if str(tenant_dir(product.settings, tid)) in b]
    emails = next(b for b in bodies if "table_name = 'emails'" in b)
    named = re.findall(r"'([^']+\.duckdb)'", emails)
    assert named and all(Path(n).parent == snapshot_parts(snap) for n in named)


def test_a_session_without_file_access_still_reads_the_snapshot_and_nothing_else(product):
    """What `o365sync sql` does: `open_snapshot`, then file access disabled; the users' tables (views over the
    snapshot's copies) still read, the live store and other files do not."""
    tid = product.world.tenants[0].tid
    with open_store(product.settings, tid, write=False) as live:
        expected = live.execute("SELECT count(*) FROM emails").fetchall()[0][0]
    con = open_snapshot(product.settings, tid)
    try:
        con.execute("SET enable_external_access = false")
        assert con.execute("SELECT count(*) FROM email_activity").fetchall()[0][0] == expected > 0
        for path in (store_path(product.settings, tid), snapshot_parts(snapshot_path(product.settings, tid)) / ".."):
            with pytest.raises(duckdb.PermissionException):
                con.execute(f"SELECT count(*) FROM read_text('{path}')").fetchall()
    finally:
        con.close()


def test_publish_snapshot_carries_the_views(product):
    tid = product.world.tenants[0].tid
    with duckdb.connect(str(snapshot_path(product.settings, tid)), read_only=True) as con:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        assert views >= set(VIEW_NAMES)
        assert con.execute("SELECT tenant_id FROM snapshot_info").fetchall()[0][0] == tid


def cli() -> typer.Typer:
    from app.cli_checks import command_group

    app = command_group("export only")  # the error handling of app.cli's groups
    app.command("export")(export)
    app.command("noop")(lambda: None)  # two commands: `export` stays a sub-command, as in app.cli
    return app


def test_export_writes_every_view_as_parquet_atomically_from_the_snapshot(product):
    tid = product.world.tenants[0].tid
    result = CliRunner().invoke(cli(), ["export", "--tenant", tid], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    exports = tenant_dir(product.settings, tid) / "exports"
    (folder,) = [d for d in exports.iterdir()]
    assert not folder.name.startswith(".")  # no temporary folder left behind
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest["files"]) == list(DEFAULT_EXPORT)
    con = analyst(product)
    for view in DEFAULT_EXPORT:
        frame = pl.read_parquet(folder / f"{view}.parquet")
        assert (
            frame.height
            == manifest["files"][view]["rows"]
            == con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0]
        )
        assert frame.columns == [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]
    assert "outside the tenant" not in result.output


def test_export_never_opens_the_live_store(product, tmp_path):
    """With a sync holding the live store exclusively, an export of the published snapshot still completes."""
    tid = product.world.tenants[0].tid
    done: dict = {}
    with store_lock(product.settings, tid, write=True):
        worker = threading.Thread(
            target=lambda: done.update(r=export_views(product.settings, tid, ["activities"], out=tmp_path / "x"))
        )
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "the export waited for the live store"
    assert done["r"].rows["activities"] > 0 and (tmp_path / "x" / "activities.parquet").exists()


def test_export_options_tables_unknown_views_and_existing_destinations(product, tmp_path):
    tid = product.world.tenants[0].tid
    runner = CliRunner()
    out = tmp_path / "mine"
    ok = runner.invoke(
        cli(),
        ["export", "--tenant", tid, "--out", str(out), "--view", "sync_status", "--view", "emails"],
        env={"COLUMNS": "200"},
    )
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in out.iterdir()) == ["emails.parquet", "manifest.json", "sync_status.parquet"]
    assert "body_text" in pl.read_parquet_schema(out / "emails.parquet")
    assert "outside the tenant" in ok.output  # erasure cannot reach it: the operator is told
    again = runner.invoke(cli(), ["export", "--tenant", tid, "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    unknown = runner.invoke(cli(), ["export", "--tenant", tid, "--out", str(tmp_path / "u"), "--view", "secrets"])
    assert unknown.exit_code == 2 and "unknown view" in unknown.output and not (tmp_path / "u").exists()
    assert runner.invoke(cli(), ["export", "--tenant", "no-such-tenant"]).exit_code == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_publishes_a_snapshot_first_if_there_is_none(product, tmp_path):
    tid = product.world.tenants[0].tid
    snapshot_path(product.settings, tid).unlink()
    result = export_views(product.settings, tid, ["activities"], out=tmp_path / "e")
    assert snapshot_path(product.settings, tid).exists()
    with open_store(product.settings, tid, write=False) as con:
        live = con.execute("SELECT (SELECT count(*) FROM emails) + (SELECT count(*) FROM meetings)").fetchall()[0][0]
    assert result.rows["activities"] == live
    assert Path(tmp_path / "e" / "manifest.json").exists()
