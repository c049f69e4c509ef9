"""`o365sync tenant …` and `o365sync user …`: register, inspect, move and configure tenants; a user's own
choices. Secrets are stored encrypted and never shown."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

tenant_app = typer.Typer(help="Register and inspect tenants.", no_args_is_help=True)
user_app = typer.Typer(help="Per-user choices (calendar import, internal meetings, Notetaker).", no_args_is_help=True)
console = Console()


def _settings():  # noqa: ANN202
    from o365sync.settings import load_settings

    return load_settings()


@tenant_app.command("add")
def tenant_add(
    id: Annotated[str, typer.Option("--id", help="Entra tenant id.")],
    domain: Annotated[list[str], typer.Option(help="Verified domain (repeat).")],
    name: Annotated[str, typer.Option(help="Display name.")] = "",
    crm: Annotated[str, typer.Option(help="CRM kind: salesforce, hubspot, pipedrive or files.")] = "salesforce",
    crm_login_url: Annotated[str, typer.Option(help="Salesforce login URL, or the HubSpot/Pipedrive API base URL.")]
    = "https://login.salesforce.com",
    crm_client_id: Annotated[str, typer.Option(help="Salesforce OAuth client id.")] = "",
    crm_client_secret: Annotated[str, typer.Option(help="Salesforce OAuth client secret.")] = "",
    crm_refresh_token: Annotated[str, typer.Option(help="Salesforce OAuth refresh token.")] = "",
    crm_token: Annotated[str, typer.Option(help="HubSpot private-app token or Pipedrive API token.")] = "",
    crm_directory: Annotated[str, typer.Option(help="crm=files: folder with people/accounts CSV or Parquet.")] = "",
    feature: Annotated[list[str], typer.Option(help="Enabled feature (repeat): email, calendar, notetaker, teams. "
                                               "Default: email, calendar, notetaker.")] = [],  # noqa: B006
    explicit_consent: Annotated[bool, typer.Option(help="Notetaker Explicit Consent Mode (Teams links and consent "
                                                        "notices on matched external meetings).")] = False,
) -> None:
    """Register (or update) a tenant. Secrets are stored encrypted and never shown."""
    from pydantic import ValidationError

    from o365sync.tenants import DEFAULT_FEATURES, CrmConnection, TenantConfig, save_tenant

    try:
        config = TenantConfig(id=id, name=name, domains=domain, features=feature or list(DEFAULT_FEATURES),
                              notetaker_explicit_consent=explicit_consent, crm_kind=crm,
                              crm=CrmConnection(login_url=crm_login_url, client_id=crm_client_id,
                                                directory=crm_directory or None))
    except ValidationError as exc:
        for err in exc.errors():
            console.print(f"[red]{'.'.join(str(p) for p in err['loc'])}: {err['msg']}[/]")
        raise typer.Exit(2) from None
    secrets: dict[str, str] | None = None
    if crm == "salesforce" and crm_refresh_token:
        secrets = {"client_secret": crm_client_secret, "refresh_token": crm_refresh_token}
    elif crm in ("hubspot", "pipedrive") and crm_token:
        secrets = {"access_token" if crm == "hubspot" else "api_token": crm_token}
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


@user_app.command("set")
def user_set(
    tenant_id: str,
    user: Annotated[str, typer.Argument(help="The user's object id.")],
    calendar: Annotated[bool | None, typer.Option("--calendar/--no-calendar", help="Import meetings.")] = None,
    internal_meetings: Annotated[bool | None, typer.Option("--internal-meetings/--no-internal-meetings",
                                                           help="Also import internal meetings.")] = None,
    notetaker: Annotated[bool | None, typer.Option("--notetaker/--no-notetaker", help="Notetaker for my meetings.")]
    = None,
) -> None:
    """Change one user's choices; options left out keep their value."""
    from o365sync.tenants import TenantNotFound, load_tenant, save_tenant

    settings = _settings()
    try:
        t = load_tenant(settings, tenant_id)
    except TenantNotFound as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    changes = {k: v for k, v in {"calendar": calendar, "internal_meetings": internal_meetings,
                                 "notetaker": notetaker}.items() if v is not None}
    prefs = t.preferences_for(user).model_copy(update=changes)
    t.user_preferences[user] = prefs
    save_tenant(settings, t)
    console.print(f"user {user}: " + ", ".join(f"{k}={'on' if v else 'off'}" for k, v in prefs.model_dump().items()))


@tenant_app.command("move")
def tenant_move(
    tenant_id: str,
    region: Annotated[str, typer.Option(help="Target region (a key of O365SYNC_REGIONS); 'default' = data_dir.")],
) -> None:
    """Move every file of a tenant (store, snapshot, tokens, credentials, exports) to another region's storage."""
    from o365sync.residency import move_tenant
    from o365sync.tenants import TenantNotFound

    try:
        result = move_tenant(_settings(), tenant_id, None if region == "default" else region)
    except (TenantNotFound, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    console.print(f"tenant {tenant_id} now stored in region {result['region']} ({result['files']} files moved, "
                  f"{result['removed_locations']} old locations removed)")


@tenant_app.command("block")
def tenant_block(
    tenant_id: str,
    entries: Annotated[list[str], typer.Argument(help="Addresses or domains never to import mail with.")],
    user: Annotated[str | None, typer.Option(help="Only for this user (object id); default: tenant-wide.")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Take the entries off the list instead.")] = False,
) -> None:
    """Add (or remove) blocklist entries, tenant-wide or for one user."""
    from pydantic import ValidationError

    from o365sync.tenants import TenantConfig, TenantNotFound, blocklist_entry, load_tenant, save_tenant

    settings = _settings()
    try:
        t = load_tenant(settings, tenant_id)
        values = {blocklist_entry(e) for e in entries}
    except (TenantNotFound, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    current = set(t.user_blocklists.get(user, [])) if user else set(t.blocklist)
    updated = sorted(current - values if remove else current | values)
    data = t.model_dump()
    if user:
        data["user_blocklists"] = {**t.user_blocklists, user: updated}
    else:
        data["blocklist"] = updated
    try:
        save_tenant(settings, TenantConfig.model_validate(data))
    except ValidationError as exc:
        console.print(f"[red]{exc.errors()[0]['msg']}[/]")
        raise typer.Exit(2) from None
    owner = f"user {user}" if user else f"tenant {tenant_id}"
    console.print(f"blocklist of {owner}: {', '.join(updated) or '(empty)'}")
