"""The Graph simulator's `$search` on messages (simulators/graph_search.py): KQL participants/from/to/received
semantics against the world, paging by `$skiptoken`, the 1,000-result cap, and the refusals beside it."""

from __future__ import annotations

import copy
from datetime import timedelta

import httpx
import pytest

from simulators.graph import GraphSimulator
from simulators.graph_search import SEARCH_RESULT_CAP, search_messages
from simulators.tokens import TokenAuthority
from simulators.world import Mailbox, SimUser, World
from tests.test_graph_sim import IMMUTABLE, assert_graph_error, auth, list_inbox


def _addr(box: Mailbox | None) -> str:
    return (box.address or "").strip().lower() if box else ""


def _inbox(world: World, user: SimUser) -> list:
    return [m for m in world.mailboxes[user.oid] if m.folder == "inbox"]


def _search_all(http: httpx.Client, sim: GraphSimulator, headers: dict, query: str, top: int = 7) -> list[dict]:
    out: list[dict] = []
    resp = list_inbox(http, sim, headers, {"$search": query, "$select": "id,sentDateTime", "$top": str(top)})
    while True:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        out += body["value"]
        if "@odata.nextLink" not in body:
            return out
        assert "$skip=" not in body["@odata.nextLink"] and "skiptoken" in body["@odata.nextLink"].lower()
        resp = http.get(body["@odata.nextLink"], headers=headers)


def test_participants_finds_every_field_but_only_that_address(world: World, user: SimUser) -> None:
    inbox = _inbox(world, user)
    target = next(_addr(m.sender) for m in inbox if m.kind == "contact")
    found = search_messages(inbox, f'"participants:{target.upper()}"')
    expected = [
        m
        for m in inbox
        if target in {_addr(b) for b in (m.sender, *m.to, *m.cc, *m.bcc)}  # participants includes bcc (DOC)
    ]
    assert {m.id for m in found} == {m.id for m in expected} and found
    assert [m.sent for m in found] == sorted((m.sent for m in found), reverse=True)  # newest sent first (DOC)
    assert {m.id for m in search_messages(inbox, f'"from:{target}"')} == {
        m.id for m in inbox if _addr(m.sender) == target
    }
    domain = target.rpartition("@")[2]
    by_domain = search_messages(inbox, f'"participants:{domain}"')
    assert {m.id for m in found} <= {m.id for m in by_domain}
    assert all(any(_addr(b).endswith("@" + domain) for b in (m.sender, *m.to, *m.cc, *m.bcc)) for m in by_domain)


def test_or_and_and_received_window(world: World, user: SimUser) -> None:
    inbox = _inbox(world, user)
    a, b = sorted({_addr(m.sender) for m in inbox if m.kind in ("contact", "lead")})[:2]
    either = {m.id for m in search_messages(inbox, f'"participants:{a} OR participants:{b}"')}
    assert either == {m.id for m in search_messages(inbox, f'"participants:{a}"')} | {
        m.id for m in search_messages(inbox, f'"participants:{b}"')
    }
    day = (world.now - timedelta(days=20)).date()
    windowed = search_messages(inbox, f'"(participants:{a} OR participants:{b}) AND received>={day:%Y-%m-%d}"')
    assert {m.id for m in windowed} == {m.id for m in inbox if m.id in either and m.received.date() >= day}
    before = search_messages(inbox, f'"(participants:{a} OR participants:{b}) AND received<{day:%Y-%m-%d}"')
    assert {m.id for m in before} | {m.id for m in windowed} == either
    assert not {m.id for m in before} & {m.id for m in windowed}


def test_paging_by_skiptoken_returns_each_result_once(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    inbox = _inbox(world, user)
    domain = next(_addr(m.sender) for m in inbox if m.kind == "account").rpartition("@")[2]
    query = f'"participants:{domain}"'
    headers = {**auth(tokens, user), **IMMUTABLE}
    got = _search_all(http, sim, headers, query, top=3)
    assert [g["id"] for g in got] == [m.id for m in search_messages(inbox, query)] and len(got) > 3
    assert sim.searches and all(s[2] == query for s in sim.searches)


def test_a_search_returns_at_most_1000_results(tls, tokens: TokenAuthority, world: World) -> None:
    big = copy.deepcopy(world)
    user = big.tenants[0].users[0]
    model = next(m for m in big.mailboxes[user.oid] if m.folder == "inbox" and m.kind == "contact")
    for i in range(SEARCH_RESULT_CAP + 50):
        clone = copy.copy(model)
        clone.id = f"{model.id[:-8]}{i:05d}AAA="
        clone.internet_message_id = f"<clone{i}@mail.example>"
        clone.sent = model.sent - timedelta(minutes=i)
        big.mailboxes[user.oid].append(clone)
    big.mailboxes[user.oid].sort(key=lambda m: m.received)
    with GraphSimulator(big, tls, tokens) as sim, httpx.Client(verify=tls.client_context(), trust_env=False) as http:
        got = _search_all(http, sim, {**auth(tokens, user), **IMMUTABLE}, f'"participants:{_addr(model.sender)}"', 1000)
    assert len(got) == SEARCH_RESULT_CAP


@pytest.mark.parametrize(
    ("params", "code"),
    [
        (
            {"$search": '"participants:a@b.com"', "$filter": "receivedDateTime ge 2024-01-01T00:00:00Z"},
            "ErrorInvalidUrlQuery",
        ),
        ({"$search": '"participants:a@b.com"', "$orderby": "receivedDateTime desc"}, "ErrorInvalidUrlQuery"),
        ({"$search": '"participants:a@b.com"', "$skip": "10"}, "ErrorInvalidUrlQuery"),
        ({"$search": "participants:a@b.com OR x"}, "BadRequest"),  # not quoted
        ({"$search": '"(participants:a@b.com"'}, "BadRequest"),
        ({"$search": '"received>=yesterday"'}, "BadRequest"),
        ({"$search": '"' + " OR ".join(f"participants:user{i}@example.com" for i in range(90)) + '"'}, "BadRequest"),
        ({"$skiptoken": "abc"}, "BadRequest"),
    ],
    ids=["filter", "orderby", "skip", "unquoted", "unbalanced", "bad-date", "too-long", "skiptoken-alone"],
)
def test_what_search_refuses(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, params: dict, code: str
) -> None:
    assert_graph_error(list_inbox(http, sim, auth(tokens, user), params), 400, code)


def test_message_delta_still_refuses_search(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser
) -> None:
    resp = http.get(
        f"{sim.base_url}/me/mailFolders/inbox/messages/delta",
        params={"$search": '"participants:a@b.com"'},
        headers=auth(tokens, user),
    )
    assert resp.status_code == 400
