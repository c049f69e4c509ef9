"""The console in a real Chromium (Playwright, the machine's `chromium`) against the simulated world: an admin signs in,
grants admin consent, turns Teams on; a rep connects, sees the import progress, opts out of calendar import, exports
and deletes a conversation, signs out; a rep cannot open admin pages or another user's data; another tenant's session
cannot reach this tenant's pages; CSRF-less posts are refused; no page, cookie or log line carries unmatched mail,
tokens or codes.

Screenshots of each page are written to a temporary folder; with CONSOLE_SCREENSHOTS=<dir> (the repo keeps
them in docs/console/) they are written there."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from o365sync.store import open_store
from o365sync.store.sync_state import record_sync_state
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import load_tenant
from simulators.identity import GLOBAL_ADMINISTRATOR
from tests.console.world import ConsoleWorld, stand_up_console, tear_down

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # Handler.handle holds the handler's lock
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def cw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-browser")
    world = stand_up_console(tmp, messages=60, import_on_connect=True)
    yield world
    tear_down(world, tmp)


@pytest.mark.skipif(CHROMIUM is None, reason="needs the machine's chromium (apt-get install -y chromium)")
def test_the_whole_console_path_in_chromium(cw: ConsoleWorld, tmp_path: Path) -> None:
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    log = Captured()
    logging.getLogger().addHandler(log)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    seen: list[str] = []  # every page's HTML
    sim, tid, rep, admin = cw.running.identity, cw.admin.tid, cw.rep, cw.admin
    sim.set_tenant_policy(tid, user_consent=False)  # this organisation lets only admins consent
    sim.assign_directory_role(admin.oid, GLOBAL_ADMINISTRATOR)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            contexts = []

            def new_page():  # noqa: ANN202
                context = browser.new_context(ignore_https_errors=True, viewport={"width": 1100, "height": 760})
                contexts.append(context)
                return context.new_page()

            def shot(page, name: str) -> None:  # noqa: ANN001
                seen.append(page.content())
                page.screenshot(path=str(shots / f"{name}.png"))

            expect = playwright.expect
            # ---- the admin signs in, grants admin consent, turns Teams (and calendar) on, grants again
            a = new_page()
            a.goto(f"{cw.base}/")
            shot(a, "sign-in")
            sim.login_as(admin.oid)
            a.click("#signin")
            expect(a).to_have_url(f"{cw.base}/admin")
            a.click("#grant-consent")
            expect(a.locator("#consented")).to_be_visible()
            a.check("#feature-teams")
            a.check("#feature-calendar")
            a.click("#save-features")
            assert load_tenant(cw.settings, tid).features == ["email", "calendar", "teams"]
            a.click("#grant-consent")  # the new features' permissions, for the whole organisation
            expect(a.locator("#consented")).to_be_visible()
            expect(a.locator("#grant-consent")).to_have_count(0)
            shot(a, "admin")

            # ---- a rep: refused by Microsoft until the admin consented (done above), connects, sees the import
            r = new_page()
            sim.login_as(rep.oid)
            r.goto(f"{cw.base}/")
            r.click("#signin")
            expect(r).to_have_url(f"{cw.base}/me")
            with resolve_tenant(cw.settings, tid).sync_locks(["email"]):  # a sync of the tenant is running:
                r.click("#connect")  # the import the connect starts waits for it
                expect(r.locator(".notice").first).to_contain_text("Office 365 connected")
                with open_store(cw.settings, tid, write=True) as con:  # what that sync shows while it runs
                    record_sync_state(con, tid, rep.oid, "syncing")
                r.goto(f"{cw.base}/me")
                expect(r.locator("#progress")).to_contain_text("Import in progress")
                assert r.locator('meta[http-equiv="refresh"]').count() == 1
            # the lock is free: the import started by the connect runs and ends; the page stops refreshing itself
            expect(r.locator("#sync-state")).to_contain_text("idle", timeout=120_000)
            assert r.locator("#progress").count() == 0
            shot(r, "me")

            # ---- opts out of calendar import
            r.uncheck("#pref-calendar")
            r.click("#preferences button")
            expect(r.locator(".notice").first).to_contain_text("saved")
            assert load_tenant(cw.settings, tid).preferences_for(rep.oid).calendar is False

            # ---- exports, then deletes a conversation
            r.goto(f"{cw.base}/me/activities")
            rows = r.locator("#conversations tbody tr")
            before = rows.count()
            assert before > 0
            shot(r, "activities")
            conversation = r.locator("#conversations tbody tr").first.locator('input[name="id"]').first.input_value()
            with r.expect_download() as download:
                r.locator("#conversations tbody tr").first.get_by_role("button", name="Export JSON").click()
            exported = json.loads(Path(download.value.path()).read_text())
            assert exported["conversation_id"] == conversation and exported["user_oid"] == rep.oid
            r.locator("#conversations tbody tr").first.get_by_role("button", name="Delete").click()
            expect(r.locator("#deleted")).to_be_visible()
            assert r.locator("#conversations tbody tr").count() == before - 1
            with open_store(cw.settings, tid, write=False) as con:
                left = con.execute(
                    "SELECT count(*) FROM emails WHERE user_oid = ? AND conversation_id = ?", [rep.oid, conversation]
                ).fetchall()[0][0]
            assert left == 0

            # ---- a rep cannot open admin pages, another user's data, or post without the CSRF token
            for path in ("/admin", "/admin/users", "/admin/runs"):
                reply = r.goto(f"{cw.base}{path}")
                assert reply is not None and reply.status == 403
            csrf = r.locator('input[name="csrf"]').first.input_value()
            theirs = next(m.conversation_id for m in cw.world.mailboxes[cw.other_rep.oid] if m.conversation_id)
            other = r.request.post(
                f"{cw.base}/me/activities/export", form={"csrf": csrf, "kind": "conversation", "id": theirs}
            )
            assert other.status == 404
            for path, form in (
                ("/me/preferences", {"calendar": "on"}),
                ("/me/activities/delete", {"kind": "conversation", "id": conversation}),
            ):
                assert r.request.post(f"{cw.base}{path}", form=form).status == 403
            assert load_tenant(cw.settings, tid).preferences_for(rep.oid).calendar is False

            # ---- the admin's other pages
            for path, name in (("/admin/users", "users"), ("/admin/blocklists", "blocklists"), ("/admin/runs", "runs")):
                a.goto(f"{cw.base}{path}")
                shot(a, name)
            expect(a.locator("#runs")).to_contain_text("Email sync")

            # ---- another tenant's admin sees only their own organisation
            b = new_page()
            sim.login_as(cw.admin_b.oid)
            b.goto(f"{cw.base}/signin")
            for path in ("/admin", "/admin/users", "/admin/runs", f"/admin/users?tenant={tid}"):
                b.goto(f"{cw.base}{path}")
                html = b.content()
                seen.append(html)
                assert rep.upn not in html and tid not in html and cw.world.tenants[0].name not in html

            # ---- the rep signs out
            r.goto(f"{cw.base}/me")
            r.click("#signout")
            expect(r.locator("h1")).to_have_text("Signed out")
            r.goto(f"{cw.base}/me")
            expect(r).to_have_url(f"{cw.base}/")

            cookies = [c for context in contexts for c in context.cookies()]
            browser.close()
    finally:
        logging.getLogger().removeHandler(log)
        logging.getLogger().setLevel(old_level)

    # ---- privacy: no page, cookie or log line carries unmatched mail, tokens or codes
    expected = cw.world.expected_matches(tid)
    matched_subjects = {m.subject for m in cw.world.mailboxes[rep.oid] if (rep.oid, m.id) in expected}
    unmatched = [m for m in cw.world.mailboxes[rep.oid] if (rep.oid, m.id) not in expected]
    markers = {m.subject for m in unmatched if m.subject and m.subject not in matched_subjects and len(m.subject) > 12}
    markers |= {m.body[:40] for m in unmatched if len(m.body) > 40}
    assert markers
    secrets = ("SIM-RT", "SIM-CODE", cw.settings.client_secret.get_secret_value(), "code_verifier", "access_token")
    session = [c for c in cookies if c["name"] == "o365sync_session"]
    assert session and all(c["httpOnly"] and c["sameSite"] == "Lax" for c in session)
    for cookie in session:
        payload = json.loads(base64.b64decode(cookie["value"].split(".")[0] + "=="))
        assert set(payload) <= {"tid", "oid", "upn", "name", "admin", "csrf", "at", "login_state"}
    everything = "\n".join(seen + log.lines + [c["value"] for c in cookies])
    for text in (*markers, *secrets):
        assert text not in everything, text[:30]
    assert not any("code=" in line for line in log.lines)
