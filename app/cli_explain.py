"""`o365sync explain`: why one message or calendar event was imported or not, decided now by the real pipeline rules
(`o365sync.explain`). Reads that one item from Graph and the store; writes nothing, logs nothing about it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from app.cli_checks import BadInput, known_user, registered_tenant

console = Console()


def explain(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    user: Annotated[str, typer.Option("--user", help="The mailbox owner's object id.")],
    message: Annotated[
        str | None,
        typer.Option("--message", help="internetMessageId (in <angle brackets>) or Graph message id."),
    ] = None,
    event: Annotated[
        str | None, typer.Option("--event", help="Graph calendar event id (meeting, occurrence or series master).")
    ] = None,
) -> None:
    """Explain why one message or event is imported or not: exclusion rule, CRM matches and the primary, stored,
    erased."""
    from o365sync.auth import consent_needed, token_path
    from o365sync.errors import O365SyncError
    from o365sync.explain import EventExplanation, Explanation, explain_event, explain_message, explanation_lines
    from o365sync.graph import GraphNotFound
    from o365sync.settings import load_settings
    from o365sync.sync.calendar import calendar_scopes
    from o365sync.tenant_context import resolve_tenant

    if (message is None) == (event is None):
        raise BadInput("give exactly one of --message or --event", 2)
    settings = load_settings()
    config = registered_tenant(settings, tenant)
    known_user(settings, config, user)
    if not token_path(settings, config.id, user).exists():
        raise BadInput(f"user {user} is not connected to tenant {config.id} (they connect once in the web app)")
    if event is not None and not config.feature_on("calendar", user):
        raise BadInput(f"calendar sync is off for user {user} in tenant {config.id}: no event of theirs is imported")
    if event is not None and consent_needed(settings, config.id, user, calendar_scopes(config)):
        raise BadInput(f"user {user} has not consented to calendar access yet (they reconnect once in the web app)")
    item = "message" if message is not None else "event"
    try:
        if message is not None:
            result: Explanation | EventExplanation = explain_message(resolve_tenant(settings, config.id), user, message)
        else:
            assert event is not None
            result = explain_event(resolve_tenant(settings, config.id), user, event)
    except GraphNotFound:
        raise BadInput(f"no such {item} for user {user} (Graph: not found); nothing changed") from None
    except O365SyncError as exc:
        raise BadInput(f"{exc}; nothing changed") from None
    for line in explanation_lines(result):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
