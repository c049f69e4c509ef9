"""The `o365sync` command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from o365sync.prefect_env import configure_prefect_env

configure_prefect_env()  # before anything imports Prefect

app = typer.Typer(help="Office 365 activity capture for revenue teams: CRM-matched mail into DuckDB.",
                  no_args_is_help=True, add_completion=False)
tenant_app = typer.Typer(help="Register and inspect tenants.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
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


@tenant_app.command("add")
def tenant_add(
    id: Annotated[str, typer.Option("--id", help="Entra tenant id.")],
    domain: Annotated[list[str], typer.Option(help="Verified domain (repeat).")],
    name: Annotated[str, typer.Option(help="Display name.")] = "",
    crm: Annotated[str, typer.Option(help="CRM kind.")] = "salesforce",
    crm_login_url: Annotated[str, typer.Option(help="CRM login/instance URL.")] = "https://login.salesforce.com",
    crm_client_id: Annotated[str, typer.Option(help="CRM OAuth client id.")] = "",
    crm_client_secret: Annotated[str, typer.Option(help="CRM OAuth client secret.")] = "",
    crm_refresh_token: Annotated[str, typer.Option(help="CRM OAuth refresh token.")] = "",
    feature: Annotated[list[str], typer.Option(help="Enabled feature (repeat).")] = ["email"],  # noqa: B006
) -> None:
    """Register (or update) a tenant. Secrets are stored encrypted and never shown."""
    from pydantic import ValidationError

    from o365sync.tenants import CrmConnection, TenantConfig, save_tenant

    try:
        config = TenantConfig(id=id, name=name, domains=domain, features=feature, crm_kind=crm,
                              crm=CrmConnection(login_url=crm_login_url, client_id=crm_client_id))
    except ValidationError as exc:
        for err in exc.errors():
            console.print(f"[red]{'.'.join(str(p) for p in err['loc'])}: {err['msg']}[/]")
        raise typer.Exit(2) from None
    secrets = {"client_secret": crm_client_secret, "refresh_token": crm_refresh_token} if crm_refresh_token else None
    save_tenant(_settings(), config, secrets)
    console.print(f"tenant {config.id} saved")


@tenant_app.command("list")
def tenant_list() -> None:
    """List registered tenants."""
    from o365sync.tenants import list_tenants

    table = Table("id", "name", "domains", "crm", "features")
    for t in list_tenants(_settings()):
        table.add_row(t.id, t.name, ", ".join(t.domains), t.crm_kind, ", ".join(t.features))
    console.print(table)


@tenant_app.command("show")
def tenant_show(tenant_id: str) -> None:
    """Show one tenant (without secrets) and its connected users."""
    from o365sync.auth import connected_users
    from o365sync.tenants import TenantNotFound, load_crm_secrets, load_tenant

    settings = _settings()
    try:
        t = load_tenant(settings, tenant_id)
    except TenantNotFound as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(t.model_dump_json(indent=2))
    console.print(f"CRM secrets stored: {', '.join(sorted(load_crm_secrets(settings, tenant_id))) or 'none'}")
    for u in connected_users(settings, tenant_id):
        console.print(f"connected user {u.oid} ({u.display_name})")


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


@app.command()
def status(tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None) -> None:
    """Print per-user sync state."""
    from o365sync.store import open_store
    from o365sync.tenants import list_tenants

    settings = _settings()
    tenants = [t for t in list_tenants(settings) if not tenant or t.id == tenant]
    if not tenants:
        console.print("No tenants registered." if not tenant else f"Tenant {tenant} is not registered.")
        raise typer.Exit(0 if not tenant else 1)
    table = Table("tenant", "user", "stage", "last run", "last success", "failures", "last error", "scanned",
                  "matched", "imported", "discarded")
    for t in tenants:
        with open_store(settings, t.id, write=False) as con:
            for row in con.execute("SELECT user_oid, stage, last_run_at, last_success_at, consecutive_failures, "
                                   "last_error, scanned, matched, imported, discarded FROM sync_state "
                                   "ORDER BY user_oid").fetchall():
                table.add_row(t.id, *(_cell(v) for v in row))
    console.print(table)


if __name__ == "__main__":
    app()
