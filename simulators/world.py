"""A seeded, self-consistent Microsoft 365 + CRM world, with the ground truth of what must be imported.

Every simulator serves a view of one `World`; tests compare the store against `World.expected_matches`.
The ground truth is computed here with deliberately naive Python (a second, independent implementation of
the matching rules), so it can catch mistakes in the product's vectorised matcher.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

FREE_MAIL_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "icloud.com", "gmx.de")
MAIL_FOLDERS = ("inbox", "sentitems")

_FIRST = ("Ada", "Ben", "Chloe", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Viktor", "Wen", "Yusuf")
_LAST = ("Abbott", "Berg", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ito", "Jensen", "Khan",
         "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Rossi", "Silva", "Tanaka", "Usman", "Weber")
_COMPANY = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell", "Cyberdyne",
            "Soylent", "Vandelay", "Wonka", "Oscorp", "Gringotts", "Massive", "Dunder", "Pied", "Aperture")
_TLD = ("com", "io", "co.uk", "de", "net", "fr")
_TOPICS = ("renewal", "pricing", "Q3 plan", "onboarding", "security review", "invoice", "roadmap",
           "contract", "pilot results", "kick-off", "SOW draft", "integration")


@dataclass(frozen=True)
class Mailbox:
    """An email participant as it appears on the wire (address case and whitespace as sent)."""

    name: str
    address: str


@dataclass
class SimUser:
    oid: str
    tid: str
    upn: str
    display_name: str


@dataclass
class SimTenant:
    tid: str
    name: str
    domains: list[str]
    users: list[SimUser]


@dataclass
class SimMessage:
    id: str  # immutable Graph id
    owner_oid: str
    folder: str  # "inbox" | "sentitems"
    internet_message_id: str
    conversation_id: str
    subject: str
    body: str  # plain text
    sender: Mailbox
    to: list[Mailbox]
    cc: list[Mailbox]
    received: datetime  # UTC
    sent: datetime  # UTC
    has_attachments: bool = False
    kind: str = ""  # generator's label (contact, lead, account, stranger, internal, newsletter, freemail, ...)

    def participants(self) -> list[Mailbox]:
        return [self.sender, *self.to, *self.cc]


@dataclass
class CrmContact:
    id: str
    first_name: str
    last_name: str
    email: str  # as typed into the CRM (case kept)
    account_id: str | None


@dataclass
class CrmLead:
    id: str
    first_name: str
    last_name: str
    email: str
    company: str
    is_converted: bool = False
    converted_contact_id: str | None = None


@dataclass
class CrmAccount:
    id: str
    name: str
    website: str | None  # free text, e.g. "https://www.acme.com/en"


@dataclass
class CrmOpportunity:
    id: str
    account_id: str
    name: str
    is_closed: bool
    created: datetime


@dataclass
class SimCrm:
    contacts: list[CrmContact] = field(default_factory=list)
    leads: list[CrmLead] = field(default_factory=list)
    accounts: list[CrmAccount] = field(default_factory=list)
    opportunities: list[CrmOpportunity] = field(default_factory=list)


@dataclass
class World:
    seed: int
    now: datetime
    tenants: list[SimTenant]
    crm: dict[str, SimCrm]  # by tenant id
    mailboxes: dict[str, list[SimMessage]]  # by user oid

    def tenant(self, tid: str) -> SimTenant:
        return next(t for t in self.tenants if t.tid == tid)

    def user(self, oid: str) -> SimUser:
        return next(u for t in self.tenants for u in t.users if u.oid == oid)

    def scan_start(self, tid: str) -> datetime:
        return scan_start(self.crm[tid], self.now)

    def expected_matches(self, tid: str) -> dict[tuple[str, str], frozenset[str]]:
        """Ground truth: (user oid, message id) -> every CRM record id the message must be linked to."""
        crm = self.crm[tid]
        own = {d.lower() for d in self.tenant(tid).domains}
        people: dict[str, set[str]] = {}
        for c in crm.contacts:
            people.setdefault(c.email.strip().lower(), set()).add(c.id)
        for lead in crm.leads:
            if not lead.is_converted:
                people.setdefault(lead.email.strip().lower(), set()).add(lead.id)
        accounts: dict[str, set[str]] = {}
        for a in crm.accounts:
            dom = website_domain(a.website)
            if dom and dom not in FREE_MAIL_DOMAINS and dom not in own:
                accounts.setdefault(dom, set()).add(a.id)
        start = self.scan_start(tid)
        out: dict[tuple[str, str], frozenset[str]] = {}
        for user in self.tenant(tid).users:
            for m in self.mailboxes.get(user.oid, []):
                if m.received < start or m.received > self.now:
                    continue
                ids: set[str] = set()
                for p in m.participants():
                    addr = p.address.strip().lower()
                    dom = addr.rpartition("@")[2]
                    if dom in own:
                        continue
                    ids |= people.get(addr, set())
                    ids |= accounts.get(dom, set())
                if ids:
                    out[(user.oid, m.id)] = frozenset(ids)
        return out

    def unmatched_messages(self, tid: str) -> Iterator[SimMessage]:
        expected = self.expected_matches(tid)
        for user in self.tenant(tid).users:
            for m in self.mailboxes.get(user.oid, []):
                if (user.oid, m.id) not in expected:
                    yield m


def scan_start(crm: SimCrm, now: datetime) -> datetime:
    """min(oldest open opportunity's created date, now - 7 days)."""
    return min([now - timedelta(days=7), *(o.created for o in crm.opportunities if not o.is_closed)])


def website_domain(website: str | None) -> str | None:
    """The naive oracle's reading of a free-text Website: host without scheme, 'www.', port or path."""
    if not website or not website.strip():
        return None
    host = website.strip().lower().split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host.removeprefix("www.") or None


def _graph_id(rng: random.Random, prefix: str = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A") -> str:
    raw = rng.getrandbits(256).to_bytes(32, "big")
    return prefix + base64.urlsafe_b64encode(raw).decode().rstrip("=") + "AAA="


def _sf_id(prefix: str, n: int, salt: str) -> str:
    digest = hashlib.sha1(f"{salt}{n}".encode()).hexdigest()[:12].upper()
    return f"{prefix}{digest}"  # 15 chars like a Salesforce id


def generate_world(
    seed: int = 7,
    tenants: int = 1,
    users_per_tenant: int = 3,
    messages_per_user: int = 120,
    contacts_per_tenant: int = 40,
    now: datetime | None = None,
    history_days: int = 60,
) -> World:
    """Build tenants, users, mailboxes and CRM data that are consistent with each other.

    Mix per mailbox: external mail with CRM contacts, leads and account domains; strangers; internal-only mail;
    newsletters; free-mail senders; replies in threads; sent items; some mail older than the scan window.
    """
    rng = random.Random(seed)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    world = World(seed=seed, now=now, tenants=[], crm={}, mailboxes={})
    for t in range(tenants):
        tid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        company = ("Contoso", "Fabrikam", "Northwind", "Adatum", "Litware")[t % 5] + ("" if t < 5 else str(t))
        domain = f"{company.lower()}.com"
        tenant = SimTenant(tid=tid, name=company, domains=[domain, f"{company.lower()}.onmicrosoft.com"], users=[])
        for u in range(users_per_tenant):
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            oid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            upn = f"{first.lower()}.{last.lower()}{u}@{domain}"
            tenant.users.append(SimUser(oid=oid, tid=tid, upn=upn, display_name=f"{first} {last}"))
        world.tenants.append(tenant)
        world.crm[tid] = crm = _generate_crm(rng, tid, domain, contacts_per_tenant, now, history_days)
        for user in tenant.users:
            world.mailboxes[user.oid] = _generate_mailbox(
                rng, tenant, user, crm, messages_per_user, now, history_days, scan_start(crm, now)
            )
    return world


def _company_domain(rng: random.Random, used: set[str]) -> tuple[str, str]:
    while True:
        name = f"{rng.choice(_COMPANY)} {rng.choice(('Corp', 'Labs', 'GmbH', 'Ltd', 'Systems', 'Group'))}"
        dom = f"{name.split()[0].lower()}{rng.randint(2, 999)}.{rng.choice(_TLD)}"
        if dom not in used:
            used.add(dom)
            return name, dom


def _messy(rng: random.Random, address: str) -> str:
    """CRM and mail clients keep case as typed; sometimes with stray whitespace."""
    r = rng.random()
    if r < 0.15:
        return address.upper()
    if r < 0.3:
        local, _, dom = address.partition("@")
        return f"{local.capitalize()}@{dom.capitalize()}"
    if r < 0.35:
        return f" {address} "
    return address


def _generate_crm(rng: random.Random, tid: str, own_domain: str, n_contacts: int, now: datetime,
                  history_days: int) -> SimCrm:
    crm = SimCrm()
    used: set[str] = {own_domain}
    n_accounts = max(3, n_contacts // 4)
    for i in range(n_accounts):
        name, dom = _company_domain(rng, used)
        website = rng.choice((f"https://www.{dom}/", f"{dom}", f"http://{dom}/en/home", f"https://{dom}",
                              f"WWW.{dom.upper()}", None if i % 9 == 8 else f"www.{dom}"))
        crm.accounts.append(CrmAccount(id=_sf_id("001", i, tid), name=name, website=website))
    # Traps: an account whose website is a free-mail domain, one with the tenant's own domain.
    crm.accounts.append(CrmAccount(id=_sf_id("001", n_accounts, tid), name="Sloppy Freemail Co",
                                   website="https://gmail.com"))
    crm.accounts.append(CrmAccount(id=_sf_id("001", n_accounts + 1, tid), name="Ourselves (internal)",
                                   website=f"https://www.{own_domain}"))
    real_accounts = crm.accounts[:n_accounts]
    for i in range(n_contacts):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        acc = rng.choice(real_accounts)
        dom = website_domain(acc.website) or _company_domain(rng, used)[1]
        if rng.random() < 0.12:
            dom = rng.choice(FREE_MAIL_DOMAINS)  # a contact on a personal address
        email = f"{first.lower()}.{last.lower()}{i}@{dom}"
        crm.contacts.append(CrmContact(id=_sf_id("003", i, tid), first_name=first, last_name=last,
                                       email=_messy(rng, email), account_id=acc.id))
    for i in range(max(2, n_contacts // 3)):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        company, dom = _company_domain(rng, used)
        email = f"{first.lower()}{i}@{dom}"
        converted = i % 4 == 3
        crm.leads.append(CrmLead(id=_sf_id("00Q", i, tid), first_name=first, last_name=last,
                                 email=_messy(rng, email), company=company, is_converted=converted,
                                 converted_contact_id=None))
    for i, acc in enumerate(real_accounts):
        if i % 2:
            continue
        closed = i % 6 == 4
        age = rng.randint(3, history_days - 20)
        crm.opportunities.append(CrmOpportunity(id=_sf_id("006", i, tid), account_id=acc.id,
                                                name=f"{acc.name} - expansion", is_closed=closed,
                                                created=now - timedelta(days=age, hours=rng.randint(0, 23))))
    return crm


def _generate_mailbox(rng: random.Random, tenant: SimTenant, user: SimUser, crm: SimCrm, n: int,
                      now: datetime, history_days: int, scan_start: datetime) -> list[SimMessage]:
    me = Mailbox(user.display_name, user.upn)
    colleagues = [Mailbox(u.display_name, u.upn) for u in tenant.users if u.oid != user.oid] or [
        Mailbox("Team Inbox", f"team@{tenant.domains[0]}")
    ]
    contacts = [Mailbox(f"{c.first_name} {c.last_name}", c.email) for c in crm.contacts]
    leads = [Mailbox(f"{x.first_name} {x.last_name}", x.email) for x in crm.leads]
    account_doms = [d for a in crm.accounts if (d := website_domain(a.website))]
    account_doms = [d for d in account_doms if d not in FREE_MAIL_DOMAINS and d not in tenant.domains]
    used = set(account_doms) | set(tenant.domains)
    messages: list[SimMessage] = []
    threads: list[SimMessage] = []
    kinds = (("contact", 20), ("lead", 8), ("account", 10), ("stranger", 18), ("internal", 18),
             ("newsletter", 10), ("freemail", 8), ("reply", 8))
    population = [k for k, w in kinds for _ in range(w)]
    lo_boundary, hi_boundary = scan_start - timedelta(hours=2), scan_start + timedelta(hours=2)
    for _ in range(n):
        kind = rng.choice(population)
        while True:  # keep clear of the window boundary so a few seconds of clock drift cannot flip a message
            received = now - timedelta(seconds=rng.randint(600, history_days * 86400))
            if not lo_boundary <= received <= hi_boundary:
                break
        subject = f"{rng.choice(_TOPICS).capitalize()} - {rng.randint(100, 999)}"
        conv = base64.urlsafe_b64encode(rng.getrandbits(192).to_bytes(24, "big")).decode()
        others: list[Mailbox]
        if kind == "contact":
            others = [rng.choice(contacts)] if contacts else []
        elif kind == "lead":
            others = [rng.choice(leads)] if leads else []
        elif kind == "account":
            dom = rng.choice(account_doms)
            others = [Mailbox("Someone New", f"{rng.choice(_FIRST).lower()}.new{rng.randint(1, 9999)}@{dom}")]
        elif kind == "stranger":
            dom = _company_domain(rng, used)[1]
            others = [Mailbox("A Stranger", f"{rng.choice(_FIRST).lower()}@{dom}")]
        elif kind == "internal":
            others = [rng.choice(colleagues)]
        elif kind == "newsletter":
            others = [Mailbox("Weekly Digest", f"no-reply@news.{_company_domain(rng, used)[1]}")]
        elif kind == "freemail":
            others = [Mailbox("Free Mailer", f"{rng.choice(_FIRST).lower()}{rng.randint(1, 99999)}"
                                             f"@{rng.choice(FREE_MAIL_DOMAINS)}")]
        else:  # reply in an existing thread
            if not threads:
                continue
            parent = rng.choice(threads)
            others = [p for p in parent.participants() if p.address.strip().lower() != user.upn]
            subject = parent.subject if parent.subject.startswith("Re: ") else f"Re: {parent.subject}"
            conv = parent.conversation_id
            received = min(now - timedelta(seconds=60), parent.received + timedelta(hours=rng.randint(1, 72)))
            if lo_boundary <= received <= hi_boundary:
                continue
        if not others:
            continue
        cc = [rng.choice(colleagues)] if rng.random() < 0.2 else []
        outgoing = kind not in ("newsletter",) and rng.random() < 0.3
        if outgoing:
            folder, sender, to = "sentitems", me, others
        else:
            folder, sender, to = "inbox", others[0], [me, *others[1:]]
        body = f"Hi,\n\nFollowing up on {subject.lower()}.\n\nRegards,\n{sender.name}"
        msg = SimMessage(
            id=_graph_id(rng), owner_oid=user.oid, folder=folder,
            internet_message_id=f"<{uuid.UUID(int=rng.getrandbits(128))}@mail.example>",
            conversation_id=conv, subject=subject, body=body, sender=sender, to=to, cc=cc,
            received=received, sent=received - timedelta(seconds=rng.randint(1, 30)),
            has_attachments=rng.random() < 0.1, kind=kind,
        )
        messages.append(msg)
        if kind in ("contact", "lead", "account", "stranger"):
            threads.append(msg)
    messages.sort(key=lambda m: m.received)
    return messages
