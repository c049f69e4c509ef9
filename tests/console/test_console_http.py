"""The console over HTTP against the simulated identity platform (real MSAL, real sessions, real tenant files):
roles, CSRF, headers, admin consent bound to the session, tenant isolation, the rep's choices."""

from __future__ import annotations

import html
from urllib.parse import parse_qsl, urlsplit

import pytest

from o365sync.auth import admin_consent_info, checked_identity, connection_info
from o365sync.offboarding import offboarding_status
from o365sync.tenants import load_tenant
from tests.console.world import ConsoleWorld, csrf_of, stand_up_console, tear_down


@pytest.fixture(scope="module")
def cw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    world = stand_up_console(tmp)
    yield world
    tear_down(world, tmp)


def test_headers_and_session_cookie(cw: ConsoleWorld):
    with cw.browser() as b:
        home = b.get(f"{cw.base}/")
        csp = home.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src" not in csp and "default-src 'none'" in csp
        assert home.headers["referrer-policy"] == "no-referrer"
        assert home.headers["x-frame-options"] == "DENY"
        signed = cw.sign_in(b, cw.admin)
        assert signed.url.path == "/admin"
        cookie = next(h for r in signed.history for h in r.headers.get_list("set-cookie") if "o365sync" in h)
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
        assert "secure" not in cookie.lower()  # localhost: plain HTTP


def test_admin_by_app_role_and_by_directory_role_rep_is_refused_admin_pages(cw: ConsoleWorld):
    with cw.browser() as admin, cw.browser() as admin_b, cw.browser() as rep:
        assert cw.sign_in(admin, cw.admin).url.path == "/admin"
        page_b = cw.sign_in(admin_b, cw.admin_b)
        assert page_b.url.path == "/admin" and cw.world.tenants[1].name in page_b.text
        assert cw.sign_in(rep, cw.rep).url.path == "/me"
        for path in ("/admin", "/admin/users", "/admin/blocklists", "/admin/runs", "/admin/consent"):
            assert rep.get(f"{cw.base}{path}").status_code == 403, path
        token = csrf_of(rep.get(f"{cw.base}/me").text)
        refused = rep.post(f"{cw.base}/admin/features", data={"csrf": token, "feature_teams": "on"})
        assert refused.status_code == 403
        assert "teams" not in load_tenant(cw.settings, cw.rep.tid).features


def test_posts_without_the_sessions_csrf_token_change_nothing(cw: ConsoleWorld):
    with cw.browser() as admin, cw.browser() as other:
        page = cw.sign_in(admin, cw.admin).text
        cw.sign_in(other, cw.admin)
        before = load_tenant(cw.settings, cw.admin.tid)
        for data in ({}, {"csrf": ""}, {"csrf": csrf_of(other.get(f"{cw.base}/admin").text)}):
            r = admin.post(
                f"{cw.base}/admin/policy",
                data={**data, "retention_days": "7", "offboarding": "retain", "offboarding_grace_days": "0"},
            )
            assert r.status_code == 403
        cross = admin.post(
            f"{cw.base}/admin/policy",
            data={"csrf": csrf_of(page), "retention_days": "7", "offboarding": "retain", "offboarding_grace_days": "0"},
            headers={"sec-fetch-site": "cross-site"},
        )
        assert cross.status_code == 403
        assert load_tenant(cw.settings, cw.admin.tid) == before
        ok = admin.post(
            f"{cw.base}/admin/policy",
            data={
                "csrf": csrf_of(page),
                "retention_days": "400",
                "offboarding": "delete",
                "offboarding_grace_days": "3",
            },
        )
        assert ok.status_code == 200 and ok.url.path == "/admin"
        assert load_tenant(cw.settings, cw.admin.tid).retention_days == 400


def test_admin_consent_is_bound_to_the_admins_session_and_tenant(cw: ConsoleWorld):
    with cw.browser() as admin:
        cw.sign_in(admin, cw.admin)
        start = admin.get(f"{cw.base}/admin/consent", follow_redirects=False)
        assert start.status_code == 302
        target = urlsplit(start.headers["location"])
        assert target.path == f"/{cw.admin.tid}/v2.0/adminconsent"
        q = dict(parse_qsl(target.query))
        assert q["scope"].split() == ["https://graph.microsoft.com/User.Read", "https://graph.microsoft.com/Mail.Read"]
        # A forged `tenant` in the answer is never believed.
        forged = admin.get(
            f"{cw.base}/auth/callback",
            params={"admin_consent": "True", "tenant": cw.admin_b.tid, "state": q["state"], "scope": q["scope"]},
        )
        assert forged.status_code == 403 and admin_consent_info(cw.settings, cw.admin.tid) == {}
        assert admin_consent_info(cw.settings, cw.admin_b.tid) == {}
        # The app-role admin holds no directory role: the simulated Entra refuses the tenant-wide grant.
        denied = admin.get(f"{cw.base}/admin/consent")
        assert denied.status_code == 403 and "cannot grant consent" in denied.text
    with cw.browser() as admin_b, cw.browser() as thief:
        cw.sign_in(admin_b, cw.admin_b)
        state = dict(
            parse_qsl(
                urlsplit(admin_b.get(f"{cw.base}/admin/consent", follow_redirects=False).headers["location"]).query
            )
        )["state"]
        cw.sign_in(thief, cw.admin)  # another session cannot complete it
        stolen = thief.get(
            f"{cw.base}/auth/callback", params={"admin_consent": "True", "tenant": cw.admin.tid, "state": state}
        )
        assert stolen.status_code == 400 and admin_consent_info(cw.settings, cw.admin.tid) == {}
        cw.running.identity.login_as(cw.admin_b.oid)  # the simulated browser session at Microsoft is admin B's again
        granted = admin_b.get(f"{cw.base}/admin/consent")
        assert granted.url.path == "/admin" and "Admin consent granted" in granted.text
        assert admin_consent_info(cw.settings, cw.admin_b.tid)["scopes"] == ["Mail.Read", "User.Read"]


def test_one_tenants_session_never_reaches_another_tenants_data(cw: ConsoleWorld):
    with cw.browser() as admin_b:
        cw.sign_in(admin_b, cw.admin_b)
        for path in ("/admin", "/admin/users", "/admin/runs", "/admin/blocklists", "/me", "/me/activities"):
            page = admin_b.get(f"{cw.base}{path}", params={"tenant": cw.admin.tid})
            assert cw.world.tenants[0].name not in page.text, path
            assert cw.admin.tid not in page.text and cw.rep.oid not in page.text, path
        token = csrf_of(admin_b.get(f"{cw.base}/admin").text)
        r = admin_b.post(f"{cw.base}/admin/users/offboard", data={"csrf": token, "oid": cw.rep.oid})
        assert r.status_code == 404 and cw.rep.oid not in offboarding_status(cw.settings, cw.rep.tid)


def test_sign_in_refused_for_unregistered_tenant_and_for_a_state_of_another_browser(cw: ConsoleWorld):
    with cw.browser() as b:
        r = cw.sign_in(b, cw.stranger)
        assert r.status_code == 403 and "not registered" in r.text
        assert b.get(f"{cw.base}/me").url.path == "/"
    with cw.browser() as victim, cw.browser() as attacker:
        cw.running.identity.login_as(cw.admin.oid)
        start = attacker.get(f"{cw.base}/signin", follow_redirects=False)
        answer = attacker.get(start.headers["location"], follow_redirects=False).headers["location"]
        r = victim.get(answer)  # login CSRF: the attacker's sign-in answer planted in the victim's browser
        assert r.status_code == 400 and victim.get(f"{cw.base}/me").url.path == "/"


def test_checked_identity_refuses_what_msal_no_longer_checks(cw: ConsoleWorld):
    tid = cw.admin.tid
    good = {
        "aud": cw.settings.client_id,
        "tid": tid,
        "oid": cw.admin.oid,
        "iss": f"https://x/{tid}/v2.0",
        "exp": 4_000_000_000,
        "roles": ["O365Sync.Admin"],
    }
    assert checked_identity(cw.settings, good).is_admin
    from o365sync.auth import SignInRefused

    for bad in (
        {"aud": "someone-else"},
        {"iss": f"https://x/{cw.admin_b.tid}/v2.0"},
        {"exp": 1},
        {"tid": cw.stranger.tid, "iss": f"https://x/{cw.stranger.tid}/v2.0"},
    ):
        with pytest.raises(SignInRefused):
            checked_identity(cw.settings, {**good, **bad})
    wids = {**good, "roles": [], "wids": ["9B895D92-2CD3-44C7-9D02-A6AC2D5EA5C3"]}
    assert checked_identity(cw.settings, wids).is_admin
    assert not checked_identity(cw.settings, {**good, "roles": ["Reader"], "wids": ["not-a-role"]}).is_admin


def test_rep_connects_then_a_new_feature_asks_for_reconsent_and_choices_save(cw: ConsoleWorld):
    with cw.browser() as rep, cw.browser() as admin:
        me = cw.sign_in(rep, cw.other_rep)
        assert "Connect Office 365" in me.text
        connected = rep.get(f"{cw.base}/connect", params={"tenant": cw.other_rep.tid, "login_hint": cw.other_rep.upn})
        assert connected.url.path == "/me" and "Office 365 connected" in connected.text
        assert connection_info(cw.settings, cw.other_rep.tid, cw.other_rep.oid)["scopes"]
        page = cw.sign_in(admin, cw.admin).text
        form = {"csrf": csrf_of(page), "feature_email": "on", "feature_calendar": "on", "feature_teams": "on"}
        saved = admin.post(f"{cw.base}/admin/features", data=form)
        assert "must reconnect" in saved.text
        assert load_tenant(cw.settings, cw.admin.tid).features == ["email", "calendar", "teams"]
        me = rep.get(f"{cw.base}/me").text
        assert 'id="reconsent"' in me and "Team.ReadBasic.All" in me
        rep.post(f"{cw.base}/me/preferences", data={"csrf": csrf_of(me), "notetaker": "on"})
        prefs = load_tenant(cw.settings, cw.admin.tid).preferences_for(cw.other_rep.oid)
        assert (prefs.calendar, prefs.internal_meetings) == (False, False)
        users = admin.get(f"{cw.base}/admin/users").text
        assert "re-consent needed" in users and f"login_hint={cw.other_rep.upn.replace('@', '%40')}" in users


def connect(cw: ConsoleWorld, user) -> None:  # noqa: ANN001
    """`user` connects Office 365 through the connect page (the simulated Microsoft signs them in)."""
    cw.running.identity.login_as(user.oid)
    with cw.browser() as b:
        r = b.get(f"{cw.base}/connect", params={"tenant": user.tid, "login_hint": user.upn})
        assert r.status_code == 200 and connection_info(cw.settings, user.tid, user.oid)["scopes"]


def test_rep_keeps_an_own_blocklist_and_an_admin_edits_any_of_their_tenants(cw: ConsoleWorld):
    connect(cw, cw.rep)
    with cw.browser() as rep, cw.browser() as admin, cw.browser() as admin_b:
        token = csrf_of(cw.sign_in(rep, cw.rep).text)
        added = rep.post(
            f"{cw.base}/me/blocklist", data={"csrf": token, "entries": "Friend.Example, a@b.example", "action": "add"}
        )
        assert added.url.path == "/me" and "friend.example" in added.text
        assert load_tenant(cw.settings, cw.rep.tid).user_blocklists[cw.rep.oid] == ["a@b.example", "friend.example"]
        before = load_tenant(cw.settings, cw.rep.tid)
        bad = rep.post(f"{cw.base}/me/blocklist", data={"csrf": token, "entries": "ok.example nope@", "action": "add"})
        assert bad.status_code == 400 and "not an address or domain: 'nope@'" in html.unescape(bad.text)
        assert rep.post(f"{cw.base}/me/blocklist", data={"entries": "x.example", "action": "add"}).status_code == 403
        assert load_tenant(cw.settings, cw.rep.tid) == before  # nothing changed by either
        rep.post(f"{cw.base}/me/blocklist", data={"csrf": token, "entries": "a@b.example", "action": "remove"})
        assert load_tenant(cw.settings, cw.rep.tid).user_blocklists[cw.rep.oid] == ["friend.example"]
        # The rep cannot edit someone else's list through the admin form.
        assert rep.post(f"{cw.base}/admin/blocklists", data={"csrf": token, "user": cw.admin.oid}).status_code == 403

        page = cw.sign_in(admin, cw.admin).text
        form = {"csrf": csrf_of(page), "user": cw.rep.oid, "entries": "rival.example", "action": "add"}
        assert admin.post(f"{cw.base}/admin/blocklists", data=form).url.path == "/admin/blocklists"
        tenant = load_tenant(cw.settings, cw.rep.tid)
        assert tenant.user_blocklists[cw.rep.oid] == ["friend.example", "rival.example"] and not tenant.blocklist
        bad = admin.post(f"{cw.base}/admin/blocklists", data={**form, "entries": "not a domain!"})
        assert bad.status_code == 400 and "not an address or domain" in bad.text
        assert load_tenant(cw.settings, cw.rep.tid) == tenant

        token_b = csrf_of(cw.sign_in(admin_b, cw.admin_b).text)
        foreign = admin_b.post(
            f"{cw.base}/admin/blocklists",
            data={"csrf": token_b, "user": cw.rep.oid, "entries": "x.example", "action": "add"},
        )
        assert foreign.status_code == 404
        assert load_tenant(cw.settings, cw.rep.tid) == tenant
        assert cw.rep.oid not in load_tenant(cw.settings, cw.admin_b.tid).user_blocklists
        page = admin.get(f"{cw.base}/admin/blocklists").text
        assert 'id="user-block"' in page and "rival.example" in page
        wide = admin.post(
            f"{cw.base}/admin/blocklists", data={"csrf": csrf_of(page), "entries": "@Spam.Example", "action": "add"}
        )
        assert wide.url.path == "/admin/blocklists" and 'id="blocklist"><li>spam.example</li>' in wide.text
        assert load_tenant(cw.settings, cw.rep.tid).blocklist == ["spam.example"]


def test_admin_readmits_an_offboarded_user_of_their_own_tenant_only(cw: ConsoleWorld):
    connect(cw, cw.rep)
    with cw.browser() as admin, cw.browser() as admin_b:
        token = csrf_of(cw.sign_in(admin, cw.admin).text)
        admin.post(f"{cw.base}/admin/users/offboard", data={"csrf": token, "oid": cw.rep.oid})
        assert cw.rep.oid in offboarding_status(cw.settings, cw.rep.tid)
        users = admin.get(f"{cw.base}/admin/users").text
        assert "/admin/users/readmit" in users
        assert admin.post(f"{cw.base}/admin/users/readmit", data={"oid": cw.rep.oid}).status_code == 403
        token_b = csrf_of(cw.sign_in(admin_b, cw.admin_b).text)
        foreign = admin_b.post(f"{cw.base}/admin/users/readmit", data={"csrf": token_b, "oid": cw.rep.oid})
        assert foreign.status_code == 404 and cw.rep.oid in offboarding_status(cw.settings, cw.rep.tid)
        done = admin.post(f"{cw.base}/admin/users/readmit", data={"csrf": token, "oid": cw.rep.oid})
        assert done.url.path == "/admin/users" and "User readmitted" in done.text
        assert cw.rep.oid not in offboarding_status(cw.settings, cw.rep.tid)
        connect(cw, cw.rep)  # they can connect again
        again = admin.post(f"{cw.base}/admin/users/readmit", data={"csrf": token, "oid": cw.rep.oid})
        assert again.status_code == 409 and "not offboarded" in again.text


@pytest.fixture(scope="module")
def cal(tmp_path_factory):
    """A world with calendars: the first tenant imports meetings; its two reps are connected and synced."""
    from o365sync.sync.calendar import sync_calendar_now
    from o365sync.tenant_context import resolve_tenant
    from o365sync.tenants import save_tenant
    from tasks.crm_snapshot import refresh_crm_snapshot

    tmp = tmp_path_factory.mktemp("console-cal")
    world = stand_up_console(tmp, messages=5, calendars=True)
    tid = world.rep.tid
    tenant = load_tenant(world.settings, tid)
    save_tenant(world.settings, tenant.model_copy(update={"features": ["email", "calendar"]}))
    for user in (world.rep, world.other_rep):
        connect(world, user)
    refresh_crm_snapshot(world.settings, tid)
    for user in (world.rep, world.other_rep):
        sync_calendar_now(resolve_tenant(world.settings, tid), user.oid)
    yield world
    tear_down(world, tmp)


def stored_meetings(cw: ConsoleWorld, oid: str) -> set[str]:
    from o365sync.store import open_store

    with open_store(cw.settings, cw.rep.tid, write=False) as con:
        rows = con.execute("SELECT event_id FROM meetings WHERE user_oid = ?", [oid]).fetchall()
    return {r[0] for r in rows}


def test_rep_exports_and_deletes_own_meetings_but_never_anothers(cal: ConsoleWorld):
    mine, theirs = stored_meetings(cal, cal.rep.oid), stored_meetings(cal, cal.other_rep.oid)
    assert mine and theirs, "the simulated calendars hold customer meetings for both reps"
    with cal.browser() as rep:
        cal.sign_in(rep, cal.rep)
        page = rep.get(f"{cal.base}/me/activities").text
        token = csrf_of(page)
        eid = sorted(mine)[0]
        assert 'id="meetings"' in page and html.escape(eid) in page
        exported = rep.post(
            f"{cal.base}/me/activities/export", data={"csrf": token, "kind": "meeting", "id": eid, "format": "json"}
        )
        assert exported.status_code == 200 and exported.headers["content-type"].startswith("application/json")
        assert 'filename="meeting.json"' in exported.headers["content-disposition"]
        assert eid in exported.text
        other = sorted(theirs)[0]
        for action in ("export", "delete"):
            r = rep.post(
                f"{cal.base}/me/activities/{action}",
                data={"csrf": token, "kind": "meeting", "id": other, "format": "json"},
            )
            assert r.status_code == 404, action
        assert stored_meetings(cal, cal.other_rep.oid) == theirs
        deleted = rep.post(f"{cal.base}/me/activities/delete", data={"csrf": token, "kind": "meeting", "id": eid})
        assert deleted.url.path == "/me/activities" and 'id="deleted"' in deleted.text
        assert stored_meetings(cal, cal.rep.oid) == mine - {eid}
        gone = rep.post(
            f"{cal.base}/me/activities/export", data={"csrf": token, "kind": "meeting", "id": eid, "format": "json"}
        )
        assert gone.status_code == 404
