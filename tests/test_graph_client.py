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
    EXPAND_ALLOWLIST,
    MAIL_READ_ALLOWLIST,
    SENSITIVITY_EXPAND,
    Allow,
    DeltaTokenExpired,
    ForbiddenRequest,
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
from tests.fake_graph import batch_answer


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
def test_header_pages_are_exactly_the_folder_since(
    client: GraphClient, sim: GraphSimulator, world: World, user: SimUser, folder: str
) -> None:
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
        sender = (m.sender.name, m.sender.address) if m.sender is not None else (None, None)
        assert (row["from_name"], row["from_address"]) == sender
        assert row["received_at"] == m.received and row["sent_at"] == m.sent
        assert row["has_attachments"] is m.has_attachments and row["is_draft"] is False
        assert row["web_link"].startswith("https://outlook.office365.com/owa/?ItemID=")
        assert row["parent_folder_id"] == sim.folder_id(user.oid, folder) and row["is_partial"] is False
        assert row["odata_type"] in (None, getattr(m, "odata_type", None))
        # PidTagSensitivity via $expand: absent for mail that never had it (NULL), else the world's value
        assert row["sensitivity"] == (None if m.sensitivity == "normal" else m.sensitivity)
    parts = pa.concat_tables(p.participants for p in pages).to_pylist()
    got_parts = sorted((p["graph_id"], p["role"], p["name"], p["address"]) for p in parts)
    want_parts = sorted(
        (m.id, role, r.name, r.address)  # raw addresses: case and stray whitespace kept
        for m in want
        for role, rs in (("from", [m.sender]), ("sender", [m.sender]), ("to", m.to), ("cc", m.cc))
        for r in rs
        if r is not None and r.address and r.address.strip()  # display-name-only: no participant row
    )
    assert got_parts == want_parts
    listing = [r for r in sim.requests if r.path.endswith("/messages")]
    assert listing and all(r.status == 200 for r in listing)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_size=st.one_of(st.integers(1, 1000), st.sampled_from([1, 2, 99, 100, 101, 1000])))
def test_any_page_size_yields_the_same_ids(client: GraphClient, world: World, user: SimUser, page_size: int) -> None:
    since = world.now - timedelta(days=10)
    ids = [
        i
        for p in iter_header_pages(client, "inbox", since, page_size)
        for i in p.messages.column("graph_id").to_pylist()
    ]
    assert len(ids) == len(set(ids))
    assert set(ids) == {m.id for m in expected(world, user, "inbox", since)}


def test_header_listing_selects_only_header_fields(client: GraphClient, world: World) -> None:
    assert "body" not in HEADER_FIELDS and "bodyPreview" not in HEADER_FIELDS
    assert "bccRecipients" not in HEADER_FIELDS and "sensitivity" not in HEADER_FIELDS
    raw = next(client.iter_pages("me/mailFolders/inbox/messages", {"$select": ",".join(HEADER_FIELDS), "$top": "3"}))
    for item in json.loads(raw)["value"]:
        assert set(item) == {"@odata.etag", *HEADER_FIELDS}


def test_header_listing_expands_sensitivity(
    client: GraphClient, sim: GraphSimulator, world: World, user: SimUser
) -> None:
    """The listing asks for PidTagSensitivity by `$expand` (never `$select=sensitivity`, a 400 on real Graph);
    the ground truth's sensitive mail is still recognised."""
    since = world.now - timedelta(days=400)
    rows = [r for p in iter_header_pages(client, "inbox", since, page_size=200) for r in p.messages.to_pylist()]
    sent = [r for r in sim.requests if r.path.endswith("/messages")]
    assert sent and all(r.status == 200 for r in sent)
    by_id = {m.id: m for m in world.mailboxes[user.oid]}
    sensitive = {r["graph_id"]: r["sensitivity"] for r in rows if r["sensitivity"] is not None}
    assert sensitive and sensitive == {
        m.id: m.sensitivity
        for m in by_id.values()
        if m.folder == "inbox" and m.received >= since and m.sensitivity != "normal"
    }
    assert set(sensitive.values()) <= {"personal", "private", "confidential"}


def test_since_must_be_aware_and_is_sent_unquoted() -> None:
    assert graph_datetime(datetime(2024, 5, 2, 9, 14, 3, 999, tzinfo=UTC)) == "2024-05-02T09:14:03Z"
    with pytest.raises(ValueError):
        graph_datetime(datetime(2024, 5, 2))


def test_the_token_is_asked_again_once_its_reuse_time_is_over(monkeypatch) -> None:
    asked: list[bool] = []

    def token(force: bool) -> str:
        asked.append(force)
        return f"tok{len(asked)}"

    sent: list[str] = []
    transport = httpx.MockTransport(lambda r: sent.append(r.headers["Authorization"]) or httpx.Response(200, json={}))
    reusing = GraphClient(httpx.Client(transport=transport), "https://graph.test/v1.0", token)
    reusing.get("me")
    reusing.get("me")
    assert asked == [False] and sent == ["Bearer tok1", "Bearer tok1"]
    monkeypatch.setattr("o365sync.graph.TOKEN_REUSE_S", 0.0)  # every token has run out at once
    fresh = GraphClient(httpx.Client(transport=transport), "https://graph.test/v1.0", token)
    fresh.get("me")
    fresh.get("me")
    assert asked == [False, False, False] and sent[2:] == ["Bearer tok2", "Bearer tok3"]


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
        assert token.calls == [False, True]  # the first token is reused (TOKEN_REUSE_S) until the 401 forces one
        assert [r.status for r in own.requests] == [200, 401, 200]
        assert client.get("me").status_code == 200 and token.calls == [False, True]  # the refreshed one is reused

        stale = GraphClient(http, own.base_url, lambda force: "not.a.jwt", sleep=Sleeps())
        with pytest.raises(GraphAuthError) as info:
            stale.get("me")
        assert info.value.status == 401 and info.value.code == "InvalidAuthenticationToken"
        assert [r.status for r in own.requests][-2:] == [401, 401]  # exactly one retry


def test_forbidden_raises_immediately(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    sleeps = Sleeps()
    basic = make_client(sim, http, Tokens(tokens, user, ("User.Read", "Mail.ReadBasic")), sleep=sleeps)
    since = world.now - timedelta(days=5)
    headers_only = {
        "$select": ",".join(HEADER_FIELDS),
        "$filter": f"receivedDateTime ge {graph_datetime(since)}",
        "$top": "100",
    }
    assert sum(
        len(json.loads(raw)["value"]) for raw in basic.iter_pages("me/mailFolders/inbox/messages", headers_only)
    ) == len(expected(world, user, "inbox", since))
    with pytest.raises(GraphForbidden) as info:
        basic.get("me/mailFolders/inbox/messages", params={"$select": "id,body"})
    err = info.value
    assert (err.status, err.code) == (403, "ErrorAccessDenied") and err.request_id
    with pytest.raises(GraphForbidden):
        list(fetch_bodies(basic, [world.mailboxes[user.oid][0].id]))
    # Mail.ReadBasic excludes extended properties too: the header listing reads PidTagSensitivity, so needs Mail.Read
    with pytest.raises(GraphForbidden):
        list(iter_header_pages(basic, "inbox", since, 100))
    assert sleeps == [] and [r.status for r in sim.requests].count(403) == 3


def test_bad_filter_and_not_found_raise_without_leaking(client: GraphClient, sim: GraphSimulator) -> None:
    with pytest.raises(GraphBadRequest) as info:
        client.get(
            "me/mailFolders/inbox/messages",
            params={"$filter": "receivedDateTime ge '2024-01-01T00:00:00Z'", "$select": "id"},
        )
    assert info.value.code == "BadRequest"
    with pytest.raises(GraphBadRequest) as info:
        client.get(
            "me/mailFolders/inbox/messages",
            params={"$filter": "toRecipients/any(r:r/emailAddress/address eq 'secret@x.com')"},
        )
    assert info.value.code == "ErrorInvalidUrlQueryFilter"
    text = str(info.value)
    assert text.startswith("Graph HTTP 400 ErrorInvalidUrlQueryFilter (request-id ")
    assert "secret" not in text and "?" not in text and "$" not in text
    with pytest.raises(GraphNotFound) as nf:
        client.get("me/messages/AAkAnope")
    assert nf.value.code == "ErrorItemNotFound"
    assert [r.status for r in sim.requests] == [400, 400, 404]  # no retries


# ---------------------------------------------------------------------------------------------- retries
def test_fractional_retry_after_is_honoured(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser
) -> None:
    sleeps = Sleeps()
    client = make_client(sim, http, Tokens(tokens, user), sleep=sleeps)
    sim.inject(user.oid, 429, retry_after="1.5")
    assert client.get("me").status_code == 200
    assert len(sleeps) == 1 and 1.5 <= sleeps[0] < 2.0
    assert [r.status for r in sim.requests] == [429, 200]


def test_503_504_and_retry_exhaustion(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser
) -> None:
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


@pytest.mark.slow
def test_client_never_exceeds_four_in_flight(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
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
                bodies.append(len(list(fetch_bodies(client, ids[i * 15 : (i + 1) * 15]))))
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


def test_batch_inner_429_and_503_are_retried(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
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


def test_fetch_bodies_chunks_and_skips_missing(
    client: GraphClient, sim: GraphSimulator, world: World, user: SimUser
) -> None:
    msgs = world.mailboxes[user.oid][10:55]
    ids = [m.id for m in msgs]
    ids.insert(7, "AAkAdeletedMeanwhile")
    got = list(fetch_bodies(client, ids))
    assert dict(got) == {m.id: m.body for m in msgs} and len(got) == 45
    assert "<html>" not in "".join(b for _, b in got)
    assert len([r for r in sim.requests if not r.inner]) == 3  # 46 requests -> 20 + 20 + 6


def test_batch_direct_results(client: GraphClient, world: World, user: SimUser) -> None:
    m = world.mailboxes[user.oid][0]
    out = {
        rid: (status, body)
        for rid, status, body in client.batch(
            [
                {"id": "a", "method": "GET", "url": f"/me/messages/{m.id}?$select=subject"},
                {"id": "b", "method": "GET", "url": "/me"},
            ]
        )
    }
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
        if request.url.path.endswith("/loop/messages"):
            return httpx.Response(200, json={"value": [], "@odata.nextLink": f"{base}/me/mailFolders/loop2?$skip=1"})
        if request.url.path.endswith("/loop2"):
            return httpx.Response(200, json={"value": [], "@odata.nextLink": f"{base}/me/mailFolders/loop2?$skip=1"})
        if request.url.path.endswith("/foreign/messages"):
            return httpx.Response(200, json={"value": [], "@odata.nextLink": "https://evil.test/v1.0/x"})
        return httpx.Response(200, json={"value": []})

    sleeps = Sleeps()
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = GraphClient(http, base, lambda force: "tok", sleep=sleeps)
        client.get("me", headers={"Prefer": 'outlook.body-content-type="text"'})
        assert seen[-1].headers["Prefer"] == 'outlook.body-content-type="text", IdType="ImmutableId"'
        assert seen[-1].headers["Authorization"] == "Bearer tok"
        client.get("me/mailFolders/flaky")
        assert len(sleeps) == 1 and seen[-1].headers["Prefer"] == 'IdType="ImmutableId"'
        with pytest.raises(GraphPagingError) as loop:
            list(client.iter_pages("me/mailFolders/loop/messages", None))
        assert loop.value.code == "NextLinkLoop"
        with pytest.raises(GraphPagingError) as foreign:
            list(client.iter_pages("me/mailFolders/foreign/messages", None))
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


# ---------------------------------------------------------------------------------------------- least privilege
MID = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AAAA="
FORBIDDEN: list[tuple[str, str, dict | None]] = [
    ("POST", "me/sendMail", None),
    ("POST", f"me/messages/{MID}/reply", None),
    ("POST", f"me/messages/{MID}/replyAll", None),
    ("POST", f"me/messages/{MID}/forward", None),
    ("POST", f"me/messages/{MID}/move", None),
    ("POST", f"me/messages/{MID}/copy", None),
    ("POST", f"me/messages/{MID}/createReply", None),
    ("POST", "me/messages", None),
    ("POST", "me/mailFolders/inbox/messages", None),
    ("PATCH", f"me/messages/{MID}", None),
    ("PUT", f"me/messages/{MID}", None),
    ("DELETE", f"me/messages/{MID}", None),
    ("DELETE", "me/mailFolders/inbox", None),
    ("GET", f"me/messages/{MID}/attachments", None),
    ("GET", f"me/messages/{MID}/attachments/AAMkAtt", None),
    ("GET", f"me/mailFolders/inbox/messages/{MID}/attachments", None),
    ("GET", f"me/messages/{MID}/$value", None),
    ("GET", f"me/messages/{MID}?$expand=attachments", None),
    ("GET", f"me/messages/{MID}", {"$expand": "attachments"}),
    ("GET", f"me/messages/{MID}", {"expand": "attachments"}),
    ("GET", f"me/messages/{MID}", {"$expand": f"{SENSITIVITY_EXPAND},attachments"}),
    ("GET", f"me/messages/{MID}", {"$expand": "singleValueExtendedProperties"}),
    ("GET", "me/mailFolders/inbox/messages", {"$expand": SENSITIVITY_EXPAND.replace("0x0036", "0x0E08")}),
    ("GET", f"me/messages/{MID}", {"$select": "subject, Attachments"}),
    ("GET", "me/mailFolders/inbox/messages?$select=id,attachments/name", None),
    ("GET", "me/mailFolders/inbox/messages/delta", {"$SELECT": "id,attachments"}),
    ("GET", "me/messages", None),  # the whole mailbox, Deleted Items included: not needed
    ("GET", "me/drive/root/children", None),
    ("GET", "me/drives", None),
    ("GET", "drives/b!x/items/root", None),
    ("GET", "sites/root", None),
    ("GET", "me/contacts", None),
    ("GET", "me/people", None),
    ("GET", "users/alice@contoso.com/messages", None),
    ("GET", "users/8f0a2c55-0000-4000-8000-000000000001/mailFolders/inbox/messages", None),
    ("GET", "users", None),
    ("GET", "me/events", None),
    ("GET", "me/calendarView", None),
    ("GET", "me/calendar/events", None),
    ("GET", "me/joinedTeams", None),
    ("GET", "teams/t1/channels", None),
    ("GET", "chats", None),
    ("GET", "me/messages/..%2F..%2Fusers%2Fbob%2Fmessages", None),
    ("GET", "me/mailFolders/inbox/messages/../../../drive", None),
    ("GET", "me/mailFolders/%2E%2E/messages", None),
    ("GET", "me/mailFolders/inbox/messages/delta/extra", None),
    ("GET", "", None),
]


@pytest.mark.parametrize(("method", "path", "params"), FORBIDDEN)
def test_forbidden_requests_are_refused_before_sending(
    sim: GraphSimulator,
    http: httpx.Client,
    tokens: TokenAuthority,
    user: SimUser,
    method: str,
    path: str,
    params: dict | None,
) -> None:
    token = Tokens(tokens, user, ("User.Read", "Mail.ReadWrite", "Mail.Send", "Files.Read.All"))
    client = make_client(sim, http, token, sleep=Sleeps())
    with pytest.raises(ForbiddenRequest) as info:
        client.request(method, path, params=params, content=b"{}" if method in ("POST", "PATCH", "PUT") else None)
    with pytest.raises(ForbiddenRequest):
        client.request(method, f"{sim.base_url}/{path}", params=params)  # the absolute (nextLink) form too
    assert sim.requests == [] and token.calls == []  # nothing sent, not even a token fetched
    err = info.value
    assert isinstance(err, GraphError) and err.status == 0 and err.method == method
    text = str(err)
    assert text.startswith(f"Graph request refused by the client allowlist: {method} ")
    for secret in ("?", "=", "alice", "contoso", MID, "8f0a2c55", "AAMkAtt", "name"):
        assert secret not in text
    assert pickle.loads(pickle.dumps(err)).template == err.template


def test_forbidden_templates_name_the_shape_only() -> None:
    def refused(method: str, path: str, params: dict | None = None) -> ForbiddenRequest:
        client = GraphClient(
            httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500))),
            "https://graph.test/v1.0",
            lambda force: "tok",
        )
        with pytest.raises(ForbiddenRequest) as info:
            client.request(method, path, params=params)
        return info.value

    assert refused("POST", "me/sendMail").template == "me/sendMail"
    assert refused("GET", f"me/messages/{MID}/attachments").template == "me/messages/{id}/attachments"
    assert refused("GET", "users/alice@contoso.com/messages").template == "users/{id}/messages"
    assert refused("GET", "users/bob/messages").template == "users/{id}/messages"
    err = refused("GET", f"me/messages/{MID}", {"$expand": "attachments"})
    assert (err.template, err.option) == ("me/messages/{id}", "$expand")
    assert str(err).endswith("GET me/messages/{id} (query option $expand)")
    assert refused("GET", "https://graph.test/beta/me").template == "beta/me"


def test_forbidden_inner_batch_request_stops_the_whole_batch(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    token = Tokens(tokens, user)
    client = make_client(sim, http, token, sleep=Sleeps())
    m = world.mailboxes[user.oid][0]
    good = [{"id": str(i), "method": "GET", "url": f"/me/messages/{m.id}?$select=body"} for i in range(25)]
    for bad in (
        {"id": "x", "method": "POST", "url": f"/me/messages/{m.id}/forward"},
        {"id": "x", "method": "GET", "url": f"/me/messages/{m.id}/attachments"},
        {"id": "x", "method": "GET", "url": f"/me/messages/{m.id}?$expand=attachments"},
        {"id": "x", "method": "GET", "url": "/users/someone@else.com/messages"},
        {"id": "x", "method": "POST", "url": "/$batch"},
        {"id": "x", "method": "GET", "url": f"{sim.base_url}/me"},
        {"id": "x", "method": "DELETE", "url": f"/me/messages/{m.id}"},
    ):
        with pytest.raises(ForbiddenRequest):
            list(client.batch([*good, bad]))  # the bad one is in the second chunk: the first is not sent either
        payload = json.dumps({"requests": [good[0], bad]}).encode()
        for batch_path in ("$batch", "/$BATCH", f"{sim.base_url}/%24batch"):
            with pytest.raises(ForbiddenRequest):  # a hand-made $batch POST is inspected too, in any spelling
                client.request("POST", batch_path, content=payload)
    with pytest.raises(ForbiddenRequest):
        client.request("POST", "$batch", content=b"not json")
    assert sim.requests == [] and token.calls == []


def test_nextlinks_are_checked_before_they_are_followed() -> None:
    seen: list[str] = []
    base = "https://graph.test/v1.0"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"value": [], "@odata.nextLink": f"{base}/me/messages/X/attachments?$skip=1"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = GraphClient(http, base, lambda force: "tok")
        with pytest.raises(ForbiddenRequest):
            list(client.iter_pages("me/mailFolders/inbox/messages", None))
    assert seen == ["/v1.0/me/mailFolders/inbox/messages"]


def test_allowed_shapes_including_graph_link_forms() -> None:
    client = GraphClient(
        httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500))),
        "https://graph.microsoft.com/v1.0",
        lambda force: "tok",
    )
    ok = [
        ("GET", "me"),
        ("GET", "/me"),
        ("GET", "me/mailFolders/inbox"),
        ("GET", "ME/MAILFOLDERS/SentItems"),
        ("GET", "me/mailFolders/AQMkADNkNAAAgEMAAAA%3D/messages?$select=id,subject&$top=5"),
        ("GET", "me/mailFolders/inbox/messages/delta?$select=id,subject"),
        (
            "GET",
            "me/mailFolders/inbox/messages/delta?$select=id&$expand=singleValueExtendedProperties(%24filter%3D"
            "id%20eq%20%27Integer%200x0036%27)",
        ),
        (
            "GET",
            "https://graph.microsoft.com/v1.0/me/mailfolders('AQMkADNkNAAAgEMAAAA')/messages/delta"
            "?$skiptoken=GwcBoTmPuoTQWfcsAbkYM",
        ),
        ("GET", "https://graph.microsoft.com/v1.0/me/mailFolders('inbox')/messages/delta?$deltatoken=abc%3D%3D"),
        ("GET", "https://graph.microsoft.com/v1.0/me/mailFolders/inbox/messages?%24select=id&%24skip=50"),
        ("GET", f"me/messages/{MID}?$select=body"),
        ("get", f"/me/messages/{MID}"),
    ]
    for method, path in ok:
        assert client.check_allowed(method, path) == 1, path
    batch = json.dumps(
        {"requests": [{"id": str(i), "method": "GET", "url": f"/me/messages/{MID}?$select=body"} for i in range(7)]}
    ).encode()
    assert client.check_allowed("POST", "$batch", content=batch) == 7
    with pytest.raises(ForbiddenRequest):
        client.check_allowed("GET", "me/mailfolders('in/box')/messages/delta")
    with pytest.raises(ForbiddenRequest):
        client.check_allowed("GET", "me/contacts('x')/messages/delta")

    # the allowlist is plain data: a later feature adds its entries
    calendar = GraphClient(
        client.http,
        client.base_url,
        lambda force: "tok",
        allow=(*MAIL_READ_ALLOWLIST, Allow("GET", "me/calendarView/delta")),
    )
    assert calendar.check_allowed("GET", "me/calendarView/delta?startDateTime=2024-01-01T00:00:00Z") == 1
    with pytest.raises(ForbiddenRequest):
        client.check_allowed("GET", "me/calendarView/delta")


SEGMENTS = [
    "me",
    "ME",
    "messages",
    "mailFolders",
    "inbox",
    "delta",
    "$batch",
    MID,
    "%2E%2E",
    "..",
    "a%2Fb",
    "%5C",
    "mailfolders('x')",
    "attachments",
    "users",
    "",
    "%24batch",
    "a;b",
    "me?x",
]
QUERIES = [
    "",
    "?$select=body",
    "?$select=attachments",
    "?$expand=attachments",
    "?%24select=id&$top=5",
    "?$select=",
    "?$expand=" + SENSITIVITY_EXPAND,
    "?a=1&&b",
    "?$SELECT=Attachments,body",
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["GET", "get", "POST", "DELETE"]),
    st.booleans(),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5),
    st.sampled_from(QUERIES),
)
def test_relative_paths_are_judged_as_their_absolute_form(method: str, slash: bool, parts: list, query: str) -> None:
    """The allowlist's shortcut for paths relative to the version root (every inner `$batch` request) decides
    exactly as the full parse of the same request written as an absolute URL."""
    client = GraphClient(
        httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500))),
        "https://graph.microsoft.com/v1.0",
        lambda force: "tok",
    )
    path = ("/" if slash else "") + "/".join(parts) + query

    def verdict(url: str) -> object:
        try:
            return client.check_allowed(method, url)
        except ForbiddenRequest as refused:
            return (refused.method, refused.template, refused.option)

    assert verdict(path) == verdict(f"{client.base_url}/{path.lstrip('/')}")


def test_expand_allowlist_is_exactly_the_sensitivity_property() -> None:
    client = GraphClient(
        httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500))),
        "https://graph.microsoft.com/v1.0",
        lambda force: "tok",
    )
    assert EXPAND_ALLOWLIST == {SENSITIVITY_EXPAND} == {"singleValueExtendedProperties($filter=id eq 'Integer 0x0036')"}
    listing, delta, one = "me/mailFolders/inbox/messages", "me/mailFolders/inbox/messages/delta", f"me/messages/{MID}"
    allowed = [SENSITIVITY_EXPAND, f"  {SENSITIVITY_EXPAND}\t", SENSITIVITY_EXPAND.replace(" ", "  \n ")]
    for value in allowed:  # exact match after whitespace normalisation, as params, in the URL and in a $batch
        for path in (listing, delta, one):
            assert client.check_allowed("GET", path, {"$expand": value, "$select": "id"}) == 1
        assert client.check_allowed("GET", f"{listing}?{httpx.QueryParams({'$expand': value})}") == 1
        batch = json.dumps(
            {"requests": [{"id": "1", "method": "GET", "url": f"/{one}?{httpx.QueryParams({'$expand': value})}"}]}
        ).encode()
        assert client.check_allowed("POST", "$batch", content=batch) == 1
    refused = [
        "attachments",
        "Attachments",
        "extensions",
        "singleValueExtendedProperties",
        "multiValueExtendedProperties",
        f"{SENSITIVITY_EXPAND},attachments",
        f"attachments,{SENSITIVITY_EXPAND}",
        SENSITIVITY_EXPAND.replace("Integer 0x0036", "Integer 0x36"),  # exact string: not the echoed id form
        SENSITIVITY_EXPAND.replace("Integer", "integer"),
        SENSITIVITY_EXPAND.replace("single", "Single"),
        SENSITIVITY_EXPAND.replace("0x0036", "0x0E08"),
        SENSITIVITY_EXPAND.replace("(", " ("),
        "singleValueExtendedProperties($filter=id eq 'String {00020386-0000-0000-C000-000000000046} Name x-secret')",
        "",
        "*",
    ]
    for value in refused:
        for key in ("$expand", "expand", "$EXPAND"):
            with pytest.raises(ForbiddenRequest) as info:
                client.check_allowed("GET", listing, {key: value})
            assert info.value.option == "$expand" and "secret" not in str(info.value)
        with pytest.raises(ForbiddenRequest):
            client.check_allowed("GET", f"{one}?{httpx.QueryParams({'$expand': value})}")
    with pytest.raises(ForbiddenRequest):  # every $expand of a request must be allowed
        client.check_allowed(
            "GET", f"{listing}?{httpx.QueryParams({'$expand': SENSITIVITY_EXPAND})}", {"$expand": "attachments"}
        )
    # like the path allowlist, it is plain data; nothing at all when emptied
    strict = GraphClient(client.http, client.base_url, lambda force: "tok", allow_expand=())
    with pytest.raises(ForbiddenRequest):
        strict.check_allowed("GET", listing, {"$expand": SENSITIVITY_EXPAND})


def test_delta_token_errors_are_classified() -> None:
    from o365sync.graph import error_for

    body = json.dumps({"error": {"code": "SyncStateNotFound", "message": "gen=149"}}).encode()
    for status, code in (
        (410, "SyncStateNotFound"),
        (410, None),
        (400, "syncStateNotFound"),
        (400, "resyncRequired"),
        (404, "SYNCSTATEINVALID"),
        (409, "ResyncRequired"),
    ):
        raw = json.dumps({"error": {"code": code}}).encode() if code else b""
        err = error_for(status, raw)
        assert isinstance(err, DeltaTokenExpired) and err.status == status, (status, code)
    assert isinstance(error_for(410, body), DeltaTokenExpired)
    assert not isinstance(error_for(400, json.dumps({"error": {"code": "BadRequest"}}).encode()), DeltaTokenExpired)
    assert not isinstance(error_for(503, json.dumps({"error": {"code": "resyncRequired"}}).encode()), DeltaTokenExpired)


# ---------------------------------------------------------------------------------------------- budget
class FakeClock:
    """`clock` and `sleep` in one: sleeping advances the clock; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _counting_client(
    clock: FakeClock,
    sent: list[tuple[float, int]],
    budget: int | None,
    window: float,
    statuses: list[int] | None = None,
) -> GraphClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/$batch"):
            sent.append((clock.now, len(json.loads(request.content)["requests"])))
            return batch_answer(request, lambda r: {"id": r["id"]}, headers={})
        sent.append((clock.now, 1))
        status = statuses.pop(0) if statuses else 200
        return httpx.Response(status, json={"id": "me"} if status == 200 else {"error": {"code": "x"}})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    return GraphClient(
        http,
        "https://graph.test/v1.0",
        lambda force: "tok",
        sleep=clock.sleep,
        clock=clock,
        budget=budget,
        budget_window_s=window,
        backoff_base_s=0.01,
    )


def _max_in_window(sent: list[tuple[float, int]], window: float) -> int:
    return max(sum(n for t2, n in sent if t <= t2 < t + window) for t, _ in sent)


def test_budget_blocks_until_the_sliding_window_frees() -> None:
    clock, sent = FakeClock(), []
    client = _counting_client(clock, sent, budget=5, window=60.0)
    for _ in range(5):
        client.get("me")
        clock.now += 1.0  # one request a second
    assert clock.sleeps == [] and client.budget_used() == 5
    client.get("me")  # the 6th must wait until the first (t=1000) has left the window
    assert clock.sleeps == [pytest.approx(55.0)] and sent[-1][0] == pytest.approx(1060.0)
    for _ in range(20):
        client.get("me")
    assert _max_in_window(sent, 60.0) <= 5
    assert len(sent) == 26 and sum(clock.sleeps) >= 4 * 60 - 5


def test_budget_counts_inner_batch_requests_and_retries() -> None:
    clock, sent = FakeClock(), []
    client = _counting_client(clock, sent, budget=30, window=600.0, statuses=[503, 200])
    client.get("me")  # a 503 and its retry: two requests booked
    assert client.budget_used() == 2
    reqs = [{"id": str(i), "method": "GET", "url": f"/me/messages/{MID}?$select=body"} for i in range(25)]
    assert len(list(client.batch(reqs))) == 25  # 20 + 5 inner requests
    assert client.budget_used() == 27 and not [s for s in clock.sleeps if s > 1]
    assert len(list(client.batch(reqs[:4]))) == 4  # 27 + 4 > 30: waits for the window
    assert clock.sleeps[-1] == pytest.approx(600.0, abs=1.0)
    assert _max_in_window(sent, 600.0) <= 30


def test_budget_default_is_outlooks_limit_and_can_be_lowered_or_disabled() -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})))
    client = GraphClient(http, "https://graph.test/v1.0", lambda force: "tok")
    assert (client.budget, client.budget_window_s) == (10_000, 600.0)
    assert GraphClient(http, "https://graph.test/v1.0", lambda f: "t", budget=9_000).budget == 9_000
    clock = FakeClock()
    unlimited = GraphClient(http, "https://graph.test/v1.0", lambda f: "t", budget=None, sleep=clock.sleep, clock=clock)
    for _ in range(50):
        unlimited.get("me")
    assert clock.sleeps == []
    with pytest.raises(ValueError):
        GraphClient(http, "https://graph.test/v1.0", lambda f: "t", budget=0)


def test_budget_setting_zero_switches_the_clients_budget_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from o365sync.settings import Settings

    assert Settings(_env_file=None).graph_budget == 9500  # on unless asked
    monkeypatch.setenv("O365SYNC_GRAPH_REQUEST_BUDGET", "0")
    off = Settings(_env_file=None)
    assert off.graph_budget is None
    clock, sent = FakeClock(), []
    client = _counting_client(clock, sent, budget=off.graph_budget, window=600.0)
    for _ in range(40):
        client.get("me")
    assert client.budget is None and client.budget_used() == 0 and clock.sleeps == [] and len(sent) == 40
    monkeypatch.setenv("O365SYNC_GRAPH_REQUEST_BUDGET", "-1")
    with pytest.raises(ValidationError, match="graph_request_budget"):
        Settings(_env_file=None)


def test_budget_is_shared_by_threads() -> None:
    clock_lock = threading.Lock()
    clock, sent = FakeClock(), []
    real_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        with clock_lock:
            real_sleep(seconds)

    client = _counting_client(clock, sent, budget=10, window=30.0)
    client._sleep = sleep
    threads = [threading.Thread(target=lambda: [client.get("me") for _ in range(5)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == 30 and _max_in_window(sent, 30.0) <= 10


# ---------------------------------------------------------------------------------------------- links and run limits
def test_links_off_the_configured_graph_url_are_not_followed_and_mean_resync() -> None:
    """A saved deltaLink of another Graph endpoint (issue 10 item 5) is a `DeltaTokenExpired` (callers resync)
    and nothing, in particular no token, is sent anywhere."""
    from o365sync.graph import LinkNotFollowable

    seen: list[httpx.Request] = []
    with httpx.Client(transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200, json={}))) as h:
        client = GraphClient(h, "https://graph.test/v1.0", lambda force: "tok")
        for link, code in (
            ("https://127.0.0.1:4711/v1.0/me/mailFolders('x')/messages/delta?$deltatoken=1", "ForeignOrigin"),
            ("http://graph.test/v1.0/me/mailFolders/inbox/messages?$skip=5", "ForeignOrigin"),
            ("https://graph.test/beta/me/calendarView/delta?$deltatoken=1", "OutsideGraphRoot"),
            ("https://graph.test:8443/v1.0/me", "ForeignOrigin"),
        ):
            with pytest.raises(DeltaTokenExpired) as info:
                list(client.iter_pages(link, None))
            assert isinstance(info.value, LinkNotFollowable) and info.value.code == code
            assert "deltatoken" not in str(info.value) and "127.0.0.1" not in str(info.value)
    assert seen == []


def test_paging_stops_at_the_page_and_time_limits() -> None:
    from o365sync.graph import RunLimitReached

    clock = FakeClock()
    base = "https://graph.test/v1.0"
    served: list[str] = []

    def endless(request: httpx.Request) -> httpx.Response:
        served.append(str(request.url))
        clock.now += 1.0  # each page takes a second
        return httpx.Response(
            200, json={"value": [], "@odata.nextLink": f"{base}/me/mailFolders/inbox/messages?$skip={len(served)}"}
        )

    with httpx.Client(transport=httpx.MockTransport(endless)) as http:
        client = GraphClient(http, base, lambda force: "tok", clock=clock, max_pages=7)
        with pytest.raises(RunLimitReached) as info:
            list(client.iter_pages("me/mailFolders/inbox/messages", None))
        assert (info.value.code, len(served)) == ("PageCap", 7)
        client.stop_paging_after(3.5)
        served.clear()
        with pytest.raises(RunLimitReached) as info:
            list(client.iter_pages("me/mailFolders/inbox/messages", None))
        assert (info.value.code, len(served)) == ("TimeCap", 4)
        served.clear()
        with pytest.raises(RunLimitReached):  # past the deadline a listing still reads its first page
            list(client.iter_pages("me/mailFolders/inbox/messages", None))
        assert len(served) == 1 and client.past_deadline()
    with pytest.raises(ValueError):
        GraphClient(httpx.Client(), base, lambda force: "tok", max_pages=0)


def test_simulator_faults_endless_next_links_and_half_emoji(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, world: World, user: SimUser
) -> None:
    from o365sync.graph import RunLimitReached

    since = datetime(2000, 1, 1, tzinfo=UTC)
    inbox = expected(world, user, "inbox", since)
    sim.endless_next_links = True
    client = make_client(sim, http, Tokens(tokens, user), sleep=Sleeps(), max_pages=len(inbox) // 50 + 20)
    got: list[str] = []
    with pytest.raises(RunLimitReached):
        for page in iter_header_pages(client, "inbox", since, 50):
            got += page.messages.column("graph_id").to_pylist()
    assert sorted(got) == sorted(m.id for m in inbox)  # every real page, then empty pages with fresh links
    assert sum(r.path.endswith("/messages") for r in sim.requests) == client.max_pages

    sim.reset()
    broken = {m.id for m in inbox[:3]}
    sim.lone_surrogate_ids = frozenset(broken)
    client = make_client(sim, http, Tokens(tokens, user), sleep=Sleeps())
    pages = list(iter_header_pages(client, "inbox", since, 50))
    rows = [r for p in pages for r in p.messages.to_pylist() if r["graph_id"] in broken]
    by_id = {m.id: m for m in inbox}
    assert all(r["subject"] == f"{by_id[r['graph_id']].subject}\ufffd" for r in rows) and len(rows) == 3
    assert all(r["from_name"].endswith("\ufffd") for r in rows)
    assert sum(p.odd for p in pages) == 3
