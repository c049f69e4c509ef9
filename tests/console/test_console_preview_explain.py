"""Preview and explain in the console, in a real Chromium against the simulated world: a rep connects (their import
runs), the admin clicks "Preview import" for that rep and sees the counts the import stored; the rep clicks
"Explain" on a captured conversation and sees why it was imported. Both are CSRF-checked POST forms, rendered on
the server."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from app.import_trigger import IN_PROCESS
from o365sync.store import open_store
from tests.console.world import ConsoleWorld, console_world
from tests.test_import_now import poll

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")


@pytest.fixture
def cw(tmp_path_factory):
    yield from console_world(tmp_path_factory, "console-preview", messages=40, import_on_connect=True)


@pytest.mark.skipif(CHROMIUM is None, reason="needs the machine's chromium (apt-get install -y chromium)")
def test_admin_previews_a_users_import_and_a_rep_explains_an_activity(cw: ConsoleWorld, tmp_path: Path) -> None:
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    sim, tid, rep, admin = cw.running.identity, cw.admin.tid, cw.rep, cw.admin
    expect = playwright.expect
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # ---- the rep connects; the import the connect starts runs to its end
            r = browser.new_context(ignore_https_errors=True).new_page()
            sim.login_as(rep.oid)
            r.goto(f"{cw.base}/signin")
            expect(r).to_have_url(f"{cw.base}/me")
            r.click("#connect")
            expect(r.locator(".notice").first).to_contain_text("Office 365 connected")  # the import has started
            poll(lambda: IN_PROCESS.running(tid, rep.oid), lambda running: not running, 180, "the import did not end")
            r.goto(f"{cw.base}/me")
            expect(r.locator("#sync-state")).to_contain_text("idle")
            with open_store(cw.settings, tid, write=False) as con:
                stored = con.execute("SELECT count(*) FROM emails WHERE user_oid = ?", [rep.oid]).fetchall()[0][0]
            assert stored > 0

            # ---- the admin previews the rep's import: the counts are what the import stored
            a = browser.new_context(ignore_https_errors=True).new_page()
            sim.login_as(admin.oid)
            a.goto(f"{cw.base}/signin")
            a.goto(f"{cw.base}/admin/users")
            a.locator(f"#user-{rep.oid}").get_by_role("button", name="Preview import").click()
            # the preview runs beside the request; its page reloads itself until the counts are there
            expect(a).to_have_url(f"{cw.base}/admin/users/preview?oid={rep.oid}")
            expect(a.locator("h1")).to_have_text("Import preview")
            expect(a.locator("#preview-user")).to_contain_text(f"{stored} emails", timeout=60_000)
            matched = a.locator("#preview-reason tr", has_text="matched").first
            expect(matched.locator("td").nth(1)).to_have_text(str(stored))
            assert a.locator("#preview-kind tbody tr").count() >= 1
            assert a.locator("#preview-month tbody tr").count() >= 1
            expect(a.locator("#preview-accounts tbody tr td").nth(1)).to_have_text(re.compile(r"^\d+$"))
            expect(a.locator("body")).to_contain_text("Estimated import time")
            a.screenshot(path=str(shots / "preview.png"), full_page=True)
            a.click("#preview-again")  # a new run of the same user's preview, the same counts
            expect(a.locator("#preview-user")).to_contain_text(f"{stored} emails", timeout=60_000)
            # another tenant's user is no user of this admin's, by form or by link
            other = cw.admin_b.oid
            assert a.goto(f"{cw.base}/admin/users/preview?oid={other}").status == 404

            # ---- the rep explains a captured conversation
            r.goto(f"{cw.base}/me/activities")
            r.locator("#conversations tbody tr").first.get_by_role("button", name="Explain").click()
            expect(r.locator("#explanation")).to_contain_text("decision: matched")
            expect(r.locator("#explanation")).to_contain_text("primary: ")
            expect(r.locator("#explanation")).to_contain_text("stored now: yes")
            r.screenshot(path=str(shots / "explain.png"))

            # ---- the rep previews their own import from their page
            r.goto(f"{cw.base}/me")
            r.click("#preview")
            expect(r).to_have_url(f"{cw.base}/me/preview")
            expect(r.locator("#preview-user")).to_contain_text(f"{stored} emails", timeout=60_000)

            # ---- a rep cannot preview another user; both forms are refused without the session's CSRF token
            csrf = r.locator('input[name="csrf"]').first.input_value()
            theirs = {"csrf": csrf, "oid": cw.other_rep.oid}
            assert r.request.post(f"{cw.base}/admin/users/preview", form=theirs).status == 403
            for page, path, form in (
                (a, "/admin/users/preview", {"oid": rep.oid}),
                (r, "/me/activities/explain", {"kind": "conversation", "id": "x"}),
            ):
                assert page.request.post(f"{cw.base}{path}", form=form).status == 403
        finally:
            browser.close()
