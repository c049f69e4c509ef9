"""The mass-drop guard: a CRM refresh that would remove more than half of the stored people or accounts is refused
(previous snapshot kept, CRM state `refused` with counts and the command to confirm) until an admin runs
`o365sync crm confirm-drop`, which lets the next refresh only remove up to as many. Files and every simulated
API CRM, full and incremental refreshes; real DuckDB files, the real CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from typer.testing import CliRunner

from app.cli import app
from o365sync.crm import CrmDropRefused
from o365sync.settings import Settings
from o365sync.store import (
    apply_crm_changes,
    crm_removals,
    open_store,
    read_crm_drop_guard,
    read_crm_state,
    replace_crm_snapshot,
    store_path,
)
from o365sync.tenants import CrmConnection, TenantConfig, save_tenant
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.crm_helpers import delete_in_crm, snapshot_of
from tests.product import stand_up

runner = CliRunner()
ACCOUNTS = "crm_id,domain\nA1,acme.com\nA2,globex.com\n"
HEADER = "crm_id,email\n"


def people_csv(*ids: int) -> str:
    return HEADER + "".join(f"P{i},p{i}@acme.com\n" for i in ids)


@pytest.fixture
def files_tenant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Path]:
    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path / "data"))
    settings = Settings(data_dir=tmp_path / "data")
    crm_dir = tmp_path / "crm"
    crm_dir.mkdir()
    (crm_dir / "accounts.csv").write_text(ACCOUNTS)
    save_tenant(
        settings,
        TenantConfig(
            id="t1", name="T", domains=["contoso.com"], crm_kind="files", crm=CrmConnection(directory=str(crm_dir))
        ),
    )
    return settings, crm_dir


def stored_people(settings: Settings, tenant_id: str = "t1") -> set[str]:
    with open_store(settings, tenant_id, write=False) as con:
        return {r[0] for r in con.execute("SELECT DISTINCT crm_id FROM crm_people").fetchall()}


def state(settings: Settings, tenant_id: str = "t1") -> dict:
    with open_store(settings, tenant_id, write=False) as con:
        return read_crm_state(con)


def confirm(tenant_id: str = "t1"):  # noqa: ANN201
    return runner.invoke(app, ["crm", "confirm-drop", "--tenant", tenant_id])


@pytest.mark.slow
def test_a_header_only_people_file_is_refused_until_confirmed_then_applied_once(files_tenant):
    settings, crm_dir = files_tenant
    (crm_dir / "people.csv").write_text(people_csv(1, 2, 3, 4))
    assert refresh_crm_snapshot(settings, "t1")["people"] == 4

    (crm_dir / "people.csv").write_text(HEADER)  # an export that went wrong: only the header
    for _ in range(2):  # refused again and again while nobody confirms
        with pytest.raises(CrmDropRefused) as err:
            refresh_crm_snapshot(settings, "t1")
        assert err.value.removals == {"people": (4, 4), "accounts": (0, 2)}
        assert stored_people(settings) == {"P1", "P2", "P3", "P4"}  # the previous snapshot stays in use
        crm = state(settings)
        assert crm["status"] == "refused" and crm["last_success_at"] is not None
        assert "would remove 4 of 4 people" in crm["last_error"]
        assert "o365sync crm confirm-drop --tenant t1" in crm["last_error"]

    result = confirm()
    assert result.exit_code == 0, result.output
    assert "up to 4 of 4 people" in result.output
    counts = refresh_crm_snapshot(settings, "t1")  # the next refresh applies it ...
    assert counts["people"] == 0 and stored_people(settings) == set()
    assert state(settings)["status"] == "ok" and state(settings)["last_error"] is None
    with open_store(settings, "t1", write=False) as con:
        assert read_crm_drop_guard(con) is None  # ... and uses the confirmation up
    (crm_dir / "people.csv").write_text(people_csv(1, 2))
    assert refresh_crm_snapshot(settings, "t1")["people"] == 2  # growing is never refused
    assert confirm().exit_code == 1  # nothing refused now: nothing to confirm


def test_a_confirmation_covers_one_refresh_and_no_more_than_was_refused(files_tenant):
    settings, crm_dir = files_tenant
    (crm_dir / "people.csv").write_text(people_csv(1, 2, 3, 4, 5, 6))
    refresh_crm_snapshot(settings, "t1")
    (crm_dir / "people.csv").write_text(people_csv(1, 2))  # 4 of 6 gone
    with pytest.raises(CrmDropRefused):
        refresh_crm_snapshot(settings, "t1")
    assert confirm().exit_code == 0
    (crm_dir / "people.csv").write_text(people_csv(1))  # meanwhile 5 of 6: more than was confirmed
    with pytest.raises(CrmDropRefused, match="would remove 5 of 6 people"):
        refresh_crm_snapshot(settings, "t1")
    assert len(stored_people(settings)) == 6
    with open_store(settings, "t1", write=False) as con:
        assert read_crm_drop_guard(con)["confirmed_at"] is None  # the confirmation was used up
    assert confirm().exit_code == 0
    assert refresh_crm_snapshot(settings, "t1")["people"] == 1


def test_accounts_are_guarded_and_half_is_not_more_than_half(files_tenant):
    settings, crm_dir = files_tenant
    (crm_dir / "people.csv").write_text(people_csv(1, 2, 3, 4))
    refresh_crm_snapshot(settings, "t1")
    (crm_dir / "people.csv").write_text(people_csv(1, 2))  # exactly half: allowed
    assert refresh_crm_snapshot(settings, "t1")["people"] == 2
    (crm_dir / "accounts.csv").write_text("crm_id,domain\n")
    with pytest.raises(CrmDropRefused, match="would remove 2 of 2 accounts;"):
        refresh_crm_snapshot(settings, "t1")


def test_a_first_snapshot_and_the_first_of_a_new_crm_are_never_refused(files_tenant):
    settings, crm_dir = files_tenant
    (crm_dir / "people.csv").write_text(HEADER)
    assert refresh_crm_snapshot(settings, "t1")["people"] == 0  # nothing stored yet
    with open_store(settings, "t1", write=True) as con:  # the tenant used HubSpot before
        replace_crm_snapshot(con, *_hubspot_frames(10), "hubspot", datetime(2026, 1, 1, tzinfo=UTC))
    (crm_dir / "people.csv").write_text(people_csv(1))
    assert refresh_crm_snapshot(settings, "t1")["people"] == 1


def _hubspot_frames(n: int):  # noqa: ANN202
    snap = snapshot_of([(str(i), "contact", f"h{i}@x.com", None, None) for i in range(n)], [], [])
    return snap.people, snap.accounts, snap.opportunities


def test_confirm_drop_checks_the_tenant_and_writes_nothing_without_a_refusal(files_tenant):
    settings, _ = files_tenant
    data = sorted(p for p in settings.data_dir.rglob("*"))
    for tenant, message in (
        ("nosuch", "tenant nosuch is not registered"),
        ("../x", "invalid tenant id"),
        ("t1", "nothing to confirm: no CRM refresh of tenant t1 was refused"),
    ):
        result = confirm(tenant)
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [result.output.strip()] and message in result.output
    assert sorted(p for p in settings.data_dir.rglob("*")) == data  # no store created, nothing written
    assert not store_path(settings, "t1").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crm_kind", "reconcile_hours"),
    [
        ("salesforce", "24"),
        ("hubspot", "24"),
        ("pipedrive", "24"),  # incremental: the CRM reports the deletes
        ("salesforce", "0"),  # full read: the deleted records are simply not listed any more
    ],
)
def test_most_contacts_deleted_in_the_crm_is_refused_until_confirmed(tmp_path, monkeypatch, crm_kind, reconcile_hours):
    world = generate_world(seed=41, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=20)
    p = stand_up(world, tmp_path, monkeypatch, crm_kind=crm_kind, O365SYNC_CRM_RECONCILE_HOURS=reconcile_hours)
    try:
        tid = world.tenants[0].tid
        assert refresh_crm_snapshot(p.settings, tid)["mode"] == "full"
        before = stored_people(p.settings, tid)
        for contact in world.crm[tid].contacts:
            delete_in_crm(p.running, crm_kind, tid, contact.id)

        with pytest.raises(CrmDropRefused) as err:
            refresh_crm_snapshot(p.settings, tid)
        removed, stored = err.value.removals["people"]
        assert stored == len(before) and removed * 2 > stored
        assert stored_people(p.settings, tid) == before
        assert state(p.settings, tid)["status"] == "refused"

        assert confirm(tid).exit_code == 0
        counts = refresh_crm_snapshot(p.settings, tid)
        assert counts["mode"] == ("full" if reconcile_hours == "0" else "incremental")
        assert len(stored_people(p.settings, tid)) == counts["people"] == stored - removed
        assert state(p.settings, tid)["status"] == "ok"
    finally:
        p.running.stop()


@pytest.mark.slow
def test_the_sync_flow_keeps_matching_and_shows_the_refusal_in_its_artifact_and_status(
    prefect_server, tmp_path, monkeypatch
):
    from flows._reporting import artifact_key
    from flows.initial_import import initial_import
    from o365sync.tenants import tenant_dir
    from tests.product import latest_artifact_rows, stored_matches

    world = generate_world(seed=44, users_per_tenant=1, messages_per_user=40, contacts_per_tenant=20)
    p = stand_up(world, tmp_path, monkeypatch, crm_kind="files", COLUMNS="250")
    tenant, user = world.tenants[0], world.tenants[0].users[0]
    try:
        initial_import(tenant.tid)
        before = stored_people(p.settings, tenant.tid)
        people_file = tenant_dir(p.settings, tenant.tid) / "crm-files" / "people.csv"
        people_file.write_text(people_file.read_text().splitlines()[0] + "\n")  # only the header
        added = world.add_message(user.oid, "inbox", kind="contact")

        totals = initial_import(tenant.tid)
        assert totals["crm_refreshed"] == 0 and totals["failed"] == 0
        assert (user.oid, added.id) in stored_matches(p.settings, tenant.tid)  # matched against the kept snapshot
        assert stored_people(p.settings, tenant.tid) == before
        [crm] = latest_artifact_rows(artifact_key("initial-import-crm", tenant.tid))
        assert crm["state"] == "refused" and f"would remove {len(before)} of {len(before)} people" in crm["last_error"]
        status = runner.invoke(app, ["status"])
        assert status.exit_code == 0 and "refused" in status.output

        assert confirm(tenant.tid).exit_code == 0
        initial_import(tenant.tid)
        [crm] = latest_artifact_rows(artifact_key("initial-import-crm", tenant.tid))
        assert crm["state"] == "ok" and crm["people"] == 0
    finally:
        p.running.stop()


_ids = st.sets(st.sampled_from([f"p{i}" for i in range(8)]))


@pytest.mark.slow
@hsettings(max_examples=40, deadline=None)
@given(stored=_ids, listed=_ids, changed=st.none() | _ids)
def test_the_removal_count_is_what_writing_removes(tmp_path_factory, stored, listed, changed):
    """For a full refresh (`changed` None) or an incremental one, the count the guard decides on equals the
    people that writing the refresh really removes."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("s"))
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def frames(ids: set[str]) -> dict:
        snap = snapshot_of([(i, "contact", f"{i}@x.com", None, None) for i in sorted(ids)], [], [])
        return {"people": snap.people, "accounts": snap.accounts, "opportunities": snap.opportunities}

    with open_store(settings, "t", write=True) as con:
        replace_crm_snapshot(con, *frames(stored).values(), "files", start)
        if changed is not None:
            listed &= changed  # an incremental refresh has rows only for changed records
        new = frames(listed)
        changes = None if changed is None else {"people": changed, "accounts": set(), "opportunities": set()}
        removed, before = crm_removals(con, new, changes)["people"]
        if changes is None:
            replace_crm_snapshot(con, *new.values(), "files", start)
        else:
            apply_crm_changes(con, new, changes, "files", lambda _oldest: start, None)
        after = {r[0] for r in con.execute("SELECT crm_id FROM crm_people").fetchall()}
    assert (removed, before) == (len(stored - after), len(stored))
