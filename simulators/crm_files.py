"""Write a simulated tenant's CRM as the file-based CRM's CSVs (docs/CRM_FILES.md), e.g. for the files adapter."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from simulators.world import SimCrm


def write_crm_files(crm: SimCrm, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    people = [(c.id, "contact", c.email, c.account_id, f"{c.first_name} {c.last_name}", "false") for c in crm.contacts]
    people += [
        (x.id, "lead", x.email, None, f"{x.first_name} {x.last_name}", str(x.is_converted).lower()) for x in crm.leads
    ]
    pl.DataFrame(
        people, schema=["crm_id", "kind", "email", "account_id", "name", "is_converted"], orient="row"
    ).write_csv(directory / "people.csv")
    pl.DataFrame(
        [(a.id, a.name, a.website) for a in crm.accounts], schema=["crm_id", "name", "website"], orient="row"
    ).write_csv(directory / "accounts.csv")
    pl.DataFrame(
        [(o.id, o.account_id, o.name, str(o.is_closed).lower(), o.created.isoformat()) for o in crm.opportunities],
        schema=["crm_id", "account_id", "name", "is_closed", "created_at"],
        orient="row",
    ).write_csv(directory / "opportunities.csv")
