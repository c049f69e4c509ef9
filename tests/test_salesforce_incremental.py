"""Salesforce incremental refresh, describe, person accounts and custom email fields, against the Salesforce
simulator on loopback TLS (no mocks of our code, no sleeps: the injected `sleep` records)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import httpx
import polars as pl
import pytest

from crm_adapters.salesforce import fetch_changes, fetch_snapshot, soql_datetime
from o365sync.crm import CrmQuotaExhausted, CrmSnapshot
from simulators.salesforce import SalesforceSimulator
from simulators.tls import SimulatorTLS
from simulators.world import World, generate_world
from tests.crm_helpers import Sleeps, apply_changes, assert_same
from tests.test_salesforce import access_token, conn_for

OVERLAP = timedelta(minutes=5)


@pytest.fixture
def world() -> World:
    """A fresh world per test: the tests move its clock."""
    return generate_world(tenants=2, users_per_tenant=1, messages_per_user=1, contacts_per_tenant=30)


@pytest.fixture
def tid(world: World) -> str:
    return world.tenants[0].tid


@pytest.fixture
def sim(world: World, tls: SimulatorTLS) -> Iterator[SalesforceSimulator]:
    with SalesforceSimulator(world, tls, batch_size=3) as s:
        yield s


def ids(frame: pl.DataFrame) -> set[str]:
    return set(frame["crm_id"])


def rich_org(sim: SalesforceSimulator, tid: str) -> dict[str, str]:
    """Person accounts (one with a website, one without) and custom email fields on Contact, Lead and Account."""
    sim.enable_person_accounts(tid)
    sim.add_custom_field(tid, "Contact", "Secondary_Email__c")
    sim.add_custom_field(tid, "Lead", "Other_Email__c")
    sim.add_custom_field(tid, "Account", "Alt_Email__pc")
    sim.add_custom_field(tid, "Account", "Billing_Email__c")  # a business address, not a person's
    pa_web = sim.add_person_account(tid, "Pat", "Solo", "Pat.Solo@GMail.com", website="https://pat.example.io/me")
    pa_bare = sim.add_person_account(tid, "Kim", "Lone", " kim@lone.example.net ")
    sim.update(tid, pa_bare, Alt_Email__pc="KIM.alt@lone.example.net", Billing_Email__c="billing@lone.example.net")
    return {"pa_web": pa_web, "pa_bare": pa_bare}


# -- incremental = full ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rich", [False, True], ids=["plain-org", "person-accounts-and-custom-fields"])
def test_changes_applied_to_snapshot_equal_a_fresh_snapshot(
    world: World, tid: str, sim: SalesforceSimulator, http: httpx.Client, rich: bool
) -> None:
    crm = world.crm[tid]
    extra = rich_org(sim, tid) if rich else {}
    before = fetch_snapshot(conn_for(sim, tid), http)
    assert before.watermark is not None and before.watermark <= world.now

    world.now += timedelta(minutes=10)
    doomed_account = crm.accounts[1].id
    keep = [c for c in crm.contacts if c.account_id != doomed_account]
    cascaded = {c.id for c in crm.contacts if c.account_id == doomed_account}
    new_contact = sim.add_contact(tid, "New", "Person", " New.Person@Example.ORG", crm.accounts[0].id)
    sim.update(tid, keep[0].id, Email=keep[0].email.upper())  # case only: same rows
    sim.update(tid, keep[1].id, Email="moved.on@new-employer.example.com")
    sim.update(tid, keep[2].id, Email=None)  # no address left: leaves the scope
    sim.soft_delete(tid, keep[3].id)
    lead = next(x for x in crm.leads if not x.is_converted)
    converted_to = sim.convert_lead(tid, lead.id, account_id=crm.accounts[0].id)
    opp = next(o for o in crm.opportunities if not o.is_closed and o.account_id != doomed_account)
    sim.close_opportunity(tid, opp.id)
    sim.update(tid, crm.accounts[2].id, Website="https://shop.renamed.co.uk/en")
    sim.soft_delete(tid, doomed_account)  # cascades to its contacts and opportunities
    if rich:
        sim.update(tid, keep[4].id, Secondary_Email__c="Second@Home.example.com")
        sim.update(tid, keep[5].id, Secondary_Email__c=keep[5].email.upper())  # the same address twice
        sim.update(tid, extra["pa_web"], PersonEmail="pat@new.example.io")
        sim.soft_delete(tid, extra["pa_bare"])

    changes = fetch_changes(conn_for(sim, tid), http, before.watermark - OVERLAP)
    fresh = fetch_snapshot(conn_for(sim, tid), http)
    assert_same(apply_changes(before, changes), fresh)
    assert changes.watermark == world.now and fresh.watermark == world.now

    # out-of-scope changes come through as ids without rows
    changed = changes.changed_ids
    gone = {keep[2].id, keep[3].id, lead.id, *cascaded}
    assert gone <= changed["people"] and not gone & ids(changes.people) and not gone & ids(fresh.people)
    assert {new_contact, converted_to} <= ids(changes.people)
    assert opp.id in changed["opportunities"] and opp.id not in ids(changes.opportunities)
    assert doomed_account in changed["accounts"] and doomed_account not in ids(fresh.accounts)
    assert not ids(fresh.opportunities) & {o.id for o in crm.opportunities if o.account_id == doomed_account}
    new_row = changes.people.filter(pl.col("crm_id") == new_contact).row(0, named=True)
    assert new_row == {
        "crm_id": new_contact,
        "kind": "contact",
        "email": "new.person@example.org",
        "account_id": crm.accounts[0].id,
        "name": "New Person",
    }
    if rich:
        assert {extra["pa_web"], extra["pa_bare"]} <= changed["people"]
        assert extra["pa_bare"] not in ids(fresh.people) | ids(fresh.accounts)
        assert fresh.people.filter(pl.col("crm_id") == keep[5].id).height == 1

    # each object was read once through queryAll, by SystemModstamp, without scope filters
    reads = [r for r in sim.requests if r.soql and "SystemModstamp >=" in r.soql]
    assert sorted(r.soql.split(" FROM ")[1].split()[0] for r in reads) == ["Account", "Contact", "Lead", "Opportunity"]
    for r in reads:
        assert r.path.endswith("/queryAll") and r.status == 200
        assert r.soql.endswith(
            f"WHERE SystemModstamp >= {soql_datetime(before.watermark - OVERLAP)} ORDER BY SystemModstamp ASC"
        )


def test_overlapping_reads_are_idempotent(world: World, tid: str, sim: SalesforceSimulator, http: httpx.Client) -> None:
    crm = world.crm[tid]
    before = fetch_snapshot(conn_for(sim, tid), http)
    world.now += timedelta(minutes=1)
    sim.soft_delete(tid, crm.contacts[0].id)
    sim.add_contact(tid, "Ada", "Late", "ada@late.example.com")
    first = fetch_changes(conn_for(sim, tid), http, before.watermark - OVERLAP)
    applied = apply_changes(before, first)
    # the same window again, and a window starting at the new watermark (records sharing the timestamp re-read)
    assert_same(apply_changes(applied, first), applied)
    again = fetch_changes(conn_for(sim, tid), http, first.watermark - OVERLAP)
    assert again.changed_ids["people"] >= {crm.contacts[0].id}
    assert_same(apply_changes(applied, again), applied)
    at_mark = fetch_changes(conn_for(sim, tid), http, first.watermark)
    assert at_mark.changed_ids["people"] and at_mark.watermark == first.watermark
    assert_same(apply_changes(applied, at_mark), fetch_snapshot(conn_for(sim, tid), http))
    # nothing changed after the watermark: empty frames, no ids, no watermark
    nothing = fetch_changes(conn_for(sim, tid), http, world.now + timedelta(seconds=1))
    assert nothing.watermark is None
    assert all(not v for v in nothing.changed_ids.values())
    assert (nothing.people.height, nothing.accounts.height, nothing.opportunities.height) == (0, 0, 0)
    assert_same(apply_changes(applied, nothing), applied)


def test_since_literal_is_unquoted_utc_and_floored() -> None:
    from datetime import UTC, datetime, timezone

    local = datetime(2024, 5, 1, 12, 0, 7, 999_999, tzinfo=timezone(timedelta(hours=2)))
    assert soql_datetime(local) == "2024-05-01T10:00:07Z"
    assert soql_datetime(datetime(2024, 5, 1, 10, 0, 7)) == "2024-05-01T10:00:07Z"  # naive: UTC
    assert soql_datetime(datetime(2024, 5, 1, 10, 0, 7, tzinfo=UTC)) == "2024-05-01T10:00:07Z"


# -- sessions, quotas, retries ---------------------------------------------------------------------------


def test_session_expiring_mid_incremental_refreshes_and_completes(
    world: World, tid: str, tls: SimulatorTLS, http: httpx.Client
) -> None:
    with SalesforceSimulator(world, tls, batch_size=3, rotate_refresh_tokens=True) as sim:
        initial = sim.refresh_token_for(tid)
        world.now += timedelta(minutes=1)
        for i in range(8):  # enough changed contacts for several pages
            sim.add_contact(tid, "Page", str(i), f"page{i}@pages.example.com")
        since = world.now - OVERLAP
        sim.expire_sessions(after_calls=5)  # 3 describes, then mid-way through the Contact pages
        changes = fetch_changes(conn_for(sim, tid), http, since)
        assert [r.status for r in sim.requests].count(401) == 1
        assert [r.path for r in sim.requests].count("/services/oauth2/token") == 2
        assert changes.people.height == 8 and len(changes.changed_ids["people"]) == 8
        assert changes.rotated_refresh_token not in (None, initial)
        # the rotated token works; the initial one is dead
        again = fetch_changes(conn_for(sim, tid, refresh_token=changes.rotated_refresh_token), http, since)
        assert again.changed_ids == changes.changed_ids
        assert_same(
            CrmSnapshot(again.people, again.accounts, again.opportunities),
            CrmSnapshot(changes.people, changes.accounts, changes.opportunities),
        )


def test_request_limit_mid_incremental_is_quota_exhausted(
    world: World, tid: str, tls: SimulatorTLS, http: httpx.Client
) -> None:
    with SalesforceSimulator(world, tls, batch_size=3, rotate_refresh_tokens=True) as sim:
        sim.daily_limit = 5  # the describes and a couple of pages
        sleeps = Sleeps()
        with pytest.raises(CrmQuotaExhausted) as err:
            fetch_changes(conn_for(sim, tid), http, world.now - timedelta(days=3650), sleep=sleeps)
        assert (err.value.status, err.value.code) == (403, "REQUEST_LIMIT_EXCEEDED")
        assert not sleeps and [r.status for r in sim.requests].count(403) == 1
        # the refresh token rotated before the failure: it rides on the exception
        assert err.value.rotated_refresh_token not in (None, sim.refresh_token_for(tid))


def test_incremental_retries_honour_retry_after(
    world: World, tid: str, sim: SalesforceSimulator, http: httpx.Client
) -> None:
    sleeps = Sleeps()
    sim.inject(429, count=1, path="/services/data/v59.0/queryAll", retry_after="3")
    sim.inject(503, count=2, path="/services/data/v59.0/sobjects")
    since = world.now - timedelta(days=3650)
    changes = fetch_changes(conn_for(sim, tid), http, since, sleep=sleeps)
    assert sleeps == [0.5, 1.0, 3.0]
    clean = fetch_changes(conn_for(sim, tid), http, since)
    assert_same(
        CrmSnapshot(changes.people, changes.accounts, changes.opportunities),
        CrmSnapshot(clean.people, clean.accounts, clean.opportunities),
    )
    assert changes.changed_ids == clean.changed_ids


# -- describe, person accounts, custom email fields --------------------------------------------------------


def test_person_accounts_and_custom_email_fields(
    world: World, tid: str, sim: SalesforceSimulator, http: httpx.Client
) -> None:
    crm = world.crm[tid]
    extra = rich_org(sim, tid)
    contact, lead = crm.contacts[0], next(x for x in crm.leads if not x.is_converted)
    sim.update(tid, contact.id, Secondary_Email__c=" Private@Home.example.com")
    sim.update(tid, lead.id, Other_Email__c="LEAD.two@example.net")
    person_contacts = {sim.record(tid, extra[k])["PersonContactId"] for k in ("pa_web", "pa_bare")}

    snap = fetch_snapshot(conn_for(sim, tid), http)
    people = snap.people
    pa = people.filter(pl.col("kind") == "person_account").sort("email")
    assert pa.rows() == [
        (extra["pa_bare"], "person_account", "kim.alt@lone.example.net", extra["pa_bare"], "Kim Lone"),
        (extra["pa_bare"], "person_account", "kim@lone.example.net", extra["pa_bare"], "Kim Lone"),
        (extra["pa_web"], "person_account", "pat.solo@gmail.com", extra["pa_web"], "Pat Solo"),
    ]
    assert "billing@lone.example.net" not in set(people["email"])  # a business field, not a person's address
    assert not person_contacts & ids(people)  # each person once, as the person account
    assert set(people.filter(pl.col("crm_id") == contact.id)["email"]) == {
        contact.email.strip().lower(),
        "private@home.example.com",
    }
    assert set(people.filter(pl.col("crm_id") == lead.id)["email"]) == {
        lead.email.strip().lower(),
        "lead.two@example.net",
    }
    assert set(people.filter(pl.col("crm_id") == lead.id)["kind"]) == {"lead"}
    domains = dict(zip(snap.accounts["crm_id"], snap.accounts["domain"], strict=True))
    assert domains[extra["pa_web"]] == "example.io" and domains[extra["pa_bare"]] is None
    contact_soql = next(r.soql for r in sim.requests if r.soql and "FROM Contact" in r.soql)
    assert contact_soql.endswith("WHERE (Email != null OR Secondary_Email__c != null) AND IsPersonAccount = false")
    assert all(r.status == 200 for r in sim.requests)


def test_org_without_person_accounts_is_never_asked_for_them(
    world: World, tid: str, sim: SalesforceSimulator, http: httpx.Client
) -> None:
    fetch_snapshot(conn_for(sim, tid), http)
    fetch_changes(conn_for(sim, tid), http, world.now - timedelta(days=1))
    assert all(r.status == 200 for r in sim.requests)
    soqls = [r.soql for r in sim.requests if r.soql]
    assert len(soqls) == 8 and not [q for q in soqls if "Person" in q or "__c" in q]


def test_sim_describe_custom_fields_and_invalid_field(
    world: World, tid: str, sim: SalesforceSimulator, http: httpx.Client
) -> None:
    token = access_token(sim, http, tid)
    auth = {"Authorization": f"Bearer {token}"}

    def describe(sobject: str) -> httpx.Response:
        return http.get(f"{sim.base_url}/services/data/v59.0/sobjects/{sobject}/describe", headers=auth)

    def query(q: str, endpoint: str = "query") -> httpx.Response:
        return http.get(f"{sim.base_url}/services/data/v59.0/{endpoint}", params={"q": q}, headers=auth)

    body = describe("Account").json()
    types = {f["name"]: f["type"] for f in body["fields"]}
    assert body["name"] == "Account" and types["Website"] == "url" and types["IsDeleted"] == "boolean"
    assert "IsPersonAccount" not in types and "PersonEmail" not in types
    assert {f["name"]: f["type"] for f in describe("contact").json()["fields"]}["Email"] == "email"
    assert describe("Widget").status_code == 404
    assert http.get(f"{sim.base_url}/services/data/v59.0/sobjects/Lead/describe").status_code == 401

    resp = query("SELECT Id, Secondary_Email__c FROM Contact")
    assert resp.status_code == 400 and resp.json()[0]["errorCode"] == "INVALID_FIELD"
    sim.add_custom_field(tid, "Contact", "Secondary_Email__c")
    sim.enable_person_accounts(tid)
    field = next(f for f in describe("Contact").json()["fields"] if f["name"] == "Secondary_Email__c")
    assert field["type"] == "email" and field["custom"] is True
    types = {f["name"]: f["type"] for f in describe("Account").json()["fields"]}
    assert (types["IsPersonAccount"], types["PersonEmail"]) == ("boolean", "email")
    assert query("SELECT Id, Secondary_Email__c FROM Contact").status_code == 200
    assert query("SELECT Id, PersonEmail FROM Account WHERE IsPersonAccount = false").json()["totalSize"] == len(
        world.crm[tid].accounts
    )

    # mutations stamp SystemModstamp with world.now; query hides deleted rows, queryAll shows them
    world.now += timedelta(hours=1)
    stamp = world.now.strftime("%Y-%m-%dT%H:%M:%S.000+0000")
    lead = next(x for x in world.crm[tid].leads if not x.is_converted)
    contact_id = sim.convert_lead(tid, lead.id)
    row = query(
        f"SELECT Id, IsConverted, ConvertedContactId, ConvertedAccountId, SystemModstamp FROM Lead "
        f"WHERE Id = '{lead.id}'"
    ).json()["records"][0]
    assert (row["IsConverted"], row["ConvertedContactId"], row["SystemModstamp"]) == (True, contact_id, stamp)
    new = query(f"SELECT Id, Email, AccountId FROM Contact WHERE Id = '{contact_id}'").json()["records"][0]
    assert (new["Email"], new["AccountId"]) == (lead.email, row["ConvertedAccountId"])
    opp = next(o for o in world.crm[tid].opportunities if not o.is_closed)
    sim.close_opportunity(tid, opp.id, won=True)
    row = query(f"SELECT IsClosed, IsWon, StageName, SystemModstamp FROM Opportunity WHERE Id = '{opp.id}'").json()
    assert row["records"][0] | {"attributes": None} == {
        "attributes": None,
        "IsClosed": True,
        "IsWon": True,
        "StageName": "Closed Won",
        "SystemModstamp": stamp,
    }
    sim.soft_delete(tid, contact_id)
    q = f"SELECT Id, IsDeleted FROM Contact WHERE SystemModstamp >= {world.now.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    assert query(q).json()["totalSize"] == 0
    assert [(r["Id"], r["IsDeleted"]) for r in query(q, "queryAll").json()["records"]] == [(contact_id, True)]
    with pytest.raises(KeyError):
        sim.update(tid, contact_id, NoSuchField__c="x")
    with pytest.raises(ValueError):
        sim.convert_lead(tid, lead.id)  # already converted
    log = repr(sim.requests)
    assert token not in log and sim.refresh_token_for(tid) not in log and "sf-secret" not in log
