"""Pipedrive adapter against the Pipedrive simulator on loopback TLS (no mocks of our code, no sleeps)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import polars as pl
import pytest

from crm_adapters.pipedrive import fetch_changes, fetch_snapshot
from o365sync.crm import CrmAuthError, CrmQuotaExhausted, CrmSnapshot
from simulators.pipedrive import PipedriveSimulator, secondary_email, website_exposed
from simulators.tls import SimulatorTLS
from simulators.world import World
from tests.crm_cases import PIPEDRIVE, fixtures
from tests.crm_cases import pd_expected as expected
from tests.crm_helpers import Clock, Sleeps, apply_changes, assert_same

case_fixture, world_fixture, clock_fixture, sim_fixture = fixtures(PIPEDRIVE)
conn_for = PIPEDRIVE.conn
OVERLAP = timedelta(minutes=5)


def test_snapshot_equals_world(world: World, sim: PipedriveSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    snap = fetch_snapshot(conn_for(sim, tid), http, sleep=Sleeps())
    assert_same(snap, expected(world, tid=tid, sim=sim))
    people = snap.people
    # secondary (non-primary) addresses are there, some listed before the primary on the wire
    pids = set(people["crm_id"].cast(pl.Int64))
    assert any(p % 6 == 0 for p in pids) and any(p % 3 == 0 and p % 6 for p in pids)
    assert people.group_by("crm_id").len()["len"].max() == 2
    jane = str(sim.ids[tid]["persons"]["003TRAPSPACE001"])
    assert "jane.doe+crm@acme.com" in people.filter(pl.col("crm_id") == jane)["email"].to_list()
    blank = str(sim.ids[tid]["persons"]["003TRAPBLANK001"])
    assert set(people.filter(pl.col("crm_id") == blank)["email"]) <= {
        e.lower() for e in [secondary_email(int(blank), "No", "Mail")] if e
    }
    accounts = world.crm[tid].accounts
    assert any(not website_exposed(a.id) and a.website for a in accounts)  # hidden website -> null domain
    assert snap.accounts["domain"].null_count() > 0 and snap.accounts["domain"].drop_nulls().len() > 0


def test_cursor_paging_with_small_limits(world: World, sim: PipedriveSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    snap = fetch_snapshot(conn_for(sim, tid, page_limit=4), http, sleep=Sleeps())
    assert_same(snap, expected(world, sim, tid))
    persons = [r for r in sim.requests if r.path == "/api/v2/persons"]
    n_persons = len(sim.ids[tid]["persons"])
    assert len(persons) == -(-n_persons // 4)
    assert sum(1 for r in persons if dict(r.params).get("cursor")) == len(persons) - 1
    deals = [r for r in sim.requests if r.path == "/api/v2/deals"]
    assert all(dict(r.params)["status"] == "open" for r in deals)


def test_default_page_size_and_filters(world: World, tls: SimulatorTLS, http: httpx.Client, clock: Clock) -> None:
    tid = world.tenants[0].tid
    with PipedriveSimulator(world, tls, page_limit_default=5, clock=clock) as s:
        headers = {"x-api-token": s.token_for(tid)}
        body = http.get(f"{s.base_url}/api/v2/organizations", headers=headers).json()
        assert body["success"] is True and len(body["data"]) == 5 and body["additional_data"]["next_cursor"]
        assert all("domain" not in o for o in body["data"])
        assert any("website" not in o for o in s._records[tid]["organizations"].values())
        # updated_since follows the clock: a touched person is the only one changed since now
        since = datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        s.update(tid, "persons", 2, name="Renamed")
        got = http.get(f"{s.base_url}/api/v2/persons", params={"updated_since": since}, headers=headers).json()
        assert [p["id"] for p in got["data"]] == [2] and got["additional_data"]["next_cursor"] is None
        won = http.get(f"{s.base_url}/api/v2/deals", params={"status": "won,lost"}, headers=headers).json()
        assert won["data"] and all(d["status"] in ("won", "lost") for d in won["data"])
        bad = http.get(f"{s.base_url}/api/v2/persons", params={"cursor": "nope"}, headers=headers)
        assert bad.status_code == 400 and bad.json()["success"] is False


@pytest.mark.parametrize("deleted_in_lists", [True, False])
def test_deleted_records_are_excluded(
    world: World, tls: SimulatorTLS, http: httpx.Client, clock: Clock, deleted_in_lists: bool
) -> None:
    tid = world.tenants[0].tid
    with PipedriveSimulator(world, tls, clock=clock, deleted_in_lists=deleted_in_lists) as s:
        person = s.ids[tid]["persons"][world.crm[tid].contacts[0].id]
        open_deal = next(s.ids[tid]["deals"][o.id] for o in world.crm[tid].opportunities if not o.is_closed)
        org = s.ids[tid]["organizations"][world.crm[tid].accounts[-1].id]
        for kind, pd_id in (("persons", person), ("deals", open_deal), ("organizations", org)):
            s.delete(tid, kind, pd_id)
        snap = fetch_snapshot(conn_for(s, tid, page_limit=7), http, sleep=Sleeps())
        want = expected(world, s, tid)
        assert str(person) not in set(snap.people["crm_id"])
        assert str(open_deal) not in set(snap.opportunities["crm_id"])
        assert str(org) not in set(snap.accounts["crm_id"])
        assert_same(
            snap,
            CrmSnapshot(
                people=want.people.filter(pl.col("crm_id") != str(person)),
                accounts=want.accounts.filter(pl.col("crm_id") != str(org)),
                opportunities=want.opportunities.filter(pl.col("crm_id") != str(open_deal)),
            ),
        )
        listed = http.get(
            f"{s.base_url}/api/v2/persons", params={"limit": 500}, headers={"x-api-token": s.token_for(tid)}
        ).json()["data"]
        assert any(p["id"] == person and p["is_deleted"] for p in listed) == deleted_in_lists
        # purged 30 days later
        clock.t += timedelta(days=31).total_seconds()
        listed = http.get(
            f"{s.base_url}/api/v2/persons", params={"limit": 500}, headers={"x-api-token": s.token_for(tid)}
        ).json()["data"]
        assert all(p["id"] != person for p in listed)


def test_burst_429_then_recovery(world: World, tls: SimulatorTLS, http: httpx.Client, clock: Clock) -> None:
    tid = world.tenants[0].tid
    with PipedriveSimulator(world, tls, clock=clock, burst_limit=3) as s:
        sleeps = Sleeps(clock)  # sleeping advances the simulator clock, so the window really drains
        snap = fetch_snapshot(conn_for(s, tid, page_limit=5), http, sleep=sleeps)
        assert_same(snap, expected(world, s, tid))
        limited = [r for r in s.requests if r.status == 429]
        assert limited and sleeps and all(0 < x <= 2 for x in sleeps)
    with PipedriveSimulator(world, tls, clock=clock) as s:
        s.inject(429, count=2)
        sleeps = Sleeps()
        assert_same(fetch_snapshot(conn_for(s, tid), http, sleep=sleeps), expected(world, s, tid))
        assert sleeps == [2.0, 2.0]
        s.inject(429, count=50)
        with pytest.raises(CrmQuotaExhausted) as err:
            fetch_snapshot(conn_for(s, tid), http, sleep=Sleeps())
        assert err.value.code == "rate_limited"


def test_daily_budget_is_quota_exhausted_until_reset(
    world: World, tls: SimulatorTLS, http: httpx.Client, clock: Clock
) -> None:
    tid = world.tenants[0].tid
    with PipedriveSimulator(world, tls, clock=clock, daily_budget=40, list_cost=10) as s:
        sleeps = Sleeps()
        with pytest.raises(CrmQuotaExhausted) as err:
            fetch_snapshot(conn_for(s, tid, page_limit=5), http, sleep=sleeps)
        assert err.value.status == 429 and err.value.code == "daily_budget"
        assert sleeps == [] and s.tokens_spent(tid) == 40
        assert s.token_for(tid) not in str(err.value)
        resp = http.get(f"{s.base_url}/api/v2/persons", headers={"x-api-token": s.token_for(tid)})
        assert resp.status_code == 429 and resp.json()["errorCode"] == 429
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(resp.headers)
        clock.t += timedelta(hours=11, minutes=59).total_seconds()  # still the same UTC day
        assert http.get(f"{s.base_url}/api/v2/persons", headers={"x-api-token": s.token_for(tid)}).status_code == 429
        clock.t += timedelta(minutes=2).total_seconds()  # past midnight: budget reset
        ok = http.get(f"{s.base_url}/api/v2/persons", headers={"x-api-token": s.token_for(tid)})
        assert ok.status_code == 200


def test_expired_token_is_auth_error(world: World, sim: PipedriveSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    conn = conn_for(sim, tid)
    sim.expire_tokens()
    with pytest.raises(CrmAuthError) as err:
        fetch_snapshot(conn, http, sleep=Sleeps())
    assert err.value.code == "unauthorized"  # status and secrecy: test_crm_adapters.py
    resp = http.get(f"{sim.base_url}/api/v2/persons", headers={"x-api-token": conn.api_token})
    assert resp.status_code == 401 and resp.headers["x-401-by-gw"] == "true"
    assert resp.json() == {
        "success": False,
        "error": "unauthorized access",
        "errorCode": 401,
        "error_info": "Please check developers.pipedrive.com",
    }
    assert http.get(f"{sim.base_url}/api/v2/persons").status_code == 401


def test_legacy_query_token_and_headers(world: World, sim: PipedriveSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    resp = http.get(f"{sim.base_url}/api/v2/deals", params={"api_token": sim.token_for(tid), "status": "open"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["success"] is True and body["data"] and all(d["status"] == "open" for d in body["data"])
    assert set(body["data"][0]) >= {"id", "title", "org_id", "person_id", "status", "add_time", "update_time"}
    assert resp.headers["x-ratelimit-limit"] == "80" and int(resp.headers["x-ratelimit-remaining"]) < 80
    assert sim.requests[-1].auth == "query"
    assert all(sim.token_for(tid) not in str(r) for r in sim.requests)


# -- incremental reads (the shared behaviour is in tests/test_crm_adapters.py) ------------------------------


def test_pipedrive_deletes_dropped_from_lists_need_the_full_snapshot(
    world: World, tls: SimulatorTLS, http: httpx.Client, clock: Clock
) -> None:
    """The [U] case: a CRM that drops deleted persons from the v2 lists gives no delete to read incrementally."""
    tid = world.tenants[0].tid
    with PipedriveSimulator(world, tls, clock=clock, deleted_in_lists=False) as s:
        conn = conn_for(s, tid)
        snap = fetch_snapshot(conn, http, sleep=Sleeps())
        assert snap.watermark is not None
        clock.t += 3600
        gone = s.ids[tid]["persons"][world.crm[tid].contacts[0].id]
        s.delete(tid, "persons", gone)
        changes = fetch_changes(conn, http, snap.watermark - OVERLAP, sleep=Sleeps())
        assert str(gone) not in changes.changed_ids["people"]
        fresh = fetch_snapshot(conn, http, sleep=Sleeps())
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
