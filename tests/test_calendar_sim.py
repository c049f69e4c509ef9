"""The Graph simulator's calendar and Teams parity (issue 5): calendarView window rules, recurrence expansion against
the oracle, exceptions and cancellations, calendarView delta (bare occurrences, @removed, eviction), events, PATCH,
onlineMeetings, joinedTeams/channels/messages/chats and per-endpoint scopes — real simulator over loopback TLS."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import httpx
import pytest

from simulators.graph import GraphSimulator
from simulators.identity import STATIC_PERMISSIONS
from simulators.tokens import TokenAuthority
from simulators.world import SimUser, World, generate_world
from simulators.world_calendar import Attendee, Calendars, occurrence_id

READ = ["User.Read", "Calendars.Read"]
# Every static permission of the registration but the two read-only ones `READ` does not cover here.
ALL = [p for p in STATIC_PERMISSIONS if p not in ("Mail.Read", "Calendars.Read")]
BARE = {"@odata.type", "@odata.etag", "id", "seriesMasterId", "type", "start", "end"}


@pytest.fixture(scope="module")
def world() -> World:  # own world with calendars: these tests mutate it
    return generate_world(seed=31, tenants=1, users_per_tenant=3, messages_per_user=20, calendars=True)


@pytest.fixture(scope="module")
def cal(world: World) -> Calendars:
    return world.calendars


def hdrs(tokens: TokenAuthority, user: SimUser, scopes: list[str] = READ, prefer: str = "") -> dict:
    token = tokens.issue_access_token(user.tid, user.oid, user.upn, scopes, "app")
    return {"Authorization": f"Bearer {token}", **({"Prefer": prefer} if prefer else {})}


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def window(world: World, days: int = 365) -> dict:
    return {"startDateTime": iso(world.now), "endDateTime": iso(world.now + timedelta(days=days))}


def wire(dt: datetime) -> dict:
    return {"dateTime": dt.strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": "UTC"}


def list_all(http: httpx.Client, url: str, headers: dict, params: dict) -> list[dict]:
    out, first = [], True
    while url:
        resp = http.get(url, params=params if first else None, headers=headers)
        assert resp.status_code == 200, resp.text
        page, first = resp.json(), False
        out += page["value"]
        url = page.get("@odata.nextLink")
    return out


def delta_round(http: httpx.Client, url: str, headers: dict, params: dict | None = None) -> tuple[list[dict], str]:
    items: list[dict] = []
    while True:
        resp = http.get(url, params=params if not items and params else None, headers=headers)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert ("@odata.nextLink" in page) != ("@odata.deltaLink" in page)
        items += page["value"]
        if "@odata.deltaLink" in page:
            return items, page["@odata.deltaLink"]
        url = page["@odata.nextLink"]
        params = None


def test_calendars_do_not_change_mail_or_crm() -> None:
    plain = generate_world(seed=31, tenants=1, users_per_tenant=3, messages_per_user=20)
    again = generate_world(seed=31, tenants=1, users_per_tenant=3, messages_per_user=20, calendars=True, now=plain.now)
    assert plain.calendars is None and again.calendars is not None
    assert plain.crm == again.crm and [u.oid for u in plain.tenants[0].users] == [u.oid for u in again.tenants[0].users]
    assert {k: [m.id for m in v] for k, v in plain.mailboxes.items()} == {
        k: [m.id for m in v] for k, v in again.mailboxes.items()
    }


def test_generated_calendars_are_realistic(world: World, cal: Calendars) -> None:
    lo, hi = world.now - timedelta(days=31), world.now + timedelta(days=400)
    for user in world.tenants[0].users:
        evs = cal.events[user.oid]
        assert all(lo <= e.start <= hi for e in evs)
        kinds = Counter(e.kind for e in evs)
        assert kinds["customer_call"] == 3 and kinds["standup"] == 1 and kinds["private"] == 2
        assert any(e.is_online and e.join_url for e in evs) and any(e.is_cancelled for e in evs)
        masters = [e for e in evs if e.recurrence]
        assert {e.recurrence.interval for e in masters} <= {1, 2} and any(e.overrides for e in masters)
        overrides = [o for e in masters for o in e.overrides.values()]
        assert any(o.deleted for o in overrides) and any(o.start for o in overrides)
        assert any(a.response != "none" for e in evs for a in e.attendees)


def test_oracle_rules(world: World, cal: Calendars) -> None:
    tid, users = world.tenants[0].tid, world.tenants[0].users
    lo, hi = world.now, world.now + timedelta(days=365)
    base = cal.expected_meetings(tid, lo, hi)
    opted = cal.expected_meetings(tid, lo, hi, include_internal_for={users[0].oid})
    assert set(base) < set(opted)
    for (oid, iid), ids in opted.items():
        if (oid, iid) not in base:
            assert oid == users[0].oid and ids == frozenset()
    for user in users:
        for inst in cal.instances(user.oid, lo, hi):
            key = (user.oid, inst.id)
            kind = inst.event.kind
            if kind in ("private", "stranger") or inst.event.is_cancelled:
                assert key not in opted, kind
            elif kind in ("standup", "internal"):
                assert key not in base and (key in opted) == (user.oid == users[0].oid)
            elif kind in ("customer_call", "lead"):
                assert base[key], kind  # contacts / leads are always CRM records


def test_window_required_and_capped(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    url, h = f"{sim.base_url}/me/calendarView", hdrs(tokens, user)
    start, end = window(world)["startDateTime"], window(world)["endDateTime"]
    for path in ("me/calendarView", "me/calendarView/delta"):
        for params in ({}, {"startDateTime": start}, {"endDateTime": end}):
            resp = http.get(f"{sim.base_url}/{path}", params=params, headers=h)
            assert resp.status_code == 400
            err = resp.json()["error"]
            assert err["code"] == "ErrorInvalidParameter" and "StartDateTime and EndDateTime" in err["message"]
            assert err["innerError"]["request-id"] == resp.headers["request-id"]
        wide = {"startDateTime": start, "endDateTime": iso(world.now + timedelta(days=1826))}
        resp = http.get(f"{sim.base_url}/{path}", params=wide, headers=h)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "ErrorInvalidRequest"
        assert resp.json()["error"]["message"].endswith("Maximum number of days: 1825")
    ok = {"startDateTime": start, "endDateTime": iso(world.now + timedelta(days=1825))}
    assert http.get(url, params=ok, headers=h).status_code == 200


def test_calendar_view_expands_series_like_the_oracle(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World, cal: Calendars
) -> None:
    lo, hi = world.now, world.now + timedelta(days=365)
    items = list_all(
        http, f"{sim.base_url}/me/calendarView", hdrs(tokens, user, prefer="odata.maxpagesize=50"), window(world)
    )
    truth = cal.instances(user.oid, lo, hi)
    assert [i["id"] for i in items] == [i.id for i in truth] and len(items) > 200
    assert "seriesMaster" not in {i["type"] for i in items}
    per_series = Counter(i["seriesMasterId"] for i in items if i["seriesMasterId"])
    for ev in cal.events[user.oid]:
        if ev.recurrence:
            assert per_series[ev.id] == sum(1 for i in truth if i.event is ev)
    expected = {iid for (oid, iid) in cal.expected_meetings(user.tid, lo, hi) if oid == user.oid}
    assert expected < {i["id"] for i in items}
    # exceptions: the moved occurrence keeps its id with the new time, the cancelled one is gone
    master = next(e for e in cal.events[user.oid] if any(o.deleted for o in e.overrides.values()))
    by_id = {i["id"]: i for i in items}
    for orig, o in master.overrides.items():
        oid_ = occurrence_id(master.id, orig)
        if o.deleted:
            assert oid_ not in by_id
        else:
            assert by_id[oid_]["type"] == "exception" and by_id[oid_]["start"] == wire(o.start)
    occ = next(i for i in items if i["type"] == "occurrence")
    assert occ["subject"] == master.subject or occ["seriesMasterId"] != master.id
    assert occ["iCalUId"] != cal.event(occ["seriesMasterId"]).ical_uid and occ["attendees"] is not None
    # $select, $top paging, time zone preference
    resp = http.get(
        f"{sim.base_url}/me/calendarView",
        params={**window(world), "$select": "subject,start", "$top": "7"},
        headers=hdrs(tokens, user, prefer='outlook.timezone="Pacific Standard Time"'),
    )
    page = resp.json()
    assert len(page["value"]) == 7 and set(page["value"][0]) == {"@odata.etag", "id", "subject", "start"}
    assert "$skip=7" in page["@odata.nextLink"] and page["@odata.nextLink"].startswith(sim.base_url)
    assert page["value"][0]["start"]["timeZone"] == "Pacific Standard Time"
    assert 'outlook.timezone="Pacific Standard Time"' in resp.headers["Preference-Applied"]
    bad = http.get(
        f"{sim.base_url}/me/calendarView", params={**window(world), "$select": "nope"}, headers=hdrs(tokens, user)
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "RequestBroker--ParseUri"


def test_events_by_id(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World, cal: Calendars
) -> None:
    h = hdrs(tokens, user)
    master = next(e for e in cal.events[user.oid] if e.overrides)
    got = http.get(f"{sim.base_url}/me/events/{master.id}", headers=h).json()
    assert got["type"] == "seriesMaster" and got["recurrence"]["pattern"]["type"] == "weekly"
    assert got["recurrence"]["range"]["recurrenceTimeZone"] == master.time_zone
    for orig, o in master.overrides.items():
        resp = http.get(f"{sim.base_url}/me/events/{occurrence_id(master.id, orig)}", headers=h)
        if o.deleted:
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "ErrorItemNotFound"
        else:
            assert resp.json()["type"] == "exception" and resp.json()["seriesMasterId"] == master.id
    inst = http.get(f"{sim.base_url}/me/events/{master.id}/instances", params=window(world), headers=h).json()
    assert [i["id"] for i in inst["value"]] == [
        i.id for i in cal.instances(user.oid, world.now, world.now + timedelta(days=365)) if i.event is master
    ]
    assert http.get(f"{sim.base_url}/me/events/AAMkAGnope=", headers=h).status_code == 404


def test_delta_baseline_then_exact_changes(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, world: World, cal: Calendars
) -> None:
    user = world.tenants[0].users[1]
    h = hdrs(tokens, user, prefer="odata.maxpagesize=40")
    url = f"{sim.base_url}/me/calendarView/delta"
    lo, hi = world.now, world.now + timedelta(days=365)
    items, link = delta_round(http, url, h, {**window(world), "$select": "subject"})  # $select ignored
    truth = cal.instances(user.oid, lo, hi)
    masters = {e.id for e in cal.events[user.oid] if e.recurrence and any(i.event is e for i in truth)}
    assert {i["id"] for i in items} == {i.id for i in truth} | masters
    assert "$deltatoken=" in link and "startDateTime" not in link
    for i in items:
        assert i["@odata.type"] == "#microsoft.graph.event"
        if i["type"] == "occurrence":
            assert set(i) == BARE  # bare: hydrate from the master
        else:
            assert "subject" in i and "attendees" in i and "body" in i
    occ = next(i for i in items if i["type"] == "occurrence")
    master = http.get(f"{sim.base_url}/me/events/{occ['seriesMasterId']}", headers=h).json()
    assert master["type"] == "seriesMaster" and master["attendees"] and master["subject"]

    # changes between rounds
    singles = [
        e
        for e in cal.events[user.oid]
        if not e.recurrence and e.start > lo + timedelta(days=2) and e.end < hi and not e.is_cancelled
    ]
    moved, reattended, organized, out = singles[0], singles[1], singles[2], singles[3]
    cal.reschedule(moved.id, moved.start + timedelta(days=1))
    cal.change_attendees(reattended.id, add=[Attendee("New One", "new.one@stranger1.org")])
    gone = cal.cancel(organized.id, delete=True)
    cal.reschedule(out.id, hi + timedelta(days=3))  # leaves the window
    added = cal.add_event(user.oid, "external", lo + timedelta(days=9, hours=3))
    far = cal.add_event(user.oid, "external", hi + timedelta(days=20))  # outside: @removed noise
    call = next(e for e in cal.events[user.oid] if e.kind == "customer_call" and e.id in masters)
    call_occ = [i for i in truth if i.event is call and i.type == "occurrence"]
    cal.reschedule(call_occ[0].id, call_occ[0].start + timedelta(hours=2))  # becomes an exception
    cal.cancel(call_occ[1].id)  # a deleted occurrence: no signal, the master comes again
    standup = next(e for e in cal.events[user.oid] if e.kind == "standup")
    standup_ids = [i.id for i in truth if i.event is standup]
    cal.delete_series(standup.id)

    changes, link2 = delta_round(http, link, h)
    by_id = {i["id"]: i for i in changes}
    assert len(by_id) == len(changes)
    removed = {i for i, v in by_id.items() if "@removed" in v}
    assert removed == {gone.id, out.id, far.id, standup.id, *standup_ids}
    assert all(
        by_id[i] == {"@odata.type": "#microsoft.graph.event", "id": i, "@removed": {"reason": "deleted"}}
        for i in removed
    )
    call_now = [i for i in cal.instances(user.oid, lo, hi) if i.event is call]
    assert set(by_id) - removed == {moved.id, reattended.id, added.id, call.id, *(i.id for i in call_now)}
    assert by_id[moved.id]["start"] == wire(moved.start)
    assert "new.one@stranger1.org" in {a["emailAddress"]["address"] for a in by_id[reattended.id]["attendees"]}
    assert by_id[call_occ[0].id]["type"] == "exception" and by_id[call_occ[0].id]["subject"] == call.subject
    assert call_occ[1].id not in by_id
    assert all(set(by_id[i.id]) == BARE for i in call_now if i.type == "occurrence")

    quiet, link3 = delta_round(http, link2, h)
    assert quiet == []
    sim.calendar.knobs.delta_deleted_occurrences = True
    cal.cancel(call_now[-1].id)
    again, _ = delta_round(http, link3, h)
    assert {"@odata.type": "#microsoft.graph.event", "id": call_now[-1].id, "@removed": {"reason": "deleted"}} in again
    replay, _ = delta_round(http, link, h)  # an old deltaLink replays from its own point
    assert {i["id"] for i in replay} >= removed
    # an attendee's copy of a cancelled meeting stays, as an update with isCancelled
    copy = next(
        e
        for e in cal.events[user.oid]
        if not e.recurrence and e.organizer.address != user.upn and not e.is_cancelled and lo < e.start < hi
    )
    cal.cancel(copy.id)
    (upd,) = [i for i in delta_round(http, link3, h)[0] if i["id"] == copy.id]
    assert upd["isCancelled"] is True and upd["subject"].startswith("Canceled: ")


def test_delta_eviction(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    h = hdrs(tokens, user, prefer="odata.maxpagesize=10")
    url = f"{sim.base_url}/me/calendarView/delta"
    first = http.get(url, params=window(world, 30), headers=h).json()
    mid = first["@odata.nextLink"]
    assert len(first["value"]) >= 1
    _, link = delta_round(http, url, h, window(world, 30))
    assert sim.calendar.evict_delta_tokens(user.oid) >= 2
    for dead in (mid, link, f"{url}?$deltatoken=bogus"):
        resp = http.get(dead, headers=h)
        assert resp.status_code == 410
        err = resp.json()["error"]
        assert err["code"] == "SyncStateNotFound" and err["message"].startswith("The sync state generation")
    items, _ = delta_round(http, url, h, window(world, 30))
    assert items


def test_series_never_split_across_pages(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    resp = http.get(
        f"{sim.base_url}/me/calendarView/delta",
        params=window(world),
        headers=hdrs(tokens, user, prefer="odata.maxpagesize=5"),
    )
    page = resp.json()
    masters = {i["id"] for i in page["value"] if i["type"] == "seriesMaster"}
    assert resp.headers["Preference-Applied"] == "odata.maxpagesize=5"
    assert masters and len(page["value"]) > 5  # a whole series on one page
    assert all(i["seriesMasterId"] in masters for i in page["value"] if i["type"] == "occurrence")


def test_patch_event_and_online_meetings(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World, cal: Calendars
) -> None:
    h = hdrs(tokens, user, ALL)
    ev = next(e for e in cal.events[user.oid] if not e.recurrence and not e.is_online and e.start > world.now)
    om = http.post(
        f"{sim.base_url}/me/onlineMeetings",
        headers=h,
        json={"startDateTime": iso(ev.start), "endDateTime": iso(ev.end), "subject": ev.subject},
    )
    assert om.status_code == 201 and om.json()["joinWebUrl"].startswith("https://teams.microsoft.com/l/meetup-join/")
    assert cal.online_meetings[-1]["joinWebUrl"] == om.json()["joinWebUrl"]
    body = {
        "body": {"contentType": "html", "content": f"Join: {om.json()['joinWebUrl']} - recorded, consent"},
        "isOnlineMeeting": True,
        "onlineMeetingProvider": "teamsForBusiness",
    }
    resp = http.patch(f"{sim.base_url}/me/events/{ev.id}", headers=h, json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["isOnlineMeeting"] is True and resp.json()["onlineMeeting"]["joinUrl"]
    assert "consent" in resp.json()["body"]["content"]
    assert cal.writes[-1].oid == user.oid and cal.writes[-1].event_id == ev.id and cal.writes[-1].fields == body
    n = len(cal.writes)
    bad = http.patch(f"{sim.base_url}/me/events/{ev.id}", headers=h, json={"location": {"displayName": "x"}})
    assert bad.status_code == 400 and len(cal.writes) == n
    ro = hdrs(tokens, user, READ)
    assert http.patch(f"{sim.base_url}/me/events/{ev.id}", headers=ro, json={"subject": "x"}).status_code == 403


def test_teams_channels_chats_and_posts(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, world: World, cal: Calendars
) -> None:
    users = world.tenants[0].users
    me, other = users[0], users[-1]
    h = hdrs(tokens, me, ALL)
    teams = http.get(f"{sim.base_url}/me/joinedTeams", headers=h).json()["value"]
    assert {t["displayName"] for t in teams} == {t.display_name for t in cal.teams if me.oid in t.members}
    assert set(teams[0]) == {"id", "displayName", "description"}
    theirs = {
        t["id"] for t in http.get(f"{sim.base_url}/me/joinedTeams", headers=hdrs(tokens, other, ALL)).json()["value"]
    }
    assert theirs < {t["id"] for t in teams}
    team = cal.teams[0]
    chans = http.get(f"{sim.base_url}/teams/{team.id}/channels", headers=h).json()["value"]
    visible = {c.id for c in team.channels if c.members is None or me.oid in c.members}
    assert {c["id"] for c in chans} == visible and {c["membershipType"] for c in chans} >= {"standard", "private"}
    hidden = next(c for c in team.channels if c.id not in visible)
    private = http.get(
        f"{sim.base_url}/teams/{team.id}/channels", params={"$filter": "membershipType eq 'private'"}, headers=h
    ).json()["value"]
    assert [c["membershipType"] for c in private] == ["private"]
    general = next(c for c in chans if c["displayName"] == "General")
    msg = {"body": {"contentType": "html", "content": "<b>Renewal call</b> with Acme"}}
    resp = http.post(f"{sim.base_url}/teams/{team.id}/channels/{general['id']}/messages", headers=h, json=msg)
    assert resp.status_code == 201 and resp.json()["channelIdentity"] == {"teamId": team.id, "channelId": general["id"]}
    assert cal.posts[-1].channel_id == general["id"] and cal.posts[-1].content == msg["body"]["content"]
    assert (
        http.post(f"{sim.base_url}/teams/{team.id}/channels/{hidden.id}/messages", headers=h, json=msg).status_code
        == 404
    )
    members = [
        {
            "@odata.type": "#microsoft.graph.aadUserConversationMember",
            "roles": ["owner"],
            "user@odata.bind": f"https://graph.microsoft.com/v1.0/users('{u}')",
        }
        for u in (me.oid, other.upn)
    ]
    chat = http.post(f"{sim.base_url}/chats", headers=h, json={"chatType": "oneOnOne", "members": members})
    again = http.post(f"{sim.base_url}/chats", headers=h, json={"chatType": "oneOnOne", "members": members})
    assert chat.status_code == again.status_code == 201 and chat.json()["id"] == again.json()["id"]
    resp = http.post(f"{sim.base_url}/chats/{chat.json()['id']}/messages", headers=h, json=msg)
    assert resp.status_code == 201 and resp.json()["chatId"] == chat.json()["id"]
    assert cal.posts[-1].chat_id == chat.json()["id"] and cal.posts[-1].oid == me.oid
    not_me = [
        members[1],
        {**members[1], "user@odata.bind": f"https://graph.microsoft.com/v1.0/users('{users[1].oid}')"},
    ]
    assert (
        http.post(f"{sim.base_url}/chats", headers=h, json={"chatType": "oneOnOne", "members": not_me}).status_code
        == 400
    )


@pytest.mark.parametrize(
    ("method", "path", "scopes", "code"),
    [
        ("GET", "me/calendarView?startDateTime=2026-01-01&endDateTime=2026-02-01", ["Mail.Read"], "ErrorAccessDenied"),
        (
            "GET",
            "me/calendarView/delta?startDateTime=2026-01-01&endDateTime=2026-02-01",
            ["Mail.Read"],
            "ErrorAccessDenied",
        ),
        ("GET", "me/events/x", ["Mail.Read"], "ErrorAccessDenied"),
        ("PATCH", "me/events/x", ["Calendars.Read"], "ErrorAccessDenied"),
        ("POST", "me/onlineMeetings", ["Calendars.ReadWrite"], "Forbidden"),
        ("GET", "me/joinedTeams", ["Channel.ReadBasic.All"], "Forbidden"),
        ("GET", "teams/x/channels", ["Team.ReadBasic.All"], "Forbidden"),
        ("POST", "teams/x/channels/y/messages", ["Team.ReadBasic.All", "Channel.ReadBasic.All"], "Forbidden"),
        ("POST", "chats", ["ChatMessage.Send"], "Forbidden"),
        ("POST", "chats/x/messages", ["Chat.Create"], "Forbidden"),
    ],
)
def test_scopes_enforced(
    sim: GraphSimulator,
    http: httpx.Client,
    tokens: TokenAuthority,
    user: SimUser,
    method: str,
    path: str,
    scopes: list[str],
    code: str,
) -> None:
    resp = http.request(method, f"{sim.base_url}/{path}", headers=hdrs(tokens, user, scopes), json={})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == code and resp.headers["request-id"]


def test_calendar_requests_share_throttling_faults_and_batch(
    sim: GraphSimulator, http: httpx.Client, tokens: TokenAuthority, user: SimUser, world: World
) -> None:
    h = hdrs(tokens, user)
    sim.inject(user.oid, 503, path_contains="calendarView", retry_after="1")
    resp = http.get(f"{sim.base_url}/me/calendarView", params=window(world, 7), headers=h)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert sim.requests[-1].path.endswith("/calendarView") and sim.requests[-1].status == 503
    batch = {
        "requests": [
            {
                "id": "1",
                "method": "GET",
                "url": f"/me/calendarView?startDateTime={iso(world.now)}&endDateTime="
                f"{iso(world.now + timedelta(days=7))}",
            },
            {"id": "2", "method": "GET", "url": "/me/calendarView"},
        ]
    }
    out = {r["id"]: r for r in http.post(f"{sim.base_url}/$batch", headers=h, json=batch).json()["responses"]}
    assert out["1"]["status"] == 200 and out["2"]["status"] == 400
    assert out["2"]["body"]["error"]["code"] == "ErrorInvalidParameter"
