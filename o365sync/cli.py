"""The `o365sync` command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from o365sync.prefect_env import configure_prefect_env

configure_prefect_env()  # before anything imports Prefect

from o365sync.cli_analytics import export  # noqa: E402
from o365sync.cli_data import conversation_app, meeting_app, offboard_app, retention_app  # noqa: E402
from o365sync.cli_sync import tenant_resync  # noqa: E402
from o365sync.cli_teams import teams_app  # noqa: E402 (imports no Prefect)
from o365sync.cli_tenants import tenant_app, user_app  # noqa: E402

app = typer.Typer(help="Office 365 activity capture for revenue teams: CRM-matched mail and meetings into DuckDB.",
                  no_args_is_help=True, add_completion=False)
app.add_typer(tenant_app, name="tenant")
app.add_typer(user_app, name="user")
app.add_typer(teams_app, name="teams")
app.add_typer(conversation_app, name="conversation")
app.add_typer(meeting_app, name="meeting")
app.add_typer(retention_app, name="retention")
app.add_typer(offboard_app, name="offboard")
app.command("export")(export)
tenant_app.command("resync")(tenant_resync)
console = Console()


def _settings():  # noqa: ANN202
    from o365sync.settings import load_settings

    return load_settings()


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="Users (mailboxes) in the demo tenant.")] = 3,
    messages: Annotated[int, typer.Option(help="Messages per mailbox.")] = 400,
    contacts: Annotated[int, typer.Option(help="CRM contacts.")] = 60,
    seed: Annotated[int, typer.Option(help="World seed.")] = 7,
) -> None:
    """Run the whole product against a simulated Microsoft 365 + Salesforce world."""
    from o365sync.demo import run_demo

    run_demo(_settings().data_dir, seed, users, messages, contacts, console)


@app.command()
def simulate(
    users: Annotated[int, typer.Option(help="Users per tenant.")] = 3,
    messages: Annotated[int, typer.Option(help="Messages per mailbox.")] = 400,
    seed: Annotated[int, typer.Option(help="World seed.")] = 7,
    web_port: Annotated[int, typer.Option(help="Port `o365sync web` will use (for the redirect URI).")] = 8400,
) -> None:
    """Start the simulated world and print its URLs and the settings that point the product at it."""
    import threading

    from simulators.running import start_world
    from simulators.world import generate_world

    settings = _settings()
    world = generate_world(seed=seed, users_per_tenant=users, messages_per_user=messages)
    redirect = f"http://localhost:{web_port}/auth/callback"
    running = start_world(world, settings.data_dir / "simulator-tls", redirect_uris=[redirect])
    console.print(f"identity platform  {running.identity.base_url}\nMicrosoft Graph    {running.graph.base_url}\n"
                  f"Salesforce         {running.salesforce.base_url}\n")
    console.print("# settings (e.g. in .env):")
    for key, value in running.settings_env(settings.data_dir, redirect).items():
        console.print(f"{key}={value}", soft_wrap=True, highlight=False)
    sf = running.salesforce
    for t in world.tenants:
        console.print(f"\n# tenant {t.name}: users {', '.join(u.upn for u in t.users)}\n"
                      f"o365sync tenant add --id {t.tid} --name {t.name} "
                      + " ".join(f"--domain {d}" for d in t.domains)
                      + f" --crm-login-url {sf.base_url} --crm-client-id {sf.client_id} "
                      f"--crm-client-secret {sf.client_secret} --crm-refresh-token {sf.refresh_token_for(t.tid)}",
                      soft_wrap=True, highlight=False)
        for u in t.users:
            console.print(f"# connect {u.display_name}: http://localhost:{web_port}/connect?tenant={t.tid}"
                          f"&login_hint={u.upn}", soft_wrap=True, highlight=False)
    console.print("\nThen: o365sync web, open the connect links, and o365sync import --tenant <id>. Ctrl-C stops.",
                  soft_wrap=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        running.stop()


@app.command()
def web(host: str = "127.0.0.1", port: int = 8400) -> None:
    """Serve /connect?tenant=<id> and the OAuth redirect callback."""
    from o365sync.web import serve

    serve(_settings(), host, port)


@app.command("import")
def import_(tenant: Annotated[str, typer.Option(help="Tenant id.")]) -> None:
    """Run the initial-import flow for a tenant now."""
    from flows.initial_import import initial_import

    console.print(initial_import(tenant))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _lag(value: object) -> str:
    if value is None:
        return ""
    seconds = int(value.total_seconds())  # type: ignore[attr-defined]
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _excluded(value: str | None) -> str:
    import json

    return ", ".join(f"{k} {v}" for k, v in sorted(json.loads(value or "{}").items()))


@app.command()
def status(tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None) -> None:
    """Print per-user sync state."""
    from o365sync.store import crm_state_summary, open_store, read_crm_state, read_sync_states
    from o365sync.tenants import list_tenants

    settings = _settings()
    tenants = [t for t in list_tenants(settings) if not tenant or t.id == tenant]
    if not tenants:
        console.print("No tenants registered." if not tenant else f"Tenant {tenant} is not registered.")
        raise typer.Exit(0 if not tenant else 1)
    table = Table("tenant", "user", "feature", "stage", "last success", "lag", "failures", "next retry",
                  "last error", "scanned", "matched", "imported", "excluded")
    crm_table = Table("tenant", "CRM", "state", "last refresh", "mode", "last success", "last full read", "error",
                      title="CRM snapshots")
    for t in tenants:
        with open_store(settings, t.id, write=False) as con:
            states = [st for f in ("email", "calendar", "teams") for st in read_sync_states(con, t.id, f)]
            crm, summary = read_crm_state(con) or {}, crm_state_summary(con)
        crm_table.add_row(t.id, t.crm_kind, crm.get("status", "never refreshed").replace("_", " "),
                          _cell(summary["taken_at"]), _cell(summary.get("mode")), _cell(crm.get("last_success_at")),
                          _cell(summary["last_full_at"]), _cell(crm.get("last_error")))
        for st in states:
            table.add_row(t.id, st["user_oid"], st["feature"], st["stage"].replace("_", " "),
                          _cell(st["last_success_at"]),
                          _lag(st["lag"]), str(st["consecutive_failures"]), _cell(st["next_retry_at"]),
                          _cell(st["last_error"]), _cell(st["scanned"]), _cell(st["matched"]),
                          _cell(st["imported"]), _excluded(st["excluded"]))
    console.print(table)
    console.print(crm_table)
    from flows.offboarding import offboarding_status

    offboarded = Table("tenant", "user", "policy", "offboarded", "delete after", "deleted", title="Offboarded users")
    for t in tenants:
        for oid, rec in sorted(offboarding_status(settings, t.id).items()):
            offboarded.add_row(t.id, oid, rec.get("policy", ""), _cell(rec.get("offboarded_at")),
                               _cell(rec.get("delete_after")), _cell(rec.get("deleted_at")))
    if offboarded.row_count:
        console.print(offboarded)


@app.command()
def serve(
    limit: Annotated[int, typer.Option(help="Flow runs executing at once (each is a subprocess).")] = 4,
    port: Annotated[int | None, typer.Option(help="Port of the local Prefect server (default 4200, else free).")]
    = None,
) -> None:
    """Run every tenant's email sync every 15 minutes (and on-demand initial imports) on a Prefect server."""
    from deployments.serve import NothingToServe, describe, serve_tenants
    from o365sync.prefect_server import PrefectApiError

    def ready(api, deployments) -> None:  # noqa: ANN001
        table = Table("tenant", "deployment", "schedule", title="Serving")
        for row in describe(deployments):
            table.add_row(*row)
        console.print(table)
        console.print(f"Prefect UI: {api.ui_url}  (deployments: {api.ui_url}/deployments). Ctrl-C stops.\n"
                      f"Other shells: export PREFECT_API_URL={api.api_url}", soft_wrap=True, highlight=False)

    try:
        serve_tenants(_settings(), limit=limit, port=port, on_ready=ready,
                      echo=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except (NothingToServe, PrefectApiError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
