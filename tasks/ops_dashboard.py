"""A tenant's dashboard for the Prefect UI (a markdown artifact keyed `dashboard-<tenant>`, refreshed by every tenant
sync): at a glance who needs a person, who is failing, how far behind each user is, what the last runs brought.

One line per user, by display name (the object id under it), each feature's stage and lag since its last success,
the last run's imported count next to the total since connect, failures and the next retry, and what to do (the
fixed action text of the error class, never a message). The CRM's state heads the page. Ids, names, stages,
times and counts only.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from o365sync.auth import ConnectedUser, connected_users, connection_info
from o365sync.settings import Settings
from o365sync.store import crm_state_summary, open_store, read_crm_state, read_sync_states
from o365sync.tenants import TenantConfig

FEATURES = ("email", "calendar", "teams")
OK_STAGES = frozenset({"idle", "syncing", "catching_up"})
PERSON_STAGES = frozenset({"reconnect_needed", "consent_needed", "action_needed"})


def _cell(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def lag_text(lag: timedelta | None) -> str:
    if lag is None:
        return "never"
    seconds = max(0, int(lag.total_seconds()))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "never"


def _feature_cell(state: Mapping[str, Any] | None, now: datetime) -> str:
    if state is None:
        return "–"
    stage = str(state["stage"]).replace("_", " ")
    last = state.get("last_success_at")
    lag = lag_text(now - last if last else None)
    failures = int(state.get("consecutive_failures") or 0)
    return f"{stage} ({lag})" + (f" ×{failures}" if failures and state["stage"] not in OK_STAGES else "")


def _action(states: list[Mapping[str, Any]]) -> str:
    actions = []
    for s in states:
        err = s.get("last_error") or ""
        if s["stage"] in PERSON_STAGES and ":" in err:
            actions.append(err.split(":", 1)[1].strip())
        elif s["stage"] in ("reconnect_needed", "consent_needed"):
            actions.append("the user must connect again")
    return "; ".join(dict.fromkeys(actions))


def dashboard_markdown(
    tenant: TenantConfig,
    users: list[ConnectedUser],
    states: Mapping[str, Mapping[str, Mapping[str, Any]]],
    crm: Mapping[str, Any],
    crm_summary: Mapping[str, Any],
    now: datetime,
) -> str:
    """`states`: feature -> user oid -> sync state (`store.read_sync_states`); `crm`: `store.read_crm_state`."""
    names = {u.oid: u.display_name for u in users}
    oids = sorted(
        set(names) | {oid for by_user in states.values() for oid in by_user}, key=lambda o: (names.get(o) or "~", o)
    )
    shown = [f for f in FEATURES if states.get(f)]
    need_person = failing = 0
    lines_users = []
    for oid in oids:
        mine = [states[f][oid] for f in shown if oid in states[f]]
        if any(s["stage"] in PERSON_STAGES for s in mine):
            need_person += 1
        elif any(s["stage"] not in OK_STAGES for s in mine):
            failing += 1
        email = states.get("email", {}).get(oid, {})
        last_run = sum(int(s.get("imported") or 0) for s in mine)
        total = sum(int(s.get("total_imported") or s.get("imported") or 0) for s in mine)
        retry = min((s["next_retry_at"] for s in mine if s.get("next_retry_at")), default=None)
        who = f"**{_cell(names.get(oid) or '(not connected)')}**<br>`{oid}`"
        cells = [who, *(_feature_cell(states[f].get(oid), now) for f in shown)]
        cells += [
            _when(email.get("last_success_at")),
            f"{last_run} / {total}",
            _when(retry) if retry else "",
            _action(mine),
        ]
        lines_users.append("| " + " | ".join(_cell(c) if i else c for i, c in enumerate(cells)) + " |")
    lags = [now - s["last_success_at"] if s.get("last_success_at") else None for f in shown for s in states[f].values()]
    worst = "never" if None in lags else lag_text(max(lags)) if lags else "–"  # type: ignore[type-var]
    title = f"{tenant.name} ({tenant.id})" if tenant.name else f"tenant {tenant.id}"
    crm_line = (
        f"**CRM** {tenant.crm_kind}: {str(crm.get('status', 'never_refreshed')).replace('_', ' ')}"
        f" · last success {_when(crm.get('last_success_at'))}"
        f" · last refresh {_when(crm_summary.get('taken_at'))}"
    )
    if crm.get("status") not in (None, "ok") and crm.get("last_error"):
        crm_line += f" · {_cell(str(crm['last_error']).split(':', 1)[0])}"
    head = [
        "User",
        *(f.capitalize() + " (lag)" for f in shown),
        "Last email success",
        "Imported last run / total",
        "Next retry",
        "What to do",
    ]
    return "\n".join(
        [
            f"# {_cell(title)}",
            "",
            f"Updated {_when(now)} · {len(oids)} users · {need_person} need a person · {failing} failing"
            f" · largest lag {worst}",
            "",
            crm_line,
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *lines_users,
        ]
    )


def read_dashboard(settings: Settings, tenant: TenantConfig, now: datetime) -> str:
    """The dashboard of a tenant as its store and connections are now."""
    with open_store(settings, tenant.id, write=False) as con:
        states = {f: {s["user_oid"]: s for s in read_sync_states(con, tenant.id, f)} for f in FEATURES}
        crm, summary = read_crm_state(con) or {}, crm_state_summary(con)
    users = connected_users(settings, tenant.id)
    connected = {u.oid for u in users}
    for oid in sorted({o for by_user in states.values() for o in by_user} - connected):  # token gone, name kept
        info = connection_info(settings, tenant.id, oid)
        users.append(ConnectedUser(tenant.id, oid, "", info.get("display_name") or ""))
    return dashboard_markdown(tenant, users, states, crm, summary, now)
