"""Incremental CRM reads (`fetch_changes`) for HubSpot and Pipedrive against their simulators on loopback TLS:
a full snapshot plus the changes since its watermark (minus an overlap) equals a fresh full snapshot. No mocks of
our code, no sleeps (the sleep recorder is injected, the simulators' clocks are driven)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import polars as pl
import pytest

from crm_adapters import hubspot, pipedrive
from crm_adapters.base import CrmAuthError, CrmQuotaExhausted, CrmSnapshot
from simulators.hubspot import OBJECT_TYPES, HubSpotSimulator
from simulators.pipedrive import PipedriveSimulator
from simulators.tls import SimulatorTLS
from simulators.world import World, generate_world
from tests.crm_helpers import Clock, Sleeps, apply_changes, assert_same

OVERLAP = timedelta(minutes=5)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(tenants=1, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=30)


def ts(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.t, UTC)


# -- HubSpot ---------------------------------------------------------------------------------------------------


@pytest.fixture
def hs_clock(world: World) -> Clock:
    return Clock(world.now)


@pytest.fixture
def hs(world: World, tls: SimulatorTLS, hs_clock: Clock) -> Iterator[HubSpotSimulator]:
    with HubSpotSimulator(world, tls, clock=hs_clock) as s:
        yield s


def hs_conn(sim: HubSpotSimulator, tid: str) -> hubspot.HubSpotConnection:
    return hubspot.HubSpotConnection(sim.base_url, sim.token_for(tid))


def hs_newest_modified(sim: HubSpotSimulator, tid: str) -> datetime:
    newest = max(r.updated for o in OBJECT_TYPES for r in sim._objects[tid][o].values() if not r.archived)
    return newest.replace(microsecond=newest.microsecond // 1000 * 1000)  # the wire carries milliseconds


def hs_mutate(world: World, sim: HubSpotSimulator, tid: str) -> dict[str, str]:
    """One of each change the incremental read must see; returns the HubSpot ids involved."""
    crm = world.crm[tid]
    linked = [c for c in crm.contacts if c.account_id]
    open_deals = [o for o in crm.opportunities if not o.is_closed]
    assert len(linked) >= 4 and len(open_deals) >= 3 and len(crm.accounts) >= 3
    ids = {
        "new_contact": sim.create(
            tid,
            "contacts",
            company=crm.accounts[1].id,
            email=" New.Person@Example.ORG ",
            firstname="New",
            lastname="Person",
            lifecyclestage="customer",
            hs_additional_emails="np@example.net;new.person@example.org",
        ),
        "new_deal": sim.create(
            tid, "deals", company=crm.accounts[2].id, dealname="Fresh deal", createdate="2026-11-27T04:00:00.000Z"
        ),
        "new_closed_deal": sim.create(
            tid, "deals", company=crm.accounts[2].id, dealname="Born closed", dealstage="closedlost"
        ),
    }
    # changed and added secondary addresses
    ids["secondary"] = sim.hs_id(tid, linked[0].id)
    sim.touch(tid, "contacts", linked[0].id, hs_additional_emails="Second@Example.com;third@example.com")
    # archived (deleted) contact
    ids["archived"] = sim.hs_id(tid, linked[1].id)
    sim.archive(tid, "contacts", linked[1].id)
    # a contact moved to another company (only the associations API tells)
    ids["moved"] = sim.hs_id(tid, linked[2].id)
    target = next(a for a in crm.accounts if a.id != linked[2].account_id)
    sim.associate(tid, "contacts", linked[2].id, target.id)
    ids["moved_to"] = sim.hs_id(tid, target.id)
    # a contact whose every address was removed
    ids["no_address"] = sim.hs_id(tid, linked[3].id)
    sim.touch(tid, "contacts", linked[3].id, email=None, hs_additional_emails=None)
    # company domain change (the registrable domain of a sub-domain)
    ids["company"] = sim.hs_id(tid, crm.accounts[0].id)
    sim.touch(tid, "companies", crm.accounts[0].id, domain="shop.newname.co.uk", hs_additional_domains=None)
    # deals: one closed through its stage (in its own pipeline), one deleted, one moved to another company
    closed = sim.record(tid, "deals", open_deals[0].id)
    stage = "closedwon" if closed.props["pipeline"] == "default" else "1002"
    sim.touch(tid, "deals", open_deals[0].id, dealstage=stage)
    ids["closed_deal"] = closed.id
    ids["deleted_deal"] = sim.hs_id(tid, open_deals[1].id)
    sim.archive(tid, "deals", open_deals[1].id)
    ids["moved_deal"] = sim.hs_id(tid, open_deals[2].id)
    sim.associate(tid, "deals", open_deals[2].id, crm.accounts[0].id)
    return ids


def test_hubspot_snapshot_watermark_is_newest_modification(
    world: World, hs: HubSpotSimulator, http: httpx.Client
) -> None:
    tid = world.tenants[0].tid
    snap = hubspot.fetch_snapshot(hs_conn(hs, tid), http, sleep=Sleeps())
    assert snap.watermark == hs_newest_modified(hs, tid) and snap.watermark <= world.now


def test_hubspot_changes_applied_equal_fresh_snapshot(
    world: World, hs: HubSpotSimulator, http: httpx.Client, hs_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = hs_conn(hs, tid)
    snap = hubspot.fetch_snapshot(conn, http, sleep=Sleeps())
    assert snap.watermark is not None
    hs_clock.t += 3600
    ids = hs_mutate(world, hs, tid)
    mutated_at = ts(hs_clock)
    hs_clock.t += 60
    hs.requests.clear()

    sleeps = Sleeps()
    changes = hubspot.fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=sleeps)
    fresh = hubspot.fetch_snapshot(conn, http, sleep=Sleeps())
    assert not sleeps
    assert_same(apply_changes(snap, changes), fresh)
    assert changes.watermark == mutated_at == fresh.watermark

    people, accounts, opps = (changes.changed_ids[k] for k in ("people", "accounts", "opportunities"))
    assert {ids[k] for k in ("new_contact", "secondary", "archived", "moved", "no_address")} <= people
    assert ids["company"] in accounts
    assert {ids[k] for k in ("new_deal", "new_closed_deal", "closed_deal", "deleted_deal", "moved_deal")} <= opps
    # left the scope: an id without rows
    for key, frame in (
        ("archived", changes.people),
        ("no_address", changes.people),
        ("closed_deal", changes.opportunities),
        ("deleted_deal", changes.opportunities),
        ("new_closed_deal", changes.opportunities),
    ):
        assert ids[key] not in set(frame["crm_id"]), key
    new = changes.people.filter(pl.col("crm_id") == ids["new_contact"])
    assert sorted(new["email"]) == ["new.person@example.org", "np@example.net"]
    assert set(new["account_id"]) == {hs.hs_id(tid, world.crm[tid].accounts[1].id)}
    moved = changes.people.filter(pl.col("crm_id") == ids["moved"])
    assert set(moved["account_id"]) == {ids["moved_to"]}
    assert set(changes.opportunities.filter(pl.col("crm_id") == ids["moved_deal"])["account_id"]) == {ids["company"]}
    assert set(changes.accounts.filter(pl.col("crm_id") == ids["company"])["domain"]) == {"newname.co.uk"}
    # the wire: modified-since searches, archived lists, v4 association reads
    searches = [r for r in hs.requests if r.path.endswith("/search")]
    assert {r.path.split("/")[4] for r in searches} == {"contacts", "companies", "deals"}
    assert all(
        r.body["filterGroups"][0]["filters"][0]["propertyName"] in ("lastmodifieddate", "hs_lastmodifieddate")
        for r in searches
    )
    archived_lists = [r for r in hs.requests if r.query and r.query.get("archived") == "true"]
    assert len(archived_lists) == 3
    assoc = [r for r in hs.requests if r.path.startswith("/crm/v4/associations/")]
    assert {r.path for r in assoc} == {
        "/crm/v4/associations/contacts/companies/batch/read",
        "/crm/v4/associations/deals/companies/batch/read",
    }
    assert all(r.status in (200, 207) for r in assoc)


def test_hubspot_overlapping_windows_are_idempotent(
    world: World, hs: HubSpotSimulator, http: httpx.Client, hs_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = hs_conn(hs, tid)
    snap = hubspot.fetch_snapshot(conn, http, sleep=Sleeps())
    assert snap.watermark is not None
    hs_clock.t += 3600
    hs_mutate(world, hs, tid)
    hs_clock.t += 60
    first = hubspot.fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=Sleeps())
    once = apply_changes(snap, first)
    assert_same(apply_changes(once, first), once)  # the same changes twice
    assert first.watermark is not None
    again = hubspot.fetch_changes(conn, http, first.watermark - OVERLAP, sleep=Sleeps())  # overlapping window
    assert again.changed_ids["people"] and again.changed_ids["people"] <= first.changed_ids["people"]
    assert_same(apply_changes(once, again), once)
    wide = hubspot.fetch_changes(conn, http, snap.watermark - timedelta(days=400), sleep=Sleeps())
    assert_same(apply_changes(snap, wide), once)
    # nothing changed since the watermark: nothing read, no watermark
    hs_clock.t += 3600
    quiet = hubspot.fetch_changes(conn, http, ts(hs_clock), sleep=Sleeps())
    assert quiet.watermark is None and not any(quiet.changed_ids.values()) and quiet.people.is_empty()


def test_hubspot_restored_contact_comes_back(
    world: World, hs: HubSpotSimulator, http: httpx.Client, hs_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = hs_conn(hs, tid)
    gone = world.crm[tid].contacts[5].id
    hs.archive(tid, "contacts", gone)
    snap = hubspot.fetch_snapshot(conn, http, sleep=Sleeps())
    hs_clock.t += 600
    hs.restore(tid, "contacts", gone)
    assert snap.watermark is not None
    changes = hubspot.fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=Sleeps())
    assert hs.hs_id(tid, gone) in set(changes.people["crm_id"])
    assert_same(apply_changes(snap, changes), hubspot.fetch_snapshot(conn, http, sleep=Sleeps()))


@pytest.mark.slow
def test_hubspot_incremental_search_beyond_10k_is_complete(
    world: World, hs: HubSpotSimulator, http: httpx.Client, hs_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = hs_conn(hs, tid)
    assert hs.search_cap == 10_000
    hs_clock.t += 3600
    bulk = set(hs.add_contacts(tid, 10_250))
    touched = world.crm[tid].contacts[0]
    hs.touch(tid, "contacts", touched.id, firstname="Renamed")
    hs.requests.clear()
    changes = hubspot.fetch_changes(conn, http, ts(hs_clock) - OVERLAP, sleep=Sleeps())
    want = bulk | {hs.hs_id(tid, touched.id)}
    assert changes.changed_ids["people"] == want
    assert set(changes.people["crm_id"]) == want
    assert (
        changes.people.height == len(bulk) + changes.people.filter(pl.col("crm_id") == hs.hs_id(tid, touched.id)).height
    )
    contact_searches = [r for r in hs.requests if r.path == "/crm/v3/objects/contacts/search"]
    assert all(int(r.body["after"]) + r.body["limit"] <= 10_000 for r in contact_searches)
    assert any(
        f["propertyName"] == "hs_object_id" for r in contact_searches for f in r.body["filterGroups"][0]["filters"]
    )  # re-windowed
    assoc = [r for r in hs.requests if r.path == "/crm/v4/associations/contacts/companies/batch/read"]
    assert len(assoc) == math.ceil(len(want) / 1000)
    assert all(len(r.body["inputs"]) <= 1000 for r in assoc)


def test_hubspot_v4_association_batch_read_shape(world: World, hs: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    crm = world.crm[tid]
    linked = next(c for c in crm.contacts if c.account_id)
    lead = next(x for x in crm.leads if not x.is_converted)
    headers = {"Authorization": f"Bearer {hs.token_for(tid)}"}
    url = f"{hs.base_url}/crm/v4/associations/contacts/companies/batch/read"
    resp = http.post(
        url, headers=headers, json={"inputs": [{"id": hs.hs_id(tid, linked.id)}, {"id": hs.hs_id(tid, lead.id)}]}
    )
    assert resp.status_code == 207 and "X-HubSpot-RateLimit-Daily-Remaining" in resp.headers
    body = resp.json()
    assert body["status"] == "COMPLETE" and body["numErrors"] == 1
    [result] = body["results"]
    assert result["from"]["id"] == hs.hs_id(tid, linked.id)
    [to] = result["to"]
    assert str(to["toObjectId"]) == hs.hs_id(tid, linked.account_id)
    assert [t["typeId"] for t in to["associationTypes"]] == [1, 279]
    assert body["errors"][0]["subCategory"] == "crm.associations.NO_ASSOCIATIONS_FOUND"
    too_many = http.post(url, headers=headers, json={"inputs": [{"id": str(i)} for i in range(1001)]})
    assert too_many.status_code == 400 and too_many.json()["category"] == "VALIDATION_ERROR"
    ok = http.post(
        f"{hs.base_url}/crm/v4/associations/deal/company/batch/read",
        headers=headers,
        json={"inputs": [{"id": hs.hs_id(tid, crm.opportunities[0].id)}]},
    )
    assert ok.status_code == 200 and ok.json()["results"][0]["to"][0]["associationTypes"][0]["typeId"] == 5


def test_hubspot_changes_rate_limits_and_auth(
    world: World, hs: HubSpotSimulator, http: httpx.Client, hs_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = hs_conn(hs, tid)
    snap = hubspot.fetch_snapshot(conn, http, sleep=Sleeps())
    assert snap.watermark is not None
    hs_clock.t += 3600
    hs_mutate(world, hs, tid)
    since = snap.watermark - OVERLAP
    plain = hubspot.fetch_changes(conn, http, since, sleep=Sleeps())

    hs.throttle("TEN_SECONDLY_ROLLING", count=1, after=2)  # no Retry-After: the policy window
    sleeps = Sleeps()
    throttled = hubspot.fetch_changes(conn, http, since, sleep=sleeps)
    assert sleeps == [10.0] and throttled.changed_ids == plain.changed_ids
    assert_same(apply_changes(snap, throttled), apply_changes(snap, plain))

    hs.throttle("DAILY", count=None, after=4)
    sleeps = Sleeps()
    with pytest.raises(CrmQuotaExhausted) as quota:
        hubspot.fetch_changes(conn, http, since, sleep=sleeps)
    assert quota.value.code == "DAILY" and not sleeps
    hs.clear_throttles()

    hs.expire_tokens()
    with pytest.raises(CrmAuthError) as auth:
        hubspot.fetch_changes(conn, http, since, sleep=Sleeps())
    assert auth.value.status == 401 and conn.access_token not in str(auth.value)


# -- Pipedrive -------------------------------------------------------------------------------------------------


@pytest.fixture
def pd_clock(world: World) -> Clock:
    """Noon (UTC) of the day after the world's `now`: later than every generated update_time."""
    day = world.now.date() + timedelta(days=1)
    return Clock(datetime(day.year, day.month, day.day, 12, tzinfo=UTC))


@pytest.fixture
def pd(world: World, tls: SimulatorTLS, pd_clock: Clock) -> Iterator[PipedriveSimulator]:
    with PipedriveSimulator(world, tls, clock=pd_clock) as s:
        yield s


def pd_conn(sim: PipedriveSimulator, tid: str, page_limit: int = 500) -> pipedrive.PipedriveConnection:
    return pipedrive.PipedriveConnection(sim.base_url, sim.token_for(tid), page_limit=page_limit)


def pd_mutate(world: World, sim: PipedriveSimulator, tid: str) -> dict[str, str]:
    crm, ids = world.crm[tid], sim.ids[tid]
    persons = [ids["persons"][c.id] for c in crm.contacts]
    open_deals = [ids["deals"][o.id] for o in crm.opportunities if not o.is_closed]
    orgs = [ids["organizations"][a.id] for a in crm.accounts]
    assert len(open_deals) >= 3 and len(persons) >= 5 and len(orgs) >= 3
    out = {
        "new_person": sim.create(
            tid,
            "persons",
            name="New Person",
            org_id=orgs[1],
            emails=[
                {"value": " New.Person@Example.ORG", "primary": True, "label": "work"},
                {"value": "np@example.net", "primary": False, "label": "home"},
            ],
        ),
        "new_deal": sim.create(tid, "deals", title="Fresh deal", org_id=orgs[2]),
        "new_org": sim.create(tid, "organizations", name="Newco", website="https://www.newco.example.com/en"),
    }
    rec = sim.record(tid, "persons", persons[0])
    sim.update(
        tid,
        "persons",
        persons[0],
        emails=[*rec["emails"], {"value": "Added@Example.com", "primary": False, "label": "other"}],
    )
    out["secondary"] = persons[0]
    sim.delete(tid, "persons", persons[1])
    out["deleted_person"] = persons[1]
    sim.update(tid, "persons", persons[2], emails=[])
    out["no_address"] = persons[2]
    sim.update(tid, "persons", persons[3], org_id=orgs[2])
    out["moved"] = persons[3]
    sim.update(tid, "organizations", orgs[0], website="https://shop.newname.co.uk/x")
    out["org"] = orgs[0]
    sim.delete(tid, "organizations", orgs[-1])
    out["deleted_org"] = orgs[-1]
    sim.update(tid, "deals", open_deals[0], status="won")
    out["won_deal"] = open_deals[0]
    sim.delete(tid, "deals", open_deals[1])
    out["deleted_deal"] = open_deals[1]
    sim.update(tid, "deals", open_deals[2], org_id=orgs[0])
    out["moved_deal"] = open_deals[2]
    return {k: str(v) for k, v in out.items()}


def test_pipedrive_snapshot_watermark_is_newest_update(
    world: World, pd: PipedriveSimulator, http: httpx.Client
) -> None:
    tid = world.tenants[0].tid
    snap = pipedrive.fetch_snapshot(pd_conn(pd, tid), http, sleep=Sleeps())
    newest = max(
        datetime.fromisoformat(r["update_time"].replace("Z", "+00:00"))
        for kind in ("persons", "organizations")
        for r in pd._records[tid][kind].values()
    )
    open_deals = [r for r in pd._records[tid]["deals"].values() if r["status"] == "open"]
    newest = max(newest, *(datetime.fromisoformat(r["update_time"].replace("Z", "+00:00")) for r in open_deals))
    assert snap.watermark == newest


def test_pipedrive_changes_applied_equal_fresh_snapshot(
    world: World, pd: PipedriveSimulator, http: httpx.Client, pd_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = pd_conn(pd, tid, page_limit=4)  # several cursor pages per list
    snap = pipedrive.fetch_snapshot(conn, http, sleep=Sleeps())
    assert snap.watermark is not None
    pd_clock.t += 3600
    ids = pd_mutate(world, pd, tid)
    mutated_at = ts(pd_clock)
    pd_clock.t += 60
    pd.requests.clear()

    changes = pipedrive.fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=Sleeps())
    lists = [r for r in pd.requests if r.path.startswith("/api/v2/")]
    fresh = pipedrive.fetch_snapshot(conn, http, sleep=Sleeps())
    assert_same(apply_changes(snap, changes), fresh)
    assert changes.watermark == mutated_at == fresh.watermark

    people, accounts, opps = (changes.changed_ids[k] for k in ("people", "accounts", "opportunities"))
    assert {ids[k] for k in ("new_person", "secondary", "deleted_person", "no_address", "moved")} <= people
    assert {ids[k] for k in ("new_org", "org", "deleted_org")} <= accounts
    assert {ids[k] for k in ("new_deal", "won_deal", "deleted_deal", "moved_deal")} <= opps
    for key, frame in (
        ("deleted_person", changes.people),
        ("no_address", changes.people),
        ("deleted_org", changes.accounts),
        ("won_deal", changes.opportunities),
        ("deleted_deal", changes.opportunities),
    ):
        assert ids[key] not in set(frame["crm_id"]), key
    assert "added@example.com" in set(changes.people.filter(pl.col("crm_id") == ids["secondary"])["email"])
    assert set(changes.accounts.filter(pl.col("crm_id") == ids["org"])["domain"]) == {"newname.co.uk"}
    params = [dict(r.params) for r in lists]
    assert len(lists) > 3 and all(
        p["sort_by"] == "update_time" and p["sort_direction"] == "asc" and "updated_since" in p for p in params
    )
    assert {dict(r.params).get("status") for r in lists if r.path == "/api/v2/deals"} == {"open,won,lost,deleted"}


def test_pipedrive_overlapping_windows_are_idempotent(
    world: World, pd: PipedriveSimulator, http: httpx.Client, pd_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = pd_conn(pd, tid)
    snap = pipedrive.fetch_snapshot(conn, http, sleep=Sleeps())
    assert snap.watermark is not None
    pd_clock.t += 3600
    pd_mutate(world, pd, tid)
    pd_clock.t += 60
    first = pipedrive.fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=Sleeps())
    once = apply_changes(snap, first)
    assert_same(apply_changes(once, first), once)
    assert first.watermark is not None
    again = pipedrive.fetch_changes(conn, http, first.watermark - OVERLAP, sleep=Sleeps())
    assert again.changed_ids["people"] and again.changed_ids["people"] <= first.changed_ids["people"]
    assert_same(apply_changes(once, again), once)
    wide = pipedrive.fetch_changes(conn, http, snap.watermark - timedelta(days=400), sleep=Sleeps())
    assert_same(apply_changes(snap, wide), once)
    pd_clock.t += 3600
    quiet = pipedrive.fetch_changes(conn, http, ts(pd_clock), sleep=Sleeps())
    assert quiet.watermark is None and not any(quiet.changed_ids.values())


def test_pipedrive_deletes_dropped_from_lists_need_the_full_snapshot(
    world: World, tls: SimulatorTLS, http: httpx.Client, pd_clock: Clock
) -> None:
    """The [U] case: a CRM that drops deleted persons from the v2 lists gives no delete to read incrementally."""
    tid = world.tenants[0].tid
    with PipedriveSimulator(world, tls, clock=pd_clock, deleted_in_lists=False) as s:
        conn = pd_conn(s, tid)
        snap = pipedrive.fetch_snapshot(conn, http, sleep=Sleeps())
        assert snap.watermark is not None
        pd_clock.t += 3600
        gone = s.ids[tid]["persons"][world.crm[tid].contacts[0].id]
        s.delete(tid, "persons", gone)
        changes = pipedrive.fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=Sleeps())
        assert str(gone) not in changes.changed_ids["people"]
        fresh = pipedrive.fetch_snapshot(conn, http, sleep=Sleeps())
        stale = apply_changes(snap, changes)
        assert str(gone) in set(stale.people["crm_id"]) and str(gone) not in set(fresh.people["crm_id"])
        assert_same(
            CrmSnapshot(
                people=stale.people.filter(pl.col("crm_id") != str(gone)),
                accounts=stale.accounts,
                opportunities=stale.opportunities,
            ),
            fresh,
        )


def test_pipedrive_changes_rate_limits_and_auth(
    world: World, pd: PipedriveSimulator, http: httpx.Client, pd_clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = pd_conn(pd, tid)
    snap = pipedrive.fetch_snapshot(conn, http, sleep=Sleeps())
    assert snap.watermark is not None
    pd_clock.t += 3600
    pd_mutate(world, pd, tid)
    pd_clock.t += 60
    since = snap.watermark - OVERLAP
    plain = pipedrive.fetch_changes(conn, http, since, sleep=Sleeps())

    pd.inject(503, count=1)  # backoff
    pd.inject(429, count=2)  # burst: waits x-ratelimit-reset
    sleeps = Sleeps()
    recovered = pipedrive.fetch_changes(conn, http, since, sleep=sleeps)
    assert sleeps == [0.5, 2.0, 2.0] and recovered.changed_ids == plain.changed_ids
    assert_same(apply_changes(snap, recovered), apply_changes(snap, plain))

    pd.daily_budget = pd.tokens_spent(tid) + 2 * pd.list_cost
    sleeps = Sleeps()
    with pytest.raises(CrmQuotaExhausted) as quota:
        pipedrive.fetch_changes(conn, http, since, sleep=sleeps)
    assert quota.value.code == "daily_budget" and not sleeps
    pd.daily_budget = None

    pd.expire_tokens()
    with pytest.raises(CrmAuthError) as auth:
        pipedrive.fetch_changes(conn, http, since, sleep=Sleeps())
    assert auth.value.status == 401 and conn.api_token not in str(auth.value)
