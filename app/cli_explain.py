"""`o365sync explain`: why one message was imported or not, decided now by the real pipeline rules
(`o365sync.explain`). Reads that one item from Graph and the store; writes nothing, logs nothing about it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from app.cli_checks import BadInput, known_user, registered_tenant

console = Console()

_DECISIONS = {
    "not_synced_folder": "not imported: it is in neither Inbox nor Sent Items",
    "draft": "excluded: a draft",
    "meeting_message": "excluded: a meeting request/response (eventMessage)",
    "sensitive": "excluded: marked personal, private or confidential",
    "automated_sender": "excluded: an automated sender (no-reply style address)",
    "blocklisted": "excluded: a participant's address or domain is on the tenant's or the user's blocklist",
    "internal_only": "excluded: no participant outside the tenant's domains",
    "no_crm_match": "not imported: no external participant matches a CRM record",
    "matched": "imported: matches CRM records",
}


def explain(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    user: Annotated[str, typer.Option("--user", help="The mailbox owner's object id.")],
    message: Annotated[
        str | None,
        typer.Option("--message", help="internetMessageId (in <angle brackets>) or Graph message id."),
    ] = None,
    event: Annotated[str | None, typer.Option("--event", help="Calendar event id (not yet supported).")] = None,
) -> None:
    """Explain why one message is imported or not: exclusion rule, CRM matches and the primary, stored, erased."""
    from o365sync.auth import token_path
    from o365sync.errors import O365SyncError
    from o365sync.explain import explain_message
    from o365sync.graph import GraphNotFound
    from o365sync.settings import load_settings
    from o365sync.tenant_context import resolve_tenant

    if (message is None) == (event is None):
        raise BadInput("give exactly one of --message or --event", 2)
    if event is not None:
        raise BadInput("explain --event is not supported yet; explain a message with --message", 2)
    assert message is not None
    settings = load_settings()
    config = registered_tenant(settings, tenant)
    known_user(settings, config, user)
    if not token_path(settings, config.id, user).exists():
        raise BadInput(f"user {user} is not connected to tenant {config.id} (they connect once in the web app)")
    try:
        result = explain_message(resolve_tenant(settings, config.id), user, message)
    except GraphNotFound:
        raise BadInput(f"no such message in the mailbox of user {user} (Graph: not found); nothing changed") from None
    except O365SyncError as exc:
        raise BadInput(f"{exc}; nothing changed") from None
    say = console.print
    say(f"message {result.graph_id} ({result.folder})", highlight=False, soft_wrap=True)
    say(f"decision: {result.decision} — {_DECISIONS[result.decision]}", highlight=False, soft_wrap=True)
    for m in result.matches:
        mark = "primary" if m.is_primary else "also"
        say(f"  {mark}: {m.crm_kind} {m.crm_id} by {m.role} {m.matched_address}", highlight=False, soft_wrap=True)
    if result.primary_why:
        say(f"primary because: {result.primary_why}", highlight=False, soft_wrap=True)
    say(f"stored now: {'yes' if result.stored else 'no'}", highlight=False)
    if result.erased:
        say("erased: yes — a tombstone keeps it from ever being imported again", highlight=False)
