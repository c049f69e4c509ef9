"""The console's pages and actions. Every page takes the tenant from the session, never from the URL or a form, so no
page of one tenant can be reached from another tenant's session; a rep's pages take the user from the session too.
Actions are POST forms with the session's CSRF token; the two that leave for Microsoft (sign in, grant consent) are
GET links, since `form-action 'self'` would block a form whose answer redirects there."""

from __future__ import annotations

import functools
import io
import logging
import secrets
import shutil
import zipfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from app.console import data
from app.console.previews import Previews
from app.console.security import CONSOLE_HEADERS, CsrfRefused, Who, checked_form, start_session, who
from o365sync.auth import (
    AuthError,
    PendingSignIns,
    SignedIn,
    SignInRefused,
    admin_consent_info,
    admin_consent_url,
    begin_sign_in,
    complete_sign_in,
    record_admin_consent,
)
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig, TenantNotFound, change_blocklist, load_tenant, save_tenant

log = logging.getLogger("o365sync.console")
HERE = Path(__file__).parent
Handler = Callable[[Request, Who], Awaitable[Response]]

# Fixed sentences for a failed sign-in or consent (never the caller's text or a raw code).
SIGN_IN_FAILED = {
    "tenant_not_onboarded": "Your organisation is not registered with this service. Ask your administrator.",
    "access_denied": "Access was not granted: your organisation lets only an administrator approve this app. "
    "Ask your administrator to grant consent for the organisation, then sign in again.",
    "expired_link": "This sign-in expired or was started in another browser. Sign in again.",
    "unavailable": "Microsoft's sign-in service is unavailable right now. Try again in a few minutes.",
}
CONSENT_FAILED = {
    "permission_denied": "Consent was not granted: your account cannot grant consent for the organisation, or the "
    "request was cancelled. A Global, Privileged Role, Cloud Application or Application Administrator can.",
    "consent_required": "Consent was declined, so nothing changed.",
    "other_tenant": "Consent came back for another organisation than yours, so it was not recorded.",
}


def _templates() -> Jinja2Templates:
    # autoescape=True for every template (Starlette's default escapes only .html/.htm/.xml names).
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.globals["feature_names"] = data.FEATURE_NAMES
    return Jinja2Templates(env=env)


def _when(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return str(value).replace("T", " ").replace("+00:00", " UTC") if value else "never"


class Console:
    """The console's routes and the state they share (sign-ins and admin consents in progress)."""

    def __init__(self, settings: Settings, rate_limit: Any = None):
        self.settings = settings
        self.rate_limit = rate_limit  # app.web.ConnectRateLimit: starting a sign-in needs no login, so it is bounded
        self.sign_ins = PendingSignIns()
        self.consents = PendingSignIns()
        self.templates = _templates()
        self.templates.env.filters["when"] = _when
        self.previews = Previews(functools.partial(data.preview_user_report, settings))

    # ------------------------------------------------------------------ plumbing
    def page(self, request: Request, name: str, person: Who | None, status: int = 200, **context: Any) -> Response:
        return self.templates.TemplateResponse(
            request, name, {"who": person, **context}, status_code=status, headers=CONSOLE_HEADERS
        )

    def message(self, request: Request, title: str, text: str, status: int, person: Who | None = None) -> Response:
        return self.page(request, "message.html", person, status, title=title, text=text)

    def signed_in(self, handler: Handler, admin: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """Only for a signed-in person of a registered tenant (admins only with `admin`); a POST also needs the
        session's CSRF token."""

        async def endpoint(request: Request) -> Response:
            person = who(request)
            if person is None:
                if request.method == "GET":
                    return RedirectResponse("/", status_code=303)
                return self.message(request, "Signed out", "Your session ended. Sign in again.", 401)
            try:
                await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
            except TenantNotFound:
                request.session.clear()
                return self.message(request, "Organisation not registered", SIGN_IN_FAILED["tenant_not_onboarded"], 403)
            if admin and not person.admin:
                return self.message(
                    request, "Administrators only", "This page is for your organisation's administrators.", 403, person
                )
            if request.method == "POST":
                try:
                    request.state.form = await checked_form(request, person)
                except CsrfRefused:
                    log.warning("console: form refused without a valid CSRF token: %s", request.url.path)
                    return self.message(
                        request, "Request refused", "This form expired. Reload the page and try again.", 403, person
                    )
            return await handler(request, person)

        return endpoint

    def routes(self) -> list[BaseRoute]:
        a = lambda h: self.signed_in(h, admin=True)  # noqa: E731
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/signin", self.sign_in, methods=["GET"]),
            Route("/signout", self.signed_in(self.sign_out), methods=["POST"]),
            Route("/me", self.signed_in(self.me), methods=["GET"]),
            Route("/me/preferences", self.signed_in(self.my_preferences), methods=["POST"]),
            Route("/me/blocklist", self.signed_in(self.my_blocklist), methods=["POST"]),
            Route("/me/activities", self.signed_in(self.my_activities), methods=["GET"]),
            Route("/me/activities/export", self.signed_in(self.export), methods=["POST"]),
            Route("/me/activities/delete", self.signed_in(self.delete), methods=["POST"]),
            Route("/me/activities/explain", self.signed_in(self.explain), methods=["POST"]),
            Route("/me/preview", self.signed_in(self.my_preview), methods=["GET", "POST"]),
            Route("/admin", a(self.admin), methods=["GET"]),
            Route("/admin/consent", a(self.grant_consent), methods=["GET"]),
            Route("/admin/features", a(self.set_features), methods=["POST"]),
            Route("/admin/policy", a(self.set_policy), methods=["POST"]),
            Route("/admin/users", a(self.users), methods=["GET"]),
            Route("/admin/users/offboard", a(self.offboard), methods=["POST"]),
            Route("/admin/users/readmit", a(self.readmit), methods=["POST"]),
            Route("/admin/users/preview", a(self.user_preview), methods=["GET", "POST"]),
            Route("/admin/blocklists", a(self.blocklists), methods=["GET", "POST"]),
            Route("/admin/runs", a(self.runs), methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # ------------------------------------------------------------------ sign-in, callback, sign-out
    async def home(self, request: Request) -> Response:
        person = who(request)
        if person is not None:
            return RedirectResponse("/admin" if person.admin else "/me", status_code=303)
        return self.page(request, "home.html", None)

    async def sign_in(self, request: Request) -> Response:
        if self.rate_limit is not None:
            retry = self.rate_limit.retry_after(request.client.host if request.client else None)
            if retry is not None:
                return self.message(request, "Too many attempts", f"Wait {retry} seconds, then sign in again.", 429)
        try:
            hint = request.query_params.get("login_hint") or None
            url, state = await run_in_threadpool(begin_sign_in, self.settings, self.sign_ins, hint)
        except AuthError as exc:
            log.warning("console sign-in could not start: %s", exc)
            return self.message(request, "Try again later", SIGN_IN_FAILED["unavailable"], 503)
        request.session.clear()
        request.session["login_state"] = state  # the callback must come back to this browser (login CSRF)
        return RedirectResponse(url, status_code=302, headers=CONSOLE_HEADERS)

    def owns(self, state: str) -> bool:
        return self.sign_ins.holds(state) or self.consents.holds(state)

    def callback(self, request: Request) -> Response:
        """The OAuth redirect of a console sign-in or an admin consent (the connect flow's states are not ours).
        Sync: MSAL's I/O runs in Starlette's thread pool."""
        query = dict(request.query_params)
        state = query.get("state", "")
        if self.consents.holds(state):
            return self._consent_came_back(request, query)
        if request.session.pop("login_state", None) != state:
            self.sign_ins.pop(state)
            return self.message(request, "Sign-in expired", SIGN_IN_FAILED["expired_link"], 400)
        try:
            person: SignedIn = complete_sign_in(self.settings, query, self.sign_ins)
        except SignInRefused as exc:
            log.info("console sign-in refused: %s", exc)
            return self.message(request, "Not signed in", SIGN_IN_FAILED["tenant_not_onboarded"], 403)
        except AuthError as exc:
            from app.web import case_of  # the connect pages' classification of the same errors

            case = case_of(exc)
            ref = secrets.token_hex(4)
            log.info("console sign-in failed: case=%s ref=%s %s", case, ref, exc)
            text = SIGN_IN_FAILED.get(case, f"The sign-in could not be completed. Try again; reference {ref}.")
            return self.message(request, "Not signed in", text, 403 if case == "access_denied" else 400)
        start_session(request, person)
        log.info("console sign-in: tenant=%s user=%s admin=%s", person.tenant_id, person.oid, person.is_admin)
        return RedirectResponse("/admin" if person.is_admin else "/me", status_code=303)

    def _consent_came_back(self, request: Request, query: dict[str, str]) -> Response:
        entry = self.consents.pop(query.get("state", ""))
        person = who(request)
        # The state is bound to the admin's session; the tenant is the session's, never the `tenant` parameter.
        if entry is None or person is None or not person.admin or entry.flow.get("admin") != person.oid:
            return self.message(request, "Consent link expired", "Start again from the console.", 400, person)
        if entry.tenant_id != person.tenant_id:
            return self.message(request, "Consent link expired", "Start again from the console.", 400, person)
        if query.get("error"):
            case = query["error"] if query["error"] in CONSENT_FAILED else "permission_denied"
            log.info("console admin consent not granted: tenant=%s case=%s", person.tenant_id, case)
            return self.message(request, "Consent not granted", CONSENT_FAILED[case], 403, person)
        if query.get("admin_consent", "").lower() != "true" or query.get("tenant", "").lower() != person.tenant_id:
            log.warning("console admin consent for another tenant refused: session tenant=%s", person.tenant_id)
            return self.message(request, "Consent not recorded", CONSENT_FAILED["other_tenant"], 403, person)
        granted = query.get("scope", "").split() or entry.scopes
        record_admin_consent(self.settings, person.tenant_id, granted, person.oid)
        log.info("console admin consent recorded: tenant=%s by=%s", person.tenant_id, person.oid)
        return RedirectResponse("/admin?consented=1", status_code=303)

    def same_user(self, request: Request, tenant_id: str, oid: str) -> bool:
        person = who(request)
        return person is not None and (person.tenant_id, person.oid) == (tenant_id, oid)

    async def sign_out(self, request: Request, person: Who) -> Response:
        request.session.clear()
        logout = (
            f"{self.settings.authority.rstrip('/')}/oauth2/v2.0/logout?"
            f"post_logout_redirect_uri={data.base_url(self.settings)}/"
        )
        return self.page(request, "signed_out.html", None, logout=logout)

    # ------------------------------------------------------------------ rep pages
    async def me(self, request: Request, person: Who, error: str = "") -> Response:
        tenant = await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
        me = await run_in_threadpool(data.user_view, self.settings, tenant, person.oid)
        return self.page(
            request,
            "me.html",
            person,
            tenant=tenant,
            me=me,
            prefs=tenant.preferences_for(person.oid),
            connect=data.connect_link(self.settings, tenant.id, person.upn),
            saved=request.query_params.get("saved"),
            connected=request.query_params.get("connected"),
            blocklist=tenant.user_blocklists.get(person.oid, []),
            error=error,
            status=400 if error else 200,
        )

    async def my_preferences(self, request: Request, person: Who) -> Response:
        form = request.state.form
        changes = {k: form.get(k) == "on" for k in ("calendar", "internal_meetings", "notetaker")}

        def save() -> None:
            tenant = load_tenant(self.settings, person.tenant_id)
            tenant.user_preferences[person.oid] = tenant.preferences_for(person.oid).model_copy(update=changes)
            save_tenant(self.settings, tenant)

        await run_in_threadpool(save)
        return RedirectResponse("/me?saved=1", status_code=303)

    async def my_activities(self, request: Request, person: Who) -> Response:
        conversations, meetings = await run_in_threadpool(
            data.my_activities, self.settings, person.tenant_id, person.oid
        )
        return self.page(
            request,
            "activities.html",
            person,
            conversations=conversations,
            meetings=meetings,
            done=request.query_params.get("done"),
        )

    async def export(self, request: Request, person: Who) -> Response:
        from o365sync.conversations import export_conversation, export_meeting

        form = request.state.form
        kind, key, fmt = str(form.get("kind", "")), str(form.get("id", "")), str(form.get("format", "json"))

        def run() -> tuple[str, bytes, str] | None:
            try:
                if kind == "meeting":
                    result = export_meeting(self.settings, person.tenant_id, event_id=key, user_oid=person.oid)
                elif kind == "conversation":
                    result = export_conversation(
                        self.settings, person.tenant_id, conversation_id=key, user_oid=person.oid, eml=fmt == "eml"
                    )
                else:
                    return None
            except (LookupError, ValueError):
                return None
            try:  # the download is the export: nothing of it stays on the server
                if fmt == "eml" and kind == "conversation":
                    buffer = io.BytesIO()
                    with zipfile.ZipFile(buffer, "w") as archive:
                        for eml in sorted((result.path / "messages").glob("*.eml")):
                            archive.writestr(eml.name, eml.read_bytes())
                    return "conversation.zip", buffer.getvalue(), "application/zip"
                name = "meeting.json" if kind == "meeting" else "conversation.json"
                return name, (result.path / name).read_bytes(), "application/json"
            finally:
                shutil.rmtree(result.path, ignore_errors=True)

        out = await run_in_threadpool(run)
        if out is None:
            return self.message(request, "Nothing matched", "This item is not (or no longer) stored.", 404, person)
        name, body, media = out
        return Response(
            body, media_type=media, headers={**CONSOLE_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'}
        )

    async def delete(self, request: Request, person: Who) -> Response:
        from o365sync.erasure import ErasureError, Scope, erase

        form = request.state.form
        kind, key = str(form.get("kind", "")), str(form.get("id", ""))
        scopes = {"conversation": Scope.conversation, "meeting": Scope.meeting}
        if kind not in scopes or not key:
            return self.message(request, "Nothing matched", "This item is not (or no longer) stored.", 404, person)

        def run() -> bool:
            try:
                erase(
                    self.settings,
                    person.tenant_id,
                    scopes[kind](key, user_oid=person.oid),
                    actor=f"console:{person.oid}",
                    reason="user_request",
                )
            except LookupError:
                return False
            return True

        try:
            found = await run_in_threadpool(run)
        except ErasureError:
            return self.message(request, "Not finished", "The deletion did not finish. Try again.", 500, person)
        if not found:
            return self.message(request, "Nothing matched", "This item is not (or no longer) stored.", 404, person)
        return RedirectResponse("/me/activities?done=deleted", status_code=303)

    async def explain(self, request: Request, person: Who) -> Response:
        """Why one of the rep's stored activities was imported, decided again now (`o365sync explain`): a meeting by
        its event id, a conversation by its latest stored message."""
        form = request.state.form
        kind, key = str(form.get("kind", "")), str(form.get("id", ""))
        lines = await run_in_threadpool(data.explain_activity, self.settings, person.tenant_id, person.oid, kind, key)
        if lines is None:
            return self.message(request, "Nothing matched", "This item is not (or no longer) stored.", 404, person)
        if isinstance(lines, str):
            return self.message(request, "Cannot explain now", lines, 409, person)
        return self.page(request, "explain.html", person, lines=lines)

    async def my_preview(self, request: Request, person: Who) -> Response:
        return self._preview(request, person, person.oid, "/me/preview", "/me")

    def _preview(self, request: Request, person: Who, oid: str, here: str, back: str) -> Response:
        """POST starts a preview of `oid`'s import (`o365sync preview`: counts only) beside the request and sends
        the browser to `here`; GET shows it running (the page reloads itself) or its counts."""
        if request.method == "POST":
            self.previews.start(person.tenant_id, oid)
            return RedirectResponse(here, status_code=303)
        run = self.previews.get(person.tenant_id, oid)
        if run is None:
            return RedirectResponse(back, status_code=303)
        form = {"action": here.partition("?")[0], "oid": oid if back != "/me" else None}
        if not run.finished.is_set():
            return self.page(request, "preview_running.html", person, run=run, form=form)
        if isinstance(run.result, str) or run.result is None:
            return self.message(request, "No preview", run.result or "", 409, person)
        return self.page(
            request, "preview.html", person, run=run, form=form, report=run.result, **data.preview_tables(run.result)
        )

    # ------------------------------------------------------------------ admin pages
    async def admin(self, request: Request, person: Who) -> Response:
        tenant = await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
        users, crm = await run_in_threadpool(data.users_view, self.settings, tenant)
        consent = admin_consent_info(self.settings, tenant.id)
        required = data.required_scopes(tenant)
        return self.page(
            request,
            "admin.html",
            person,
            tenant=tenant,
            crm=crm,
            consent=consent,
            consent_missing=[s for s in required if s not in consent.get("scopes", [])],
            waiting=[u for u in users if u["missing_scopes"]],
            features=data.FEATURES,
            notice=request.query_params.get("notice") or ("consented" if request.query_params.get("consented") else ""),
            error=request.query_params.get("error"),
        )

    async def grant_consent(self, request: Request, person: Who) -> Response:
        tenant = await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
        scopes = data.required_scopes(tenant)
        state = secrets.token_urlsafe(24)
        try:
            self.consents.add(self.settings, {"state": state, "admin": person.oid}, tenant.id, scopes)
        except AuthError:
            return self.message(request, "Try again later", "Too many consents are in progress.", 503, person)
        return RedirectResponse(admin_consent_url(self.settings, tenant.id, scopes, state), 302, CONSOLE_HEADERS)

    async def _update_tenant(self, person: Who, changes: dict[str, Any]) -> str | None:
        """Save the tenant with `changes` through the same validation and save as `o365sync tenant update`; an
        error sentence if the values are invalid (nothing saved)."""

        def run() -> str | None:
            tenant = load_tenant(self.settings, person.tenant_id)
            try:
                updated = TenantConfig.model_validate({**tenant.model_dump(), **changes})
            except ValidationError as exc:
                return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            save_tenant(self.settings, updated)
            log.info("console: tenant %s updated by %s: %s", tenant.id, person.oid, ", ".join(sorted(changes)))
            return None

        return await run_in_threadpool(run)

    async def set_features(self, request: Request, person: Who) -> Response:
        form = request.state.form
        features = [f for f in data.FEATURES if form.get(f"feature_{f}") == "on"]
        error = await self._update_tenant(
            person, {"features": features, "notetaker_explicit_consent": form.get("explicit_consent") == "on"}
        )
        return RedirectResponse("/admin?" + ("error=features" if error else "notice=features"), status_code=303)

    async def set_policy(self, request: Request, person: Who) -> Response:
        form = request.state.form
        try:
            changes = {
                "retention_days": int(str(form.get("retention_days", ""))),
                "offboarding": str(form.get("offboarding", "")),
                "offboarding_grace_days": int(str(form.get("offboarding_grace_days", ""))),
            }
        except ValueError:
            return RedirectResponse("/admin?error=policy", status_code=303)
        error = await self._update_tenant(person, changes)
        return RedirectResponse("/admin?" + ("error=policy" if error else "notice=policy"), status_code=303)

    async def users(self, request: Request, person: Who) -> Response:
        tenant = await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
        users, _ = await run_in_threadpool(data.users_view, self.settings, tenant)
        return self.page(
            request,
            "users.html",
            person,
            tenant=tenant,
            users=users,
            org_link=data.connect_link(self.settings, tenant.id),
            done=request.query_params.get("done"),
        )

    async def _own_user(self, person: Who, oid: str) -> bool:
        """Whether `oid` is a user (connected, or once connected) of the admin's own tenant."""
        tenant = await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
        users, _ = await run_in_threadpool(data.users_view, self.settings, tenant)
        return oid in {u["oid"] for u in users}

    async def offboard(self, request: Request, person: Who) -> Response:
        from o365sync.offboarding import offboard_user_now

        oid = str(request.state.form.get("oid", ""))
        if not await self._own_user(person, oid):
            return self.message(request, "Nothing matched", "No such user in your organisation.", 404, person)
        await run_in_threadpool(offboard_user_now, self.settings, person.tenant_id, oid, f"console:{person.oid}")
        return RedirectResponse("/admin/users?done=offboarded", status_code=303)

    async def readmit(self, request: Request, person: Who) -> Response:
        from o365sync.offboarding import readmit_user_now

        oid = str(request.state.form.get("oid", ""))
        if not await self._own_user(person, oid):
            return self.message(request, "Nothing matched", "No such user in your organisation.", 404, person)
        try:
            await run_in_threadpool(readmit_user_now, self.settings, person.tenant_id, oid, f"console:{person.oid}")
        except LookupError:
            return self.message(request, "Nothing to do", "This user is not offboarded.", 409, person)
        return RedirectResponse("/admin/users?done=readmitted", status_code=303)

    async def user_preview(self, request: Request, person: Who) -> Response:
        given = request.state.form if request.method == "POST" else request.query_params
        oid = str(given.get("oid", ""))
        if not await self._own_user(person, oid):
            return self.message(request, "Nothing matched", "No such user in your organisation.", 404, person)
        return self._preview(request, person, oid, f"/admin/users/preview?{urlencode({'oid': oid})}", "/admin/users")

    async def my_blocklist(self, request: Request, person: Who) -> Response:
        error = await self._blocklist_form(request, person, person.oid)
        if error:
            return await self.me(request, person, error=error)
        return RedirectResponse("/me?saved=blocklist", status_code=303)

    async def _blocklist_form(self, request: Request, person: Who, user: str | None) -> str:
        """Apply the posted form (entries, action add/remove) to the tenant's list (`user` None) or `user`'s own
        list, through the library function `o365sync tenant block` uses; an error sentence if nothing changed."""
        form = request.state.form
        entries = str(form.get("entries", "")).replace(",", " ").split()
        remove = form.get("action") == "remove"
        try:
            await run_in_threadpool(change_blocklist, self.settings, person.tenant_id, entries, user, remove)
        except ValueError as exc:
            return str(exc)
        log.info("console: blocklist of %s changed by %s", user or person.tenant_id, person.oid)
        return ""

    async def blocklists(self, request: Request, person: Who) -> Response:
        tenant = await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
        error = ""
        if request.method == "POST":
            user = str(request.state.form.get("user", "")) or None
            if user is not None and not await self._own_user(person, user):
                return self.message(request, "Nothing matched", "No such user in your organisation.", 404, person)
            error = await self._blocklist_form(request, person, user)
            if not error:
                return RedirectResponse("/admin/blocklists", status_code=303)
        users, _ = await run_in_threadpool(data.users_view, self.settings, tenant)
        return self.page(
            request, "blocklists.html", person, tenant=tenant, users=users, error=error, status=400 if error else 200
        )

    async def runs(self, request: Request, person: Who) -> Response:
        tenant = await run_in_threadpool(load_tenant, self.settings, person.tenant_id)
        users, crm = await run_in_threadpool(data.users_view, self.settings, tenant)
        return self.page(request, "runs.html", person, tenant=tenant, runs=data.recent_runs(users), crm=crm)
