"""The Graph mail simulator, driven with plain httpx over loopback TLS and real TokenAuthority tokens."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulators.graph import GraphSimulator
from simulators.tls import SimulatorTLS
from simulators.tokens import TokenAuthority
from simulators.world import SimUser, World

HEADER_SELECT = (
    "id,internetMessageId,conversationId,subject,from,sender,toRecipients,ccRecipients,"
    "bccRecipients,receivedDateTime,sentDateTime,hasAttachments,isDraft,parentFolderId,webLink"
)


IMMUTABLE = {"Prefer": 'IdType="ImmutableId"'}  # without it Graph (and the simulator) returns mutable ids


def auth(tokens: TokenAuthority, user: SimUser, scopes: tuple[str, ...] = ("User.Read", "Mail.Read")) -> dict:
    token = tokens.issue_access_token(user.tid, user.oid, user.upn, list(scopes), "app")
    return {"Authorization": f"Bearer {token}"}


def list_inbox(http: httpx.Client, sim: GraphSimulator, headers: dict, params: dict) -> httpx.Response:
    """GET the inbox's messages with `params` (the `$` query options) and `headers`."""
    return http.get(f"{sim.base_url}/me/mailFolders/inbox/messages", params=params, headers=headers)


def assert_graph_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str)
    inner = err["innerError"]
    assert set(inner) == {"date", "request-id", "client-request-id"}
    assert inner["request-id"] == resp.headers["request-id"]
    assert inner["client-request-id"] == resp.headers["client-request-id"]
    return err


def test_me_and_folders(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser) -> None:
    resp = http.get(f"{sim.base_url}/me", headers={**auth(tokens, user), "client-request-id": "abc-123"})
    assert resp.status_code == 200
    assert resp.headers["client-request-id"] == "abc-123" and resp.headers["request-id"]
    me = resp.json()
    assert (me["id"], me["displayName"], me["userPrincipalName"], me["mail"]) == (
        user.oid,
        user.display_name,
        user.upn,
        user.upn,
    )

    inbox = http.get(f"{sim.base_url}/me/mailFolders/InBox", headers=auth(tokens, user)).json()
    sent = http.get(f"{sim.base_url}/me/mailFolders/SENTITEMS", headers=auth(tokens, user)).json()
    assert inbox["id"] not in ("inbox", "InBox") and inbox["id"] != sent["id"]
    assert inbox["displayName"] == "Inbox" and sent["displayName"] == "Sent Items"
    by_id = http.get(f"{sim.base_url}/me/mailFolders/{inbox['id']}", headers=auth(tokens, user)).json()
    assert by_id["id"] == inbox["id"]
    msgs = list_inbox(http, sim, auth(tokens, user), {"$select": "parentFolderId", "$top": "3"}).json()
    assert {m["parentFolderId"] for m in msgs["value"]} == {inbox["id"]}
    missing = http.get(f"{sim.base_url}/me/mailFolders/nosuchfolder", headers=auth(tokens, user))
    assert_graph_error(missing, 404, "ErrorItemNotFound")


@pytest.mark.parametrize("folder", ["inbox", "sentitems"])
def test_paging_returns_exactly_the_folder_since(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World, folder: str
) -> None:
    since = world.now - timedelta(days=20)
    params = {
        "$select": HEADER_SELECT,
        "$filter": f"receivedDateTime ge {since:%Y-%m-%dT%H:%M:%SZ}",
        "$top": "37",
        "$orderby": "receivedDateTime desc",
    }
    url: str | None = f"{sim.base_url}/me/mailFolders/{folder}/messages"
    got: list[dict] = []
    pages = 0
    while url:
        resp = http.get(url, params=params if pages == 0 else None, headers={**auth(tokens, user), **IMMUTABLE})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page["value"]) <= 37
        got += page["value"]
        url = page.get("@odata.nextLink")
        if url:  # absolute, on the simulator, carrying every query option
            assert url.startswith(sim.base_url + "/me/mailFolders/")
            assert all(k in httpx.URL(url).params for k in ("$select", "$filter", "$top", "$orderby", "$skip"))
        pages += 1
    expected = sorted(
        (m for m in world.mailboxes[user.oid] if m.folder == folder and m.received >= since),
        key=lambda m: m.received,
        reverse=True,
    )
    assert [m["id"] for m in got] == [m.id for m in expected]
    assert pages == -(-len(expected) // 37)
    assert [m["receivedDateTime"] for m in got] == sorted((m["receivedDateTime"] for m in got), reverse=True)


def test_gt_filter_and_default_top(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    inbox = sorted((m for m in world.mailboxes[user.oid] if m.folder == "inbox"), key=lambda m: m.received)
    pivot = inbox[-5].received
    ge = list_inbox(
        http, sim, auth(tokens, user), {"$select": "id", "$filter": f"receivedDateTime ge {pivot:%Y-%m-%dT%H:%M:%SZ}"}
    ).json()
    gt = list_inbox(
        http, sim, auth(tokens, user), {"$select": "id", "$filter": f"receivedDateTime gt {pivot:%Y-%m-%dT%H:%M:%SZ}"}
    ).json()
    assert len(ge["value"]) == 5 and len(gt["value"]) == 4
    first = list_inbox(http, sim, auth(tokens, user), {"$select": "id"}).json()
    assert len(first["value"]) == 10 and "@odata.nextLink" in first  # Graph's default page size


def test_select_projection(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    resp = list_inbox(http, sim, auth(tokens, user), {"$select": "subject,toRecipients", "$top": "5"})
    for item in resp.json()["value"]:
        assert set(item) == {"@odata.etag", "id", "subject", "toRecipients"}
    bad = list_inbox(http, sim, auth(tokens, user), {"$select": "subject,nope"})
    assert_graph_error(bad, 400, "RequestBroker--ParseUri")


SENSITIVITY_EXPAND = "singleValueExtendedProperties($filter=id eq 'Integer 0x0036')"
SENSITIVITY_VALUE = {"personal": "1", "private": "2", "confidential": "3"}


def test_select_sensitivity_is_the_real_parse_error(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    """Graph v1.0 `message` has no `sensitivity` property (only `event` has): $select of it is a 400."""
    m = world.mailboxes[user.oid][0]
    for url, select in (
        (f"{sim.base_url}/me/mailFolders/inbox/messages", "id,subject,sensitivity"),
        (f"{sim.base_url}/me/messages/{m.id}", "Sensitivity"),
        (f"{sim.base_url}/me/mailFolders/inbox/messages/delta", "id,sensitivity"),
    ):
        resp = http.get(url, params={"$select": select}, headers=auth(tokens, user))
        err = assert_graph_error(resp, 400, "RequestBroker--ParseUri")
        name = select.rsplit(",", 1)[-1]
        assert err["message"] == f"Could not find a property named '{name}' on type 'microsoft.graph.message'."
    unselected = http.get(f"{sim.base_url}/me/messages/{m.id}", headers={**auth(tokens, user), **IMMUTABLE}).json()
    assert "sensitivity" not in unselected and "singleValueExtendedProperties" not in unselected


def test_sensitivity_extended_property(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    """PidTagSensitivity via `$expand`: "Integer 0x36" with "1"/"2"/"3"; mail that never had it omits the key."""
    h = {**auth(tokens, user), **IMMUTABLE}
    url = f"{sim.base_url}/me/mailFolders/inbox/messages"
    inbox = {m.id: m for m in world.mailboxes[user.oid] if m.folder == "inbox"}
    items: list[dict] = []
    next_url: str | None = url
    params: dict | None = {"$select": "id,subject", "$expand": SENSITIVITY_EXPAND, "$top": "50"}
    while next_url:  # the $expand survives into the nextLinks
        page = http.get(next_url, params=params, headers=h).json()
        items += page["value"]
        next_url, params = page.get("@odata.nextLink"), None
    assert {i["id"] for i in items} == set(inbox)
    for item in items:
        m = inbox[item["id"]]
        keys = set(item) - {"@odata.type"}  # lists name derived types (meeting requests)
        if m.sensitivity == "normal":
            assert keys == {"@odata.etag", "id", "subject"}
        else:
            assert keys == {"@odata.etag", "id", "subject", "singleValueExtendedProperties"}
            assert item["singleValueExtendedProperties"] == [
                {"id": "Integer 0x36", "value": SENSITIVITY_VALUE[m.sensitivity]}
            ]
    assert any("singleValueExtendedProperties" in i for i in items)

    # the id is matched case-insensitively and whatever the leading zeros; whitespace is tolerated
    secret = next(m for m in inbox.values() if m.sensitivity != "normal")
    for expand in (
        SENSITIVITY_EXPAND,
        "singleValueExtendedProperties($filter=id eq 'integer 0x36')",
        "SingleValueExtendedProperties( $filter=Id eq 'INTEGER 0X0036' )",
    ):
        one = http.get(
            f"{sim.base_url}/me/messages/{secret.id}", params={"$select": "id", "$expand": expand}, headers=h
        )
        assert one.status_code == 200, one.text
        assert one.json()["singleValueExtendedProperties"] == [
            {"id": "Integer 0x36", "value": SENSITIVITY_VALUE[secret.sensitivity]}
        ]
    batch = http.post(
        f"{sim.base_url}/$batch",
        headers=h,
        json={
            "requests": [
                {"id": "1", "method": "GET", "url": f"/me/messages/{secret.id}?$select=id&$expand={SENSITIVITY_EXPAND}"}
            ]
        },
    )
    (inner,) = batch.json()["responses"]
    assert inner["status"] == 200 and inner["body"]["singleValueExtendedProperties"][0]["id"] == "Integer 0x36"

    # every other $expand keeps its old answer
    for expand in (
        "attachments",
        "singleValueExtendedProperties",
        f"{SENSITIVITY_EXPAND},attachments",
        SENSITIVITY_EXPAND.replace("0x0036", "0x0E08"),
        SENSITIVITY_EXPAND.replace("Integer", "String"),
    ):
        err = assert_graph_error(
            http.get(url, params={"$select": "id", "$expand": expand}, headers=h), 400, "BadRequest"
        )
        assert err["message"] == "Query option '$expand' is not supported."
    # Mail.ReadBasic reads no extended properties
    basic = auth(tokens, user, ("User.Read", "Mail.ReadBasic"))
    assert_graph_error(
        http.get(url, params={"$select": "id", "$expand": SENSITIVITY_EXPAND}, headers=basic), 403, "ErrorAccessDenied"
    )


def test_message_shape_and_body_types(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    m = next(x for x in world.mailboxes[user.oid] if x.cc and x.folder == "inbox")
    url = f"{sim.base_url}/me/messages/{m.id.replace('=', '%3D')}"
    html_resp = http.get(url, headers={**auth(tokens, user), "Prefer": 'IdType="ImmutableId"'})
    assert html_resp.status_code == 200
    msg = html_resp.json()
    assert msg["body"]["contentType"] == "html" and "<html>" in msg["body"]["content"]
    assert msg["bodyPreview"] == m.body[:255]
    assert msg["id"] == m.id and msg["internetMessageId"] == m.internet_message_id
    assert msg["conversationId"] == m.conversation_id and msg["subject"] == m.subject
    assert msg["from"] == msg["sender"] == {"emailAddress": {"name": m.sender.name, "address": m.sender.address}}
    assert [r["emailAddress"]["address"] for r in msg["toRecipients"]] == [r.address for r in m.to]
    assert [r["emailAddress"]["address"] for r in msg["ccRecipients"]] == [r.address for r in m.cc]
    assert msg["bccRecipients"] == [] and msg["replyTo"] == [] and msg["isDraft"] is False
    assert msg["receivedDateTime"] == m.received.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert msg["sentDateTime"] == m.sent.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert msg["hasAttachments"] is m.has_attachments
    for key in ("isRead", "webLink", "changeKey", "categories", "parentFolderId", "@odata.etag"):
        assert key in msg

    text = http.get(
        url,
        params={"$select": "body"},
        headers={**auth(tokens, user), "Prefer": 'outlook.body-content-type="text", IdType="ImmutableId"'},
    )
    assert text.headers["Preference-Applied"] == 'outlook.body-content-type="text"'
    assert text.json()["body"] == {"contentType": "text", "content": m.body}
    assert set(text.json()) == {"@odata.context", "@odata.etag", "id", "body"}

    missing = http.get(f"{sim.base_url}/me/messages/AAkAnope", headers=auth(tokens, user))
    assert_graph_error(missing, 404, "ErrorItemNotFound")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"$filter": "receivedDateTime ge '2024-01-01T00:00:00Z'"}, "BadRequest"),
        ({"$filter": "toRecipients/any(r:r/emailAddress/address eq 'a@b.com')"}, "ErrorInvalidUrlQueryFilter"),
        ({"$filter": "subject eq 'x'"}, "ErrorInvalidUrlQueryFilter"),
        ({"$filter": "receivedDateTime ge 2024-01-01T00:00:00Z", "$orderby": "subject"}, "InefficientFilter"),
        ({"$top": "0"}, "ErrorInvalidUrlQuery"),
        ({"$top": "1001"}, "ErrorInvalidUrlQuery"),
    ],
)
def test_bad_queries(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, params: dict, code: str
) -> None:
    resp = list_inbox(http, sim, auth(tokens, user), {"$select": "id", **params})
    assert_graph_error(resp, 400, code)


def test_unauthenticated(sim: GraphSimulator, http: httpx.Client, tls: SimulatorTLS, world: World) -> None:
    authority = TokenAuthority()
    u = world.tenants[0].users[1]
    good = auth(authority, u)
    with GraphSimulator(world, tls, authority) as own:
        url = f"{own.base_url}/me/mailFolders/inbox/messages"
        assert http.get(url, headers=good).status_code == 200
        for headers in ({}, {"Authorization": "Bearer not.a.jwt"}, auth(TokenAuthority(), u)):
            resp = http.get(url, headers=headers)
            assert_graph_error(resp, 401, "InvalidAuthenticationToken")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
        authority.revoke_access_tokens(u.oid)
        assert_graph_error(http.get(url, headers=good), 401, "InvalidAuthenticationToken")
        assert http.get(url, headers=auth(authority, u)).status_code == 200  # a fresh token works again


def test_a_remembered_token_is_still_checked_for_expiry_and_revocation(
    http: httpx.Client, tls: SimulatorTLS, world: World
) -> None:
    """The authority keeps a verified token's claims (every inner `$batch` request carries the outer request's
    token); expiry and revocation still count on every request, and another signature is checked afresh."""
    now = [time.time()]
    authority = TokenAuthority(clock=lambda: now[0])
    u = world.tenants[0].users[1]
    with GraphSimulator(world, tls, authority) as own:
        url = f"{own.base_url}/me"
        first = auth(authority, u)
        assert http.get(url, headers=first).status_code == 200
        now[0] += 3600  # the token lives 3,599 s
        err = assert_graph_error(http.get(url, headers=first), 401, "InvalidAuthenticationToken")
        assert err["message"] == "Lifetime validation failed, the token is expired."
        fresh = auth(authority, u)
        assert http.get(url, headers=fresh).status_code == 200
        signing_input, _, signature = fresh["Authorization"].rpartition(".")
        forged = {"Authorization": f"{signing_input}.{signature[::-1]}"}
        assert_graph_error(http.get(url, headers=forged), 401, "InvalidAuthenticationToken")
        authority.revoke_access_tokens(u.oid)
        err = assert_graph_error(http.get(url, headers=fresh), 401, "InvalidAuthenticationToken")
        assert err["message"] == "Access token has expired or is not yet valid."


ROUTE_SEGMENTS = (
    "v1.0",
    "V1.0",
    "me",
    "Me",
    "messages",
    "mailFolders",
    "mailfolders",
    "mailFolders('AQMk')",
    "mailFolders%28%27AQMk%27%29",
    "inbox",
    "delta",
    "events",
    "instances",
    "calendarView",
    "onlineMeetings",
    "createOrGet",
    "joinedTeams",
    "teams",
    "channels",
    "chats",
    "AAkA%3D",
    "",
    "$batch",
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PATCH", "DELETE", "GET /v1.0/me", ""]),
    segments=st.lists(st.sampled_from(ROUTE_SEGMENTS), max_size=6),
    versioned=st.booleans(),
)
def test_inner_request_routing_is_the_first_matching_route(
    running_sim: GraphSimulator, method: str, segments: list[str], versioned: bool
) -> None:
    """An inner `$batch` request goes to the first route (in order) whose method is the request's and whose pattern
    matches the whole path, exactly as a scan of every route would pick it."""
    path = ("/v1.0/" if versioned else "/") + "/".join(segments)
    scan = next(
        (
            (handler, match.groups())
            for m, pattern, handler in running_sim._routes
            if m == method and (match := pattern.fullmatch(path))
        ),
        None,
    )
    routed = running_sim._route(method, path)
    assert (None if routed is None else (routed[0], routed[1].groups())) == scan


def test_inner_request_the_simulator_cannot_parse_fails_the_batch_after_the_others_ran(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    """An inner url `urlsplit` refuses (an unclosed IPv6 host) is a simulator error: the batch answers 500, but only
    once every other inner request has run (and counted)."""
    ids = [m.id for m in world.mailboxes[user.oid][:6]]
    reqs = [{"id": str(i), "method": "GET", "url": f"/me/messages/{gid}?$select=id"} for i, gid in enumerate(ids)]
    reqs.insert(2, {"id": "bad", "method": "GET", "url": "https://[graph/v1.0/me"})
    resp = http.post(f"{sim.base_url}/$batch", json={"requests": reqs}, headers=auth(tokens, user))
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "generalException"
    assert [r.status for r in sim.requests if r.inner] == [200] * 6


def test_scopes(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser) -> None:
    url = f"{sim.base_url}/me/mailFolders/inbox/messages"
    basic = auth(tokens, user, ("User.Read", "Mail.ReadBasic"))
    assert http.get(url, params={"$select": HEADER_SELECT}, headers=basic).status_code == 200
    for select in ("id,body", "bodyPreview", "uniqueBody"):
        assert_graph_error(http.get(url, params={"$select": select}, headers=basic), 403, "ErrorAccessDenied")
    assert_graph_error(http.get(url, headers=basic), 403, "ErrorAccessDenied")  # no $select = body included
    no_mail = auth(tokens, user, ("User.Read",))
    assert_graph_error(http.get(url, params={"$select": "id"}, headers=no_mail), 403, "ErrorAccessDenied")
    assert http.get(f"{sim.base_url}/me", headers=no_mail).status_code == 200
    assert http.get(f"{sim.base_url}/me", headers=auth(tokens, user, ("Mail.Read",))).status_code == 403
    assert http.get(url, params={"$select": "body"}, headers=auth(tokens, user, ("Mail.ReadWrite",))).is_success


def test_mailbox_concurrency_limit(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser
) -> None:
    sim.latency_s = 1.0  # long beside a TLS handshake even on a loaded CI machine (0.3 s let 7 of 8 through once)
    headers = auth(tokens, user)
    barrier = threading.Barrier(8)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def call() -> None:
        barrier.wait()
        resp = http.get(f"{sim.base_url}/me/mailFolders/inbox/messages", params={"$select": "id"}, headers=headers)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    # every request overlaps the first four (1 s each): the 5th and later ones are throttled (a handshake slowed by
    # the machine's load may let a straggler in after a slot frees up, so only bound the counts: some are throttled)
    assert statuses.count(200) + statuses.count(429) == 8 and 4 <= statuses.count(200) <= 7, statuses
    throttled = next(r for r in results if r.status_code == 429)
    err = assert_graph_error(throttled, 429, "ApplicationThrottled")
    assert err["message"] == "Application is over its MailboxConcurrency limit."
    assert float(throttled.headers["Retry-After"]) == pytest.approx(0.2)
    assert sim.peak_in_flight[user.oid] == 4


def test_fault_injection(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser) -> None:
    sim.inject(user.oid, 429, retry_after="1.5")
    sim.inject(user.oid, 503, count=2)
    sim.inject(user.oid, 504, code="GatewayTimeout")
    url = f"{sim.base_url}/me"
    r429 = http.get(url, headers=auth(tokens, user))
    assert_graph_error(r429, 429, "TooManyRequests")
    assert r429.headers["Retry-After"] == "1.5"
    for _ in range(2):
        r503 = http.get(url, headers=auth(tokens, user))
        assert_graph_error(r503, 503, "serviceNotAvailable")
        assert "Retry-After" not in r503.headers
    assert_graph_error(http.get(url, headers=auth(tokens, user)), 504, "GatewayTimeout")
    assert http.get(url, headers=auth(tokens, user)).status_code == 200
    assert [r.status for r in sim.requests] == [429, 503, 503, 504, 200]
    assert {r.oid for r in sim.requests} == {user.oid}


def test_batch(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World) -> None:
    msgs = [m for m in world.mailboxes[user.oid]][:6]
    reqs = [
        {
            "id": str(i),
            "method": "GET",
            "url": f"/me/messages/{m.id}?$select=subject",
            "headers": {"Prefer": 'IdType="ImmutableId"'},
        }
        for i, m in enumerate(msgs)
    ]
    reqs.append({"id": "missing", "method": "GET", "url": "/me/messages/AAkAnope"})
    reqs.append({"id": "dep", "method": "GET", "url": "/me", "dependsOn": ["missing"]})
    resp = http.post(f"{sim.base_url}/$batch", json={"requests": reqs}, headers=auth(tokens, user))
    assert resp.status_code == 200
    out = {r["id"]: r for r in resp.json()["responses"]}
    assert set(out) == {r["id"] for r in reqs}
    for i, m in enumerate(msgs):
        assert out[str(i)]["status"] == 200 and out[str(i)]["body"]["subject"] == m.subject
    assert out["missing"]["status"] == 404 and out["missing"]["body"]["error"]["code"] == "ErrorItemNotFound"
    assert out["dep"]["status"] == 424
    inner = [r for r in sim.requests if r.inner]
    assert len(inner) == 7 and all(r.oid == user.oid for r in inner)  # the 424 one never ran

    too_many = [{"id": str(i), "method": "GET", "url": "/me"} for i in range(21)]
    big = http.post(f"{sim.base_url}/$batch", json={"requests": too_many}, headers=auth(tokens, user))
    assert_graph_error(big, 400, "BadRequest")
    bad_token = http.post(f"{sim.base_url}/$batch", json={"requests": reqs[:1]}, headers={"Authorization": "Bearer x"})
    assert_graph_error(bad_token, 401, "InvalidAuthenticationToken")


def test_batch_inner_requests_run_four_at_a_time(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    sim.latency_s = 0.05
    ids = [m.id for m in world.mailboxes[user.oid][:20]]
    reqs = [{"id": str(i), "method": "GET", "url": f"/me/messages/{gid}?$select=id"} for i, gid in enumerate(ids)]
    resp = http.post(f"{sim.base_url}/$batch", json={"requests": reqs}, headers=auth(tokens, user))
    statuses = [r["status"] for r in resp.json()["responses"]]
    assert statuses == [200] * 20
    assert sim.peak_in_flight[user.oid] == 4
    assert [r["id"] for r in resp.json()["responses"]] != [str(i) for i in range(20)]  # any order


def test_all_messages_endpoint(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    resp = http.get(
        f"{sim.base_url}/me/messages",
        params={"$select": "id", "$top": "1000"},
        headers={**auth(tokens, user), **IMMUTABLE},
    )
    assert {m["id"] for m in resp.json()["value"]} == {m.id for m in world.mailboxes[user.oid]}


def test_filter_by_internet_message_id(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    """`$filter=internetMessageId eq '<id>'` on /me/messages finds every copy, in any folder; a quote inside the
    literal is doubled; no match is an empty page, not a 404."""
    target = next(m for m in world.mailboxes[user.oid] if m.folder != "inbox")
    headers = {**auth(tokens, user), **IMMUTABLE}

    def by_imid(imid: str) -> list[str]:
        resp = http.get(
            f"{sim.base_url}/me/messages",
            params={"$filter": f"internetMessageId eq '{imid.replace(chr(39), chr(39) * 2)}'", "$select": "id"},
            headers=headers,
        )
        assert resp.status_code == 200, resp.text
        return [item["id"] for item in resp.json()["value"]]

    assert by_imid(target.internet_message_id) == [target.id]
    assert by_imid("<no-such'quote@example.com>") == []
    assert by_imid(target.internet_message_id.upper()) == []  # exact comparison
