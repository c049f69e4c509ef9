"""`o365sync ops automations create`: Prefect automations that notify on the ops signals (tasks/ops_signals.py).

One automation per signal, named `o365sync: <signal>`: a reactive `EventTrigger` on the signal's event from any
tenant (`o365sync.tenant.*`, evaluated per tenant) whose action calls a webhook (a Prefect `Webhook` block named
`o365sync-ops-webhook`, saved with the URL given; the URL is kept as a secret by Prefect) with a JSON body: the
signal, the tenant's and user's display names and the event's payload (ids, counts, stage and error class). Re-running
updates the block and the automations in place (matched by name) instead of adding copies. `--dry-run` prints the
automations as JSON and contacts nothing. Registered in app/cli.py with `app.add_typer(ops_app, name="ops")`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit
from uuid import UUID

import typer

from app.cli_checks import BadInput, command_group

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

ops_app = command_group("Operations: Prefect automations that notify on the ops signals.")
automations_app = command_group("Automations notifying on reconnect/consent needed, CRM quota, throttling, failures.")
ops_app.add_typer(automations_app, name="automations")

WEBHOOK_BLOCK = "o365sync-ops-webhook"
NAME_PREFIX = "o365sync: "
PLACEHOLDER_BLOCK = UUID(int=0)  # --dry-run: the block the real run saves


def webhook_body(what: str) -> str:
    """The webhook's JSON body, rendered by Prefect's (sandboxed) Jinja when the automation fires; `tojson` keeps
    names with quotes valid JSON."""
    return (
        f'{{"signal": {{{{ event.event | tojson }}}}, "what": {json.dumps(what)}, '
        '"tenant": {{ event.resource.name | tojson }}, "occurred": {{ event.occurred | string | tojson }}, '
        '"payload": {{ event.payload | tojson }}}'
    )


def automation_specs(block_id: UUID) -> list[AutomationCore]:
    """The automations, one per signal, calling the webhook block `block_id`."""
    from datetime import timedelta

    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from tasks.ops_signals import SIGNALS, TENANT_RESOURCE_PREFIX

    return [
        AutomationCore(
            name=f"{NAME_PREFIX}{what}",
            description=f"o365sync ops signal `{event}` (tasks/ops_signals.py): notify the webhook `{WEBHOOK_BLOCK}`.",
            trigger=EventTrigger(
                expect={event},
                match={"prefect.resource.id": f"{TENANT_RESOURCE_PREFIX}*"},
                for_each={"prefect.resource.id"},
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(0),
            ),
            actions=[CallWebhook(block_document_id=block_id, payload=webhook_body(what))],
        )
        for event, what in SIGNALS.items()
    ]


def _webhook_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"--webhook must be an http(s) URL (got {value!r})", 2)
    return value


def apply_automations(webhook_url: str) -> dict[str, str]:
    """Save the webhook block and create or update every automation; {automation name: "created" | "updated"}."""
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client

    block_id = Webhook(method="POST", url=webhook_url).save(WEBHOOK_BLOCK, overwrite=True)
    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for spec in automation_specs(block_id):
            existing = client.read_automations_by_name(spec.name)
            if existing:
                client.update_automation(existing[0].id, spec)
                for extra in existing[1:]:  # copies someone made by hand: one automation per signal
                    client.delete_automation(extra.id)
                out[spec.name] = "updated"
            else:
                client.create_automation(spec)
                out[spec.name] = "created"
    return out


@automations_app.command("create")
def create(
    webhook: Annotated[
        str | None, typer.Option(help="URL the notifications are POSTed to (JSON; e.g. a chat or paging webhook).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the automations as JSON; create nothing.")] = False,
) -> None:
    """Create or update the Prefect automations that POST each ops signal to --webhook (re-running updates them)."""
    if dry_run:
        for spec in automation_specs(PLACEHOLDER_BLOCK):
            typer.echo(spec.model_dump_json(indent=2))
        return
    if webhook is None:
        raise BadInput("say where notifications go: --webhook URL (or --dry-run to see the automations)", 2)
    url = _webhook_url(webhook)
    from deployments.prefect_server import configured_api_url, healthy

    api = configured_api_url()
    if not api:
        raise BadInput("PREFECT_API_URL is not set: point it at the Prefect server (o365sync serve prints it)", 2)
    if not healthy(api):
        raise BadInput(f"the Prefect server at {api} does not answer (is it running?)")
    for name, what in apply_automations(url).items():
        typer.echo(f"{what} automation {name!r}")
    typer.echo(f"notifications go to the webhook block {WEBHOOK_BLOCK!r}")
