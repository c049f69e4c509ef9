"""The mailbox's body fetcher and slot sharing against the real Graph simulator on loopback TLS: batches filled
across pages, a slot left for the listing, never more than 4 requests in flight (the simulator's own counter),
Retry-After holding the whole mailbox."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import pytest

from o365sync.graph import GraphClient, GraphForbidden
from o365sync.mail import iter_header_pages
from o365sync.sync.bodies import BodyFetcher, senders_for
from simulators.graph import GraphSimulator
from simulators.tokens import TokenAuthority
from simulators.world import SimUser, World
from tests.test_graph_client import Sleeps, Tokens, make_client


def batch_sizes(sim: GraphSimulator) -> list[int]:
    """Inner requests per `$batch`, from the simulator's log (exact while one batch is in flight at a time)."""
    sizes, current = [], 0
    for entry in sim.requests:
        if entry.path.lower().endswith("/$batch"):
            sizes.append(current)
            current = 0
        elif entry.inner:
            current += 1
    return sizes


@pytest.fixture()
def client(sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser) -> GraphClient:
    return make_client(sim, http, Tokens(tokens, user), sleep=Sleeps())


def test_batches_are_filled_across_pages(client: GraphClient, sim: GraphSimulator, world: World, user: SimUser):
    ids = [m.id for m in world.mailboxes[user.oid][:28]]
    pages = [ids[i : i + 7] for i in range(0, 28, 7)]  # four pages of 7 matched messages each
    with BodyFetcher(client, senders=1) as fetcher:
        with client.slots.hold(4):  # the mailbox is busy: the pages queue up meanwhile
            tickets = [fetcher.request(page) for page in pages]
        got = [fetcher.wait(t) for t in tickets]
    bodies = {m.id: m.body for m in world.mailboxes[user.oid][:28]}
    assert got == [{gid: bodies[gid] for gid in page} for page in pages]
    sizes = batch_sizes(sim)
    assert sum(sizes) == 28 and 20 in sizes  # a full batch, with messages of three pages or more
    assert len(sizes) < len(pages)  # not one batch (or more) per page
    assert all(s % 4 == 0 for s in sizes[:-1])  # whole rounds of 4 while more were queued


def test_a_listing_keeps_its_slot_and_the_mailbox_never_has_more_than_four_in_flight(
    client: GraphClient, sim: GraphSimulator, world: World, user: SimUser
):
    sim.latency_s = 0.01
    since = world.now - timedelta(days=400)
    ids = [m.id for m in world.mailboxes[user.oid] if m.folder == "inbox"][:60]
    with BodyFetcher(client) as fetcher:
        with fetcher.listing():
            tickets = [fetcher.request(ids[i : i + 6]) for i in range(0, 60, 6)]
            pages = list(iter_header_pages(client, "sentitems", since, page_size=5))  # on the 4th slot meanwhile
            got = {gid: body for t in tickets for gid, body in fetcher.wait(t).items()}
    assert len(got) == 60 and pages
    listed_while_fetching = [e for e in sim.requests if not e.inner and "/messages" in e.path.lower()]
    assert len(listed_while_fetching) == len(pages)
    assert max(batch_sizes(sim)) <= 3  # while a listing runs, a batch is one round that leaves it a slot
    assert sim.peak_in_flight[user.oid] == 4  # every slot used, and never more
    assert all(e.status == 200 for e in sim.requests)  # so Graph never had to throttle


def test_with_limits_off_and_more_slots_a_listing_leaves_batches_full(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, world: World, user: SimUser
):
    sim.max_in_flight = 10**9  # limits off, as the benchmarks switch them off; the client's cap raised to 8
    client = make_client(sim, http, Tokens(tokens, user), sleep=Sleeps(), max_in_flight=8)
    ids = [m.id for m in world.mailboxes[user.oid] if m.folder == "inbox"][:40]
    with BodyFetcher(client, senders=1) as fetcher, fetcher.listing():
        with client.slots.hold(8):  # the ids queue up while the mailbox is busy
            tickets = [fetcher.request(ids[i : i + 10]) for i in range(0, 40, 10)]
        got = {gid: body for t in tickets for gid, body in fetcher.wait(t).items()}
    assert len(got) == 40
    assert batch_sizes(sim) == [20, 20]  # a batch holds 4 slots at most: 4 of the 7 beside the listing


def test_a_retry_after_holds_every_request_of_the_mailbox(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser
):
    import time

    throttled = threading.Event()

    def sleep(seconds: float) -> None:
        throttled.set()  # the first thread got its 429 and waits it out
        time.sleep(seconds)

    client = make_client(sim, http, Tokens(tokens, user), sleep=sleep)
    sim.inject(user.oid, 429, count=1, retry_after="0.4")
    first = threading.Thread(target=client.get, args=("me",))
    first.start()
    throttled.wait(10)
    client.get("me/mailFolders/inbox")  # another request of the same mailbox, sent during the Retry-After
    first.join()
    sent = sim.sent[user.oid]
    assert [s.status for s in sent] == [429, 200, 200]
    assert all(s.at >= sent[0].at + 0.4 for s in sent[1:])
    assert sim.retry_violations(user.oid, mailbox_wide=True) == []


def test_a_failed_body_fetch_reaches_the_waiter_and_stops_the_fetcher(
    client: GraphClient, sim: GraphSimulator, world: World, user: SimUser
):
    ids = [m.id for m in world.mailboxes[user.oid][:3]]
    sim.inject(user.oid, 403, count=1)
    with BodyFetcher(client) as fetcher:
        ticket = fetcher.request(ids)
        with pytest.raises(GraphForbidden):
            fetcher.wait(ticket)
        with pytest.raises(GraphForbidden):
            fetcher.request(ids)  # no more work is taken


def test_senders_follow_the_mailbox_slots():
    """Under Outlook's 4 a mailbox has one `$batch` in flight and one ready; a raised cap (limits off) runs more."""
    assert [senders_for(n) for n in (1, 4, 5, 8, 12)] == [2, 2, 3, 3, 4]


def test_cancelling_a_ticket_releases_whoever_waits_for_it(client: GraphClient, world: World, user: SimUser):
    ids = [m.id for m in world.mailboxes[user.oid][:5]]
    with BodyFetcher(client) as fetcher:
        with client.slots.hold(4):  # nothing is sent meanwhile: the ticket cannot complete
            ticket = fetcher.request(ids)
            waited: list[int] = []  # bodies in when the wait returned
            waiter = threading.Thread(target=lambda: waited.append(len(fetcher.wait(ticket))))
            waiter.start()
            fetcher.cancel([ticket])
            waiter.join()  # returns while the slots are still held: no body can have come
    assert waited == [0] and ticket.cancelled
