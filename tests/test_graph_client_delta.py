"""Per-folder delta (`iter_delta_pages`): wire details against a scripted transport, then whole rounds against
the real Graph simulator (created / partial updated / @removed items, 410 and syncStateNotFound eviction)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pyarrow as pa
import pytest

from o365sync.graph import DeltaTokenExpired, ForbiddenRequest, GraphClient, GraphError, GraphPagingError
from o365sync.mail import (
    HEADER_FIELDS,
    MESSAGES_SCHEMA,
    SENSITIVITY_EXPAND,
    DeltaPage,
    baseline_delta_link,
    fetch_bodies,
    iter_delta_pages,
)
from simulators.graph import GraphSimulator
from simulators.tls import SimulatorTLS
from simulators.tokens import TokenAuthority
from simulators.world import SimUser, World, generate_world
from tests.fake_graph import batch_answer

BASE = "https://graph.test/v1.0"
FOLDER_LINK = f"{BASE}/me/mailfolders('AQMkADNkNAAAgEMAAAA')/messages/delta"


def item(mid: str, **over: object) -> dict:
    out = {
        "@odata.type": "#microsoft.graph.message",
        "id": mid,
        "internetMessageId": f"<{mid}@x>",
        "conversationId": "c",
        "subject": "s",
        "from": {"emailAddress": {"name": "A", "address": "a@x.com"}},
        "sender": None,
        "toRecipients": [],
        "ccRecipients": [],
        "receivedDateTime": "2024-05-02T09:14:03Z",
        "sentDateTime": "2024-05-02T09:14:00Z",
        "hasAttachments": False,
        "isDraft": False,
        "parentFolderId": "AQMk",
        "webLink": "https://outlook.office365.com/owa/?ItemID=x",
    }
    out.update(over)
    return out


class Script:
    """A scripted Graph: URL (without the base) → response; records every request."""

    def __init__(self, routes: dict[str, Callable[[httpx.Request], httpx.Response] | httpx.Response]):
        self.routes = routes
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        key = str(request.url)[len(BASE) :]
        route = self.routes.get(key) or self.routes.get(key.split("?")[0])
        if route is None:
            return httpx.Response(404, json={"error": {"code": "ErrorItemNotFound"}})
        return route(request) if callable(route) else route

    def client(self, **kw: object) -> GraphClient:
        return GraphClient(
            httpx.Client(transport=httpx.MockTransport(self)), BASE, lambda force: "tok", sleep=lambda s: None, **kw
        )


def test_first_round_wire_and_links_followed_verbatim() -> None:
    skip1 = f"{FOLDER_LINK}?$skiptoken=GwcB%2BoTm-1"
    skip2 = f"{FOLDER_LINK}?$skiptoken=GwcB%2BoTm-2"
    delta = f"{FOLDER_LINK}?$deltatoken=Zz%3D%3D"
    script = Script(
        {
            "/me/mailFolders/inbox/messages/delta": httpx.Response(
                200,
                json={
                    "value": [
                        item("A"),
                        item("B", singleValueExtendedProperties=[{"id": "Integer 0x36", "value": "1"}]),
                    ],
                    "@odata.nextLink": skip1,
                },
            ),
            skip1[len(BASE) :]: httpx.Response(200, json={"value": [], "@odata.nextLink": skip2}),  # empty page
            skip2[len(BASE) :]: httpx.Response(
                200,
                json={
                    "value": [
                        {"id": "A", "isRead": True, "parentFolderId": "AQMk"},
                        {"id": "C", "@removed": {"reason": "deleted"}},
                    ],
                    "@odata.deltaLink": delta,
                },
            ),
        }
    )
    since = datetime(2024, 5, 1, 8, 30, 15, 999, tzinfo=UTC)
    pages = list(iter_delta_pages(script.client(), "inbox", delta_link=None, since=since, page_size=50))
    assert [p.delta_link for p in pages] == [None, None, delta]
    assert [p.messages.num_rows for p in pages] == [2, 0, 1] and pages[2].removed == ["C"]
    assert all(p.messages.schema == MESSAGES_SCHEMA for p in pages)
    assert pages[2].messages.column("is_partial").to_pylist() == [True]
    assert pages[0].messages.column("sensitivity").to_pylist() == [None, "personal"]

    first, *rest = script.seen
    query = parse_qs(urlsplit(str(first.url)).query)
    assert urlsplit(str(first.url)).path == "/v1.0/me/mailFolders/inbox/messages/delta"
    assert query == {
        "$select": [",".join(HEADER_FIELDS)],
        "$expand": [SENSITIVITY_EXPAND],
        "$filter": ["receivedDateTime ge 2024-05-01T08:30:15Z"],
    }
    assert SENSITIVITY_EXPAND == "singleValueExtendedProperties($filter=id eq 'Integer 0x0036')"
    assert "sensitivity" not in query["$select"][0]
    assert "$top" not in str(first.url) and "bccRecipients" not in str(first.url)
    assert [str(r.url) for r in rest] == [skip1, skip2]  # verbatim: nothing added, nothing re-encoded
    for r in script.seen:
        assert r.headers["Prefer"] == 'odata.maxpagesize=50, IdType="ImmutableId"'


def test_later_round_starts_from_the_stored_link_and_ignores_since() -> None:
    delta = f"{FOLDER_LINK}?$deltatoken=old"
    new = f"{FOLDER_LINK}?$deltatoken=new"
    script = Script({delta[len(BASE) :]: httpx.Response(200, json={"value": [item("N")], "@odata.deltaLink": new})})
    pages = list(
        iter_delta_pages(
            script.client(), "inbox", delta_link=delta, since=datetime(2020, 1, 1, tzinfo=UTC), page_size=7
        )
    )
    assert len(pages) == 1 and pages[0].delta_link == new
    assert [str(r.url) for r in script.seen] == [delta]
    assert script.seen[0].headers["Prefer"] == 'odata.maxpagesize=7, IdType="ImmutableId"'


def test_round_without_since_has_no_filter() -> None:
    script = Script(
        {
            "/me/mailFolders/sentitems/messages/delta": httpx.Response(
                200,
                json={"value": [], "@odata.deltaLink": f"{BASE}/me/mailFolders/sentitems/messages/delta?$deltatoken=1"},
            )
        }
    )
    (page,) = iter_delta_pages(script.client(), "sentitems", delta_link=None, since=None, page_size=10)
    query = parse_qs(urlsplit(str(script.seen[0].url)).query)
    assert page.delta_link and set(query) == {"$select", "$expand"}  # no scan-back $filter


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (410, "SyncStateNotFound"),
        (410, None),
        (400, "syncStateNotFound"),
        (400, "resyncRequired"),
        (404, "SyncStateInvalid"),
        (400, "RESYNCREQUIRED"),
    ],
)
def test_expired_tokens_raise_delta_token_expired(status: int, code: str | None) -> None:
    delta = f"{FOLDER_LINK}?$deltatoken=old"
    body = {"error": {"code": code, "message": "The sync state generation is not found."}} if code else {}
    headers = {"Location": f"{FOLDER_LINK}?$deltatoken="} if status == 410 else {}
    script = Script({delta[len(BASE) :]: httpx.Response(status, json=body, headers=headers)})
    with pytest.raises(DeltaTokenExpired) as info:
        list(iter_delta_pages(script.client(), "inbox", delta_link=delta, since=None, page_size=10))
    assert info.value.status == status and len(script.seen) == 1  # not retried
    assert "deltatoken" not in str(info.value)


def test_mid_round_expiry_after_pages_were_yielded() -> None:
    skip = f"{FOLDER_LINK}?$skiptoken=stale"
    script = Script(
        {
            "/me/mailFolders/inbox/messages/delta": httpx.Response(
                200, json={"value": [item("A")], "@odata.nextLink": skip}
            ),
            skip[len(BASE) :]: httpx.Response(400, json={"error": {"code": "SyncStateNotFound"}}),
        }
    )
    got: list[DeltaPage] = []
    with pytest.raises(DeltaTokenExpired):
        for page in iter_delta_pages(script.client(), "inbox", delta_link=None, since=None, page_size=10):
            got.append(page)
    assert len(got) == 1 and got[0].delta_link is None  # nothing durable was handed out


def test_round_without_delta_link_is_an_error() -> None:
    script = Script({"/me/mailFolders/inbox/messages/delta": httpx.Response(200, json={"value": [item("A")]})})
    pages = iter_delta_pages(script.client(), "inbox", delta_link=None, since=None, page_size=10)
    assert next(pages).delta_link is None
    with pytest.raises(GraphPagingError) as info:
        next(pages)
    assert info.value.code == "MissingDeltaLink"


def test_a_baseline_sends_the_rounds_own_requests_and_returns_its_delta_link_without_decoding_items() -> None:
    skip = f"{FOLDER_LINK}?$skiptoken=GwcB%2BoTm-1"
    delta = f"{FOLDER_LINK}?$deltatoken=Zz%3D%3D"
    not_a_header = {"id": 7, "receivedDateTime": "not a time"}  # a full decode would refuse this item
    script = Script(
        {
            "/me/mailFolders/inbox/messages/delta": httpx.Response(
                200, json={"value": [item("A"), not_a_header], "@odata.nextLink": skip}
            ),
            skip[len(BASE) :]: httpx.Response(200, json={"value": [item("B")], "@odata.deltaLink": delta}),
        }
    )
    since = datetime(2024, 5, 1, 8, 30, 15, tzinfo=UTC)
    assert baseline_delta_link(script.client(), "inbox", since=since, page_size=50) == delta
    rounds = Script({k: v for k, v in script.routes.items()})
    with pytest.raises(GraphError):  # the same pages through the full decoder
        list(iter_delta_pages(rounds.client(), "inbox", delta_link=None, since=since, page_size=50))
    assert [str(r.url) for r in script.seen] == [str(r.url) for r in rounds.seen] + [skip]
    assert all(r.headers["Prefer"] == rounds.seen[0].headers["Prefer"] for r in script.seen)


@pytest.mark.parametrize(
    ("answer", "code"),
    [({"value": [item("A")]}, "MissingDeltaLink"), (b"<html>gateway</html>", "MalformedPage")],
)
def test_a_baseline_without_a_delta_link_or_with_a_page_that_is_not_json_is_an_error(
    answer: dict | bytes, code: str
) -> None:
    body = {"content": answer} if isinstance(answer, bytes) else {"json": answer}
    script = Script({"/me/mailFolders/inbox/messages/delta": httpx.Response(200, **body)})
    with pytest.raises(GraphError) as info:
        baseline_delta_link(script.client(), "inbox", since=datetime(2024, 5, 1, tzinfo=UTC), page_size=10)
    assert info.value.code == code


def test_links_outside_the_allowlist_are_refused() -> None:
    script = Script(
        {
            "/me/mailFolders/inbox/messages/delta": httpx.Response(
                200, json={"value": [], "@odata.nextLink": f"{BASE}/users/other@x.com/mailFolders/inbox/messages/delta"}
            )
        }
    )
    with pytest.raises(ForbiddenRequest):
        list(iter_delta_pages(script.client(), "inbox", delta_link=None, since=None, page_size=10))
    assert len(script.seen) == 1
    with pytest.raises(ForbiddenRequest):
        list(
            iter_delta_pages(
                script.client(), "inbox", delta_link=f"{BASE}/me/contacts/delta?$deltatoken=1", since=None, page_size=10
            )
        )
    assert len(script.seen) == 1
    with pytest.raises(ValueError):
        list(iter_delta_pages(script.client(), "inbox", delta_link=None, since=None, page_size=0))


def test_batch_and_inner_requests_ask_for_immutable_ids() -> None:
    def batch(request: httpx.Request) -> httpx.Response:
        return batch_answer(request, lambda r: {"body": {"content": r["headers"]["Prefer"]}})

    script = Script({"/$batch": batch})
    got = dict(fetch_bodies(script.client(), ["A", "B"]))
    assert script.seen[0].headers["Prefer"] == 'IdType="ImmutableId"'
    assert got == {m: 'outlook.body-content-type="text", IdType="ImmutableId"' for m in ("A", "B")}


# ---------------------------------------------------------------------------------------------- simulator
# The simulator's delta endpoint and World mutations (simulators/graph.py `_delta`, World.add_message & co).
requires_sim_delta = pytest.mark.skipif(
    not (hasattr(GraphSimulator, "_delta") and hasattr(World, "add_message")),
    reason="the Graph simulator has no delta endpoint / world mutations yet",
)


@pytest.fixture()
def dworld() -> World:
    """A world of its own: these tests mutate it."""
    return generate_world(tenants=1, users_per_tenant=1, messages_per_user=120)


@pytest.fixture()
def dsim(dworld: World, tls: SimulatorTLS, tokens: TokenAuthority):
    with GraphSimulator(dworld, tls, tokens) as s:
        yield s


@pytest.fixture()
def duser(dworld: World) -> SimUser:
    return dworld.tenants[0].users[0]


@pytest.fixture()
def dclient(dsim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, duser: SimUser) -> GraphClient:
    token = tokens.issue_access_token(duser.tid, duser.oid, duser.upn, ["User.Read", "Mail.Read"], "app")
    return GraphClient(http, dsim.base_url, lambda force: token, sleep=lambda s: None)


def round_of(
    client: GraphClient, folder: str, link: str | None, since: datetime | None = None, page_size: int = 25
) -> tuple[pa.Table, pa.Table, list[str], str]:
    pages = list(iter_delta_pages(client, folder, delta_link=link, since=since, page_size=page_size))
    assert all(p.delta_link is None for p in pages[:-1]) and pages[-1].delta_link
    return (
        pa.concat_tables(p.messages for p in pages),
        pa.concat_tables(p.participants for p in pages),
        [r for p in pages for r in p.removed],
        pages[-1].delta_link,
    )


@requires_sim_delta
def test_sim_first_round_is_the_folder(
    dclient: GraphClient, dworld: World, duser: SimUser, dsim: GraphSimulator
) -> None:
    since = dworld.now - timedelta(days=30)
    messages, participants, removed, link = round_of(dclient, "inbox", None, since)
    want = {m.id for m in dworld.mailboxes[duser.oid] if m.folder == "inbox" and m.received >= since}
    assert set(messages.column("graph_id").to_pylist()) == want and removed == []
    assert not any(messages.column("is_partial").to_pylist())
    assert "bcc" not in participants.column("role").to_pylist()
    assert dsim.folder_id(duser.oid, "inbox") in set(messages.column("parent_folder_id").to_pylist())
    assert all("/delta" in r.path for r in dsim.requests)

    # nothing changed: the next round is empty and hands out a new link
    messages2, _, removed2, link2 = round_of(dclient, "inbox", link)
    assert messages2.num_rows == 0 and removed2 == [] and link2


@requires_sim_delta
def test_sim_a_baselines_link_brings_only_what_changed_after_it(
    dclient: GraphClient, dworld: World, duser: SimUser
) -> None:
    link = baseline_delta_link(dclient, "inbox", since=dworld.now - timedelta(days=60), page_size=25)
    added = dworld.add_message(duser.oid, "inbox", kind="contact")
    messages, _, removed, _ = round_of(dclient, "inbox", link)
    assert messages.column("graph_id").to_pylist() == [added.id] and removed == []


@requires_sim_delta
def test_sim_next_round_has_created_partial_and_removed(dclient: GraphClient, dworld: World, duser: SimUser) -> None:
    _, _, _, link = round_of(dclient, "inbox", None, dworld.now - timedelta(days=60))
    inbox = [m for m in dworld.mailboxes[duser.oid] if m.folder == "inbox"]
    updated, moved, deleted = inbox[-1], inbox[-2], inbox[-3]
    added = dworld.add_message(duser.oid, "inbox", kind="contact")
    dworld.update_message(updated.id, is_read=True, subject="Changed subject")
    dworld.move_message(moved.id, "deleteditems")
    dworld.delete_message(deleted.id)

    messages, participants, removed, _ = round_of(dclient, "inbox", link)
    rows = {r["graph_id"]: r for r in messages.to_pylist()}
    assert set(rows) == {added.id, updated.id}
    assert rows[added.id]["is_partial"] is False and rows[added.id]["subject"] == added.subject
    assert {p for p in participants.column("graph_id").to_pylist()} == {added.id}
    upd = rows[updated.id]
    assert upd["is_partial"] is True and upd["subject"] == "Changed subject"
    assert upd["received_at"] is None and upd["from_address"] is None and upd["parent_folder_id"]
    assert sorted(removed) == sorted([moved.id, deleted.id])


@requires_sim_delta
def test_sim_moved_message_arrives_in_the_destination_with_the_same_immutable_id(
    dclient: GraphClient, dworld: World, duser: SimUser
) -> None:
    _, _, _, link = round_of(dclient, "sentitems", None)
    m = next(m for m in dworld.mailboxes[duser.oid] if m.folder == "inbox")
    dworld.move_message(m.id, "sentitems", reason="changed")
    messages, _, removed, _ = round_of(dclient, "sentitems", link)
    assert messages.column("graph_id").to_pylist() == [m.id] and removed == []


@requires_sim_delta
@pytest.mark.parametrize("code", ["SyncStateNotFound", "resyncRequired"])
def test_sim_evicted_token_raises_delta_token_expired(
    dclient: GraphClient, dsim: GraphSimulator, duser: SimUser, dworld: World, code: str
) -> None:
    _, _, _, link = round_of(dclient, "inbox", None, dworld.now - timedelta(days=10))
    assert dsim.evict_delta_tokens(duser.oid, "inbox", code=code) >= 1
    with pytest.raises(DeltaTokenExpired):
        round_of(dclient, "inbox", link)
    # the restart is a new first round with the scan-back filter
    messages, _, _, link2 = round_of(dclient, "inbox", None, dworld.now - timedelta(days=10))
    assert link2 and link2 != link and messages.num_rows > 0


@requires_sim_delta
def test_sim_sensitivity_via_extended_property_across_rounds(
    dclient: GraphClient, dworld: World, duser: SimUser, dsim: GraphSimulator
) -> None:
    messages, _, _, link = round_of(dclient, "inbox", None)
    inbox = [m for m in dworld.mailboxes[duser.oid] if m.folder == "inbox"]
    got = dict(zip(messages.column("graph_id").to_pylist(), messages.column("sensitivity").to_pylist(), strict=True))
    assert got == {m.id: None if m.sensitivity == "normal" else m.sensitivity for m in inbox}
    assert any(v is not None for v in got.values())
    first = next(r for r in dsim.requests if r.path.endswith("/delta"))
    assert first.status == 200

    plain = [m for m in inbox if m.sensitivity == "normal"]
    marked, unmarked, untouched = plain[0], next(m for m in inbox if m.sensitivity != "normal"), plain[1]
    dworld.update_message(marked.id, sensitivity="confidential")
    dworld.update_message(unmarked.id, sensitivity="normal")  # explicit Normal: the property is written as 0
    dworld.update_message(untouched.id, is_read=True)
    messages, _, _, _ = round_of(dclient, "inbox", link)  # the $expand lives in the token
    rows = {r["graph_id"]: r for r in messages.to_pylist()}
    assert {g: (r["sensitivity"], r["is_partial"]) for g, r in rows.items()} == {
        marked.id: ("confidential", True),
        unmarked.id: ("normal", True),
        untouched.id: (None, True),
    }
