"""What the console's pages show, read through the same functions the CLI uses (`o365sync status`'s report, the
library's consent check): nothing here writes."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode, urlsplit

from app.cli_checks import has_store
from app.cli_status import late_match_line, tenant_report
from o365sync.auth import consent_needed, scopes_for
from o365sync.settings import Settings
from o365sync.store import open_store
from o365sync.sync_policy import CATCHING_UP
from o365sync.tenants import TenantConfig

FEATURES = ("email", "calendar", "notetaker", "teams")
FEATURE_NAMES = {
    "email": "Email sync",
    "calendar": "Calendar import",
    "notetaker": "Notetaker (automatic recording)",
    "teams": "Teams sharing",
}
# Stages of a sync under way (recorded when a run starts; `catching_up`: it stopped at its paging limit and the next
# run goes on): while a user has one, their page refreshes itself.
IN_PROGRESS = frozenset({"syncing", CATCHING_UP})
RECENT = 50


def base_url(settings: Settings) -> str:
    """This service's origin, from the registered redirect URI."""
    parts = urlsplit(settings.redirect_uri)
    return f"{parts.scheme}://{parts.netloc}"


def connect_link(settings: Settings, tenant_id: str, upn: str = "") -> str:
    query = {"tenant": tenant_id, **({"login_hint": upn} if upn else {})}
    return f"{base_url(settings)}/connect?{urlencode(query)}"


def required_scopes(tenant: TenantConfig) -> list[str]:
    return scopes_for(tenant.features, tenant.notetaker_explicit_consent)


def users_view(settings: Settings, tenant: TenantConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(users, crm): `o365sync status`'s report of the tenant, each user with the scopes they still have to consent
    to (a feature turned on after they connected) and their reconnect link; crm with the late-match backfill's
    line (counts only) when a refresh ever queued one."""
    report = tenant_report(settings, tenant)
    required = required_scopes(tenant)
    for user in report["users"]:
        user["missing_scopes"] = (
            consent_needed(settings, tenant.id, user["oid"], required) if user["connection"] == "connected" else []
        )
        user["reconnect_link"] = connect_link(settings, tenant.id, user["upn"] or "")
        user["running"] = any(f["stage"] in IN_PROGRESS for f in user["features"].values())
    late = report["late_match"]
    return report["users"], {**report["crm"], "late_match": late_match_line(late) if late else None}


def user_view(settings: Settings, tenant: TenantConfig, oid: str) -> dict[str, Any] | None:
    users, _ = users_view(settings, tenant)
    return next((u for u in users if u["oid"] == oid), None)


def recent_runs(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest run of each user and feature recorded in the store, newest first."""
    runs = [
        {"user": u["display_name"] or u["upn"] or u["oid"], "oid": u["oid"], "feature": f, **state}
        for u in users
        for f, state in u["features"].items()
        if state["last_run_at"]
    ]
    return sorted(runs, key=lambda r: r["last_run_at"], reverse=True)[:RECENT]


_RECORD = "string_agg(DISTINCT coalesce(a.name, p.name, m.crm_id), ', ')"
_PEOPLE = "LEFT JOIN crm_people p ON p.crm_id = m.crm_id LEFT JOIN crm_accounts a ON a.crm_id = m.crm_id"


def my_activities(settings: Settings, tenant_id: str, oid: str) -> tuple[list[tuple], list[tuple]]:
    """(conversations, meetings) of one user, newest first: subject, when and the CRM records they matched. Only
    matched items are ever stored; the joins keep it so here too."""
    if not has_store(settings, tenant_id):
        return [], []
    with open_store(settings, tenant_id, write=False) as con:
        conversations = con.execute(
            f"""SELECT e.conversation_id, arg_max(e.subject, coalesce(e.sent_at, e.received_at)),
                       max(coalesce(e.sent_at, e.received_at)) AS last_at, count(DISTINCT e.graph_id), {_RECORD}
                FROM emails e JOIN email_crm_matches m USING (tenant_id, user_oid, graph_id) {_PEOPLE}
                WHERE e.tenant_id = ? AND e.user_oid = ? AND e.conversation_id IS NOT NULL
                GROUP BY e.conversation_id ORDER BY last_at DESC LIMIT {RECENT}""",
            [tenant_id, oid],
        ).fetchall()
        meetings = con.execute(
            f"""SELECT mt.event_id, any_value(mt.subject), min(mt.start_at) AS first_at, {_RECORD}
                FROM meetings mt JOIN meeting_crm_matches m USING (tenant_id, user_oid, event_id) {_PEOPLE}
                WHERE mt.tenant_id = ? AND mt.user_oid = ?
                GROUP BY mt.event_id ORDER BY first_at DESC LIMIT {RECENT}""",
            [tenant_id, oid],
        ).fetchall()
    return conversations, meetings


def explain_activity(settings: Settings, tenant_id: str, oid: str, kind: str, key: str) -> list[str] | str | None:
    """`o365sync explain`'s lines for one of the user's stored activities (a meeting's event id, or a
    conversation, explained by its latest stored message); None when the user has no such stored item, a sentence
    when it cannot be explained now (Graph no longer has it, the user must reconnect…)."""
    from o365sync.errors import O365SyncError
    from o365sync.explain import explain_event, explain_message, explanation_lines
    from o365sync.graph import GraphNotFound
    from o365sync.tenant_context import resolve_tenant

    if kind not in ("meeting", "conversation") or not has_store(settings, tenant_id):
        return None
    with open_store(settings, tenant_id, write=False) as con:
        sql = (
            "SELECT event_id FROM meetings WHERE tenant_id = ? AND user_oid = ? AND event_id = ?"
            if kind == "meeting"
            else "SELECT graph_id FROM emails WHERE tenant_id = ? AND user_oid = ? AND conversation_id = ? "
            "ORDER BY coalesce(sent_at, received_at) DESC LIMIT 1"
        )
        row = con.execute(sql, [tenant_id, oid, key]).fetchone()
    if row is None:
        return None
    tenant = resolve_tenant(settings, tenant_id)
    try:
        result = explain_event(tenant, oid, row[0]) if kind == "meeting" else explain_message(tenant, oid, row[0])
    except GraphNotFound:
        return "Office 365 no longer has this item (it was deleted or moved); the stored copy stays."
    except O365SyncError as exc:
        return exc.action or "It cannot be explained right now. Try again later."
    return explanation_lines(result)


def preview_user_report(settings: Settings, tenant_id: str, oid: str) -> dict[str, Any] | str:
    """`o365sync preview --user`'s report for one user of the tenant, or the sentence why there is none (the user
    has not connected; no CRM snapshot yet…)."""
    from o365sync.auth import connection_info, token_path
    from o365sync.errors import O365SyncError
    from o365sync.preview import preview_report
    from o365sync.tenant_context import resolve_tenant

    if not token_path(settings, tenant_id, oid).exists():
        return "This user has not connected Office 365 yet: a preview reads their mailbox with their permission."
    info = connection_info(settings, tenant_id, oid)
    try:
        return preview_report(
            resolve_tenant(settings, tenant_id), {oid: info.get("display_name") or info.get("upn") or oid}
        )
    except O365SyncError as exc:
        return exc.action or "The preview could not be made right now. Try again later."


def preview_tables(report: dict[str, Any]) -> dict[str, Any]:
    """What the preview page shows besides the report: the breakdowns summed over its users, the estimate lines."""
    from app.cli_preview import duration, estimate_lines
    from o365sync.preview import breakdown

    return {
        "breakdowns": [
            ("reason", "By reason (matched = imported)", breakdown(report, "by_reason")),
            ("kind", "Imported, by the primary CRM record's kind", breakdown(report, "by_kind")),
            ("month", "Imported, by month (UTC)", breakdown(report, "by_month")),
        ],
        "estimate": estimate_lines(report),
        "duration": duration,
    }
