"""`o365sync teams`: list users' Teams channels and share an activity summary to a channel or a chat.

Registered in o365sync/cli.py with `app.add_typer(teams_app, name="teams")`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from o365sync.prefect_env import configure_prefect_env

configure_prefect_env()  # before anything imports Prefect

teams_app = typer.Typer(help="Teams sharing: users' channels, and activity summaries posted to a channel or chat.",
                        no_args_is_help=True)
console = Console()


def _settings():  # noqa: ANN202
    from o365sync.settings import load_settings

    return load_settings()


def _tenant_or_exit(settings, tenant: str):  # noqa: ANN001, ANN202
    from o365sync.tenants import TenantNotFound, load_tenant

    try:
        config = load_tenant(settings, tenant)
    except TenantNotFound as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if not config.feature_on("teams"):
        console.print(f"[red]Tenant {tenant} has not enabled Teams sharing[/] "
                      f"(o365sync tenant add --id {tenant} ... --feature teams).")
        raise typer.Exit(1)
    return config


@teams_app.command("channels")
def channels(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    user: Annotated[str | None, typer.Option(help="Only this user (object id).")] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Refresh from Microsoft Graph first.")] = False,
) -> None:
    """List the Teams channels each connected user can post to (with membership type)."""
    from o365sync.auth import connected_users
    from o365sync.store import open_store
    from o365sync.teams import ConsentNeeded, refresh_channels
    from o365sync.teams_store import read_channels

    settings = _settings()
    _tenant_or_exit(settings, tenant)
    if refresh and user:
        try:
            result = refresh_channels(settings, tenant, user)
        except ConsentNeeded:
            console.print(f"[yellow]User {user} connected before Teams was enabled: they must reconnect "
                          f"(/connect?tenant={tenant}) to grant the Teams permissions.[/]")
            raise typer.Exit(1) from None
        console.print(f"refreshed: {result.teams} teams, {result.channels} channels")
    elif refresh:
        from flows.teams import teams_refresh

        console.print(teams_refresh(tenant))
    names = {u.oid: u.display_name or u.upn for u in connected_users(settings, tenant)}
    with open_store(settings, tenant, write=False) as con:
        rows = read_channels(con, tenant, user)
    table = Table("user", "team", "channel", "membership", "team id", "channel id", "refreshed")
    for r in rows:
        table.add_row(names.get(r["user_oid"], r["user_oid"]), r["team_name"] or "", r["channel_name"] or "",
                      r["membership_type"] or "", r["team_id"], r["channel_id"],
                      r["refreshed_at"].isoformat(timespec="seconds") if r["refreshed_at"] else "")
    console.print(table if rows else "No channels stored yet (use --refresh).")


@teams_app.command("share")
def share(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    user: Annotated[str, typer.Option(help="The sharing user (object id or UPN of a connected user).")],
    meeting: Annotated[str | None, typer.Option(help="Meeting (event id) to share.")] = None,
    email: Annotated[str | None, typer.Option(help="Email (Graph id) to share.")] = None,
    team: Annotated[str | None, typer.Option(help="Team id of the target channel.")] = None,
    channel: Annotated[str | None, typer.Option(help="Target channel id (with --team).")] = None,
    member: Annotated[list[str] | None, typer.Option(
        help="Chat member (repeat; object id, or UPN of a connected user): one = 1:1 chat, several = group.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Post even if an earlier run may already have posted.")]
    = False,
) -> None:
    """Post an activity summary (never a body) to a channel or to a chat created for it; once per target."""
    from o365sync.auth import connected_users

    settings = _settings()
    _tenant_or_exit(settings, tenant)
    if (meeting is None) == (email is None):
        console.print("[red]Give exactly one of --meeting or --email.[/]")
        raise typer.Exit(2)
    if (team is None) != (channel is None) or (team is None) == (not member):
        console.print("[red]Give --team and --channel, or one or more --member.[/]")
        raise typer.Exit(2)
    by_upn = {u.upn.lower(): u.oid for u in connected_users(settings, tenant) if u.upn}
    oid = by_upn.get(user.lower(), user)
    oids: list[str] = []
    for m in member or []:
        resolved = by_upn.get(m.lower(), m)
        if "@" in resolved:
            console.print(f"[red]{m} is not a connected user of tenant {tenant}: give their object id.[/]")
            raise typer.Exit(2)
        oids.append(resolved)
    from flows.teams import teams_share

    kind, activity_id = ("meeting", meeting) if meeting else ("email", email)
    assert activity_id is not None
    result = teams_share(tenant, oid, kind, activity_id, team_id=team, channel_id=channel,
                         member_oids=oids or None, force=force)
    status = result["status"]
    messages = {
        "posted": f"posted: message {result.get('message_id')} in {result.get('target_kind')} "
                  f"{result.get('target_id')}",
        "already_posted": f"already shared (message {result.get('message_id')}); nothing posted",
        "uncertain": "an earlier run may have posted this share but did not record it; nothing posted "
                     "(check the target, then use --force to post anyway)",
        "consent_needed": f"user {oid} must reconnect (/connect?tenant={tenant}) to grant the Teams permissions",
        "disabled": f"tenant {tenant} has not enabled Teams sharing",
    }
    console.print(messages.get(str(status), str(result)), soft_wrap=True)
    if status not in ("posted", "already_posted"):
        raise typer.Exit(1)
