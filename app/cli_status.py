"""`o365sync status`: per tenant its CRM snapshot's state, per user (with their name) each feature's sync state,
the last run's counts next to the totals since the user connected (while a run is under way, its progress so far:
"importing: 12,400 messages scanned, 310 imported"), offboarding, and the late-match backfill's pending work
(counts only: the CRM addresses and domains waiting are never printed).

Readable at 80 columns: one block of short lines per user, nothing cut off (ids and times are never
shortened). `--json` prints the same report with stable keys for scripts. A user whose token is gone shows
"reconnect needed" for every feature. Read-only: a tenant without a store is reported as never synced (no
store is created). Registered in app/cli.py with `app.command("status")(status)`."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.console import Console

from app.cli_checks import has_store, registered_tenant
from o365sync.settings import Settings

console = Console()
FEATURES = ("email", "calendar", "teams")  # features with a per-user sync state
COUNTS = ("scanned", "matched", "imported", "discarded")


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value else None


def _progress(p) -> dict[str, Any] | None:  # noqa: ANN001 - an o365sync.store.SyncProgress or None
    """The running (or last) run's progress: counts so far, when it started, its one line."""
    if p is None:
        return None
    return {
        "running": p.running,
        "started_at": _iso(p.started_at),
        "updated_at": _iso(p.updated_at),
        "scanned": p.scanned,
        "imported": p.imported,
        "line": p.line(),
    }


def _feature_report(state: dict | None, token_gone: bool, progress=None) -> dict[str, Any]:  # noqa: ANN001
    if state is None:
        return {
            "stage": "reconnect_needed" if token_gone else "not_synced_yet",
            "last_run_at": None,
            "last_success_at": None,
            "lag_seconds": None,
            "consecutive_failures": 0,
            "next_retry_at": None,
            "last_error": None,
            "last_run": None,
            "total": None,
            "progress": None,
        }
    lag: timedelta | None = state["lag"]
    return {
        "stage": "reconnect_needed" if token_gone else state["stage"],
        "last_run_at": _iso(state["last_run_at"]),
        "last_success_at": _iso(state["last_success_at"]),
        "lag_seconds": int(lag.total_seconds()) if lag is not None else None,
        "consecutive_failures": state["consecutive_failures"],
        "next_retry_at": _iso(state["next_retry_at"]),
        "last_error": state["last_error"],
        "last_run": {**{n: state[n] or 0 for n in COUNTS}, "excluded": json.loads(state["excluded"] or "{}")},
        "total": {n: state[f"total_{n}"] if state[f"total_{n}"] is not None else state[n] or 0 for n in COUNTS},
        "progress": _progress(progress),
    }


def tenant_report(settings: Settings, tenant) -> dict[str, Any]:  # noqa: ANN001
    """One tenant's status as plain data (the `--json` shape)."""
    from o365sync.auth import connected_users, connection_info
    from o365sync.offboarding import offboarding_status
    from o365sync.store import (
        crm_state_summary,
        late_match_status,
        open_store,
        read_crm_state,
        read_sync_progress,
        read_sync_states,
    )

    states: dict[str, dict[str, dict]] = {}
    progress: dict[tuple[str, str], Any] = {}
    crm: dict = {}
    summary: dict = {}
    late_matches: dict | None = None
    if has_store(settings, tenant.id):
        with open_store(settings, tenant.id, write=False) as con:
            for feature in FEATURES:
                for st in read_sync_states(con, tenant.id, feature):
                    states.setdefault(st["user_oid"], {})[feature] = st
            crm, summary = read_crm_state(con) or {}, crm_state_summary(con)
            progress = {(p.user_oid, p.feature): p for p in read_sync_progress(con, tenant.id)}
            late_matches = late_match_status(con, tenant.id)
    connected = {u.oid: u for u in connected_users(settings, tenant.id)}
    offboarded = offboarding_status(settings, tenant.id)
    users = []
    for oid in sorted(set(connected) | set(states) | set(offboarded)):
        info = connection_info(settings, tenant.id, oid)
        off = offboarded.get(oid)
        token_gone = oid not in connected and off is None
        enabled = [f for f in FEATURES if tenant.feature_on(f, oid)] if off is None else []
        features = {
            f: _feature_report(states.get(oid, {}).get(f), token_gone, progress.get((oid, f)))
            for f in FEATURES
            if f in states.get(oid, {}) or f in enabled
        }
        users.append(
            {
                "oid": oid,
                "upn": info.get("upn") or None,
                "display_name": info.get("display_name") or None,
                "connection": "offboarded" if off else "reconnect_needed" if token_gone else "connected",
                "offboarding": off,
                "features": features,
            }
        )
    return {
        "id": tenant.id,
        "name": tenant.name,
        "crm": {
            "kind": tenant.crm_kind,
            "state": crm.get("status", "never_refreshed"),
            "last_refresh_at": _iso(summary.get("taken_at")),
            "mode": summary.get("mode"),
            "last_success_at": _iso(crm.get("last_success_at")),
            "last_full_read_at": _iso(summary.get("last_full_at")),
            "last_error": crm.get("last_error"),
        },
        "late_match": late_matches,
        "users": users,
    }


def _when(iso: str | None) -> str:
    return iso.replace("T", " ").replace("+00:00", " UTC") if iso else "never"


def _lag(seconds: int | None) -> str:
    if seconds is None:
        return ""
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _counts(counts: dict) -> str:
    return "".join(f"{counts[n]:>10}" for n in COUNTS)


def _plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def late_match_line(late: dict) -> str:
    """E.g. "3 addresses/domains waiting in 2 mailboxes, 12 done, 0 capped, 5 messages imported"."""
    return (
        f"{_plural(late['terms_open'], 'address/domain', 'addresses/domains')} waiting in "
        f"{_plural(late['mailboxes_open'], 'mailbox', 'mailboxes')}, {late['terms_done']} done, "
        f"{late['terms_capped']} capped, {_plural(late['imported'], 'message', 'messages')} imported"
    )


def _wrap(first: str, text: str, width: int = 80) -> list[str]:
    """`first` + `text` in lines of `width`, continuation lines indented under `first`'s indentation + 2."""
    indent = " " * (len(first) - len(first.lstrip()) + 2)
    lines = textwrap.wrap(
        text, width, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False
    )
    return lines or [first.rstrip()]


def render(report: dict[str, Any]) -> list[str]:
    """The report as short lines (each well under 80 columns except for free text such as errors, which wraps)."""
    lines: list[str] = []
    for t in report["tenants"]:
        crm = t["crm"]
        lines += [
            f"Tenant {t['name'] or t['id']}",
            f"  id {t['id']}",
            f"  CRM {crm['kind']}: {crm['state'].replace('_', ' ')}"
            + (f", {crm['mode']} refresh {_when(crm['last_refresh_at'])}" if crm["last_refresh_at"] else ""),
            f"  CRM last success {_when(crm['last_success_at'])}",
            f"  CRM last full read {_when(crm['last_full_read_at'])}",
        ]
        if crm["last_error"]:
            lines += _wrap("  CRM error: ", crm["last_error"])
        if t["late_match"]:
            lines += _wrap("  late matches: ", late_match_line(t["late_match"]))
        if not t["users"]:
            lines.append("  no user connected yet")
        for u in t["users"]:
            name = u["display_name"] or u["upn"] or "(name unknown)"
            lines += [
                "",
                f"  {name}" + (f" <{u['upn']}>" if u["upn"] and u["display_name"] else ""),
                f"    user {u['oid']}: {u['connection'].replace('_', ' ')}",
            ]
            if u["connection"] == "reconnect_needed":
                lines.append("    (token gone: the user must connect again; nothing syncs until then)")
            off = u["offboarding"]
            if off:
                lines.append(
                    f"    offboarded {_when(off.get('offboarded_at'))}, policy {off.get('policy')}"
                    + (
                        f", deleted {_when(off['deleted_at'])}"
                        if off.get("deleted_at")
                        else f", delete after {_when(off['delete_after'])}"
                        if off.get("delete_after")
                        else ""
                    )
                )
            for feature, f in u["features"].items():
                pad = " " * 13
                lines.append(f"    {feature:<9}{f['stage'].replace('_', ' ')}")
                running = bool(f["progress"] and f["progress"]["running"])
                if running:  # e.g. "importing: 12,400 messages scanned, 310 imported"
                    lines += [f"{pad}{f['progress']['line']}", f"{pad}run started {_when(f['progress']['started_at'])}"]
                if f["last_success_at"]:
                    lines.append(f"{pad}last success {_when(f['last_success_at'])} ({_lag(f['lag_seconds'])} ago)")
                if f["consecutive_failures"]:
                    retry = _when(f["next_retry_at"]) if f["next_retry_at"] else "none until someone acts"
                    lines.append(f"{pad}failures {f['consecutive_failures']}, next retry {retry}")
                    lines += _wrap(f"{pad}last error ", f["last_error"] or "")
                if f["last_run"] is not None:
                    if not running:  # a running run's start is on the line above
                        lines.append(f"{pad}last run at  {_when(f['last_run_at'])}")
                    lines += [
                        f"{pad}{'':<14}" + "".join(f"{n:>10}" for n in COUNTS),
                        f"{pad}{'this run' if running else 'last run':<14}" + _counts(f["last_run"]),
                        f"{pad}{'since connect':<14}" + _counts(f["total"]),
                    ]
                    excluded = f["last_run"]["excluded"]
                    if excluded:
                        lines += _wrap(
                            f"{pad}excluded last run: ", ", ".join(f"{k} {v}" for k, v in sorted(excluded.items()))
                        )
        lines.append("")
    return lines


def status(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable (stable keys).")] = False,
) -> None:
    """Per tenant the CRM state; per user and feature the sync state, the last run's counts and the totals since
    connect."""
    from o365sync.settings import load_settings
    from o365sync.tenants import list_tenants

    settings = load_settings()
    tenants = [registered_tenant(settings, tenant)] if tenant else list_tenants(settings)
    report = {"generated_at": _iso(datetime.now(UTC)), "tenants": [tenant_report(settings, t) for t in tenants]}
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    if not tenants:
        console.print("No tenants registered.")
        return
    for line in render(report):
        console.print(line, highlight=False, markup=False)
