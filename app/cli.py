"""The `o365sync` command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from o365sync.settings import load_settings
from o365sync.startup import start_process

start_process()  # private files (umask 077), Prefect's home in the data dir: before anything imports Prefect

from app.cli_analytics import export  # noqa: E402
from app.cli_checks import BadInput, OneLineErrors, crm_configured, registered_tenant, run_flow  # noqa: E402
from app.cli_crm import crm_app  # noqa: E402
from app.cli_data import conversation_app, meeting_app, offboard_app, retention_app  # noqa: E402
from app.cli_explain import explain  # noqa: E402
from app.cli_ops import ops_app  # noqa: E402
from app.cli_preview import preview  # noqa: E402
from app.cli_sql import sql  # noqa: E402
from app.cli_status import status  # noqa: E402
from app.cli_sync import tenant_resync  # noqa: E402
from app.cli_teams import teams_app  # noqa: E402 (imports no Prefect)
from app.cli_tenants import tenant_app, user_app  # noqa: E402

app = typer.Typer(
    help="Office 365 activity capture for revenue teams: CRM-matched mail and meetings into DuckDB.",
    no_args_is_help=True,
    add_completion=False,
    cls=OneLineErrors,
    pretty_exceptions_enable=False,
)
app.add_typer(tenant_app, name="tenant")
app.add_typer(user_app, name="user")
app.add_typer(teams_app, name="teams")
app.add_typer(conversation_app, name="conversation")
app.add_typer(meeting_app, name="meeting")
app.add_typer(retention_app, name="retention")
app.add_typer(offboard_app, name="offboard")
app.add_typer(crm_app, name="crm")
app.add_typer(ops_app, name="ops")
app.command("export")(export)
app.command("explain")(explain)
app.command("preview")(preview)
app.command("status")(status)
app.command("sql")(sql)
tenant_app.command("resync")(tenant_resync)
console = Console()


@app.callback()
def _check_settings() -> None:
    """Settings that cannot be read, or a data dir that is not a folder, fail every command in one line."""
    from pydantic import ValidationError

    try:
        settings = load_settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        raise BadInput(
            f"setting O365SYNC_{str(err['loc'][0]).upper()}: {err['msg']} (fix the environment or .env)", 2
        ) from None
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise BadInput(f"the data dir {settings.data_dir} is not a folder (set O365SYNC_DATA_DIR to a folder)", 2)


def _at_least_one(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise BadInput(f"--{name} must be at least 1 (got {value})", 2)


# The simulated world's size, shared by `demo` and `simulate`.
Messages = Annotated[int, typer.Option(help="Messages per mailbox.")]
Contacts = Annotated[int, typer.Option(help="CRM contacts.")]
Seed = Annotated[int, typer.Option(help="World seed.")]


def _port(value: int, option: str) -> int:
    if not 1 <= value <= 65535:
        raise BadInput(f"{option} must be a TCP port between 1 and 65535 (got {value})", 2)
    return value


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="Users (mailboxes) in the demo tenant.")] = 3,
    messages: Messages = 400,
    contacts: Contacts = 60,
    seed: Seed = 7,
    keep_console: Annotated[
        bool, typer.Option("--console", help="Then keep the world up and serve the web console until Ctrl-C.")
    ] = False,
) -> None:
    """Run the whole product against a simulated Microsoft 365 + Salesforce world."""
    _at_least_one(users=users, messages=messages, contacts=contacts)
    from app.demo import run_demo

    run_demo(load_settings().data_dir, seed, users, messages, contacts, console, keep_console)


@app.command()
def simulate(
    users: Annotated[int, typer.Option(help="Users per tenant.")] = 3,
    messages: Messages = 400,
    contacts: Contacts = 60,
    seed: Seed = 7,
    web_port: Annotated[int, typer.Option(help="Port `o365sync web` will use (for the redirect URI).")] = 8400,
) -> None:
    """Start the demo's simulated world (mail, calendars, Teams, CRMs) and print the settings and the
    `tenant add` commands that point the product at it."""
    import threading

    from app.demo import simulate_world

    _at_least_one(users=users, messages=messages, contacts=contacts)
    _port(web_port, "--web-port")
    running = simulate_world(
        load_settings().data_dir,
        seed,
        users,
        messages,
        contacts,
        web_port,
        lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False),
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        running.stop()


@app.command()
def web(host: str = "127.0.0.1", port: int = 8400) -> None:
    """Serve /connect?tenant=<id> and the OAuth redirect callback."""
    from app.web import serve

    serve(load_settings(), host, _port(port, "--port"))


@app.command("import")
def import_(tenant: Annotated[str, typer.Option(help="Tenant id.")]) -> None:
    """Run the initial-import flow for a tenant now."""
    settings = load_settings()
    crm_configured(settings, registered_tenant(settings, tenant))  # before Prefect starts
    from flows.initial_import import ImportIncomplete, initial_import

    try:
        console.print(run_flow(initial_import, tenant))
    except ImportIncomplete as exc:
        raise BadInput(f"{exc}; who and why: o365sync status --tenant {tenant}") from None


@app.command()
def serve(
    limit: Annotated[int, typer.Option(help="Flow runs executing at once (each is a subprocess).")] = 4,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port of the local Prefect server (default 4200; if another program holds it, a free one, said so)."
        ),
    ] = None,
) -> None:
    """Run every tenant's five deployments (mail every 15 min, calendar hourly, Teams and retention daily, initial
    import on demand) on a Prefect server."""
    from deployments.ownership import DeploymentOwnerConflict
    from deployments.prefect_server import PrefectApiError
    from deployments.serve import NothingToServe, describe, serve_tenants

    def ready(api, deployments) -> None:  # noqa: ANN001
        table = Table("tenant", "deployment", "schedule", title="Serving")
        for row in describe(deployments):
            table.add_row(*row)
        console.print(table)
        console.print(
            f"Prefect UI: {api.ui_url}  (deployments: {api.ui_url}/deployments). Ctrl-C stops.\n"
            f"Other shells: export PREFECT_API_URL={api.api_url}",
            soft_wrap=True,
            highlight=False,
        )

    try:
        serve_tenants(
            load_settings(),
            limit=limit,
            port=port,
            on_ready=ready,
            echo=lambda m: console.print(m, highlight=False, soft_wrap=True),
        )
    except (NothingToServe, PrefectApiError, DeploymentOwnerConflict) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
