"""Participants without an SMTP address: Exchange gives some internal and legacy participants an X500/`EX` address
(the legacyExchangeDN, "/o=ExchangeLabs/ou=Exchange Administrative Group (…)/cn=Recipients/cn=…") instead of an
SMTP one, and some only a display name. Before exclusions and matching, each such participant is resolved through
its display name — only when the names we know give exactly one address; between two candidates we never guess.

The names we know, without asking for more than the product's scopes (User.Read + Mail.Read): the tenant's
connected users (display name and UPN, kept from their connect) and the CRM snapshot's people (name and address).
The full tenant directory (Graph `/users`) would need User.ReadBasic.All, which the product does not request; a
colleague who never connected is therefore not known by name (their X500 participant stays unresolved, which
changes nothing: an X500 participant counts as internal either way).

Counted per participant of a message (its from and sender are one) by reason: `non_smtp_resolved_by_directory`
(a connected user), `non_smtp_resolved_by_crm_name` (one CRM address), `non_smtp_ambiguous` (a name with two or
more addresses), `non_smtp_unresolved` (no name, or a name we do not know). A resolved participant takes the
address it resolved to (stored as such); the rest keep their X500 address and match nothing. A participant with
a display name and no address (o365sync/mail.py gives it a row with a NULL address) is resolved the same way;
unresolved, its row is dropped (nothing to match or store).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from o365sync.auth import connected_users
from o365sync.matching import normalise_address
from o365sync.settings import Settings
from o365sync.store import latest_crm_snapshot_at, load_crm_names, open_store, store_path
from o365sync.tenants import TenantConfig

X500_PREFIX = "/o="  # a legacyExchangeDN starts with the organization: "/o=ExchangeLabs/ou=…"
REASONS = {
    "directory": "non_smtp_resolved_by_directory",
    "crm": "non_smtp_resolved_by_crm_name",
}
AMBIGUOUS, UNRESOLVED = "non_smtp_ambiguous", "non_smtp_unresolved"


def normalise_name(name: str | None) -> str:
    """Case and runs of whitespace do not tell two people apart; anything else does."""
    return " ".join((name or "").split()).casefold()


@dataclass(frozen=True)
class NameIndex:
    """name -> (every address known under it, where the first one came from: "directory" or "crm")."""

    by_name: dict[str, tuple[frozenset[str], str]]

    def resolve(self, name: str | None) -> tuple[str | None, str]:
        """(address, counted reason): an address only when the name gives exactly one."""
        found = self.by_name.get(normalise_name(name))
        if not normalise_name(name) or found is None:
            return None, UNRESOLVED
        addresses, source = found
        if len(addresses) > 1:
            return None, AMBIGUOUS
        return next(iter(addresses)), REASONS[source]


EMPTY_NAMES = NameIndex({})


def build_name_index(directory: Iterable[tuple[str, str]], crm_people: Iterable[tuple[str, str]]) -> NameIndex:
    """(name, address) pairs of the directory first, then of the CRM; addresses normalised like matching does."""
    by_name: dict[str, tuple[set[str], str]] = {}
    for source, pairs in (("directory", directory), ("crm", crm_people)):
        for name, address in pairs:
            key, addr = normalise_name(name), (address or "").strip().lower()
            if key and "@" in addr:
                by_name.setdefault(key, (set(), source))[0].add(addr)
    return NameIndex({k: (frozenset(v), source) for k, (v, source) in by_name.items()})


def resolve_non_smtp(participants: pl.DataFrame, names: NameIndex) -> tuple[pl.DataFrame, Counter[str]]:
    """Replace the address of each X500 or name-only participant whose name resolves; drop the name-only ones that
    do not (they have nothing to match or store); count them all by reason.
    `participants`: graph_id, role, name, address (raw; NULL for a name-only participant)."""
    address = normalise_address(pl.col("address"))
    is_odd = address.is_null() | address.str.starts_with(X500_PREFIX).fill_null(False)
    odd = participants.filter(is_odd).unique(["graph_id", "name", "address"])  # from and sender: one person
    if odd.is_empty():
        return participants, Counter()
    resolved = [names.resolve(n) for n in odd["name"].to_list()]
    reasons = Counter(reason for _, reason in resolved)
    lookup = pl.DataFrame(
        {"name": odd["name"], "address": odd["address"], "resolved": [a for a, _ in resolved]},
        schema={"name": pl.String, "address": pl.String, "resolved": pl.String},
    ).unique(["name", "address"])
    out = (
        participants.join(lookup, on=["name", "address"], how="left", nulls_equal=True)
        .with_columns(pl.coalesce("resolved", "address").alias("address"))
        .filter(normalise_address(pl.col("address")).is_not_null())
        .drop("resolved")
    )
    return out.select(participants.columns), reasons


_lock = threading.Lock()
_cache: dict[str, tuple[tuple, NameIndex]] = {}


def name_index_for(settings: Settings, tenant: TenantConfig) -> NameIndex:
    """The tenant's names (connected users, CRM people), built once per CRM snapshot and set of connected users."""
    users = tuple(sorted((u.display_name, u.upn) for u in connected_users(settings, tenant.id)))
    with _lock:
        with open_store(settings, tenant.id, write=False) as con:
            key = (str(store_path(settings, tenant.id)), latest_crm_snapshot_at(con), users)
            hit = _cache.get(tenant.id)
            if hit is not None and hit[0] == key:
                return hit[1]
            crm = load_crm_names(con)
        index = build_name_index(users, crm)
        _cache[tenant.id] = (key, index)
        return index
