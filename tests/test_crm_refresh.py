"""CRM refreshes in the store: full replace vs incremental upsert, the refresh policy, the scan start and the
CRM state ops see. Real DuckDB files; the CRM side is the file adapter (always full) or hand-made changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from crm_adapters.registry import ADAPTERS
from o365sync.crm import ACCOUNTS_SCHEMA, OPPORTUNITIES_SCHEMA, PEOPLE_SCHEMA, CrmError
from o365sync.crm_refresh import refresh_crm_snapshot, refresh_since, scan_start_for
from o365sync.settings import Settings
from o365sync.store import (
    apply_crm_changes,
    crm_state_summary,
    open_store,
    read_crm_state,
    replace_crm_snapshot,
)
from o365sync.tenants import CrmConnection, TenantConfig, save_tenant

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def people(*rows: tuple[str, str, str]) -> pl.DataFrame:
    return pl.DataFrame([(i, k, e, None, None) for i, k, e in rows], schema=PEOPLE_SCHEMA, orient="row")


def accounts(*rows: tuple[str, str]) -> pl.DataFrame:
    return pl.DataFrame([(i, None, d) for i, d in rows], schema=ACCOUNTS_SCHEMA, orient="row")


def opps(*rows: tuple[str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        [(i, None, None, False, NOW - timedelta(days=d)) for i, d in rows], schema=OPPORTUNITIES_SCHEMA, orient="row"
    )


def start(oldest_open: datetime | None) -> datetime:
    return scan_start_for(oldest_open, NOW)


def table(con, name: str) -> set[tuple]:
    return set(con.execute(f"SELECT * FROM {name}").fetchall())


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


def test_incremental_changes_replace_rows_of_changed_ids_and_recompute_the_scan_start(settings):
    with open_store(settings, "t1", write=True) as con:
        replace_crm_snapshot(
            con,
            people(
                ("c1", "contact", "a@x.com"),
                ("c1", "contact", "b@x.com"),
                ("c2", "contact", "c@y.com"),
                ("l1", "lead", "l@z.com"),
            ),
            accounts(("A1", "x.com"), ("A2", "y.com")),
            opps(("O1", 90), ("O2", 20)),
            "salesforce",
            start,
            NOW - timedelta(hours=2),
        )
        assert con.execute("SELECT scan_start FROM crm_snapshot_meta").fetchone()[0] == NOW - timedelta(days=90)
        # c1 lost an address, c2 was deleted, l1 converted (left scope), c3 is new, A2's domain changed,
        # O1 (the oldest open deal) closed.
        frames = {
            "people": people(("c1", "contact", "a@x.com"), ("c3", "contact", "n@w.com")),
            "accounts": accounts(("A2", "y2.com")),
            "opportunities": opps(),
        }
        changed = {"people": {"c1", "c2", "l1", "c3"}, "accounts": {"A2"}, "opportunities": {"O1"}}
        result = apply_crm_changes(con, frames, changed, "salesforce", start, NOW - timedelta(minutes=5))
        for _ in range(2):  # an overlapping window re-reads the same changes: harmless
            assert {r[:3] for r in table(con, "crm_people")} == {
                ("c1", "contact", "a@x.com"),
                ("c3", "contact", "n@w.com"),
            }
            assert {(r[0], r[2]) for r in table(con, "crm_accounts")} == {("A1", "x.com"), ("A2", "y2.com")}
            assert {r[0] for r in table(con, "crm_opportunities")} == {"O2"}
            result = apply_crm_changes(con, frames, changed, "salesforce", start, None)
        assert result["scan_start"] == NOW - timedelta(days=20)  # recomputed from what is still open
        assert (result["people"], result["accounts"], result["open_opportunities"]) == (2, 2, 1)
        summary = crm_state_summary(con)
        assert summary["watermark"] == NOW - timedelta(minutes=5)  # a refresh without changes keeps it
        assert summary["mode"] == "incremental" and summary["last_full_at"] < summary["taken_at"]


def test_a_failing_apply_leaves_the_previous_snapshot(settings):
    with open_store(settings, "t1", write=True) as con:
        replace_crm_snapshot(con, people(("c1", "contact", "a@x.com")), accounts(), opps(), "hubspot", start)
        bad = {
            "people": people(("c9", "contact", "z@x.com")),
            "accounts": accounts(),
            "opportunities": pl.DataFrame({"crm_id": ["O1"]}),
        }  # wrong shape: the insert fails mid-way
        with pytest.raises(duckdb.Error):
            apply_crm_changes(
                con, bad, {"people": {"c1", "c9"}, "accounts": set(), "opportunities": {"O1"}}, "hubspot", start, NOW
            )
        assert {r[0] for r in table(con, "crm_people")} == {"c1"}
        assert con.execute("SELECT count(*) FROM crm_snapshot_meta").fetchone()[0] == 1


ids = st.sampled_from([f"p{i}" for i in range(6)])
addresses = st.sampled_from([f"{n}@x.com" for n in "abcdef"])


@pytest.mark.slow
@hsettings(max_examples=60, deadline=None)
@given(
    initial=st.dictionaries(ids, st.sets(addresses, max_size=3)),
    updates=st.lists(st.dictionaries(ids, st.sets(addresses, max_size=3)), max_size=4),
)
def test_incremental_upserts_equal_a_full_read(tmp_path_factory, initial, updates):
    """Any sequence of change sets (a record with no addresses = left scope) applied to a snapshot gives the
    same people table as a full read of the CRM's final state."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("s"))

    def frame(state: dict[str, set[str]]) -> pl.DataFrame:
        return people(*[(i, "contact", e) for i, es in state.items() for e in sorted(es)])

    crm = dict(initial)
    with open_store(settings, "t", write=True) as con:
        replace_crm_snapshot(con, frame(crm), accounts(), opps(), "files", start)
        for change in updates:
            crm.update(change)
            apply_crm_changes(
                con,
                {"people": frame(change), "accounts": accounts(), "opportunities": opps()},
                {"people": set(change), "accounts": set(), "opportunities": set()},
                "files",
                start,
                None,
            )
        assert {r[:3] for r in table(con, "crm_people")} == {r[:3] for r in frame(crm).iter_rows()}


def tenant(kind: str, directory: Path | None = None) -> TenantConfig:
    return TenantConfig(
        id="t1",
        name="T",
        domains=["contoso.com"],
        crm_kind=kind,
        crm=CrmConnection(
            login_url="https://crm.invalid", client_id="c", directory=str(directory) if directory else None
        ),
    )


def test_refresh_policy_full_first_then_incremental_with_overlap_then_reconcile(settings):
    summary = {"crm_kind": None, "watermark": None, "last_full_at": None}
    assert refresh_since(settings, tenant("salesforce"), summary, NOW, ADAPTERS) is None  # first refresh: full
    mark = NOW - timedelta(hours=1)
    summary = {"crm_kind": "salesforce", "watermark": mark, "last_full_at": NOW - timedelta(hours=3)}
    assert refresh_since(settings, tenant("salesforce"), summary, NOW, ADAPTERS) == mark - timedelta(minutes=10)
    assert refresh_since(settings, tenant("hubspot"), summary, NOW, ADAPTERS) is None  # the tenant switched CRM
    assert refresh_since(settings, tenant("files"), summary | {"crm_kind": "files"}, NOW, ADAPTERS) is None
    due = summary | {"last_full_at": NOW - timedelta(hours=24)}
    assert refresh_since(settings, tenant("salesforce"), due, NOW, ADAPTERS) is None  # daily reconciliation
    assert refresh_since(settings, tenant("salesforce"), summary | {"watermark": None}, NOW, ADAPTERS) is None


def test_crm_state_records_failures_as_codes_and_keeps_the_snapshot(settings, tmp_path):
    crm_dir = tmp_path / "crm"
    crm_dir.mkdir()
    (crm_dir / "people.csv").write_text("crm_id,email\nc1,Jane@Acme.com\n")
    (crm_dir / "accounts.csv").write_text("crm_id,domain\nA1,acme.com\n")
    save_tenant(settings, tenant("files", crm_dir))
    counts = refresh_crm_snapshot(settings, "t1", ADAPTERS, now=NOW)
    assert counts["mode"] == "full" and counts["people"] == 1
    with open_store(settings, "t1", write=False) as con:
        assert read_crm_state(con)["status"] == "ok"
    (crm_dir / "people.csv").unlink()
    with pytest.raises(CrmError):
        refresh_crm_snapshot(settings, "t1", ADAPTERS, now=NOW)
    with open_store(settings, "t1", write=False) as con:
        state = read_crm_state(con)
        assert state["status"] == "invalid_file" and state["last_success_at"] is not None
        assert "Jane" not in state["last_error"]
        assert {r[0] for r in table(con, "crm_people")} == {"c1"}  # the last good snapshot still matches
