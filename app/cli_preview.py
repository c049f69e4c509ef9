"""`o365sync preview`: what an initial import would bring for a tenant's connected users (or one of them), as
counts only — by reason, by CRM record kind, by month, top accounts — and how long it would take
(`o365sync.preview`). Lists headers from Graph and reads the store; stores nothing, fetches no body.
Registered in app/cli.py with `app.command("preview")(preview)`."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.cli_checks import BadInput, known_user, registered_tenant

console = Console()


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


def preview(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    user: Annotated[
        str | None, typer.Option("--user", help="One user's object id (default: every connected user).")
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table (for people) or json.")] = OutputFormat.table,
) -> None:
    """Preview an initial import: counts by reason, CRM record kind, month and top accounts, and the estimated
    time — nothing stored, no body fetched."""
    from o365sync.auth import connected_users, connection_info, token_path
    from o365sync.errors import O365SyncError
    from o365sync.preview import preview_report
    from o365sync.settings import load_settings
    from o365sync.tenant_context import resolve_tenant

    settings = load_settings()
    config = registered_tenant(settings, tenant)
    if user is not None:
        known_user(settings, config, user)
        if not token_path(settings, config.id, user).exists():
            raise BadInput(f"user {user} has not connected to tenant {config.id}: they connect once in the web app")
        info = connection_info(settings, config.id, user)
        users = {user: str(info.get("display_name") or info.get("upn") or user)}
    else:
        users = {u.oid: u.display_name or u.upn or u.oid for u in connected_users(settings, config.id)}
        if not users:
            raise BadInput(f"no user of tenant {config.id} has connected yet: users connect once in the web app")
    try:
        report = preview_report(resolve_tenant(settings, config.id), users)
    except O365SyncError as exc:
        raise BadInput(f"{exc}; nothing changed") from None
    if output is OutputFormat.json:
        console.print_json(json.dumps(report))
    else:
        for table in report_tables(report):
            console.print(table)
        for line in estimate_lines(report):
            console.print(line, highlight=False, soft_wrap=True, markup=False)


def report_tables(report: dict[str, Any]) -> list[Table]:
    """The report as tables for people: by reason, by CRM record kind, by month, top accounts, per user."""
    from o365sync.preview import breakdown

    tables = []
    for key, title in (
        ("by_reason", "By reason (matched = imported)"),
        ("by_kind", "Imported, by the primary CRM record's kind"),
        ("by_month", "Imported, by month (UTC)"),
    ):
        t = Table(title=title, title_justify="left", min_width=len(title))
        t.add_column(key.removeprefix("by_"))
        t.add_column("email", justify="right")
        t.add_column("calendar", justify="right")
        for row, cell in breakdown(report, key).items():
            t.add_row(row, f"{cell['email']:,}", f"{cell['calendar']:,}")
        tables.append(t)
    title = "Top accounts (imported mail and meetings)"
    t = Table(title=title, title_justify="left", min_width=len(title))
    t.add_column("account")
    t.add_column("items", justify="right")
    for row in report["top_accounts"]:
        t.add_row(row["name"], f"{row['count']:,}")
    tables.append(t)
    t = Table(title="Per user", title_justify="left")
    for column in ("user", "mail imported", "meetings imported", "requests", "estimated time"):
        t.add_column(column, justify="left" if column == "user" else "right")
    for u in report["users"]:
        cal = u["calendar"]["by_reason"] if u["calendar"] else None
        t.add_row(
            u["name"],
            f"{u['email']['by_reason'].get('matched', 0):,}",
            "off" if cal is None else f"{cal.get('matched', 0) + cal.get('internal_kept', 0):,}",
            f"{u['requests']:,}",
            duration(u["estimated_seconds"]),
        )
    tables.append(t)
    return tables


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def estimate_lines(report: dict[str, Any]) -> list[str]:
    e = report["estimate"]
    return [
        f"Estimated import time: {duration(e['longest_mailbox_seconds'])} with mailboxes in parallel "
        f"({duration(e['all_mailboxes_one_after_another_seconds'])} one after another).",
        f"Assumed: {e['request_latency_seconds']} s per Graph request; header pages one after another; bodies in "
        f"$batch calls of {e['batch_size']}, {e['concurrent_requests_per_mailbox']} requests at a time per mailbox; "
        f"at most {e['budget_requests']:,} requests per mailbox in {e['budget_window_seconds']:.0f} s.",
        "Counts only: nothing was stored, no message body was read.",
    ]
