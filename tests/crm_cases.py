"""The API CRMs as test cases: one `CrmCase` per adapter says how to stand up its simulator, build a connection,
compute the expected snapshot from the world, mutate the CRM and drive its limits, so the adapter tests are
written once and parametrised over the CRMs (tests/test_crm_adapters.py) or bound to one (tests/test_hubspot.py,
tests/test_pipedrive.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import polars as pl
import pytest

from crm_adapters import hubspot, pipedrive
from crm_adapters.base import website_domain
from o365sync.crm import CrmChanges, CrmSnapshot
from simulators import world as world_mod
from simulators.hubspot import OBJECT_TYPES, HubSpotSimulator, additional_domains, additional_emails
from simulators.pipedrive import PipedriveSimulator, secondary_email, website_exposed
from simulators.tls import SimulatorTLS
from simulators.world import World, generate_world
from tests.crm_helpers import Clock, add_address_traps, snapshot_of


@dataclass(frozen=True)
class CrmCase:
    name: str
    adapter: ModuleType
    make_world: Callable[[], World]
    start_clock: Callable[[World], Clock]
    start: Callable[..., Any]  # (world, tls, clock=, **options) -> simulator context manager
    conn: Callable[..., Any]  # (sim, tid, page_limit=None) -> connection
    token: Callable[[Any], str]  # the connection's secret
    expected: Callable[[World, Any, str], CrmSnapshot]
    newest_modified: Callable[[Any, str], datetime]  # what a full snapshot's watermark must be
    mutate: Callable[[World, Any, str], dict[str, str]]  # one of each change; the CRM ids involved
    changed: dict[str, tuple[str, ...]]  # changed_ids key -> names (of `mutate`) that must be in it
    left_scope: dict[str, tuple[str, ...]]  # frame -> names (of `mutate`): changed records that must have no rows
    check_changes: Callable[[World, Any, str, dict[str, str], CrmChanges], None]  # CRM-specific, after the rest
    throttle: Callable[[Any], list[float]]  # short rate limits the adapter waits out; the sleeps expected
    quota_on: Callable[[Any, str], None]  # the daily quota runs out after a few more requests
    quota_off: Callable[[Any], None]
    daily_code: str
    options: dict[str, Any] = field(default_factory=dict)


def ts(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.t, UTC)


def fixtures(case: CrmCase | None = None) -> tuple[Any, ...]:
    """`case` (given, or parametrised by the module), `world`, `clock` and `sim` fixtures; assign them to module
    names in a test module (`case_fixture, world_fixture, ... = fixtures(HUBSPOT)`)."""

    @pytest.fixture(scope="module", name="case", params=[case] if case else CASES, ids=lambda c: c.name)
    def case_fixture(request: pytest.FixtureRequest) -> CrmCase:
        return request.param

    @pytest.fixture(scope="module", name="world")
    def world_fixture(case: CrmCase) -> World:
        return case.make_world()

    @pytest.fixture(name="clock")
    def clock_fixture(case: CrmCase, world: World) -> Clock:
        return case.start_clock(world)

    @pytest.fixture(name="sim")
    def sim_fixture(case: CrmCase, world: World, tls: SimulatorTLS, clock: Clock) -> Iterator[Any]:
        with case.start(world, tls, clock=clock) as s:
            yield s

    return case_fixture, world_fixture, clock_fixture, sim_fixture


# -- HubSpot -----------------------------------------------------------------------------------------------------


def hs_expected(world: World, sim: HubSpotSimulator, tid: str) -> CrmSnapshot:
    """The world's CRM in snapshot form (HubSpot ids), computed naively from the world."""
    crm, hs = world.crm[tid], (lambda wid: sim.hs_id(tid, wid))
    people: list[tuple[str, str, str, str | None, str]] = []
    persons = [(c.id, "contact", c.email, c.account_id, c) for c in crm.contacts]
    persons += [(x.id, "lead", x.email, None, x) for x in crm.leads if not x.is_converted]
    for wid, kind, email, account, p in persons:
        addresses = {a.strip().lower() for a in [email, *additional_emails(wid, email)] if a.strip()}
        people += [(hs(wid), kind, a, account and hs(account), f"{p.first_name} {p.last_name}") for a in addresses]
    accounts: list[tuple[str, str, str | None]] = []
    for a in crm.accounts:
        domain = world_mod.website_domain(a.website)
        domains = [domain, *additional_domains(a.id, domain)] if domain else [None]
        accounts += [(hs(a.id), a.name, d) for d in domains]
    opps = [(hs(o.id), hs(o.account_id), o.name, False, o.created) for o in crm.opportunities if not o.is_closed]
    return snapshot_of(people, accounts, opps)


def hs_newest_modified(sim: HubSpotSimulator, tid: str) -> datetime:
    newest = max(r.updated for o in OBJECT_TYPES for r in sim._objects[tid][o].values() if not r.archived)
    return newest.replace(microsecond=newest.microsecond // 1000 * 1000)  # the wire carries milliseconds


def hs_mutate(world: World, sim: HubSpotSimulator, tid: str) -> dict[str, str]:
    """One of each change the incremental read must see; returns the HubSpot ids involved."""
    crm = world.crm[tid]
    linked = [c for c in crm.contacts if c.account_id]
    open_deals = [o for o in crm.opportunities if not o.is_closed]
    assert len(linked) >= 4 and len(open_deals) >= 3 and len(crm.accounts) >= 3
    ids = {
        "new_contact": sim.create(
            tid,
            "contacts",
            company=crm.accounts[1].id,
            email=" New.Person@Example.ORG ",
            firstname="New",
            lastname="Person",
            lifecyclestage="customer",
            hs_additional_emails="np@example.net;new.person@example.org",
        ),
        "new_deal": sim.create(
            tid, "deals", company=crm.accounts[2].id, dealname="Fresh deal", createdate="2026-11-27T04:00:00.000Z"
        ),
        "new_closed_deal": sim.create(
            tid, "deals", company=crm.accounts[2].id, dealname="Born closed", dealstage="closedlost"
        ),
    }
    # changed and added secondary addresses
    ids["secondary"] = sim.hs_id(tid, linked[0].id)
    sim.touch(tid, "contacts", linked[0].id, hs_additional_emails="Second@Example.com;third@example.com")
    # archived (deleted) contact
    ids["archived"] = sim.hs_id(tid, linked[1].id)
    sim.archive(tid, "contacts", linked[1].id)
    # a contact moved to another company (only the associations API tells)
    ids["moved"] = sim.hs_id(tid, linked[2].id)
    target = next(a for a in crm.accounts if a.id != linked[2].account_id)
    sim.associate(tid, "contacts", linked[2].id, target.id)
    ids["moved_to"] = sim.hs_id(tid, target.id)
    # a contact whose every address was removed
    ids["no_address"] = sim.hs_id(tid, linked[3].id)
    sim.touch(tid, "contacts", linked[3].id, email=None, hs_additional_emails=None)
    # company domain change (the registrable domain of a sub-domain)
    ids["company"] = sim.hs_id(tid, crm.accounts[0].id)
    sim.touch(tid, "companies", crm.accounts[0].id, domain="shop.newname.co.uk", hs_additional_domains=None)
    # deals: one closed through its stage (in its own pipeline), one deleted, one moved to another company
    closed = sim.record(tid, "deals", open_deals[0].id)
    stage = "closedwon" if closed.props["pipeline"] == "default" else "1002"
    sim.touch(tid, "deals", open_deals[0].id, dealstage=stage)
    ids["closed_deal"] = closed.id
    ids["deleted_deal"] = sim.hs_id(tid, open_deals[1].id)
    sim.archive(tid, "deals", open_deals[1].id)
    ids["moved_deal"] = sim.hs_id(tid, open_deals[2].id)
    sim.associate(tid, "deals", open_deals[2].id, crm.accounts[0].id)
    return ids


def hs_check_changes(world: World, sim: HubSpotSimulator, tid: str, ids: dict[str, str], changes: CrmChanges) -> None:
    new = changes.people.filter(pl.col("crm_id") == ids["new_contact"])
    assert sorted(new["email"]) == ["new.person@example.org", "np@example.net"]
    assert set(new["account_id"]) == {sim.hs_id(tid, world.crm[tid].accounts[1].id)}
    moved = changes.people.filter(pl.col("crm_id") == ids["moved"])
    assert set(moved["account_id"]) == {ids["moved_to"]}
    assert set(changes.opportunities.filter(pl.col("crm_id") == ids["moved_deal"])["account_id"]) == {ids["company"]}
    # the wire: modified-since searches, archived lists, v4 association reads
    searches = [r for r in sim.requests if r.path.endswith("/search")]
    assert {r.path.split("/")[4] for r in searches} == {"contacts", "companies", "deals"}
    assert all(
        r.body["filterGroups"][0]["filters"][0]["propertyName"] in ("lastmodifieddate", "hs_lastmodifieddate")
        for r in searches
    )
    archived_lists = [r for r in sim.requests if r.query and r.query.get("archived") == "true"]
    assert len(archived_lists) == 3
    assoc = [r for r in sim.requests if r.path.startswith("/crm/v4/associations/")]
    assert {r.path for r in assoc} == {
        "/crm/v4/associations/contacts/companies/batch/read",
        "/crm/v4/associations/deals/companies/batch/read",
    }
    assert all(r.status in (200, 207) for r in assoc)


def hs_throttle(sim: HubSpotSimulator) -> list[float]:
    sim.throttle("TEN_SECONDLY_ROLLING", count=1, after=2)  # no Retry-After: the policy window
    return [10.0]


HUBSPOT = CrmCase(
    name="hubspot",
    adapter=hubspot,
    make_world=lambda: generate_world(tenants=2, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=30),
    start_clock=lambda world: Clock(world.now),
    start=HubSpotSimulator,
    conn=lambda sim, tid, page_limit=None: hubspot.HubSpotConnection(sim.base_url, sim.token_for(tid)),
    token=lambda conn: conn.access_token,
    expected=hs_expected,
    newest_modified=hs_newest_modified,
    mutate=hs_mutate,
    changed={
        "people": ("new_contact", "secondary", "archived", "moved", "no_address"),
        "accounts": ("company",),
        "opportunities": ("new_deal", "new_closed_deal", "closed_deal", "deleted_deal", "moved_deal"),
    },
    left_scope={
        "people": ("archived", "no_address"),
        "opportunities": ("closed_deal", "deleted_deal", "new_closed_deal"),
    },
    check_changes=hs_check_changes,
    throttle=hs_throttle,
    quota_on=lambda sim, tid: sim.throttle("DAILY", count=None, after=4),
    quota_off=lambda sim: sim.clear_throttles(),
    daily_code="DAILY",
)


# -- Pipedrive ---------------------------------------------------------------------------------------------------


def pd_world() -> World:
    """Two tenants; the first has the address traps (`add_address_traps`) without an account."""
    w = generate_world(tenants=2, users_per_tenant=1, messages_per_user=5, contacts_per_tenant=30)
    add_address_traps(w.crm[w.tenants[0].tid], None)
    return w


def pd_clock(world: World) -> Clock:
    """Noon (UTC) of the day after the world's `now`: later than every generated update_time."""
    day = world.now.date() + timedelta(days=1)
    return Clock(datetime(day.year, day.month, day.day, 12, tzinfo=UTC))


def pd_conn(sim: PipedriveSimulator, tid: str, page_limit: int | None = None) -> pipedrive.PipedriveConnection:
    return pipedrive.PipedriveConnection(sim.base_url, sim.token_for(tid), page_limit=page_limit or 500)


def pd_expected(world: World, sim: PipedriveSimulator, tid: str) -> CrmSnapshot:
    """The world's CRM in snapshot form, computed naively from the world and the simulator's documented rules."""
    crm, ids = world.crm[tid], sim.ids[tid]
    org = ids["organizations"]
    rows = [(c.id, c.first_name, c.last_name, c.email, c.account_id) for c in crm.contacts]
    rows += [(x.id, x.first_name, x.last_name, x.email, None) for x in crm.leads if not x.is_converted]
    people = []
    for wid, first, last, email, account_id in rows:
        pid = ids["persons"][wid]
        account = str(org[account_id]) if account_id else None
        for address in (email, secondary_email(pid, first, last)):
            if address and address.strip():
                people.append((str(pid), "contact", address.strip().lower(), account, f"{first} {last}"))
    accounts = [
        (str(org[a.id]), a.name, website_domain(a.website) if website_exposed(a.id) else None) for a in crm.accounts
    ]
    opps = [
        (str(ids["deals"][o.id]), str(org[o.account_id]), o.name, False, o.created)
        for o in crm.opportunities
        if not o.is_closed
    ]
    return snapshot_of(people, accounts, opps)


def pd_newest_modified(sim: PipedriveSimulator, tid: str) -> datetime:
    records = sim._records[tid]
    listed = [*records["persons"].values(), *records["organizations"].values()]
    listed += [r for r in records["deals"].values() if r["status"] == "open"]
    return max(datetime.fromisoformat(r["update_time"].replace("Z", "+00:00")) for r in listed)


def pd_mutate(world: World, sim: PipedriveSimulator, tid: str) -> dict[str, str]:
    crm, ids = world.crm[tid], sim.ids[tid]
    persons = [ids["persons"][c.id] for c in crm.contacts]
    open_deals = [ids["deals"][o.id] for o in crm.opportunities if not o.is_closed]
    orgs = [ids["organizations"][a.id] for a in crm.accounts]
    assert len(open_deals) >= 3 and len(persons) >= 5 and len(orgs) >= 3
    out = {
        "new_person": sim.create(
            tid,
            "persons",
            name="New Person",
            org_id=orgs[1],
            emails=[
                {"value": " New.Person@Example.ORG", "primary": True, "label": "work"},
                {"value": "np@example.net", "primary": False, "label": "home"},
            ],
        ),
        "new_deal": sim.create(tid, "deals", title="Fresh deal", org_id=orgs[2]),
        "new_org": sim.create(tid, "organizations", name="Newco", website="https://www.newco.example.com/en"),
    }
    rec = sim.record(tid, "persons", persons[0])
    sim.update(
        tid,
        "persons",
        persons[0],
        emails=[*rec["emails"], {"value": "Added@Example.com", "primary": False, "label": "other"}],
    )
    out["secondary"] = persons[0]
    sim.delete(tid, "persons", persons[1])
    out["deleted_person"] = persons[1]
    sim.update(tid, "persons", persons[2], emails=[])
    out["no_address"] = persons[2]
    sim.update(tid, "persons", persons[3], org_id=orgs[2])
    out["moved"] = persons[3]
    sim.update(tid, "organizations", orgs[0], website="https://shop.newname.co.uk/x")
    out["company"] = orgs[0]
    sim.delete(tid, "organizations", orgs[-1])
    out["deleted_org"] = orgs[-1]
    sim.update(tid, "deals", open_deals[0], status="won")
    out["won_deal"] = open_deals[0]
    sim.delete(tid, "deals", open_deals[1])
    out["deleted_deal"] = open_deals[1]
    sim.update(tid, "deals", open_deals[2], org_id=orgs[0])
    out["moved_deal"] = open_deals[2]
    return {k: str(v) for k, v in out.items()}


def pd_check_changes(world: World, sim: PipedriveSimulator, tid: str, ids: dict[str, str], changes: CrmChanges) -> None:
    assert "added@example.com" in set(changes.people.filter(pl.col("crm_id") == ids["secondary"])["email"])
    lists = [r for r in sim.requests if r.path.startswith("/api/v2/")]
    params = [dict(r.params) for r in lists]
    assert len(lists) > 3 and all(
        p["sort_by"] == "update_time" and p["sort_direction"] == "asc" and "updated_since" in p for p in params
    )
    assert {dict(r.params).get("status") for r in lists if r.path == "/api/v2/deals"} == {"open,won,lost,deleted"}


def pd_throttle(sim: PipedriveSimulator) -> list[float]:
    sim.inject(503, count=1)  # backoff
    sim.inject(429, count=2)  # burst: waits x-ratelimit-reset
    return [0.5, 2.0, 2.0]


def pd_quota_on(sim: PipedriveSimulator, tid: str) -> None:
    sim.daily_budget = sim.tokens_spent(tid) + 2 * sim.list_cost


def pd_quota_off(sim: PipedriveSimulator) -> None:
    sim.daily_budget = None


PIPEDRIVE = CrmCase(
    name="pipedrive",
    adapter=pipedrive,
    make_world=pd_world,
    start_clock=pd_clock,
    start=PipedriveSimulator,
    conn=pd_conn,
    token=lambda conn: conn.api_token,
    expected=pd_expected,
    newest_modified=pd_newest_modified,
    mutate=pd_mutate,
    changed={
        "people": ("new_person", "secondary", "deleted_person", "no_address", "moved"),
        "accounts": ("new_org", "company", "deleted_org"),
        "opportunities": ("new_deal", "won_deal", "deleted_deal", "moved_deal"),
    },
    left_scope={
        "people": ("deleted_person", "no_address"),
        "accounts": ("deleted_org",),
        "opportunities": ("won_deal", "deleted_deal"),
    },
    check_changes=pd_check_changes,
    throttle=pd_throttle,
    quota_on=pd_quota_on,
    quota_off=pd_quota_off,
    daily_code="daily_budget",
)

CASES = [HUBSPOT, PIPEDRIVE]
