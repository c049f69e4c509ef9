"""`o365sync tenant resync`: an operator's way out of a stuck sync position without a shell into the data dir.

It drops the saved deltaLinks of a tenant's users (all, or `--user`; mail, calendar or both), so the next sync of
each is the bounded resync that an expired token gets (docs/SYNC.md): mail re-lists from a day before its last
delta round, calendar takes a new baseline of its window. Rows are keyed on immutable ids: nothing is doubled.
Everything is checked before anything changes; it waits for a running sync of the same features to end.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console

console = Console()


class ResyncFeature(StrEnum):
    email = "email"
    calendar = "calendar"


def _fail(message: str) -> None:
    console.print(f"[red]{message}[/]", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


def tenant_resync(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id.")],
    user: Annotated[str | None, typer.Option("--user", help="Only this user (object id).")] = None,
    feature: Annotated[ResyncFeature | None, typer.Option(help="Only this feature (default: both).")] = None,
) -> None:
    """Drop saved sync positions so the next sync resyncs (e.g. after O365SYNC_GRAPH_URL changed)."""
    from o365sync.auth import connected_users
    from o365sync.settings import load_settings
    from o365sync.store import (
        open_store,
        reset_sync_positions,
        store_path,
        sync_position_users,
        tenant_sync_locks,
    )
    from o365sync.tenants import TenantNotFound, load_tenant, tenant_dir

    settings = load_settings()
    try:
        tenant = load_tenant(settings, tenant_id)
    except TenantNotFound:
        _fail(
            f"tenant {tenant_id} is not registered (o365sync tenant list shows the registered tenants); nothing changed"
        )
    has_store = store_path(settings, tenant.id).exists()
    known = {u.oid for u in connected_users(settings, tenant.id)}
    if has_store:
        with open_store(settings, tenant.id, write=False) as con:
            known |= sync_position_users(con, tenant.id)
    if user is not None and user not in known:
        _fail(
            f"user {user} is not a user of tenant {tenant.id} (o365sync tenant show {tenant.id} lists the "
            "connected users); nothing changed"
        )
    features = [feature.value] if feature else [f.value for f in ResyncFeature]
    done: list[tuple[str, str, str]] = []
    if has_store:
        with (
            tenant_sync_locks(tenant_dir(settings, tenant.id), features),
            open_store(settings, tenant.id, write=True) as con,
        ):
            done = reset_sync_positions(con, tenant.id, [user] if user else sorted(known), features)
    scope = f"user {user}" if user else f"tenant {tenant.id}"
    if not done:
        console.print(
            f"nothing to reset: no saved sync position ({', '.join(features)}) for {scope}",
            soft_wrap=True,
            highlight=False,
        )
        return
    for oid, feat, where in done:
        console.print(f"reset {oid} {feat}{'' if where == feat else ' ' + where}", highlight=False)
    console.print(
        f"{len(done)} sync position(s) of {scope} reset: the next sync resyncs them (mail from a day "
        "before its last sync, calendar with a new baseline)",
        soft_wrap=True,
        highlight=False,
    )
