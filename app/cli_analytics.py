"""`o365sync export`: a tenant's analyst views as Parquet files, from its published snapshot (never the live store).

Registered in app/cli.py with `app.command("export")(export)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli_checks import BadInput, new_folder_destination, registered_tenant

console = Console()


def export(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Destination folder (must not exist). Default: a new <tenant dir>/exports/<UTC timestamp>/."),
    ] = None,
    view: Annotated[
        list[str],
        typer.Option(
            help="View to export (repeat): activities, email_activity, "
            "meeting_activity, crm_matches, crm_records, sync_status, or the "
            "tables emails, meetings. Default: every view."
        ),
    ] = [],  # noqa: B006
) -> None:
    """Export a tenant's analyst views as Parquet (one file per view + manifest.json), atomically. Erasures
    (conversation delete, retention, offboarding) delete the exports under the tenant's directory."""
    from o365sync.analytics import export_views, is_inside_tenant
    from o365sync.settings import load_settings

    settings = load_settings()
    registered_tenant(settings, tenant)
    if out is not None:
        out = new_folder_destination(out)  # before a snapshot is published or anything is written
    try:
        result = export_views(settings, tenant, views=view or None, out=out)
    except (ValueError, FileExistsError) as exc:
        raise BadInput(str(exc), 2) from None
    table = Table("view", "rows", "file", title=f"Export of tenant {tenant}")
    for name, rows in result.rows.items():
        table.add_row(name, str(rows), f"{name}.parquet")
    console.print(table)
    console.print(f"written to {result.path}", soft_wrap=True, highlight=False)
    if not is_inside_tenant(settings, tenant, result.path):
        console.print(
            "[yellow]This export is outside the tenant's directory: erasures and `tenant move` will not "
            "reach it; deleting it is up to you.[/]",
            soft_wrap=True,
        )
