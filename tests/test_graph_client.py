"""GraphClient and the mail listing/body fetch against the real Graph simulator on loopback TLS."""

from __future__ import annotations

import json
import pickle
import threading
from datetime import UTC, datetime, timedelta

import httpx
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from o365sync.graph import (
    GraphAuthError,
    GraphBadRequest,
    GraphClient,
    GraphError,
    GraphForbidden,
    GraphNotFound,
    GraphPagingError,
    GraphThrottled,
    GraphUnavailable,
    retry_after_seconds,
)
from o365sync.mail import (
    HEADER_FIELDS,
    MESSAGES_SCHEMA,
    PARTICIPANTS_SCHEMA,
    fetch_bodies,
    graph_datetime,
    iter_header_pages,
)
from simulators.graph import GraphSimulator
from simulators.tls import SimulatorTLS
from simulators.tokens import TokenAuthority
from simulators.world import SimMessage, SimUser, World


class Tokens:
    """The `token(force_refresh)` callable: caches one token, issues a new one when forced; records calls."""

    def __init__(self, authority: TokenAuthority, user: SimUser, scopes: tuple[str, ...] = ("User.Read", "Mail.Read")):
        self.authority, self.user, self.scopes = authority, user, scopes
        self.calls: list[bool] = []
        self._token: str | None = None

    def __call__(self, force_refresh: bool) -> str:
        self.calls.append(force_refresh)
        if force_refresh or self._token is None:
            u = self.user
            self._token = self.authority.issue_access_token(u.tid, u.oid, u.upn, list(self.scopes), "app")
        return self._token


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_client(sim: GraphSimulator, http: httpx.Client, token, **kw) -> GraphClient:
    return GraphClient(http, sim.base_url, token, **kw)


def expected(world: World, user: SimUser, folder: str, since: datetime) -> list[SimMessage]:
    return [m for m in world.mailboxes[user.oid] if m.folder == folder and m.received >= since]


@pytest.fixture()
def client(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser) -> GraphClient:
    return make_client(sim, http, Tokens(tokens, user), sleep=Sleeps())


# ---------------------------------------------------------------------------------------------- listing
@pytest.mark.parametrize("folder", ["inbox", "sentitems"])
def test_header_pages_are_exactly_the_folder_since(client: GraphClient, sim: GraphSimulator, world: World,
                                                   user: SimUser, folder: str) -> None:
    since = world.now - timedelta(days=25)
    pages = list(iter_header_pages(client, folder, since, page_size=40))
    want = expected(world, user, folder, since)
    assert len(pages) == -(-len(want) // 40)
    for page in pages:
        assert page.messages.schema == MESSAGES_SCHEMA and page.participants.schema == PARTICIPANTS_SCHEMA
    ids = [i for p in pages for i in p.messages.column("graph_id").to_pylist()]
    assert sorted(ids) == sorted(m.id for m in want) and len(set(ids)) == len(ids)

    by_id = {m.id: m for m in want}
    messages = pa.concat_tables(p.messages for p in pages).to_pylist()
    for row in messages:
        m = by_id[row["graph_id"]]
        assert row["folder"] == folder and row["subject"] == m.subject
        assert row["internet_message_id"] == m.internet_message_id and row["conversation_id"] == m.conversation_id
        assert (row["from_name"], row["from_address"]) == (m.sender.name, m.sender.address)
        assert row["received_at"] == m.received and row["sent_at"] == m.sent
        assert row["has_attachments"] is m.has_attachments and row["is_draft"] is False
        assert row["web_link"].startswith("https://outlook.office365.com/owa/?ItemID=")
    parts = pa.concat_tables(p.participants for p in pages).to_pylist()
    got_parts = sorted((p["graph_id"], p["role"], p["name"], p["address"]) for p in parts)
    want_parts = sorted(
        (m.id, role, r.name, r.address)  # raw addresses: case and stray whitespace kept
        for m in want
        for role, rs in (("from", [m.sender]), ("sender", [m.sender]), ("to", m.to), ("cc", m.cc))
        for r in rs
    )
    assert got_parts == want_parts
    listing = [r for r in sim.requests if r.path.endswith("/messages")]
    assert listing and all(r.status == 200 for r in listing)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_size=st.one_of(st.integers(1, 1000), st.sampled_from([1, 2, 99, 100, 101, 1000])))
def test_any_page_size_yields_the_same_ids(client: GraphClient, world: World, user: SimUser, page_size: int) -> None:
    since = world.now - timedelta(days=10)
    ids = [i for p in iter_header_pages(client, "inbox", since, page_size)
           for i in p.messages.column("graph_id").to_pylist()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {m.id for m in expected(world, user, "inbox", since)}


def test_header_listing_selects_only_header_fields(client: GraphClient, world: World) -> None:
    assert "body" not in HEADER_FIELDS and "bodyPreview" not in HEADER_FIELDS
    raw = next(client.iter_pages("me/mailFolders/inbox/messages",
                                 {"$select": ",".join(HEADER_FIELDS), "$top": "3"}))
    for item in json.loads(raw)["value"]:
        assert set(item) == {"@odata.etag", *HEADER_FIELDS}


def test_since_must_be_aware_and_is_sent_unquoted() -> None:
    assert graph_datetime(datetime(2024, 5, 2, 9, 14, 3, 999, tzinfo=UTC)) == "2024-05-02T09:14:03Z"
    with pytest.raises(ValueError):
        graph_datetime(datetime(2024, 5, 2))


# ---------------------------------------------------------------------------------------------- errors
def test_revoked_token_is_refreshed_once(http: httpx.Client, tls: SimulatorTLS, world: World) -> None:
    authority = TokenAuthority()
    u = world.tenants[0].users[1]
    token = Tokens(authority, u)
    with GraphSimulator(world, tls, authority) as own:
        client = GraphClient(http, own.base_url, token, sleep=Sleeps())
        assert client.get("me").json()["id"] == u.oid
        authority.revoke_access_tokens(u.oid)
        assert client.get("me").json()["id"] == u.oid
        assert token.calls == [False, False, True]
        assert [r.status for r in own.requests] == [200, 401, 200]

        stale = GraphClient(http, own.base_url, lambda force: "not.a.jwt", sleep=Sleeps())
        with pytest.raises(GraphAuthError) as info:
            stale.get("me")
        assert info.value.status == 401 and info.value.code == "InvalidAuthenticationToken"
        assert [r.status for r in own.requests][-2:] == [401, 401]  # exactly one retry


def test_forbidden_raises_immediately(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority,
                                      user: SimUser, world: World) -> None:
    sleeps = Sleeps()
    basic = make_client(sim, http, Tokens(tokens, user, ("User.Read", "Mail.ReadBasic")), sleep=sleeps)
    since = world.now - timedelta(days=5)
    assert sum(p.messages.num_rows for p in iter_header_pages(basic, "inbox", since, 100)) == len(
        expected(world, user, "inbox", since))
    with pytest.raises(GraphForbidden) as info:
        basic.get("me/mailFolders/inbox/messages", params={"$select": "id,body"})
    err = info.value
    assert (err.status, err.code) == (403, "ErrorAccessDenied") and err.request_id
    with pytest.raises(GraphForbidden):
        list(fetch_bodies(basic, [world.mailboxes[user.oid][0].id]))
    assert sleeps == [] and [r.status for r in sim.requests].count(403) == 2


def test_bad_filter_and_not_found_raise_without_leaking(client: GraphClient, sim: GraphSimulator) -> None:
    with pytest.raises(GraphBadRequest) as info:
        client.get("me/mailFolders/inbox/messages",
                   params={"$filter": "receivedDateTime ge '2024-01-01T00:00:00Z'", "$select": "id"})
    assert info.value.code == "BadRequest"
    with pytest.raises(GraphBadRequest) as info:
        client.get("me/mailFolders/inbox/messages",
                   params={"$filter": "toRecipients/any(r:r/emailAddress/address eq 'secret@x.com')"})
    assert info.value.code == "ErrorInvalidUrlQueryFilter"
    text = str(info.value)
    assert text.startswith("Graph HTTP 400 ErrorInvalidUrlQueryFilter (request-id ")
    assert "secret" not in text and "?" not in text and "$" not in text
    with pytest.raises(GraphNotFound) as nf:
        client.get("me/messages/AAkAnope")
    assert nf.value.code == "ErrorItemNotFound"
    assert [r.status for r in sim.requests] == [400, 400, 404]  # no retries


# ---------------------------------------------------------------------------------------------- retries
def test_fractional_retry_after_is_honoured(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority,
                                            user: SimUser) -> None:
    sleeps = Sleeps()
    client = make_client(sim, http, Tokens(tokens, user), sleep=sleeps)
    sim.inject(user.oid, 429, retry_after="1.5")
    assert client.get("me").status_code == 200
    assert len(sleeps) == 1 and 1.5 <= sleeps[0] < 2.0
    assert [r.status for r in sim.requests] == [429, 200]


def test_503_504_and_retry_exhaustion(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority,
                                      user: SimUser) -> None:
    sleeps = Sleeps()
    client = make_client(sim, http, Tokens(tokens, user), sleep=sleeps, backoff_base_s=0.1)
    sim.inject(user.oid, 503)  # no Retry-After: exponential backoff
    sim.inject(user.oid, 504)
    sim.inject(user.oid, 503, retry_after="0.7")
    assert client.get("me").status_code == 200
    assert [r.status for r in sim.requests] == [503, 504, 503, 200]
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2 and sleeps[2] >= 0.7

    sim.inject(user.oid, 429, count=50, retry_after="2")
    limited = make_client(sim, http, Tokens(tokens, user), sleep=sleeps, max_attempts=3)
    with pytest.raises(GraphThrottled) as info:
        limited.get("me")
    assert (info.value.status, info.value.code) == (429, "TooManyRequests")
    sim.reset()
    sim.inject(user.oid, 504, count=50)
    with pytest.raises(GraphUnavailable) as down:
        limited.get("me")
    assert down.value.status == 504 and [r.status for r in sim.requests] == [504, 504, 504]
    sim.reset()


def test_client_never_exceeds_four_in_flight(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority,
                                             user: SimUser, world: World) -> None:
    sim.latency_s = 0.04
    client = make_client(sim, http, Tokens(tokens, user), sleep=Sleeps())
    ids = [m.id for m in world.mailboxes[user.oid][:30]]
    barrier = threading.Barrier(10)
    errors: list[BaseException] = []
    bodies: list[int] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            if i < 2:
                bodies.append(len(list(fetch_bodies(client, ids[i * 15:(i + 1) * 15]))))
            else:
                for _ in range(3):
                    client.get("me/mailFolders/inbox/messages", params={"$select": "id", "$top": "5"})
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and bodies == [15, 15]
    assert sim.peak_in_flight[user.oid] == 4  # really concurrent, never over the limit
    assert all(r.status == 200 for r in sim.requests)  # so Graph never had to throttle


def test_batch_inner_429_and_503_are_retried(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority,
                                             user: SimUser, world: World) -> None:
    sleeps = Sleeps()
    client = make_client(sim, http, Tokens(tokens, user), sleep=sleeps)
    msgs = world.mailboxes[user.oid][:5]
    sim.inject(user.oid, 429, count=2, retry_after="0.3")
    sim.inject(user.oid, 503, count=1, retry_after="0.1")
    got = dict(fetch_bodies(client, [m.id for m in msgs]))
    assert got == {m.id: m.body for m in msgs}
    inner = [r.status for r in sim.requests if r.inner]
    assert sorted(inner) == [200] * 5 + [429, 429, 503]
    assert sleeps and sleeps[0] >= 0.3
    outer = [r for r in sim.requests if not r.inner]
    assert len(outer) == 2 and all(r.path.endswith("/$batch") and r.status == 200 for r in outer)


def test_fetch_bodies_chunks_and_skips_missing(client: GraphClient, sim: GraphSimulator, world: World,
                                               user: SimUser) -> None:
    msgs = world.mailboxes[user.oid][10:55]
    ids = [m.id for m in msgs]
    ids.insert(7, "AAkAdeletedMeanwhile")
    got = list(fetch_bodies(client, ids))
    assert dict(got) == {m.id: m.body for m in msgs} and len(got) == 45
    assert "<html>" not in "".join(b for _, b in got)
    assert len([r for r in sim.requests if not r.inner]) == 3  # 46 requests -> 20 + 20 + 6


def test_batch_direct_results(client: GraphClient, world: World, user: SimUser) -> None:
    m = world.mailboxes[user.oid][0]
    out = {rid: (status, body) for rid, status, body in client.batch([
        {"id": "a", "method": "GET", "url": f"/me/messages/{m.id}?$select=subject"},
        {"id": "b", "method": "GET", "url": "/me"},
    ])}
    assert out["a"] == (200, out["a"][1]) and out["a"][1]["subject"] == m.subject
    assert out["b"][1]["id"] == user.oid


# ---------------------------------------------------------------------------------------------- wire details
def test_prefer_immutable_ids_paging_guards_and_network_retry() -> None:
    seen: list[httpx.Request] = []
    state = {"fail": 1}
    base = "https://graph.test/v1.0"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/flaky") and state["fail"]:
            state["fail"] -= 1
            raise httpx.ConnectError("boom")
        if request.url.path.endswith("/loop"):
            return httpx.Response(200, json={"value": [], "@odata.nextLink": f"{base}/loop2?$skip=1"})
        if request.url.path.endswith("/loop2"):
            return httpx.Response(200, json={"value": [], "@odata.nextLink": f"{base}/loop2?$skip=1"})
        if request.url.path.endswith("/foreign"):
            return httpx.Response(200, json={"value": [], "@odata.nextLink": "https://evil.test/v1.0/x"})
        return httpx.Response(200, json={"value": []})

    sleeps = Sleeps()
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = GraphClient(http, base, lambda force: "tok", sleep=sleeps)
        client.get("me", headers={"Prefer": 'outlook.body-content-type="text"'})
        assert seen[-1].headers["Prefer"] == 'outlook.body-content-type="text", IdType="ImmutableId"'
        assert seen[-1].headers["Authorization"] == "Bearer tok"
        client.get("flaky")
        assert len(sleeps) == 1 and seen[-1].headers["Prefer"] == 'IdType="ImmutableId"'
        with pytest.raises(GraphPagingError) as loop:
            list(client.iter_pages("loop", None))
        assert loop.value.code == "NextLinkLoop"
        with pytest.raises(GraphPagingError) as foreign:
            list(client.iter_pages("foreign", None))
        assert foreign.value.code == "ForeignOrigin"
        assert all(r.url.host == "graph.test" for r in seen)


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("10") == 10.0
    assert retry_after_seconds("2.128") == pytest.approx(2.128)
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("-3") == 0.0
    err = GraphError(503, "x", "rid")
    assert str(err) == "Graph HTTP 503 x (request-id rid)"
    assert pickle.loads(pickle.dumps(GraphThrottled(429, "c", "r"))).code == "c"
