"""Teams sharing against the simulated world: real Graph simulator over HTTPS, real MSAL sign-in (stand_up), a real
DuckDB store and, for the flows, a real Prefect API. Meetings are inserted into the store directly (the calendar
import is tested elsewhere)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from o365sync.graph import GraphForbidden
from o365sync.store import open_store
from o365sync.teams import (
    ChannelNotFound,
    ConsentNeeded,
    TeamsDisabled,
    refresh_channels,
    render_email_summary,
    share_activity,
)
from o365sync.teams_store import ShareRecord, begin_share, read_channels, read_shares, share_id_for
from o365sync.tenants import load_tenant, save_tenant
from simulators.world import generate_world
from simulators.world_calendar import SimChannel
from tests.product import stand_up

EVENT_ID = "AAMkAGI2TG93AAA="
BODY_MARKER = "SECRET-BODY-TEXT-7f3a"
START = datetime(2030, 3, 5, 14, 0, tzinfo=UTC)
WINDOWS_TZ = "W. Europe Standard Time"  # as Graph reports originalStartTimeZone


def _world():
    return generate_world(seed=23, users_per_tenant=3, messages_per_user=15, contacts_per_tenant=12, calendars=True)


@pytest.fixture
def product(tmp_path, monkeypatch):
    p = stand_up(_world(), tmp_path, monkeypatch, features=["email", "teams"])
    p.running.graph.reset_stats()
    yield p
    p.running.stop()


@pytest.fixture
def email_only(tmp_path, monkeypatch):
    """The same world, its tenant registered with email only (Teams not enabled)."""
    p = stand_up(_world(), tmp_path, monkeypatch, features=["email"])
    try:
        yield p
    finally:
        p.running.stop()


def tenant_of(p):
    return p.world.tenants[0]


def graph_calls(p) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in p.running.graph.requests]


def assert_no_message_history(p) -> None:
    """Every Graph request the product made is on the Teams write/list surface: never a read of messages/chats."""
    for method, path in graph_calls(p):
        if method == "GET":
            assert re.search(r"/me/joinedTeams$|/teams/[^/]+/channels$", path), path
        else:
            assert method == "POST" and re.search(r"/chats$|/messages$", path), (method, path)


def expected_channels(p, oid: str) -> set[tuple[str, str, str, str]]:
    return {
        (t.id, c.id, c.display_name, c.membership_type)
        for t in p.world.calendars.teams
        if oid in t.members
        for c in t.channels
        if c.members is None or oid in c.members
    }


def seed_meeting(p, oid: str, event_id: str = EVENT_ID) -> dict:
    """A stored meeting of `oid` with two CRM matches (a contact of an account, and an account by domain)."""
    tid = tenant_of(p).tid
    with open_store(p.settings, tid, write=True) as con:
        con.execute(
            "INSERT INTO crm_accounts VALUES ('001A', 'Initech GmbH', 'initech.example'), "
            "('001B', 'Globex & Partners', 'globex.example')"
        )
        con.execute(
            "INSERT INTO crm_people VALUES ('003C', 'contact', 'peter@initech.example', '001A', 'Peter Gibbons')"
        )
    with open_store(p.settings, tid, write=True, user_oid=oid) as con:
        con.execute(
            "INSERT INTO meetings (tenant_id, user_oid, event_id, subject, start_at, start_tz, end_at, end_tz, "
            "is_all_day, is_online, organizer_name, organizer_address, is_internal, imported_at, updated_at) "
            "VALUES (?, ?, ?, 'Q2 renewal <review>', ?, ?, ?, ?, false, true, "
            "'Ann Organizer', 'ann@contoso.com', false, now(), now())",
            [tid, oid, event_id, START, WINDOWS_TZ, START + timedelta(minutes=30), WINDOWS_TZ],
        )
        con.executemany(
            "INSERT INTO meeting_attendees VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                [tid, oid, event_id, "required", "Peter Gibbons", "peter@initech.example", "accepted"],
                [tid, oid, event_id, "optional", "Bill Lumbergh", "bill@globex.example", "none"],
                [tid, oid, event_id, "resource", "Room 1", "room1@contoso.com", "accepted"],
            ],
        )
        con.executemany(
            "INSERT INTO meeting_crm_matches VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                [tid, oid, event_id, "003C", "contact", "peter@initech.example", True],
                [tid, oid, event_id, "001B", "account", "bill@globex.example", False],
            ],
        )
    return {"event_id": event_id}


def a_channel(p, oid: str, membership: str = "standard"):
    team = next(t for t in p.world.calendars.teams if oid in t.members)
    return team, next(c for c in team.channels if c.membership_type == membership)


# --------------------------------------------------------------------------------------------- channels
def test_channels_listed_with_membership_types_and_replaced_on_refresh(product):
    p, tenant = product, tenant_of(product)
    for user in tenant.users:
        result = refresh_channels(p.settings, tenant.tid, user.oid)
        with open_store(p.settings, tenant.tid, write=False) as con:
            rows = read_channels(con, tenant.tid, user.oid)
        stored = {(r["team_id"], r["channel_id"], r["channel_name"], r["membership_type"]) for r in rows}
        assert stored == expected_channels(p, user.oid)
        assert result.channels == len(rows) and result.teams == len({r["team_id"] for r in rows})
    first = tenant.users[0].oid
    with open_store(p.settings, tenant.tid, write=False) as con:
        kinds = {r["membership_type"] for r in read_channels(con, tenant.tid, first)}
    assert kinds == {"standard", "private", "shared"}  # the first user is in every private/shared channel

    # Teams changes: a channel is deleted, one added; a refresh replaces the user's rows (and only theirs).
    team, gone = a_channel(p, first)
    team.channels.remove(gone)
    team.channels.append(SimChannel("19:newchannel0001@thread.tacv2", "Renewals", "standard"))
    with open_store(p.settings, tenant.tid, write=False) as con:
        others_before = read_channels(con, tenant.tid, tenant.users[1].oid)
    refresh_channels(p.settings, tenant.tid, first)
    with open_store(p.settings, tenant.tid, write=False) as con:
        rows = read_channels(con, tenant.tid, first)
        others_after = read_channels(con, tenant.tid, tenant.users[1].oid)
    ids = [r["channel_id"] for r in rows]
    assert gone.id not in ids and "19:newchannel0001@thread.tacv2" in ids
    assert len(ids) == len(set(ids)) == len(expected_channels(p, first))
    assert others_after == others_before
    assert_no_message_history(p)


@pytest.mark.slow
def test_teams_refresh_flow_refreshes_every_user(prefect_server, product):
    from flows.teams import teams_refresh

    p, tenant = product, tenant_of(product)
    totals = teams_refresh(tenant.tid)
    assert totals["users"] == totals["ok"] == len(tenant.users)
    assert totals["channels"] == sum(len(expected_channels(p, u.oid)) for u in tenant.users)
    with open_store(p.settings, tenant.tid, write=False) as con:
        assert {r["user_oid"] for r in read_channels(con, tenant.tid)} == {u.oid for u in tenant.users}
    assert_no_message_history(p)


# --------------------------------------------------------------------------------------------- sharing
def test_share_to_channel_posts_the_summary_once(product):
    p, tenant = product, tenant_of(product)
    me = tenant.users[0]
    seed_meeting(p, me.oid)
    team, channel = a_channel(p, me.oid, "private")

    result = share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, team_id=team.id, channel_id=channel.id)
    assert result.status == "posted" and result.refreshed  # the channel list was empty: refreshed once
    posts = p.world.calendars.posts
    assert len(posts) == 1
    post = posts[0]
    assert (post.oid, post.team_id, post.channel_id, post.id) == (me.oid, team.id, channel.id, result.message_id)
    assert post.content_type == "html"
    html = post.content
    assert "Q2 renewal &lt;review&gt;" in html  # escaped
    assert "Tue 05 Mar 2030, 15:00–15:30 (W. Europe Standard Time)" in html  # local time with its zone
    assert "Initech GmbH" in html and "Globex &amp; Partners" in html  # the contact's account and the account
    assert "Peter Gibbons (contact)" in html
    assert "Bill Lumbergh" in html and "Room 1" not in html
    assert "peter@initech.example" not in html and BODY_MARKER not in html

    with open_store(p.settings, tenant.tid, write=False) as con:
        shares = read_shares(con, tenant.tid)
    assert [(s.target_kind, s.target_id, s.activity_kind, s.activity_id, s.message_id) for s in shares] == [
        ("channel", channel.id, "meeting", EVENT_ID, result.message_id)
    ]
    assert shares[0].posted_at is not None

    # A retry (same activity, same channel) posts nothing and makes no Graph call.
    p.running.graph.reset_stats()
    again = share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, team_id=team.id, channel_id=channel.id)
    assert (again.status, again.message_id, again.share_id) == ("already_posted", result.message_id, result.share_id)
    assert len(p.world.calendars.posts) == 1 and graph_calls(p) == []


@pytest.mark.slow
def test_share_flow_creates_one_on_one_and_group_chats_and_never_posts_twice(prefect_server, product, caplog):
    from flows.teams import teams_share
    from tests.test_privacy import _sqlite_hits

    caplog.set_level(logging.DEBUG)

    p, tenant = product, tenant_of(product)
    me, bob, carol = tenant.users
    seed_meeting(p, me.oid)

    one = teams_share(tenant.tid, me.oid, "meeting", EVENT_ID, member_oids=[bob.oid])
    assert one["status"] == "posted"
    chat = p.world.calendars.chats[one["target_id"]]
    assert chat.chat_type == "oneOnOne" and set(chat.members) == {me.oid, bob.oid}
    group = teams_share(tenant.tid, me.oid, "meeting", EVENT_ID, member_oids=[bob.oid, carol.oid])
    assert group["status"] == "posted" and group["target_id"] != one["target_id"]
    gchat = p.world.calendars.chats[group["target_id"]]
    assert gchat.chat_type == "group" and set(gchat.members) == {me.oid, bob.oid, carol.oid}
    posts = p.world.calendars.posts
    assert [(x.chat_id, x.id) for x in posts] == [
        (one["target_id"], one["message_id"]),
        (group["target_id"], group["message_id"]),
    ]
    assert all("Q2 renewal" in x.content for x in posts)

    # A retried flow run: nothing posted, no chat created; member order does not matter.
    calls_before = len(graph_calls(p))
    again = teams_share(tenant.tid, me.oid, "meeting", EVENT_ID, member_oids=[carol.oid, bob.oid])
    assert again["status"] == "already_posted" and again["message_id"] == group["message_id"]
    assert len(p.world.calendars.posts) == 2 and len(p.world.calendars.chats) == 2
    assert len(graph_calls(p)) == calls_before
    with open_store(p.settings, tenant.tid, write=False) as con:
        assert sorted(s.target_id for s in read_shares(con, tenant.tid)) == sorted(
            [one["target_id"], group["target_id"]]
        )
    assert_no_message_history(p)
    # Ids and counts only: the summary's content and the members' addresses reach neither logs nor Prefect's DB.
    needles = ["q2 renewal", "peter gibbons", "initech", bob.upn.lower(), carol.upn.lower()]
    assert [r.getMessage() for r in caplog.records if any(n in r.getMessage().lower() for n in needles)] == []
    if prefect_server.startswith("sqlite"):
        assert _sqlite_hits(Path(prefect_server.split("///", 1)[1]), needles) == []


@pytest.mark.slow
def test_flow_refuses_member_addresses(prefect_server, product):
    from flows.teams import teams_share

    tenant = tenant_of(product)
    with pytest.raises(ValueError, match="object ids"):
        teams_share(tenant.tid, tenant.users[0].oid, "meeting", EVENT_ID, member_oids=[tenant.users[1].upn])


def test_share_by_upn_binds_the_member_by_upn(product):
    p, tenant = product, tenant_of(product)
    me, bob = tenant.users[:2]
    seed_meeting(p, me.oid)
    result = share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, members=[bob.upn])
    assert result.status == "posted"
    assert set(p.world.calendars.chats[result.target_id].members) == {me.oid, bob.oid}


def test_unknown_channel_refreshes_once_then_fails_clearly(product):
    p, tenant = product, tenant_of(product)
    me = tenant.users[0]
    seed_meeting(p, me.oid)
    team, _ = a_channel(p, me.oid)
    refresh_channels(p.settings, tenant.tid, me.oid)
    p.running.graph.reset_stats()
    with pytest.raises(ChannelNotFound, match="after refreshing"):
        share_activity(
            p.settings,
            tenant.tid,
            me.oid,
            "meeting",
            EVENT_ID,
            team_id=team.id,
            channel_id="19:doesnotexist@thread.tacv2",
        )
    calls = graph_calls(p)
    assert sum(path.endswith("/me/joinedTeams") for _, path in calls) == 1
    assert not any(m == "POST" for m, _ in calls)
    assert p.world.calendars.posts == []
    with open_store(p.settings, tenant.tid, write=False) as con:
        assert read_shares(con, tenant.tid) == []


def test_intent_without_message_id_is_not_reposted_unless_forced(product):
    """A run that died between recording its intent and recording the message id may have posted: a retry says
    'uncertain' and sends nothing; --force posts."""
    p, tenant = product, tenant_of(product)
    me = tenant.users[0]
    seed_meeting(p, me.oid)
    team, channel = a_channel(p, me.oid)
    sid = share_id_for(tenant.tid, me.oid, "meeting", EVENT_ID, "channel", [team.id, channel.id])
    with open_store(p.settings, tenant.tid, write=True) as con:
        intent = ShareRecord(sid, me.oid, "channel", channel.id, "meeting", EVENT_ID)
        assert begin_share(con, tenant.tid, intent) is None
    result = share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, team_id=team.id, channel_id=channel.id)
    assert (result.status, result.message_id) == ("uncertain", None)
    assert p.world.calendars.posts == [] and graph_calls(p) == []
    forced = share_activity(
        p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, team_id=team.id, channel_id=channel.id, force=True
    )
    assert forced.status == "posted" and len(p.world.calendars.posts) == 1
    with open_store(p.settings, tenant.tid, write=False) as con:
        shares = read_shares(con, tenant.tid)
    assert [(s.share_id, s.message_id) for s in shares] == [(sid, forced.message_id)]


def test_refused_post_drops_the_intent_so_a_retry_posts(product):
    p, tenant = product, tenant_of(product)
    me = tenant.users[0]
    seed_meeting(p, me.oid)
    team, channel = a_channel(p, me.oid)
    p.running.graph.inject(me.oid, 403, path_contains="/messages")
    with pytest.raises(GraphForbidden):
        share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, team_id=team.id, channel_id=channel.id)
    with open_store(p.settings, tenant.tid, write=False) as con:
        assert read_shares(con, tenant.tid) == []
    result = share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, team_id=team.id, channel_id=channel.id)
    assert result.status == "posted" and len(p.world.calendars.posts) == 1


def test_email_summary_has_subject_date_and_crm_links_but_no_body(product):
    p, tenant = product, tenant_of(product)
    me = tenant.users[0]
    tid = tenant.tid
    with open_store(p.settings, tid, write=True) as con:
        con.execute("INSERT INTO crm_accounts VALUES ('001A', 'Initech GmbH', 'initech.example')")
    with open_store(p.settings, tid, write=True, user_oid=me.oid) as con:
        con.execute(
            "INSERT INTO emails (tenant_id, user_oid, graph_id, subject, body_text, from_name, from_address, "
            "received_at, sent_at, imported_at) VALUES (?, ?, 'MSG1', 'Pricing follow-up', ?, 'Peter', "
            "'peter@initech.example', ?, NULL, now())",
            [tid, me.oid, BODY_MARKER, START],
        )
        con.execute(
            "INSERT INTO email_crm_matches VALUES (?, ?, 'MSG1', '001A', 'account', 'peter@initech.example', true)",
            [tid, me.oid],
        )
        html = render_email_summary(con, tid, me.oid, "MSG1")
    assert "Pricing follow-up" in html and "Tue 05 Mar 2030, 14:00 (UTC)" in html and "Initech GmbH" in html
    assert BODY_MARKER not in html and "peter@initech.example" not in html
    team, channel = a_channel(p, me.oid)
    result = share_activity(p.settings, tid, me.oid, "email", "MSG1", team_id=team.id, channel_id=channel.id)
    assert result.status == "posted" and BODY_MARKER not in p.world.calendars.posts[0].content


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.slow
def test_tenant_without_teams_is_refused_before_any_graph_call(prefect_server, email_only):
    p = email_only
    tenant = tenant_of(p)
    me, bob = tenant.users[:2]
    seed_meeting(p, me.oid)
    p.running.graph.reset_stats()
    with pytest.raises(TeamsDisabled):
        refresh_channels(p.settings, tenant.tid, me.oid)
    with pytest.raises(TeamsDisabled):
        share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, members=[bob.oid])
    from flows.teams import teams_refresh, teams_share

    assert teams_refresh(tenant.tid) == {"users": 0, "disabled": 1}
    assert teams_share(tenant.tid, me.oid, "meeting", EVENT_ID, member_oids=[bob.oid])["status"] == "disabled"
    assert graph_calls(p) == [] and p.world.calendars.posts == [] and p.world.calendars.chats == {}


@pytest.mark.slow
def test_user_connected_before_teams_was_enabled_gets_consent_needed(prefect_server, email_only):
    p = email_only
    tenant = tenant_of(p)
    me, bob = tenant.users[:2]
    config = load_tenant(p.settings, tenant.tid)
    save_tenant(p.settings, config.model_copy(update={"features": ["email", "teams"]}))
    seed_meeting(p, me.oid)
    p.running.graph.reset_stats()
    token_calls = len(p.running.identity.token_requests)
    with pytest.raises(ConsentNeeded) as err:
        share_activity(p.settings, tenant.tid, me.oid, "meeting", EVENT_ID, members=[bob.oid])
    assert "ChannelMessage.Send" in err.value.missing and "@" not in str(err.value)
    from flows.teams import teams_refresh, teams_share

    totals = teams_refresh(tenant.tid)
    assert totals["consent_needed"] == len(tenant.users) and totals["ok"] == 0
    from o365sync.store import open_store, read_sync_states

    with open_store(p.settings, tenant.tid, write=False) as con:
        assert {s["stage"] for s in read_sync_states(con, tenant.tid, "teams")} == {"consent_needed"}
    assert teams_share(tenant.tid, me.oid, "meeting", EVENT_ID, member_oids=[bob.oid])["status"] == "consent_needed"
    assert graph_calls(p) == [] and p.world.calendars.posts == []
    assert len(p.running.identity.token_requests) == token_calls  # MSAL was not asked either
    from o365sync.auth import connection_info

    assert "reconnect_needed" not in connection_info(p.settings, tenant.tid, me.oid)  # the grant is intact


def test_cli_lists_channels_and_shares(product):
    import typer
    from typer.testing import CliRunner

    from app.cli_teams import teams_app

    p, tenant = product, tenant_of(product)
    me = tenant.users[0]
    seed_meeting(p, me.oid)
    app = typer.Typer()
    app.add_typer(teams_app, name="teams")
    runner = CliRunner(env={"COLUMNS": "300"})
    out = runner.invoke(app, ["teams", "channels", "--tenant", tenant.tid, "--user", me.oid, "--refresh"])
    assert out.exit_code == 0, out.output
    assert "private" in out.output and "shared" in out.output and "Deals" in out.output
    team, channel = a_channel(p, me.oid)
    # Without --team/--channel or --member: a clear usage error.
    bad = runner.invoke(app, ["teams", "share", "--tenant", tenant.tid, "--user", me.oid, "--meeting", EVENT_ID])
    assert bad.exit_code == 2
    assert p.world.calendars.posts == []


def test_meeting_time_is_shown_in_its_own_zone_and_labelled():
    from o365sync.teams import _when

    end = START + timedelta(hours=1)
    assert _when(START, end, "America/New_York", False) == "Tue 05 Mar 2030, 09:00–10:00 (America/New_York)"
    assert _when(START, end, "Pacific Standard Time", False) == "Tue 05 Mar 2030, 06:00–07:00 (Pacific Standard Time)"
    assert _when(START, end, "Not A Zone", False) == "Tue 05 Mar 2030, 14:00–15:00 (UTC)"
    assert _when(START, end, None, True) == "Tue 05 Mar 2030 (all day)"
