"""`o365sync teams`: list users' Teams channels and share an activity summary to a channel or a chat.

Registered in app/cli.py with `app.add_typer(teams_app, name="teams")`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli_checks import (
    BadInput,
    command_group,
    connected_user,
    has_store,
    known_user,
    read_store,
    registered_tenant,
    run_flow,
)
from o365sync.prefect_env import configure_prefect_env
from o365sync.settings import load_settings

configure_prefect_env()  # before anything imports Prefect

teams_app = command_group("Teams sharing: users' channels, and activity summaries posted to a channel or chat.")
console = Console()


def _tenant_or_exit(settings, tenant: str):  # noqa: ANN001, ANN202
    config = registered_tenant(settings, tenant)
    if not config.feature_on("teams"):
        raise BadInput(
            f"tenant {tenant} has not enabled Teams sharing (turn on the feature 'teams' with o365sync tenant)"
        )
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

    settings = load_settings()
    config = _tenant_or_exit(settings, tenant)
    if user:
        (connected_user if refresh else known_user)(settings, config, user)
    if refresh and user:
        try:
            result = refresh_channels(settings, tenant, user)
        except ConsentNeeded:
            raise BadInput(
                f"user {user} connected before Teams was enabled: they must reconnect "
                f"(/connect?tenant={tenant}) to grant the Teams permissions"
            ) from None
        console.print(f"refreshed: {result.teams} teams, {result.channels} channels")
    elif refresh:
        from flows.teams import TeamsRefreshIncomplete, teams_refresh

        try:
            console.print(run_flow(teams_refresh, tenant))
        except TeamsRefreshIncomplete as exc:
            raise BadInput(f"{exc}: who and why: o365sync status --tenant {tenant}") from None
    names = {u.oid: u.display_name or u.upn for u in connected_users(settings, tenant)}
    rows = []
    if has_store(settings, tenant):
        with open_store(settings, tenant, write=False) as con:
            rows = read_channels(con, tenant, user)
    table = Table("user", "team", "channel", "membership", "team id", "channel id", "refreshed")
    for r in rows:
        table.add_row(
            names.get(r["user_oid"], r["user_oid"]),
            r["team_name"] or "",
            r["channel_name"] or "",
            r["membership_type"] or "",
            r["team_id"],
            r["channel_id"],
            r["refreshed_at"].isoformat(timespec="seconds") if r["refreshed_at"] else "",
        )
    console.print(table if rows else "No channels stored yet (use --refresh).")


@teams_app.command("share")
def share(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    user: Annotated[str, typer.Option(help="The sharing user (object id or UPN of a connected user).")],
    meeting: Annotated[str | None, typer.Option(help="Meeting (event id) to share.")] = None,
    email: Annotated[str | None, typer.Option(help="Email (Graph id) to share.")] = None,
    team: Annotated[str | None, typer.Option(help="Team id of the target channel.")] = None,
    channel: Annotated[str | None, typer.Option(help="Target channel id (with --team).")] = None,
    member: Annotated[
        list[str] | None,
        typer.Option(
            help="Chat member (repeat; object id, or UPN of a connected user): one = 1:1 chat, several = group."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Post even if an earlier run may already have posted.")
    ] = False,
) -> None:
    """Post an activity summary (never a body) to a channel or to a chat created for it; once per target."""
    from o365sync.auth import connected_users

    settings = load_settings()
    config = _tenant_or_exit(settings, tenant)
    if (meeting is None) == (email is None):
        raise BadInput("give exactly one of --meeting or --email", 2)
    if (team is None) != (channel is None) or (team is None) == (not member):
        raise BadInput("give --team and --channel, or one or more --member", 2)
    by_upn = {u.upn.lower(): u.oid for u in connected_users(settings, tenant) if u.upn}
    oid = connected_user(settings, config, by_upn.get(user.lower(), user))
    oids: list[str] = []
    for m in member or []:
        resolved = by_upn.get(m.lower(), m)
        if "@" in resolved:
            raise BadInput(f"{m} is not a connected user of tenant {tenant}: give their object id", 2)
        oids.append(resolved)
    kind, activity_id = ("meeting", meeting) if meeting else ("email", email)
    assert activity_id is not None
    table, column = ("meetings", "event_id") if meeting else ("emails", "graph_id")
    if not read_store(
        settings,
        tenant,
        f"SELECT 1 FROM {table} WHERE tenant_id = ? AND user_oid = ? AND {column} = ? LIMIT 1",
        [tenant, oid, activity_id],
    ):
        raise BadInput(f"nothing matched: no {kind} {activity_id} of user {oid} is stored in tenant {tenant}")
    from flows.teams import TeamsShareError, teams_share

    try:
        result = run_flow(
            teams_share,
            tenant,
            oid,
            kind,
            activity_id,
            team_id=team,
            channel_id=channel,
            member_oids=oids or None,
            force=force,
        )
    except TeamsShareError as exc:
        raise BadInput(str(exc)) from None
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
    if status not in ("posted", "already_posted"):
        raise BadInput(messages.get(str(status), str(status)))
    console.print(messages[str(status)], soft_wrap=True)
