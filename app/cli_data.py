"""`o365sync conversation|meeting|retention|offboard`: export and delete a user's conversations and meetings,
run retention, offboard a user or end a tenant's subscription. Every deletion goes through
`o365sync.erasure.erase` (delete, copy-compaction, new snapshot, exports removed, audit entry) and is complete when
the command returns. Output: ids, counts and paths — never content.

Registered in app/cli.py with:
    from app.cli_data import conversation_app, meeting_app, offboard_app, retention_app
    app.add_typer(conversation_app, name="conversation")
    app.add_typer(meeting_app, name="meeting")
    app.add_typer(retention_app, name="retention")
    app.add_typer(offboard_app, name="offboard")
"""

from __future__ import annotations

import getpass
import re
from typing import Annotated

import typer
from rich.console import Console

from app.cli_checks import BadInput, command_group, known_user, registered_tenant, run_flow
from o365sync.prefect_env import configure_prefect_env
from o365sync.settings import load_settings

configure_prefect_env()  # before anything imports Prefect

conversation_app = command_group("Export or delete a conversation (by conversation id or a message in it).")
meeting_app = command_group("Export or delete a meeting or a whole meeting series.")
retention_app = command_group("Retention: delete activities older than the tenant's retention period.")
offboard_app = command_group("Offboard a user (tenant policy: delete or retain) or end a tenant's subscription.")
console = Console()

Tenant = Annotated[str, typer.Option(help="Tenant id.")]
User = Annotated[str | None, typer.Option(help="Only this user's copy (object id); default: every user's.")]
Actor = Annotated[str | None, typer.Option(help="Who asks (an id for the audit log); default cli:<login>.")]
Reason = Annotated[str, typer.Option(help="user_request | admin_request.")]
# What a conversation or meeting command acts on (export and delete alike).
Message = Annotated[str | None, typer.Option(help="A message's (immutable) Graph id: its conversation.")]
Event = Annotated[str | None, typer.Option(help="Event (instance) id.")]
Series = Annotated[str | None, typer.Option(help="Series master id: every stored occurrence.")]


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "unknown"
    return "cli:" + (re.sub(r"[^A-Za-z0-9._-]", "_", login)[:60] or "unknown")


def _erase(tenant: str, scope, actor: str | None, reason: str) -> None:  # noqa: ANN001
    from o365sync.erasure import ErasureError, erase
    from o365sync.tenants import TenantNotFound

    try:
        r = erase(load_settings(), tenant, scope, actor=_actor(actor), reason=reason)
    except (LookupError, ValueError, TenantNotFound, ErasureError) as exc:
        raise BadInput(str(exc)) from None
    ids = " ".join(f"{k}={','.join(v)}" for k, v in r.ids.items() if v)
    rows = ", ".join(f"{t} {n}" for t, n in sorted(r.rows.items()) if n) or "nothing stored"
    console.print(
        f"Erased {r.scope} {ids}: {rows}; tombstones {r.tombstones}; exports removed "
        f"{r.exports_removed}; store {r.bytes_before} -> {r.bytes_after} bytes (compacted, snapshot "
        f"replaced) in {r.seconds:.2f} s. Audit: {r.audit_path}"
    )


# ---------------------------------------------------------------------------------------------- conversation
@conversation_app.command("export")
def conversation_export(
    tenant: Tenant,
    conversation: Annotated[str | None, typer.Option("--id", help="Conversation id.")] = None,
    message: Message = None,
    user: User = None,
    eml: Annotated[bool, typer.Option(help="Also one .eml file per message.")] = True,
) -> None:
    """Export a conversation as JSON (+ .eml) under the tenant's exports folder."""
    from o365sync.conversations import export_conversation
    from o365sync.tenants import TenantNotFound

    try:
        r = export_conversation(
            load_settings(), tenant, conversation_id=conversation, graph_id=message, user_oid=user, eml=eml
        )
    except (LookupError, ValueError, TenantNotFound) as exc:
        raise BadInput(str(exc)) from None
    console.print(f"Exported {r.items} messages ({r.files} files) to {r.path}")


@conversation_app.command("delete")
def conversation_delete(
    tenant: Tenant,
    conversation: Annotated[list[str] | None, typer.Option("--id", help="Conversation id (repeatable).")] = None,
    message: Message = None,
    user: User = None,
    actor: Actor = None,
    reason: Reason = "user_request",
) -> None:
    """Delete a conversation from every file we keep; it is never imported again (new replies included)."""
    from o365sync.erasure import Scope

    if bool(conversation) == bool(message):
        raise BadInput("give --id or --message")
    scope = Scope.message(message, user_oid=user) if message else Scope.conversation(*conversation, user_oid=user)
    _erase(tenant, scope, actor, reason)


# ---------------------------------------------------------------------------------------------- meeting
@meeting_app.command("export")
def meeting_export(
    tenant: Tenant,
    event: Event = None,
    series: Series = None,
    user: User = None,
) -> None:
    """Export a meeting or a series as JSON under the tenant's exports folder."""
    from o365sync.conversations import export_meeting
    from o365sync.tenants import TenantNotFound

    try:
        r = export_meeting(load_settings(), tenant, event_id=event, series_id=series, user_oid=user)
    except (LookupError, ValueError, TenantNotFound) as exc:
        raise BadInput(str(exc)) from None
    console.print(f"Exported {r.items} meeting instances to {r.path}")


@meeting_app.command("delete")
def meeting_delete(
    tenant: Tenant,
    event: Event = None,
    series: Series = None,
    user: User = None,
    actor: Actor = None,
    reason: Reason = "user_request",
) -> None:
    """Delete a meeting or a series from every file we keep; it is never imported again."""
    from o365sync.erasure import Scope

    if bool(event) == bool(series):
        raise BadInput("give --event or --series")
    scope = Scope.meeting(event, user_oid=user) if event else Scope.series(series, user_oid=user)
    _erase(tenant, scope, actor, reason)


# ---------------------------------------------------------------------------------------------- retention
@retention_app.command("run")
def retention_run(tenant: Tenant) -> None:
    """Run the retention flow now (also completes offboarding deletions whose grace period passed)."""
    registered_tenant(load_settings(), tenant)  # before Prefect starts
    from flows.retention import retention

    console.print(run_flow(retention, tenant))


# ---------------------------------------------------------------------------------------------- offboard
@offboard_app.command("user")
def offboard_user_cmd(tenant: Tenant, user: Annotated[str, typer.Argument(help="The user's object id.")]) -> None:
    """A user left: tokens removed now; their data deleted (after the grace period) or retained, per policy."""
    settings = load_settings()
    known_user(settings, registered_tenant(settings, tenant), user)  # before Prefect starts
    from flows.offboarding import offboard_user

    console.print(run_flow(offboard_user, tenant, user))


@offboard_app.command("readmit")
def offboard_readmit(tenant: Tenant, user: Annotated[str, typer.Argument(help="The user's object id.")]) -> None:
    """Let an offboarded user connect again (cancels a deletion still pending; deleted data stays deleted)."""
    from o365sync.offboarding import readmit_user_now

    try:
        out = readmit_user_now(load_settings(), tenant, user, actor=_actor(None))
    except (LookupError, ValueError) as exc:  # unknown tenant or user, or a user who is not offboarded
        raise BadInput(str(exc)) from None
    console.print(f"user {user} of tenant {tenant} readmitted (was: {out['policy']}); they can connect again")


@offboard_app.command("tenant")
def offboard_tenant(
    tenant: Tenant,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: delete every file of the tenant.")] = False,
) -> None:
    """End the subscription: delete the tenant's store, snapshot, exports, CRM snapshot and credentials, token
    caches and registry entry. Only the audit log entry remains."""
    registered_tenant(load_settings(), tenant)
    if not yes:
        raise BadInput(f"this deletes every file of tenant {tenant}; repeat with --yes")
    from flows.offboarding import end_subscription

    console.print(run_flow(end_subscription, tenant))


@offboard_app.command("status")
def offboard_status(tenant: Tenant) -> None:
    """Offboarded users: policy, when, deletion due and done."""
    from rich.table import Table

    from o365sync.offboarding import offboarding_status

    settings = load_settings()
    registered_tenant(settings, tenant)
    table = Table("user", "policy", "offboarded", "delete after", "deleted")
    for oid, r in sorted(offboarding_status(settings, tenant).items()):
        table.add_row(oid, r["policy"], r["offboarded_at"], r.get("delete_after") or "-", r.get("deleted_at") or "-")
    console.print(table if table.row_count else f"No user of tenant {tenant} was offboarded.")
