"""Shared helpers of the CRM adapter tests: build an expected snapshot from rows, compare snapshots."""

from __future__ import annotations

from datetime import datetime

import polars as pl

from o365sync.crm import ACCOUNTS_SCHEMA, OPPORTUNITIES_SCHEMA, PEOPLE_SCHEMA, CrmChanges, CrmSnapshot
from simulators import world as world_mod
from simulators.world import CrmContact, SimCrm


def snapshot_of(people: list[tuple], accounts: list[tuple], opportunities: list[tuple]) -> CrmSnapshot:
    return CrmSnapshot(
        people=pl.DataFrame(people, schema=PEOPLE_SCHEMA, orient="row"),
        accounts=pl.DataFrame(accounts, schema=ACCOUNTS_SCHEMA, orient="row"),
        opportunities=pl.DataFrame(opportunities, schema=OPPORTUNITIES_SCHEMA, orient="row"),
    )


def world_snapshot(crm: SimCrm) -> CrmSnapshot:
    """A world's CRM in snapshot form with the world's own ids, computed naively in Python (the oracle of the
    adapters that keep the CRM's ids: Salesforce and files)."""
    people = [
        (c.id, "contact", c.email.strip().lower(), c.account_id, f"{c.first_name} {c.last_name}")
        for c in crm.contacts
        if c.email.strip()
    ]
    people += [
        (x.id, "lead", x.email.strip().lower(), None, f"{x.first_name} {x.last_name}")
        for x in crm.leads
        if not x.is_converted and x.email.strip()
    ]
    accounts = [(a.id, a.name, world_mod.website_domain(a.website)) for a in crm.accounts]
    opps = [(o.id, o.account_id, o.name, False, o.created) for o in crm.opportunities if not o.is_closed]
    return snapshot_of(people, accounts, opps)


def add_address_traps(crm: SimCrm, account_id: str | None) -> None:
    """Two contacts of `account_id`: one whose address is blank (no people row) and one whose address is padded
    and mixed-case (`jane.doe+crm@acme.com` once trimmed and lower-cased)."""
    crm.contacts.append(
        CrmContact(id="003TRAPBLANK001", first_name="No", last_name="Mail", email="   ", account_id=account_id)
    )
    crm.contacts.append(
        CrmContact(
            id="003TRAPSPACE001",
            first_name="Jane",
            last_name="Doe",
            email="  Jane.Doe+crm@Acme.COM ",
            account_id=account_id,
        )
    )


def assert_same(actual: CrmSnapshot, wanted: CrmSnapshot) -> None:
    """Same schemas and the same rows in any order."""
    for name in ("people", "accounts", "opportunities"):
        a, w = getattr(actual, name), getattr(wanted, name)
        assert a.schema == w.schema, name
        assert a.sort(a.columns, nulls_last=True).equals(w.sort(w.columns, nulls_last=True)), name


class Clock:
    """A settable clock for the simulators' `clock=` knob."""

    def __init__(self, start: datetime):
        self.t = start.timestamp()

    def __call__(self) -> float:
        return self.t


class Sleeps(list[float]):
    """Records sleeps instead of sleeping; with a clock, advances it so rate-limit windows pass."""

    def __init__(self, clock: Clock | None = None):
        super().__init__()
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if self.clock is not None:
            self.clock.t += seconds


def apply_changes(snapshot: CrmSnapshot, changes: CrmChanges) -> CrmSnapshot:
    """What the store does with an incremental refresh: drop the rows of every changed id, add the changed rows."""
    frames = {}
    for name in ("people", "accounts", "opportunities"):
        old, ids = getattr(snapshot, name), sorted(changes.changed_ids[name])
        frames[name] = pl.concat([old.filter(~pl.col("crm_id").is_in(ids)), getattr(changes, name)], how="vertical")
    return CrmSnapshot(**frames)


def delete_in_crm(running, crm_kind: str, tid: str, world_id: str) -> None:
    """Delete a person (world id) the way each simulated CRM does: Salesforce recycle bin, HubSpot archive,
    Pipedrive delete."""
    if crm_kind == "salesforce":
        running.salesforce.soft_delete(tid, world_id)
    elif crm_kind == "hubspot":
        running.hubspot.archive(tid, "contacts", running.hubspot.hs_id(tid, world_id))
    else:
        running.pipedrive.delete(tid, "persons", running.pipedrive.ids[tid]["persons"][world_id])
