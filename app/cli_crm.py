"""`o365sync crm …`: decisions about a tenant's CRM snapshot that only an admin can take."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

crm_app = typer.Typer(help="A tenant's CRM snapshot.", no_args_is_help=True)
console = Console()


@crm_app.command("confirm-drop")
def confirm_drop(tenant: Annotated[str, typer.Option(help="Tenant id.")]) -> None:
    """Let the next CRM refresh remove what a refused one would have (more than half of the people or accounts).
    One refresh only; `o365sync status` shows what was refused."""
    from o365sync.settings import load_settings
    from o365sync.store import confirm_crm_drop, open_store, read_crm_drop_guard, store_path
    from o365sync.tenants import TenantNotFound, load_tenant

    settings = load_settings()
    try:
        load_tenant(settings, tenant)
        has_store = store_path(settings, tenant).exists()
    except (TenantNotFound, ValueError) as exc:
        console.print(f"[red]{exc}[/]", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    nothing = f"nothing to confirm: no CRM refresh of tenant {tenant} was refused"
    if has_store:
        with open_store(settings, tenant, write=False) as con:
            pending = read_crm_drop_guard(con)
        if pending is not None:
            with open_store(settings, tenant, write=True) as con:
                pending = confirm_crm_drop(con)
    if not has_store or pending is None:
        console.print(f"[red]{nothing}[/]", soft_wrap=True, highlight=False)
        raise typer.Exit(1)
    console.print(
        f"confirmed: the next CRM refresh of tenant {tenant} may remove up to "
        f"{pending['people_removed']:,} of {pending['people_before']:,} people and "
        f"{pending['accounts_removed']:,} of {pending['accounts_before']:,} accounts",
        soft_wrap=True,
        highlight=False,
    )
