"""Bad CRM input never ends in a traceback or an emptied snapshot: each malformed file becomes one clear error in
the tenant's CRM state (`invalid_file`, file/line/column/fix, no cell value) while the previous snapshot stays in
use; odd single fields from any CRM (a 5,000-character name, a deal created in year 1) are stored adjusted and
counted. Real files and DuckDB; the API CRMs are the loopback simulators."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from o365sync.crm import MAX_NAME_CHARS, CrmFileError
from o365sync.settings import Settings
from o365sync.store import open_store, read_crm_state
from o365sync.tenants import CrmConnection, TenantConfig, save_tenant
from simulators.world import generate_world
from tasks.crm_snapshot import refresh_crm_snapshot
from tests.product import stand_up

PEOPLE = "crm_id,email,name\nP1,jane@acme.com,Jane\nP2,joe@acme.com,Joe\n"
ACCOUNTS = "crm_id,name,domain\nA1,Acme,acme.com\n"
BIG = 200_000  # over the csv module's 131,072-character field limit
OPP = "crm_id,account_id,created_at\n"

MALFORMED = [
    (
        {"people.csv": f"crm_id,email,notes\nP1,a@acme.com,{'x' * BIG}\nP2,not-an-address,x\n"},
        "people.csv line 3: email is not an address",
    ),
    (
        {"people.csv": f'crm_id,email,notes\nP1,a@acme.com,"{"x" * BIG}"\nP2,b@acme.com,x,extra\n'},
        "people.csv line 3: more fields than the header has",
    ),
    (
        {"opportunities.csv": f"{OPP}O1,A1,{'2' * BIG}\n"},
        "opportunities.csv line 2: created_at is not an ISO-8601 date-time",
    ),
    (
        {"opportunities.csv": f"{OPP}O1,A1,2024-01-01\nO2,A1,0001-01-01T00:00:00+01:00\n"},
        "opportunities.csv line 3: created_at is before 1900 or after 2099; use the real creation date",
    ),
    (
        {"opportunities.csv": f"{OPP}O1,A1,9999-12-31T23:00:00-05:00\n"},
        "opportunities.csv line 2: created_at is before 1900 or after 2099; use the real creation date",
    ),
    (
        {"people.csv": f"crm_id,email\n{'P' * 300},a@acme.com\n"},
        "people.csv line 2: crm_id is longer than 255 characters (a quote left open?)",
    ),
    (
        {"people.csv": f"crm_id,email\nP1,{'a' * 250}@acme.com\n"},
        "people.csv line 2: email is not an address (longer than 254 characters)",
    ),
    ({"people.csv": "crm_id,email\nP1,a@acme.com\x00\n"}, "people.csv line 2: email is not an address"),
    ({"accounts.csv": f"crm_id,domain\nA1,{'a' * 70}.com\n"}, "accounts.csv line 2: domain is not a domain name"),
    ({"people.csv": PEOPLE.encode("utf-16")}, "people.csv: UTF-16 text; save it as CSV UTF-8"),
    (
        {"people.csv": "crm_id,email,name\nP1,a@acme.com,José\n".encode("latin-1")},
        "people.csv line 2: not UTF-8 text; save it as CSV UTF-8",
    ),
    (
        {"people.csv": PEOPLE.replace("\n", "\r")},
        "people.csv: lines end in CR only; save it with LF or CRLF line endings",
    ),
    ({"people.csv": "crm_id,mail\nP1,a@acme.com\n"}, "people.csv: missing required column email"),
    (
        {
            "opportunities.parquet": pl.DataFrame(
                {"crm_id": ["O1"], "created_at": [datetime(1, 1, 1)]},
                schema={"crm_id": pl.String, "created_at": pl.Datetime("us", "Europe/Paris")},
            )
        },
        "opportunities.parquet row 1: created_at is before 1900 or after 2099; use the real creation date",
    ),
]


@pytest.fixture
def files_tenant(tmp_path: Path) -> tuple[Settings, Path]:
    settings = Settings(data_dir=tmp_path / "data")
    crm_dir = tmp_path / "crm"
    crm_dir.mkdir()
    (crm_dir / "people.csv").write_text(PEOPLE)
    (crm_dir / "accounts.csv").write_text(ACCOUNTS)
    save_tenant(
        settings,
        TenantConfig(
            id="t1", name="T", domains=["contoso.com"], crm_kind="files", crm=CrmConnection(directory=str(crm_dir))
        ),
    )
    assert refresh_crm_snapshot(settings, "t1")["people"] == 2
    return settings, crm_dir


def write(crm_dir: Path, name: str, content: str | bytes | pl.DataFrame) -> None:
    if isinstance(content, pl.DataFrame):
        content.write_parquet(crm_dir / name)
    elif isinstance(content, bytes):
        (crm_dir / name).write_bytes(content)
    else:
        (crm_dir / name).write_text(content, encoding="utf-8")


@pytest.mark.parametrize(("files", "message"), MALFORMED)
def test_a_malformed_file_is_a_clear_error_in_the_crm_state_and_the_snapshot_stays(files_tenant, files, message):
    settings, crm_dir = files_tenant
    for name, content in files.items():
        write(crm_dir, name, content)
    with pytest.raises(CrmFileError) as err:
        refresh_crm_snapshot(settings, "t1")
    assert str(err.value) == message and "@" not in message
    with open_store(settings, "t1", write=False) as con:
        state = read_crm_state(con)
        people = con.execute("SELECT crm_id, email FROM crm_people ORDER BY crm_id").fetchall()
    assert state["status"] == "invalid_file" and state["last_error"] == f"CrmFileError: {message}"
    assert state["last_success_at"] is not None
    assert people == [("P1", "jane@acme.com"), ("P2", "joe@acme.com")]


def test_long_names_are_cut_and_long_unknown_columns_read(files_tenant):
    settings, crm_dir = files_tenant
    write(
        crm_dir,
        "people.csv",
        f'crm_id,email,name,notes\nP1,jane@acme.com,{"N" * BIG},"{"x," * BIG}"\nP2,joe@acme.com,Joe,\n',
    )
    assert refresh_crm_snapshot(settings, "t1")["people"] == 2
    with open_store(settings, "t1", write=False) as con:
        state = read_crm_state(con)
        names = dict(con.execute("SELECT crm_id, length(name) FROM crm_people").fetchall())
    assert names == {"P1": MAX_NAME_CHARS, "P2": 3}
    assert state["status"] == "ok" and state["last_error"] == "names cut to 1,000 characters: 1"


@pytest.mark.parametrize("crm_kind", ["hubspot", "pipedrive"])
def test_odd_records_from_an_api_crm_are_stored_adjusted_and_counted(tmp_path, monkeypatch, crm_kind):
    """Both CRMs let an import set a deal's creation date and accept long names."""
    world = generate_world(seed=43, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=10)
    p = stand_up(world, tmp_path, monkeypatch, crm_kind=crm_kind)
    try:
        tid = world.tenants[0].tid
        if crm_kind == "hubspot":
            hs = p.running.hubspot
            odd_deal = hs.create(tid, "deals", dealname="Migrated")
            hs.touch(tid, "deals", odd_deal, createdate="0001-01-01T00:00:00+01:00")  # set by an import
            hs.create(tid, "contacts", email="long.name@acme-odd.com", firstname="N" * 5_000)
        else:
            pd = p.running.pipedrive
            odd_deal = str(pd.create(tid, "deals", title="Migrated", add_time="0001-01-01T00:00:00+01:00"))
            pd.create(
                tid,
                "persons",
                name="N" * 5_000,
                emails=[{"value": "long.name@acme-odd.com", "primary": True, "label": "work"}],
            )
        counts = refresh_crm_snapshot(p.settings, tid)
        assert counts["scan_start"] > datetime(2000, 1, 1, tzinfo=UTC).isoformat()
        with open_store(p.settings, tid, write=False) as con:
            state = read_crm_state(con)
            created = con.execute("SELECT created_at FROM crm_opportunities WHERE crm_id = ?", [odd_deal]).fetchall()
            name = con.execute("SELECT length(name) FROM crm_people WHERE email = 'long.name@acme-odd.com'").fetchall()
        assert created == [(None,)] and name == [(MAX_NAME_CHARS,)]
        assert state["status"] == "ok"
        assert state["last_error"] == (
            "names cut to 1,000 characters: 1; opportunity created dates before 1900 or from 2100 on ignored: 1"
        )
    finally:
        p.running.stop()


def test_an_unreadable_file_is_a_clear_error(files_tenant):
    """A file that cannot be read (here: one whose reads fail with EIO, which even root cannot read)."""
    settings, crm_dir = files_tenant
    (crm_dir / "people.csv").unlink()
    (crm_dir / "people.csv").symlink_to("/proc/self/mem")
    with pytest.raises(CrmFileError, match=r"^people.csv: cannot be read \(OSError\); check that this service may "):
        refresh_crm_snapshot(settings, "t1")
