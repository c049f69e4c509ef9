"""Salesforce adapter against the Salesforce simulator on loopback TLS (no mocks of our code, no sleeps)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import polars as pl
import pytest

from crm_adapters.base import empty_snapshot, website_domain
from crm_adapters.salesforce import MAX_ATTEMPTS, SalesforceConnection, fetch_snapshot
from o365sync.crm import (
    ACCOUNTS_SCHEMA,
    OPPORTUNITIES_SCHEMA,
    PEOPLE_SCHEMA,
    CrmAuthError,
    CrmError,
    CrmQuotaExhausted,
    CrmSnapshot,
    normalise_email,
)
from simulators.salesforce import SalesforceSimulator
from simulators.tls import SimulatorTLS, create_tls
from simulators.world import World, generate_world
from tests.crm_helpers import add_address_traps, assert_same, world_snapshot

TRAP_WEBSITES = {
    "WWW.ACME.COM": "acme.com",
    "http://x.io/en/home": "x.io",
    None: None,
    "  https://www.Shop.Example.co.uk:8443/en?x=1 ": "example.co.uk",  # registrable domain (PSL)
}


@pytest.fixture(scope="module")
def world() -> World:
    w = generate_world(tenants=2, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=30)
    crm = w.crm[w.tenants[0].tid]
    for account, website in zip(crm.accounts, TRAP_WEBSITES, strict=False):
        account.website = website
    add_address_traps(crm, crm.accounts[0].id)
    assert any(lead.is_converted for lead in crm.leads)
    return w


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SimulatorTLS:
    return create_tls(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def http(tls: SimulatorTLS) -> Iterator[httpx.Client]:
    with httpx.Client(verify=tls.client_context(), trust_env=False, timeout=10) as client:
        yield client


@pytest.fixture
def sim(world: World, tls: SimulatorTLS) -> Iterator[SalesforceSimulator]:
    with SalesforceSimulator(world, tls, batch_size=3) as s:
        yield s


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def conn_for(sim: SalesforceSimulator, tid: str, **overrides: str) -> SalesforceConnection:
    args = {
        "login_url": sim.base_url,
        "client_id": "sf-client",
        "client_secret": "sf-secret",
        "refresh_token": sim.refresh_token_for(tid),
        **overrides,
    }
    return SalesforceConnection(**args)


def expected(world: World, tid: str) -> CrmSnapshot:
    return world_snapshot(world.crm[tid])


def refresh_grant(sim: SalesforceSimulator, http: httpx.Client, tid: str) -> httpx.Response:
    return http.post(
        f"{sim.base_url}/services/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": sim.refresh_token_for(tid),
            "client_id": "sf-client",
            "client_secret": "sf-secret",
        },
    )


def access_token(sim: SalesforceSimulator, http: httpx.Client, tid: str) -> str:
    resp = refresh_grant(sim, http, tid)
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


def soql(
    sim: SalesforceSimulator, http: httpx.Client, token: str, q: str, endpoint: str = "query", **headers: str
) -> httpx.Response:
    return http.get(
        f"{sim.base_url}/services/data/v59.0/{endpoint}?q={quote(q)}",
        headers={"Authorization": f"Bearer {token}", **headers},
    )


# -- snapshot content ------------------------------------------------------------------------------------


def test_snapshot_equals_world(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    snap = fetch_snapshot(conn_for(sim, tid), http)
    assert_same(snap, expected(world, tid))
    assert snap.rotated_refresh_token is None
    people = snap.people
    converted = {x.id for x in world.crm[tid].leads if x.is_converted}
    assert converted and not converted & set(people["crm_id"])
    assert "003TRAPBLANK001" not in set(people["crm_id"])
    assert people.filter(pl.col("crm_id") == "003TRAPSPACE001")["email"].item() == "jane.doe+crm@acme.com"
    domains = dict(zip(snap.accounts["crm_id"], snap.accounts["domain"], strict=True))
    for account, want in zip(world.crm[tid].accounts, TRAP_WEBSITES.values(), strict=False):
        assert domains[account.id] == want
    assert snap.opportunities["is_closed"].to_list() == [False] * snap.opportunities.height


def test_small_batches_page_through_locators(world: World, tls: SimulatorTLS, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    with SalesforceSimulator(world, tls) as big:
        one_page = fetch_snapshot(conn_for(big, tid), http)
        assert not [r for r in big.requests if "/query/" in r.path]
    with SalesforceSimulator(world, tls, batch_size=3) as small:
        paged = fetch_snapshot(conn_for(small, tid), http)
        crm = world.crm[tid]
        sizes = [
            sum(1 for c in crm.contacts if c.email),
            sum(1 for x in crm.leads if not x.is_converted),
            len(crm.accounts),
            sum(1 for o in crm.opportunities if not o.is_closed),
        ]
        describes = [r for r in small.requests if r.path.endswith("/describe")]
        assert sorted(r.path.split("/")[-2] for r in describes) == ["Account", "Contact", "Lead"]
        gets = [r for r in small.requests if r.method == "GET" and r not in describes]
        assert len(gets) == sum(max(1, math.ceil(n / 3)) for n in sizes)
        assert all(r.status == 200 for r in small.requests)
    assert_same(paged, one_page)


def test_query_paging_shape_and_batch_header(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    token = access_token(sim, http, tid)
    n = len(world.crm[tid].accounts)
    page = soql(sim, http, token, "SELECT Id FROM Account").json()
    assert page["totalSize"] == n and page["done"] is False and len(page["records"]) == 3
    assert re.fullmatch(r"/services/data/v59\.0/query/01g[0-9A-Z]{15}-3", page["nextRecordsUrl"])
    rec = page["records"][0]
    assert rec["attributes"] == {
        "type": "Account",
        "url": f"/services/data/v59.0/sobjects/Account/{rec['Id']}",
    }
    more = http.get(sim.base_url + page["nextRecordsUrl"], headers={"Authorization": f"Bearer {token}"}).json()
    assert more["totalSize"] == n and len(more["records"]) == 3
    # the header asks for 5, clamped up to Salesforce's minimum of 200 -> a single page
    one = soql(sim, http, token, "SELECT Id FROM Account", **{"Sforce-Query-Options": "batchSize=5"}).json()
    assert one["done"] is True and len(one["records"]) == n and "nextRecordsUrl" not in one


# -- isolation, auth, limits, faults ---------------------------------------------------------------------


def test_tenant_isolation(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    a, b = world.tenants[0].tid, world.tenants[1].tid
    snap_a = fetch_snapshot(conn_for(sim, a), http)
    snap_b = fetch_snapshot(conn_for(sim, b), http)
    assert_same(snap_b, expected(world, b))
    for name in ("people", "accounts", "opportunities"):
        assert not set(getattr(snap_a, name)["crm_id"]) & set(getattr(snap_b, name)["crm_id"])
    # a query locator opened by org A is not readable with org B's session
    page = soql(sim, http, access_token(sim, http, a), "SELECT Id FROM Contact").json()
    resp = http.get(
        sim.base_url + page["nextRecordsUrl"],
        headers={"Authorization": f"Bearer {access_token(sim, http, b)}"},
    )
    assert resp.status_code == 400 and resp.json()[0]["errorCode"] == "INVALID_QUERY_LOCATOR"


def test_expired_session_refreshes_once_and_continues(
    world: World, sim: SalesforceSimulator, http: httpx.Client
) -> None:
    tid = world.tenants[0].tid
    sim.expire_sessions(after_calls=5)  # after the 3 describes, mid-way through the contact pages
    snap = fetch_snapshot(conn_for(sim, tid), http)
    assert_same(snap, expected(world, tid))
    assert [r.status for r in sim.requests].count(401) == 1
    assert [r.path for r in sim.requests].count("/services/oauth2/token") == 2


def test_session_still_invalid_after_refresh_is_not_looped(
    world: World, sim: SalesforceSimulator, http: httpx.Client
) -> None:
    sim.inject(401, count=50, path="/services/data")
    with pytest.raises(CrmAuthError) as err:
        fetch_snapshot(conn_for(sim, world.tenants[0].tid), http)
    assert err.value.code == "INVALID_SESSION_ID"
    assert [r.status for r in sim.requests] == [200, 401, 200, 401]


def test_request_limit_exceeded_is_quota_exhausted(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    sim.daily_limit = 2
    sleeps = Sleeps()
    with pytest.raises(CrmQuotaExhausted) as err:
        fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps)
    assert (err.value.status, err.value.code) == (403, "REQUEST_LIMIT_EXCEEDED")
    assert [r.status for r in sim.requests].count(403) == 1 and not sleeps
    assert sim.api_usage(tid) == 2
    resp = soql(sim, http, access_token(sim, http, tid), "SELECT Id FROM Account")
    assert resp.status_code == 403
    assert resp.json() == [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    assert resp.headers["Sforce-Limit-Info"] == "api-usage=2/2"


def test_revoked_refresh_token_is_auth_error(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    sim.revoke_refresh_token(sim.refresh_token_for(tid))
    with pytest.raises(CrmAuthError) as err:
        fetch_snapshot(conn_for(sim, tid), http)
    assert (err.value.status, err.value.code) == (400, "invalid_grant")
    assert sim.refresh_token_for(tid) not in str(err.value)
    resp = refresh_grant(sim, http, tid)
    assert resp.status_code == 400
    assert resp.json() == {"error": "invalid_grant", "error_description": "expired access/refresh token"}


def test_bad_client_is_not_a_reconnect(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    with pytest.raises(CrmError) as err:
        fetch_snapshot(conn_for(sim, world.tenants[0].tid, client_secret="wrong"), http)
    assert not isinstance(err.value, CrmAuthError)
    assert err.value.code == "invalid_client" and "wrong" not in str(err.value)


def test_rotation_reports_the_newest_refresh_token(world: World, tls: SimulatorTLS, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    with SalesforceSimulator(world, tls, batch_size=3, rotate_refresh_tokens=True) as sim:
        initial = sim.refresh_token_for(tid)
        sim.expire_sessions(after_calls=3)  # forces a second refresh, which must use the rotated token
        snap = fetch_snapshot(conn_for(sim, tid), http)
        assert_same(snap, expected(world, tid))
        assert snap.rotated_refresh_token and snap.rotated_refresh_token != initial
        assert [r.path for r in sim.requests].count("/services/oauth2/token") == 2
        with pytest.raises(CrmAuthError):
            fetch_snapshot(conn_for(sim, tid), http)  # the initial token was invalidated by rotation
        again = fetch_snapshot(conn_for(sim, tid, refresh_token=snap.rotated_refresh_token), http)
        assert again.rotated_refresh_token not in (None, snap.rotated_refresh_token)


def test_server_errors_are_retried_with_backoff(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    sleeps = Sleeps()
    sim.inject(503, count=2)  # the token endpoint first
    sim.inject(500, count=1, path="/services/data")
    snap = fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps)
    assert_same(snap, expected(world, tid))
    assert sleeps == [0.5, 1.0, 0.5]
    sim.inject(503, count=100)
    sleeps.clear()
    with pytest.raises(CrmError) as err:
        fetch_snapshot(conn_for(sim, tid), http, sleep=sleeps)
    assert err.value.status == 503 and len(sleeps) == MAX_ATTEMPTS - 1


# -- SOQL subset -----------------------------------------------------------------------------------------


def test_soql_errors_are_salesforce_arrays(world: World, sim: SalesforceSimulator, http: httpx.Client) -> None:
    token = access_token(sim, http, world.tenants[0].tid)
    resp = soql(sim, http, token, "SELECT Id, PersonEmail FROM Account")
    assert resp.status_code == 400
    assert resp.json() == [
        {
            "message": "No such column 'PersonEmail' on entity 'Account'. If you are attempting to use a "
            "custom field, be sure to append the '__c' after the custom field name. Please reference "
            "your WSDL or the describe call for the appropriate names.",
            "errorCode": "INVALID_FIELD",
        }
    ]
    resp = soql(sim, http, token, "SELECT Id FORM Account")
    assert resp.status_code == 400
    assert resp.json() == [{"message": "unexpected token: 'FORM'", "errorCode": "MALFORMED_QUERY"}]
    resp = soql(sim, http, token, "SELECT Id FROM Account WHERE")
    assert resp.json() == [{"message": "unexpected token: '<EOF>'", "errorCode": "MALFORMED_QUERY"}]
    resp = soql(sim, http, token, "SELECT Id FROM Widget")
    assert resp.status_code == 400 and resp.json()[0]["errorCode"] == "INVALID_TYPE"
    resp = soql(sim, http, token, "SELECT Id FROM Opportunity WHERE IsClosed = 'false'")
    assert resp.json() == [
        {
            "message": "value of filter criterion for field 'IsClosed' must be of type boolean "
            "and should not be enclosed in quotes",
            "errorCode": "INVALID_QUERY_FILTER_OPERATOR",
        }
    ]
    resp = http.get(
        f"{sim.base_url}/services/data/v59.0/query?q=SELECT+Id+FROM+Account",
        headers={"Authorization": "Bearer nope"},
    )
    assert resp.status_code == 401
    assert resp.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]


def test_soql_subset_semantics(world: World, tls: SimulatorTLS, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    crm = world.crm[tid]
    with SalesforceSimulator(world, tls) as sim:
        token = access_token(sim, http, tid)
        acc = crm.accounts[1].id
        pick = crm.contacts[5]
        q = (
            f"select id, EMAIL from contact where (accountid = '{acc}' and email != null) "
            f"or LastName = '{pick.last_name.upper()}' order by Email desc limit 4"
        )
        body = soql(sim, http, token, q).json()
        want = [c for c in crm.contacts if c.account_id == acc or c.last_name == pick.last_name]
        want.sort(key=lambda c: c.email.casefold(), reverse=True)
        assert [r["Id"] for r in body["records"]] == [c.id for c in want[:4]]
        assert body["totalSize"] == min(4, len(want)) and set(body["records"][0]) == {
            "attributes",
            "Id",
            "Email",
        }

        cutoff = world.now - timedelta(days=20)
        q = (
            "SELECT Id, CreatedDate FROM Opportunity WHERE IsClosed = false AND CreatedDate < "
            f"{cutoff.strftime('%Y-%m-%dT%H:%M:%SZ')} ORDER BY CreatedDate ASC"
        )
        rows = soql(sim, http, token, q).json()["records"]
        opps = sorted((o for o in crm.opportunities if not o.is_closed and o.created < cutoff), key=lambda o: o.created)
        assert [r["Id"] for r in rows] == [o.id for o in opps]
        for r, o in zip(rows, opps, strict=True):
            assert r["CreatedDate"] == o.created.strftime("%Y-%m-%dT%H:%M:%S.000+0000")
            assert datetime.strptime(r["CreatedDate"], "%Y-%m-%dT%H:%M:%S.%f%z") == o.created.astimezone(UTC)

        ids = [crm.leads[0].id, crm.leads[1].id]
        rows = soql(sim, http, token, f"SELECT Id FROM Lead WHERE NOT Id IN ('{ids[0]}', '{ids[1]}')").json()
        assert {r["Id"] for r in rows["records"]} == {x.id for x in crm.leads} - set(ids)

        # soft delete: query hides, queryAll shows with IsDeleted = true
        victim = crm.accounts[2].id
        sim.soft_delete(tid, victim)
        q = f"SELECT Id, IsDeleted FROM Account WHERE Id = '{victim}'"
        assert soql(sim, http, token, q).json()["totalSize"] == 0
        assert soql(sim, http, token, q, endpoint="queryAll").json()["records"][0]["IsDeleted"] is True


def test_versions_limit_header_and_log_without_secrets(
    world: World, sim: SalesforceSimulator, http: httpx.Client
) -> None:
    versions = http.get(f"{sim.base_url}/services/data/").json()
    assert {"label": "Winter '24", "url": "/services/data/v59.0", "version": "59.0"} in versions
    tid = world.tenants[0].tid
    token = refresh_grant(sim, http, tid).json()
    assert {"access_token", "instance_url", "id", "token_type", "issued_at", "signature", "scope"} <= set(token)
    assert "expires_in" not in token and "refresh_token" not in token and token["instance_url"] == sim.base_url
    assert token["issued_at"].isdigit()
    resp = soql(sim, http, token["access_token"], "SELECT Id FROM Account")
    assert resp.headers["Sforce-Limit-Info"] == "api-usage=1/15000"
    log = repr(sim.requests)
    for secret in (token["access_token"], sim.refresh_token_for(tid), "sf-secret"):
        assert secret not in log


def test_helpers() -> None:
    for website, want in TRAP_WEBSITES.items():
        assert website_domain(website) == want
    assert website_domain("   ") is None and website_domain("n/a") is None
    assert website_domain("https://www.acme.co.uk/en") == "acme.co.uk"
    assert website_domain("https://user:pw@www.acme.io:8443/x#top") == "acme.io"
    frame = pl.DataFrame({"e": ["  A.B+x@Ex.COM ", "   ", None]})
    assert frame.select(normalise_email(pl.col("e")))["e"].to_list() == ["a.b+x@ex.com", None, None]
    empty = empty_snapshot()
    assert (empty.people.schema, empty.accounts.schema, empty.opportunities.schema) == (
        PEOPLE_SCHEMA,
        ACCOUNTS_SCHEMA,
        OPPORTUNITIES_SCHEMA,
    )
    assert empty.rotated_refresh_token is None
