"""HubSpot adapter against the HubSpot simulator on loopback TLS (no mocks of our code, no sleeps)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import httpx
import polars as pl
import pytest

from crm_adapters.base import website_domain
from crm_adapters.hubspot import (
    MAX_ATTEMPTS,
    HubSpotConnection,
    fetch_changes,
    fetch_snapshot,
    modified_since_filter,
    search_people,
)
from o365sync.crm import CrmAuthError, CrmError, CrmQuotaExhausted
from simulators import world as world_mod
from simulators.hubspot import SEARCH_CAP, HubSpotSimulator, additional_domains, additional_emails
from simulators.tls import SimulatorTLS
from simulators.world import World
from tests.crm_cases import HUBSPOT, fixtures, ts
from tests.crm_cases import hs_expected as expected
from tests.crm_helpers import Clock, Sleeps, apply_changes, assert_same

case_fixture, world_fixture, clock_fixture, sim_fixture = fixtures(HUBSPOT)
conn_for = HUBSPOT.conn
OVERLAP = timedelta(minutes=5)


# -- snapshot content ------------------------------------------------------------------------------------


def test_snapshot_equals_world(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    crm = world.crm[tid]
    snap = fetch_snapshot(conn_for(sim, tid), http)
    assert_same(snap, expected(world, sim, tid))
    # the world exercises the traps: additional emails and domains, leads, closed deals in both pipelines
    assert any(additional_emails(c.id, c.email) for c in crm.contacts)
    assert any(additional_domains(a.id, world_mod.website_domain(a.website)) for a in crm.accounts)
    assert snap.accounts["crm_id"].n_unique() < snap.accounts.height
    assert set(snap.people["kind"]) == {"contact", "lead"}
    assert any(o.is_closed for o in crm.opportunities)
    pipelines = {sim.record(tid, "deals", o.id).props["pipeline"] for o in crm.opportunities}
    assert pipelines == {"default", "75e28846"}


def test_wire_values_are_strings(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    headers = {"Authorization": f"Bearer {sim.token_for(tid)}"}
    resp = http.get(
        f"{sim.base_url}/crm/v3/objects/deals",
        headers=headers,
        params={
            "properties": "hs_is_closed,createdate,dealstage,pipeline",
            "limit": "100",
            "associations": "companies",
        },
    )
    assert resp.status_code == 200 and "X-HubSpot-RateLimit-Daily-Remaining" in resp.headers
    body = resp.json()
    assert "paging" not in body
    for deal in body["results"]:
        assert deal["properties"]["hs_is_closed"] in ("true", "false")
        assert all(isinstance(v, str) for v in deal["properties"].values())
        assert deal["associations"]["companies"]["results"][0]["type"] == "deal_to_company"
    stages = http.get(f"{sim.base_url}/crm/v3/pipelines/deals", headers=headers).json()["results"]
    assert {s["metadata"]["isClosed"] for p in stages for s in p["stages"]} == {"true", "false"}


def test_small_pages_follow_after_cursors(world: World, tls: SimulatorTLS, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    with HubSpotSimulator(world, tls) as big:
        whole = fetch_snapshot(conn_for(big, tid), http)
    with HubSpotSimulator(world, tls) as small:
        paged = fetch_snapshot(conn_for(small, tid), http, page_limit=3)
        crm = world.crm[tid]
        sizes = [
            len(crm.contacts) + sum(1 for x in crm.leads if not x.is_converted),
            len(crm.accounts),
            len(crm.opportunities),
        ]
        lists = [r for r in small.requests if r.path.startswith("/crm/v3/objects/")]
        assert len(lists) == sum(math.ceil(n / 3) for n in sizes)
        assert all(r.status == 200 and r.query and r.query["limit"] == "3" for r in lists)
    assert_same(paged, whole)


def test_archived_contacts_leave_the_snapshot(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    gone = world.crm[tid].contacts[0]
    sim.archive(tid, "contacts", gone.id)
    snap = fetch_snapshot(conn_for(sim, tid), http)
    hs_id = sim.hs_id(tid, gone.id)
    assert hs_id not in set(snap.people["crm_id"])
    headers = {"Authorization": f"Bearer {sim.token_for(tid)}"}
    archived = http.get(f"{sim.base_url}/crm/v3/objects/contacts", headers=headers, params={"archived": "true"}).json()[
        "results"
    ]
    assert [(r["id"], r["archived"]) for r in archived] == [(hs_id, True)] and "archivedAt" in archived[0]


# -- search and its 10,000 cap ---------------------------------------------------------------------------


@pytest.mark.slow
def test_search_beyond_10k_results_re_windows(
    world: World, tls: SimulatorTLS, http: httpx.Client, clock: Clock
) -> None:
    """Real default cap (10,000): 10,250 synthetic contacts modified at the sim clock, plus older world ones."""
    tid = world.tenants[0].tid
    with HubSpotSimulator(world, tls, clock=clock) as sim:
        assert sim.search_cap == SEARCH_CAP == 10_000
        clock.t += 3600
        bulk = set(sim.add_contacts(tid, 10_250))
        headers = {"Authorization": f"Bearer {sim.token_for(tid)}"}
        since = datetime.fromtimestamp(clock.t, UTC) - timedelta(minutes=5)
        too_far = http.post(
            f"{sim.base_url}/crm/v3/objects/contacts/search",
            headers=headers,
            json={
                "filterGroups": [{"filters": [modified_since_filter("contacts", since)]}],
                "limit": 200,
                "after": "9900",
            },
        )
        assert too_far.status_code == 400 and too_far.json()["category"] == "VALIDATION_ERROR"
        assert too_far.json()["status"] == "error" and "correlationId" in too_far.json()

        people = search_people(conn_for(sim, tid), http, [modified_since_filter("contacts", since)])
        assert set(people["crm_id"]) == bulk and people.height == len(bulk)
        searches = [r for r in sim.requests if r.path.endswith("/search") and r.status == 200]
        windows = [
            r
            for r in searches
            if any(f["propertyName"] == "hs_object_id" for f in r.body["filterGroups"][0]["filters"])
        ]
        assert windows and windows[0].body["after"] == "0"
        assert all(int(r.body["after"]) + r.body["limit"] <= 10_000 for r in searches)
        assert len(searches) == math.ceil(10_250 / 200)


def test_search_filters_by_modified_date(world: World, sim: HubSpotSimulator, http: httpx.Client, clock: Clock) -> None:
    tid = world.tenants[0].tid
    touched = world.crm[tid].contacts[3]
    clock.t += 86_400
    sim.touch(tid, "contacts", touched.id, firstname="Renamed")
    since = datetime.fromtimestamp(clock.t, UTC) - timedelta(minutes=1)
    people = search_people(conn_for(sim, tid), http, [modified_since_filter("contacts", since)])
    assert set(people["crm_id"]) == {sim.hs_id(tid, touched.id)}
    assert people["name"].unique().to_list() == [f"Renamed {touched.last_name}"]


# -- rate limits and auth --------------------------------------------------------------------------------


def test_ten_secondly_429_without_retry_after_backs_off_then_recovers(
    world: World, sim: HubSpotSimulator, http: httpx.Client
) -> None:
    tid = world.tenants[0].tid
    sim.throttle("TEN_SECONDLY_ROLLING", count=2, after=1)
    sleeps = Sleeps()
    snap = fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps, page_limit=10)
    assert_same(snap, expected(world, sim, tid))
    assert sleeps == [10.0, 20.0]
    limited = [r for r in sim.requests if r.status == 429]
    assert [r.policy for r in limited] == ["TEN_SECONDLY_ROLLING"] * 2


def test_retry_after_header_wins(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    sim.throttle("SECONDLY", count=1, retry_after=3)
    sleeps = Sleeps()
    fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps)
    assert sleeps == [3.0]


def test_rolling_burst_limit_on_the_sim_clock(
    world: World, sim: HubSpotSimulator, http: httpx.Client, clock: Clock
) -> None:
    tid = world.tenants[0].tid
    sim.burst_limit = 4
    sleeps = Sleeps(clock)  # sleeping moves the simulator's clock, so the rolling window frees up
    snap = fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps, page_limit=5)
    assert_same(snap, expected(world, sim, tid))
    assert sleeps and set(sleeps) == {10.0}


def test_persistent_429_gives_up_bounded(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    sim.throttle("TEN_SECONDLY_ROLLING", count=None)
    sleeps = Sleeps()
    with pytest.raises(CrmError) as err:
        fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps)
    assert not isinstance(err.value, CrmQuotaExhausted)
    assert err.value.status == 429 and len(sleeps) == MAX_ATTEMPTS - 1 and max(sleeps) <= 30.0


def test_daily_limit_is_quota_exhausted(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    sim.daily_limit = 2
    sleeps = Sleeps()
    with pytest.raises(CrmQuotaExhausted) as err:
        fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps, page_limit=5)
    assert err.value.status == 429 and err.value.code == "DAILY" and not sleeps
    assert sim.token_for(tid) not in str(err.value)
    assert [r.status for r in sim.requests] == [200, 200, 429]


def test_expired_token_is_auth_error(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    old = conn_for(sim, tid)
    sim.expire_tokens()
    sleeps = Sleeps()
    with pytest.raises(CrmAuthError) as err:
        fetch_snapshot(old, http, sleep=sleeps)
    assert err.value.code == "EXPIRED_AUTHENTICATION" and not sleeps  # status and secrecy: test_crm_adapters.py
    with pytest.raises(CrmAuthError) as bad:
        fetch_snapshot(HubSpotConnection(sim.base_url, "pat-na1-nope"), http)
    assert bad.value.code == "INVALID_AUTHENTICATION"


def test_server_errors_then_success(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    assert website_domain("WWW.Acme.com") == "acme.com"  # company `domain` values go through the same rule
    tid = world.tenants[0].tid
    unknown = http.get(
        f"{sim.base_url}/crm/v3/objects/tickets", headers={"Authorization": f"Bearer {sim.token_for(tid)}"}
    )
    assert unknown.status_code == 404 and unknown.json()["status"] == "error"


# -- incremental reads (the shared behaviour is in tests/test_crm_adapters.py) ------------------------------


def test_hubspot_restored_contact_comes_back(
    world: World, sim: HubSpotSimulator, http: httpx.Client, clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = conn_for(sim, tid)
    gone = world.crm[tid].contacts[5].id
    sim.archive(tid, "contacts", gone)
    snap = fetch_snapshot(conn, http, sleep=Sleeps())
    clock.t += 600
    sim.restore(tid, "contacts", gone)
    assert snap.watermark is not None
    changes = fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=Sleeps())
    assert sim.hs_id(tid, gone) in set(changes.people["crm_id"])
    assert_same(apply_changes(snap, changes), fetch_snapshot(conn, http, sleep=Sleeps()))


def test_hubspot_incremental_search_beyond_10k_is_complete(
    world: World, sim: HubSpotSimulator, http: httpx.Client, clock: Clock
) -> None:
    tid = world.tenants[0].tid
    conn = conn_for(sim, tid)
    assert sim.search_cap == 10_000
    clock.t += 3600
    bulk = set(sim.add_contacts(tid, 10_250))
    touched = world.crm[tid].contacts[0]
    sim.touch(tid, "contacts", touched.id, firstname="Renamed")
    sim.requests.clear()
    changes = fetch_changes(conn, http, ts(clock) - OVERLAP, sleep=Sleeps())
    want = bulk | {sim.hs_id(tid, touched.id)}
    assert changes.changed_ids["people"] == want
    assert set(changes.people["crm_id"]) == want
    assert (
        changes.people.height
        == len(bulk) + changes.people.filter(pl.col("crm_id") == sim.hs_id(tid, touched.id)).height
    )
    contact_searches = [r for r in sim.requests if r.path == "/crm/v3/objects/contacts/search"]
    assert all(int(r.body["after"]) + r.body["limit"] <= 10_000 for r in contact_searches)
    assert any(
        f["propertyName"] == "hs_object_id" for r in contact_searches for f in r.body["filterGroups"][0]["filters"]
    )  # re-windowed
    assoc = [r for r in sim.requests if r.path == "/crm/v4/associations/contacts/companies/batch/read"]
    assert len(assoc) == math.ceil(len(want) / 1000)
    assert all(len(r.body["inputs"]) <= 1000 for r in assoc)


def test_hubspot_v4_association_batch_read_shape(world: World, sim: HubSpotSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    crm = world.crm[tid]
    linked = next(c for c in crm.contacts if c.account_id)
    lead = next(x for x in crm.leads if not x.is_converted)
    headers = {"Authorization": f"Bearer {sim.token_for(tid)}"}
    url = f"{sim.base_url}/crm/v4/associations/contacts/companies/batch/read"
    resp = http.post(
        url, headers=headers, json={"inputs": [{"id": sim.hs_id(tid, linked.id)}, {"id": sim.hs_id(tid, lead.id)}]}
    )
    assert resp.status_code == 207 and "X-HubSpot-RateLimit-Daily-Remaining" in resp.headers
    body = resp.json()
    assert body["status"] == "COMPLETE" and body["numErrors"] == 1
    [result] = body["results"]
    assert result["from"]["id"] == sim.hs_id(tid, linked.id)
    [to] = result["to"]
    assert str(to["toObjectId"]) == sim.hs_id(tid, linked.account_id)
    assert [t["typeId"] for t in to["associationTypes"]] == [1, 279]
    assert body["errors"][0]["subCategory"] == "crm.associations.NO_ASSOCIATIONS_FOUND"
    too_many = http.post(url, headers=headers, json={"inputs": [{"id": str(i)} for i in range(1001)]})
    assert too_many.status_code == 400 and too_many.json()["category"] == "VALIDATION_ERROR"
    ok = http.post(
        f"{sim.base_url}/crm/v4/associations/deal/company/batch/read",
        headers=headers,
        json={"inputs": [{"id": sim.hs_id(tid, crm.opportunities[0].id)}]},
    )
    assert ok.status_code == 200 and ok.json()["results"][0]["to"][0]["associationTypes"][0]["typeId"] == 5
