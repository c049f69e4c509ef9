"""Unmatched mail and meetings are never stored (nor any meeting's notes): unique markers seeded into unmatched
messages (subject, body, addresses) and meetings (subject; every body) must appear in no file under the data
directory or PREFECT_HOME, in no DuckDB column, in no row of Prefect's database and in no log line — while a marker
in a matched message is found (so the scan can see)."""

from __future__ import annotations

import logging
import os
import sqlite3
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from flows.initial_import import initial_import
from o365sync.sync.calendar import anchored_window
from simulators.world import Mailbox, generate_world
from tests.product import stand_up
from tests.traces import file_hits

pytestmark = pytest.mark.slow  # every test here runs Prefect flows or takes seconds


def _seed_markers(world, spare: str | None = None):
    """Markers in every unmatched message (except those `spare` takes part in: a late match will match them) and
    meeting; returns (markers, a marker of one matched message and one kept meeting)."""
    tenant = world.tenants[0]
    tag = uuid.uuid4().hex[:12]
    markers = {"subject": f"SUBJMARK{tag}", "body": f"BODYMARK{tag}", "address": f"addrmark{tag}"}
    unmatched = [m for m in world.unmatched_messages(tenant.tid) if not _takes_part(m, spare)]
    for i, msg in enumerate(unmatched):
        msg.subject += f" {markers['subject']}"
        msg.body += f"\n{markers['body']}"
        if i % 2 == 0:
            msg.cc.append(Mailbox(f"Marker {tag}", f"{markers['address']}@stranger-{tag}.example"))
    matched_key = next(iter(world.expected_matches(tenant.tid)))
    positive = f"KEEPMARK{tag}"
    next(m for m in world.mailboxes[matched_key[0]] if m.id == matched_key[1]).subject += f" {positive}"
    # Meetings: unmatched, private and (nobody opted in) internal meetings must leave no trace; no meeting's
    # body/notes is ever stored.
    markers |= {"meeting_subject": f"MEETMARK{tag}", "meeting_body": f"NOTEMARK{tag}"}
    lo, hi = anchored_window(datetime.now(UTC))
    kept = {
        ev_id
        for (oid, iid) in world.calendars.expected_meetings(tenant.tid, lo, hi)
        for ev_id in [world.calendars.find(oid, iid)[0].id]
    }
    for events in world.calendars.events.values():
        for ev in events:
            ev.body += f" {markers['meeting_body']}"
            if ev.id not in kept:
                ev.subject += f" {markers['meeting_subject']}"
    world.calendars.event(sorted(kept)[0]).subject += f" {positive}"  # a kept meeting: found (positive control)
    return markers, positive


def _file_hits(root: Path, needles: list[bytes]) -> list[str]:
    return [f"{path}: {n!r}" for path, n in file_hits([p for p in root.rglob("*") if p.is_file()], needles, lower=True)]


def _duckdb_hits(path: Path, needles: list[str]) -> list[str]:
    """Every VARCHAR column of every table of the file holding a needle (lower-cased), one query per column. Views
    are skipped: the snapshot's views read the copies, which are scanned as files of their own."""
    hits = []
    with duckdb.connect(str(path), read_only=True) as con:
        for table, column in con.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c JOIN information_schema.tables t "
            "USING (table_catalog, table_schema, table_name) WHERE c.data_type = 'VARCHAR' "
            "AND t.table_type = 'BASE TABLE'"
        ).fetchall():
            test = f'coalesce(bool_or(contains(lower("{column}"), ?)), false)'
            found = con.execute(f'SELECT {", ".join([test] * len(needles))} FROM "{table}"', needles).fetchall()[0]
            hits += [f"{path}:{table}.{column}: {n}" for n, hit in zip(needles, found, strict=True) if hit]
    return hits


def _sqlite_hits(path: Path, needles: list[str]) -> list[str]:
    hits = []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            columns = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")').fetchall()]
            for column in columns:
                for n in needles:
                    q = f'SELECT count(*) FROM "{table}" WHERE lower(CAST("{column}" AS TEXT)) LIKE ?'
                    if con.execute(q, (f"%{n}%",)).fetchone()[0]:
                        hits.append(f"{path}:{table}.{column}: {n}")
    finally:
        con.close()
    return hits


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=23, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30, calendars=True)
    markers, positive = _seed_markers(world)
    p = stand_up(world, tmp_path, monkeypatch, features=["email", "calendar", "notetaker"])
    yield p, markers, positive
    p.running.stop()


def _each_user_imported(tenant_id: str, users: list) -> dict:
    """What the connect of each user starts (flows/user_import.py), one after the other; totals summed."""
    from flows.user_import import user_import

    return dict(sum((Counter(user_import(tenant_id, u.oid)) for u in users), Counter()))


@pytest.mark.parametrize(
    "run",
    [lambda tid, _users: initial_import(tid), _each_user_imported],
    ids=["initial-import", "user-import"],
)
def test_unmatched_mail_leaves_no_trace(prefect_server, product, caplog, run):
    p, markers, positive = product
    tenant = p.world.tenants[0]
    caplog.set_level(logging.DEBUG)
    totals = run(tenant.tid, tenant.users)
    assert totals["calendar_imported"] > 0 and totals["calendar_discarded"] > 0
    _assert_no_trace(p, prefect_server, caplog, markers, positive, meetings=True)


def _assert_no_trace(p, prefect_server, caplog, markers: dict, positive: str, meetings: bool) -> None:
    """No marker in any file, DuckDB column, Prefect row or log line; the positive control is found."""
    needles = [m.lower() for m in markers.values()]
    data_dir = p.settings.data_dir
    prefect_home = Path(os.environ["PREFECT_HOME"])
    prefect_db = Path(prefect_server.split("///", 1)[1]) if prefect_server.startswith("sqlite") else None

    hits = _file_hits(data_dir, [n.encode() for n in needles])
    hits += _file_hits(prefect_home, [n.encode() for n in needles])
    duck_files = list(data_dir.rglob("*.duckdb"))
    assert duck_files, "the run should have written DuckDB files"
    for f in duck_files:
        hits += _duckdb_hits(f, needles)
    assert prefect_db is not None and prefect_db.exists()
    hits += _sqlite_hits(prefect_db, needles)
    hits += _file_hits(prefect_db.parent, [n.encode() for n in needles])
    hits += [f"log: {n}" for n in needles for r in caplog.records if n in r.getMessage().lower()]
    assert hits == []

    # Positive control: the same scans do find content of a matched message.
    found = [h for f in duck_files if f.parent.name == "parts" for h in _duckdb_hits(f, [positive.lower()])]
    assert any(":emails.subject" in h for h in found)
    assert not meetings or any(":meetings.subject" in h for h in found)


def _takes_part(message, address: str | None) -> bool:
    return address is not None and any((b.address or "").strip().lower() == address for b in message.participants())


def test_a_late_match_leaves_no_trace_of_the_mail_it_searched_but_did_not_match(
    prefect_server, tmp_path, monkeypatch, caplog
):
    """A person added to the CRM after the import: the email sync's late-match search for them also returns mail
    that still matches nothing (they were only in its Bcc, which Graph's `participants:` searches and we never
    match); that mail must leave no trace either, while their newly matched mail is imported."""
    from flows.email_sync import email_sync
    from tasks.crm_snapshot import refresh_crm_snapshot

    world = generate_world(seed=23, users_per_tenant=2, messages_per_user=120, contacts_per_tenant=30, calendars=True)
    tenant = world.tenants[0]
    start = world.scan_start(tenant.tid)
    late = next(
        m.sender.address.strip().lower()
        for u in tenant.users
        for m in world.mailboxes[u.oid]
        if m.kind == "stranger" and m.folder == "inbox" and m.received >= start and m.sender is not None
    )
    markers, positive = _seed_markers(world, spare=late)
    in_bcc = [
        m
        for m in world.unmatched_messages(tenant.tid)
        if m.folder in ("inbox", "sentitems") and m.received >= start and not _takes_part(m, late)
    ][:5]
    assert in_bcc
    for m in in_bcc:
        m.bcc.append(Mailbox("Late Person", late))  # found by the search, matched by nothing
    p = stand_up(world, tmp_path, monkeypatch, features=["email"])
    try:
        caplog.set_level(logging.DEBUG)
        initial_import(tenant.tid)
        p.running.salesforce.add_contact(tenant.tid, "Late", "Person", late)
        assert refresh_crm_snapshot(p.settings, tenant.tid)["late_match_terms"] == 1
        p.running.graph.searches.clear()
        totals = email_sync(tenant.tid)
        assert totals["late_match_imported"] > 0 and totals["late_match_terms_done"] == 2  # one per mailbox
        assert totals["late_match_discarded"] >= len(in_bcc)  # the Bcc-only mail was found, and dropped
        assert any(late in kql for _, _, kql, _ in p.running.graph.searches)
        _assert_no_trace(p, prefect_server, caplog, markers, positive, meetings=False)
    finally:
        p.running.stop()
