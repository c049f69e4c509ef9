"""What the console's pages show, read through the same functions the CLI uses (`o365sync status`'s report, the
library's consent check): nothing here writes."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode, urlsplit

from app.cli_checks import has_store
from app.cli_status import tenant_report
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
    to (a feature turned on after they connected) and their reconnect link."""
    report = tenant_report(settings, tenant)
    required = required_scopes(tenant)
    for user in report["users"]:
        user["missing_scopes"] = (
            consent_needed(settings, tenant.id, user["oid"], required) if user["connection"] == "connected" else []
        )
        user["reconnect_link"] = connect_link(settings, tenant.id, user["upn"] or "")
        user["running"] = any(f["stage"] in IN_PROGRESS for f in user["features"].values())
    return report["users"], report["crm"]


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
