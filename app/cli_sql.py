"""`o365sync sql`: one SQL query on a tenant's published analysts' snapshot, printed as a table, CSV or JSON.

The DuckDB command line is not installed on a fresh machine (the Python package ships none), so analysts query
through the product's own DuckDB. The snapshot is attached READ_ONLY (`analytics.open_snapshot`, the analyst
views included) and the session then loses file access (`enable_external_access = false`, configuration
locked): a write, an ATTACH, a COPY TO a file or reading another file fails. The live store is never opened.

Registered in app/cli.py with `app.command("sql")(sql)`."""

from __future__ import annotations

import csv
import json
import sys
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

import duckdb
import typer
from rich.console import Console
from rich.table import Table

from app.cli_checks import BadInput, only_tenant
from o365sync.settings import Settings

console = Console()


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def query_snapshot(settings: Settings, tenant_id: str, query: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of `query` on the tenant's snapshot, read-only and without file access. BadInput if
    there is no snapshot yet or DuckDB refuses the query (its message, one line)."""
    from o365sync.analytics import open_snapshot
    from o365sync.store import snapshot_path

    if not snapshot_path(settings, tenant_id).exists():
        raise BadInput(
            f"tenant {tenant_id} has no analysts' snapshot yet: it is published by every import "
            f"(o365sync import --tenant {tenant_id})"
        )
    try:
        con = open_snapshot(settings, tenant_id)
    except duckdb.Error as exc:
        raise BadInput(f"the snapshot of tenant {tenant_id} cannot be opened: {_one_line(exc)}") from None
    try:
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        cur = con.execute(query)
        if cur.description is None:
            return [], []
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.Error as exc:
        raise BadInput(f"SQL: {_one_line(exc)}", 2) from None
    finally:
        con.close()


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _plain(value: Any) -> Any:
    """A JSON value for a DuckDB value (times as ISO 8601, decimals as numbers, nested lists/structs kept)."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    plain = _plain(value)
    return json.dumps(plain) if isinstance(plain, list | dict) else str(plain)


def sql(
    query: Annotated[
        str, typer.Argument(help='One SQL statement, e.g. "SELECT kind, count(*) FROM activities GROUP BY ALL".')
    ],
    tenant: Annotated[str | None, typer.Option(help="Tenant id (default: the only registered tenant).")] = None,
    format: Annotated[Format, typer.Option("--format", help="table, csv or json (an array of objects).")] =  # noqa: A002
    Format.table,
) -> None:
    """Query a tenant's analysts' snapshot (read-only; views: activities, email_activity, meeting_activity,
    crm_matches, crm_records, sync_status; docs/ANALYSTS.md)."""
    from o365sync.settings import load_settings

    settings = load_settings()
    tenant_id = only_tenant(settings, tenant).id
    columns, rows = query_snapshot(settings, tenant_id, query)
    if format is Format.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(v) for v in row] for row in rows)
    elif format is Format.json:
        sys.stdout.write(
            json.dumps(
                [dict(zip(columns, map(_plain, row), strict=True)) for row in rows], ensure_ascii=False, default=str
            )
            + "\n"
        )
    else:
        table = Table(*columns, caption=f"{len(rows)} row{'s' if len(rows) != 1 else ''}")
        for row in rows:
            table.add_row(*(_cell(v) for v in row))
        console.print(table)
