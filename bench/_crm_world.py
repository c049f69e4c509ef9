"""Synthetic data for bench/crm_snapshot.py: a big CRM as a `simulators.world.SimCrm`, a batch of mail participants
that hits it at a realistic rate, and a Pipedrive simulator whose list pages are served in O(page) instead of
O(records) (see `FastListPipedriveSimulator`; the stock simulator is still measured per page)."""

from __future__ import annotations

import bisect
import random
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from simulators.pipedrive import MAX_LIMIT, PipedriveSimulator, _error
from simulators.server import Request, Response
from simulators.world import (
    _COMPANY,
    _FIRST,
    _LAST,
    FREE_MAIL_DOMAINS,
    CrmAccount,
    CrmContact,
    CrmLead,
    CrmOpportunity,
    SimCrm,
    World,
    _messy,
    generate_world,
    website_domain,
)

_SUFFIX = ("Corp", "Labs", "GmbH", "Ltd", "Systems", "Group")
_TLD = ("com", "io", "co.uk", "de", "net", "fr")


def build_crm(
    contacts: int, accounts: int, leads: int, opportunities: int, own_domain: str, now: datetime, seed: int
) -> SimCrm:
    """`accounts` companies with distinct domains (+2 trap accounts: a free-mail website and the tenant's own
    domain), `contacts` contacts at their accounts' domains (12 % on free-mail addresses), `leads` leads at new
    domains (every 4th converted) and `opportunities` deals on the accounts (two in three open, up to 60 days old).
    Websites are free text in the generator's six shapes, every 9th blank."""
    rng = random.Random(seed)
    crm = SimCrm()
    doms: list[str] = []
    for i in range(accounts):
        stem = f"{_COMPANY[i % len(_COMPANY)].lower()}{i}"
        dom = f"{stem}.{_TLD[(i // len(_COMPANY)) % len(_TLD)]}"
        doms.append(dom)
        shape = i % 6
        website = (
            f"https://www.{dom}/",
            dom,
            f"http://{dom}/en/home",
            f"https://{dom}",
            f"WWW.{dom.upper()}",
            f"www.{dom}",
        )[shape]
        if i % 9 == 8:
            website = None
        crm.accounts.append(
            CrmAccount(
                id=f"001{i:012X}",
                name=f"{_COMPANY[i % len(_COMPANY)]} {i} {_SUFFIX[i % len(_SUFFIX)]}",
                website=website,
            )
        )
    crm.accounts.append(CrmAccount(id=f"001{accounts:012X}", name="Sloppy Freemail Co", website="https://gmail.com"))
    crm.accounts.append(
        CrmAccount(id=f"001{accounts + 1:012X}", name="Ourselves (internal)", website=f"https://www.{own_domain}")
    )
    randrange, rand, choice = rng.randrange, rng.random, rng.choice
    for i in range(contacts):
        first, last = _FIRST[randrange(len(_FIRST))], _LAST[randrange(len(_LAST))]
        a = randrange(accounts)
        dom = choice(FREE_MAIL_DOMAINS) if rand() < 0.12 else doms[a]
        email = _messy(rng, f"{first.lower()}.{last.lower()}{i}@{dom}")
        crm.contacts.append(
            CrmContact(id=f"003{i:012X}", first_name=first, last_name=last, email=email, account_id=crm.accounts[a].id)
        )
    for i in range(leads):
        first, last = _FIRST[randrange(len(_FIRST))], _LAST[randrange(len(_LAST))]
        company = f"{_COMPANY[i % len(_COMPANY)]} Prospect {i}"
        dom = f"prospect{i}.{_TLD[i % len(_TLD)]}"
        converted = i % 4 == 3
        crm.leads.append(
            CrmLead(
                id=f"00Q{i:012X}",
                first_name=first,
                last_name=last,
                email=_messy(rng, f"{first.lower()}{i}@{dom}"),
                company=company,
                is_converted=converted,
            )
        )
    for i in range(opportunities):
        acc = crm.accounts[(i * 5) % accounts]
        crm.opportunities.append(
            CrmOpportunity(
                id=f"006{i:012X}",
                account_id=acc.id,
                name=f"{acc.name} - expansion",
                is_closed=i % 3 == 2,
                created=now - timedelta(days=3 + i % 57, hours=i % 24),
            )
        )
    return crm


def build_world(contacts: int, accounts: int, leads: int, opportunities: int, seed: int) -> World:
    """A one-tenant world (three users) from `generate_world`, its CRM replaced by `build_crm`."""
    world = generate_world(seed=seed, tenants=1, users_per_tenant=3, messages_per_user=1, contacts_per_tenant=4)
    tenant = world.tenants[0]
    world.crm[tenant.tid] = build_crm(contacts, accounts, leads, opportunities, tenant.domains[0], world.now, seed)
    return world


# Mix of the addresses on a message besides its owner (weights, per participant).
PARTICIPANT_MIX = (
    ("colleague", 34),
    ("stranger", 26),
    ("freemail", 12),
    ("contact", 7),
    ("account", 6),
    ("lead", 2),
    ("newsletter", 11),
    ("x500", 1),
    ("blank", 1),
)


def build_messages(world: World, n: int, seed: int) -> pl.DataFrame:
    """`n` messages with 3-6 participants each as a participants frame (graph_id, role, address).

    Each message has its owner (a tenant user, as `from` in ~30 %, else in `to`) plus 2-5 other participants drawn
    from `PARTICIPANT_MIX`: colleagues (own domain, some on the onmicrosoft.com domain), strangers at unknown
    companies, free-mail senders, CRM contacts (address as stored in the CRM, re-cased by the mail client in ~35 %),
    new people at an account's domain (a third of them on a sub-domain such as eu.<domain>), leads (converted ones
    included: they must not match), newsletters, X500 addresses without "@" and blank addresses."""
    rng = random.Random(f"{seed}:messages")
    tenant = world.tenants[0]
    crm = world.crm[tenant.tid]
    own, onms = tenant.domains[0], tenant.domains[1]
    users = [u.upn for u in tenant.users]
    colleagues = users + [f"colleague{k}@{own}" for k in range(40)] + [f"ops{k}@{onms}" for k in range(5)]
    contact_emails = [c.email for c in crm.contacts]
    lead_emails = [x.email for x in crm.leads]
    account_doms = [d for a in crm.accounts[:-2] if (d := website_domain(a.website))]
    kinds = [k for k, w in PARTICIPANT_MIX for _ in range(w)]
    randrange, rand, choice = rng.randrange, rng.random, rng.choice
    gids: list[str] = []
    roles: list[str] = []
    addrs: list[str | None] = []
    for i in range(n):
        gid = f"AAMk{i:08d}"
        others: list[str | None] = []
        for _ in range(randrange(2, 6)):
            kind = kinds[randrange(len(kinds))]
            if kind == "colleague":
                a: str | None = choice(colleagues)
            elif kind == "stranger":
                a = f"{choice(_FIRST).lower()}@{choice(_COMPANY).lower()}-unknown{randrange(50_000)}.com"
            elif kind == "freemail":
                a = f"{choice(_FIRST).lower()}{randrange(99_999)}@{choice(FREE_MAIL_DOMAINS)}"
            elif kind == "contact":
                a = choice(contact_emails)
                if rand() < 0.35:
                    a = _messy(rng, a.strip())
            elif kind == "account":
                dom = choice(account_doms)
                if rand() < 0.33:
                    dom = f"{choice(('eu', 'mail', 'us'))}.{dom}"
                a = f"{choice(_FIRST).lower()}.new{randrange(9999)}@{dom}"
            elif kind == "lead":
                a = choice(lead_emails)
            elif kind == "newsletter":
                a = f"no-reply@news.{choice(_COMPANY).lower()}{randrange(2000)}.com"
            elif kind == "x500":
                a = f"/O=EXCHANGELABS/OU=EXCHANGE ADMINISTRATIVE GROUP/CN=RECIPIENTS/CN={randrange(10**9):X}"
            else:
                a = choice(("", "   ", None))
            others.append(a)
        owner = users[i % len(users)]
        if rand() < 0.3:  # sent by the owner
            parts = [("from", owner)] + [("to" if k == 0 or rand() < 0.6 else "cc", a) for k, a in enumerate(others)]
        else:
            parts = [("from", others[0]), ("to", owner)] + [("to" if rand() < 0.6 else "cc", a) for a in others[1:]]
        for role, a in parts:
            gids.append(gid)
            roles.append(role)
            addrs.append(a)
    return pl.DataFrame(
        {"graph_id": gids, "role": roles, "address": addrs},
        schema={"graph_id": pl.String, "role": pl.String, "address": pl.String},
    )


class FastListPipedriveSimulator(PipedriveSimulator):
    """The stock Pipedrive simulator, except that `GET /api/v2/{persons,organizations}` sorted by id ascending
    without `updated_since/until` (the adapter's snapshot query) is answered by bisecting a sorted id list instead
    of copying, sorting and filtering every record of the kind per page (O(records) per page, so O(records^2) for
    a full listing: about 1.9 s a page at 1.1M persons). Same bodies, byte for byte (checked by
    `check_fast_list`); everything else (auth, limits, faults, deals, other sorts) is the stock code."""

    _ids_cache: dict[tuple[str, str], tuple[int, list[int]]]

    def _sorted_ids(self, tid: str, kind: str) -> list[int]:
        if not hasattr(self, "_ids_cache"):
            self._ids_cache = {}
        records = self._records[tid][kind]
        cached = self._ids_cache.get((tid, kind))
        if cached is None or cached[0] != len(records):
            cached = (len(records), sorted(records))
            self._ids_cache[(tid, kind)] = cached
        return cached[1]

    def _list(self, req: Request, tid: str) -> Response:
        assert req.match is not None
        kind, q = req.match["kind"], req.query
        if (
            kind == "deals"
            or q.get("updated_since")
            or q.get("updated_until")
            or (q.get("sort_by") or "id") != "id"
            or (q.get("sort_direction") or "asc") != "asc"
        ):
            return super()._list(req, tid)
        self._purge(tid)
        try:
            limit = int(q.get("limit") or self.page_limit_default)
        except ValueError:
            return _error(400, "Validation failed: invalid parameter")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"Validation failed: limit: Must be between 1 and {MAX_LIMIT}")
        import base64
        import json

        records = self._records[tid][kind]
        ids = self._sorted_ids(tid, kind)
        start = 0
        if q.get("cursor"):
            try:
                state = json.loads(base64.urlsafe_b64decode(q["cursor"].encode()))
                after_v, after_i = state["v"], int(state["i"])
                if state["s"] != "id" or state["d"] != "asc":
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                return _error(400, "Validation failed: cursor: Invalid cursor")
            # stock: rows with ("", id) > (after_v, after_i)
            start = bisect.bisect_right(ids, after_i) if after_v == "" else (0 if after_v < "" else len(ids))
        page: list[dict[str, Any]] = []
        more = False
        for pos in range(start, len(ids)):
            r = records[ids[pos]]
            if not self.deleted_in_lists and r["is_deleted"]:
                continue
            if len(page) == limit:
                more = True
                break
            page.append(r)
        next_cursor = None
        if more:
            state = {"s": "id", "d": "asc", "v": "", "i": page[-1]["id"]}
            next_cursor = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
        body = {"success": True, "data": [dict(r) for r in page], "additional_data": {"next_cursor": next_cursor}}
        return Response(200, body)
