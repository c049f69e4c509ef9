"""CRM matching, vectorised in Polars over an index built once per CRM snapshot.

Rules: exact address -> contacts and unconverted leads; the address's registrable domain (public-suffix aware, so
mail from eu.acme.co.uk reaches the account acme.co.uk) -> accounts, never for free-mail domains or the tenant's own
domains; a message is kept when at least one external participant matched; every matched CRM record is recorded.

How it stays fast at 1M contacts and 1M messages (bench/crm_snapshot.py, docs/benchmarks.md): every key (address,
account domain) is a 64-bit hash in a column sorted once by `build_index`; a page's few hundred keys are
binary-searched (`search_sorted`), a batch's millions hash-joined, both on integers and neither rehashing the
snapshot, and every hit is confirmed on the string itself (a hash collision never links). The registrable domain
of a host is one of its label suffixes, and every host under an account domain that has no Public Suffix List rule
at or below it has that domain as its registrable domain; so the suffixes of each distinct mail domain are looked
up directly, and the list itself is asked only for hosts that are not plain ASCII labels or that sit under one of
the ~170 registrable domains with rules below them (amazonaws.com, ...). Pages remember their hosts' accounts in
the index (`CrmIndex.host_accounts`), since a mailbox's pages repeat the same domains.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import polars as pl

from o365sync import domains
from o365sync.crm import normalise_email
from o365sync.domains import FREE_MAIL_DOMAINS, registrable_domain, registrable_domains

MATCH_SCHEMA = {
    "graph_id": pl.String,
    "crm_id": pl.String,
    "crm_kind": pl.String,
    "matched_address": pl.String,
    "is_primary": pl.Boolean,
}
# The primary link of a message: contact > person account > lead > account; ties go to the participant who sent
# the mail, then To, then Cc, then the smallest CRM id (deterministic). A link's matched address is its best-ranked
# participant's (the first listed among equals).
KIND_RANK = {"contact": 0, "person_account": 1, "lead": 2, "account": 3}
ROLE_RANK = {"from": 0, "sender": 1, "to": 2, "cc": 3}

normalise_address = normalise_email  # one rule for CRM and mail addresses: trim + lower-case, blank = null

_SEED = 365  # any fixed seed: the hashes live only inside one process's index
_PLAIN_HOST = r"^[a-z0-9-]+(\.[a-z0-9-]+)+$"  # ASCII labels, none empty: the PSL needs no other normalisation
_ROW = pl.UInt32


def _key(values: pl.Series) -> pl.Series:
    return values.hash(seed=_SEED)


@lru_cache(maxsize=1)
def shadowing_domains() -> frozenset[str]:
    """Every domain with a Public Suffix List rule at or below it (all label suffixes of every rule): under such a
    domain a host's registrable domain may be longer (x.s3.amazonaws.com), so those hosts ask the list itself."""
    out: set[str] = set()
    for rule in domains._PSL._publicsuffix:  # the bundled list's rules (publicsuffixlist keeps them in this set)
        labels = rule.lstrip("!").removeprefix("*.").split(".")
        out.update(".".join(labels[i:]) for i in range(len(labels)))
    return frozenset(out)


@dataclass(frozen=True)
class CrmIndex:
    """The CRM snapshot in the shape matching needs, built once per snapshot and process (o365sync/crm_index.py):
    address -> record and registrable domain -> account record, each sorted by the key's 64-bit hash."""

    people: pl.DataFrame  # key, email, rec — sorted by key
    accounts: pl.DataFrame  # key, domain, rec, shadowing — sorted by key
    records: pl.DataFrame  # crm_id, crm_kind, kind_rank; row number = rec, sorted by (crm_id, crm_kind)
    own_domains: frozenset[str]
    # host -> rows of `accounts`, filled as pages are matched: a mailbox's pages repeat the same domains, and a
    # dict lookup per host beats the ~20 Polars calls of resolving them again (bounded by HOST_CACHE_SIZE)
    host_accounts: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)


def build_index(people: pl.DataFrame, accounts: pl.DataFrame, own_domains: Iterable[str]) -> CrmIndex:
    """people: crm_id, kind, email; accounts: crm_id, domain (as snapshotted)."""
    own = frozenset(d.strip().lower() for d in own_domains)
    excluded = list(FREE_MAIL_DOMAINS | own | {r for d in own if (r := registrable_domain(d))})
    p = (
        people.select(
            normalise_address(pl.col("email")).alias("email"),
            "crm_id",
            pl.col("kind").cast(pl.String).alias("crm_kind"),
        )
        .filter(pl.col("email").str.contains("@", literal=True))
        .unique()
    )
    a = accounts.select(
        normalise_address(pl.col("domain")).alias("domain"), "crm_id", pl.lit("account").alias("crm_kind")
    )
    a = (
        a.with_columns(registrable_domains(a["domain"]).alias("domain"))
        .filter(pl.col("domain").is_not_null() & (pl.col("domain") != "") & ~pl.col("domain").is_in(excluded))
        .unique()
    )
    records = (
        pl.concat([p.select("crm_id", "crm_kind"), a.select("crm_id", "crm_kind")])
        .unique()
        .sort("crm_id", "crm_kind")
        .with_columns(pl.col("crm_kind").replace_strict(KIND_RANK, return_dtype=pl.Int8).alias("kind_rank"))
    )
    numbered = records.select("crm_id", "crm_kind").with_row_index("rec")

    def keyed(frame: pl.DataFrame, column: str) -> pl.DataFrame:
        frame = frame.join(numbered, on=["crm_id", "crm_kind"])
        return frame.select(_key(frame[column]).alias("key"), column, "rec").sort("key")

    shadowing = list(shadowing_domains())
    return CrmIndex(
        people=keyed(p, "email"),
        accounts=keyed(a, "domain").with_columns(pl.col("domain").is_in(shadowing).alias("shadowing")),
        records=records,
        own_domains=own,
    )


def _positions(n: int) -> pl.Series:
    return pl.int_range(n, dtype=_ROW, eager=True)


def _find(index: pl.DataFrame, column: str, values: pl.Series) -> pl.DataFrame:
    """(pos, row) for every index row whose `column` equals values[pos] (the index sorted by `key`): a few values
    (a page) are binary-searched, many (a batch) hash-joined; either way on integers, confirmed on the strings."""
    keys = _key(values)
    if len(values) * 16 < index.height:
        found = pl.DataFrame(
            {
                "pos": _positions(len(values)),
                "lo": index["key"].search_sorted(keys, side="left"),
                "hi": index["key"].search_sorted(keys, side="right"),
            }
        ).filter(pl.col("hi") > pl.col("lo"))
        found = found.select("pos", pl.int_ranges("lo", "hi", dtype=_ROW).alias("row")).explode("row")
    else:
        found = (
            pl.DataFrame({"key": keys, "pos": _positions(len(values))})
            .join(index.select("key").with_row_index("row"), on="key")
            .select("pos", "row")
        )
    same = index[column].gather(found["row"]) == values.gather(found["pos"])  # a hash collision is no match
    return found.filter(same)


def _needs_psl(hosts: pl.Series) -> pl.Series:
    """Hosts the label-suffix walk cannot resolve like the Public Suffix List does: empty labels (the list says
    no domain, or drops a trailing dot), leading white space (`registrable_domain` strips it), non-ASCII."""
    return (
        hosts.str.starts_with(".")
        | hosts.str.ends_with(".")
        | hosts.str.contains("..", literal=True)
        | hosts.str.contains(r"^\s")
        | (hosts.str.len_bytes() != hosts.str.len_chars())
    )


def _accounts_of(hosts: pl.Series, index: CrmIndex) -> pl.DataFrame:
    """(pos, row of index.accounts) for every account whose domain is the registrable domain of hosts[pos]."""
    special = _needs_psl(hosts)
    walk = pl.DataFrame({"pos": _positions(len(hosts)), "suffix": hosts}).filter(~special)
    hits = [pl.DataFrame(schema={"pos": _ROW, "row": _ROW})]
    while walk.height:
        found = _find(index.accounts, "domain", walk["suffix"])
        hits.append(pl.DataFrame({"pos": walk["pos"].gather(found["pos"]), "row": found["row"]}))
        walk = walk.filter(pl.col("suffix").str.count_matches(".", literal=True) >= 2).with_columns(
            pl.col("suffix").str.replace(r"^[^.]*\.", "")  # drop the first label; a registrable domain has two
        )
    suffixed = pl.concat(hits)
    shadowed = suffixed.filter(index.accounts["shadowing"].gather(suffixed["row"]))["pos"]
    ask = pl.DataFrame({"pos": _positions(len(hosts)), "host": hosts}).filter(
        special | pl.col("pos").is_in(shadowed.implode())
    )
    if ask.is_empty():
        return suffixed
    registrable = pl.Series([registrable_domain(h) for h in ask["host"].to_list()], dtype=pl.String)
    asked = ask.select("pos").with_columns(registrable.alias("domain")).filter(pl.col("domain").is_not_null())
    found = _find(index.accounts, "domain", asked["domain"])
    asked_hits = pl.DataFrame({"pos": asked["pos"].gather(found["pos"]), "row": found["row"]})
    return pl.concat([suffixed.filter(~pl.col("pos").is_in(ask["pos"].implode())), asked_hits])


HOST_CACHE_SIZE = 50_000  # hosts remembered per index (~6 MB); a full cache starts afresh
PAGE_HOSTS = 5_000  # up to this many external participants (a Graph page has ~1-2k) go through the host cache


def _by_domain_cached(hosts: pl.Series, index: CrmIndex) -> pl.DataFrame:
    """`_by_domain` for a page: hosts already seen by this index are looked up in its dict, the others resolved
    together (`_accounts_of`) and remembered."""
    cache = index.host_accounts
    names = hosts.to_list()
    missing = list({h for h in names if h not in cache})
    if missing:
        resolved = _accounts_of(pl.Series(missing, dtype=pl.String), index)
        rows: dict[str, list[int]] = {}
        for pos, row in resolved.iter_rows():
            rows.setdefault(missing[pos], []).append(row)
        if len(cache) + len(missing) > HOST_CACHE_SIZE:
            cache.clear()
        cache.update((h, tuple(rows.get(h, ()))) for h in missing)
    pairs = [(pos, row) for pos, h in enumerate(names) for row in cache.get(h) or ()]
    return pl.DataFrame(pairs, schema={"pos": _ROW, "row": _ROW}, orient="row")


def _by_domain(hosts: pl.Series, index: CrmIndex) -> pl.DataFrame:
    """(pos, row of index.accounts) for hosts[pos], each distinct host resolved once (a mailbox repeats a few
    domains). Hosts are told apart by their 64-bit hash and a link is made only when a host equals the one that
    was resolved, so a collision never links wrongly; at worst (two hosts of one call sharing a hash, p < n²/2⁶⁵,
    about 10⁻⁸ for the 800k distinct hosts of a 1M-message batch) it could miss the second host's accounts."""
    keyed = pl.DataFrame({"key": _key(hosts), "pos": _positions(len(hosts))})
    distinct = keyed.unique("key", keep="any")
    resolved = _accounts_of(hosts.gather(distinct["pos"]), index)
    hits = distinct[resolved["pos"]].select("key", pl.col("pos").alias("resolved"), row=resolved["row"])
    found = keyed.join(hits, on="key")
    return found.filter(hosts.gather(found["pos"]) == hosts.gather(found["resolved"])).select("pos", "row")


def match_participants(participants: pl.DataFrame, index: CrmIndex, *, cache_hosts: bool | None = None) -> pl.DataFrame:
    """participants: graph_id, address (raw), optionally role. Returns one row per (message, CRM record) with
    MATCH_SCHEMA; exactly one row per matched message has is_primary. `cache_hosts`: resolve mail domains through
    the index's host cache (default: for a page-sized input, not for a batch)."""
    address = participants["address"].str.strip_chars().str.to_lowercase()
    external = address.str.contains("@", literal=True)
    for own in index.own_domains:
        external &= ~address.str.ends_with(f"@{own}")
    rows = external.fill_null(False).arg_true().cast(_ROW)
    ext = address.gather(rows)
    by_address = _find(index.people, "email", ext)
    hosts = ext.str.slice(ext.str.find("@", literal=True) + 1)
    if hosts.str.contains("@", literal=True).any():  # the domain is what follows the last '@'
        hosts = ext.str.split("@").list.last()
    if cache_hosts is None:
        cache_hosts = len(hosts) <= PAGE_HOSTS
    by_domain = _by_domain_cached(hosts, index) if cache_hosts else _by_domain(hosts, index)
    found = pl.concat(
        [
            pl.DataFrame({"row": rows.gather(by_address["pos"]), "rec": index.people["rec"].gather(by_address["row"])}),
            pl.DataFrame({"row": rows.gather(by_domain["pos"]), "rec": index.accounts["rec"].gather(by_domain["row"])}),
        ]
    )
    if found.is_empty():
        return pl.DataFrame(schema=MATCH_SCHEMA)
    roles = (
        participants["role"] if "role" in participants.columns else pl.Series([None] * len(address), dtype=pl.String)
    )
    role_rank = roles.gather(found["row"]).replace_strict(ROLE_RANK, default=len(ROLE_RANK), return_dtype=pl.Int64)
    # One link per (message, record), from its best participant: lowest role rank, then first listed.
    links = (
        found.with_columns(
            participants["graph_id"].gather(found["row"]).alias("graph_id"),
            (role_rank * 2**32 + found["row"].cast(pl.Int64)).alias("order"),
        )
        .sort("order")
        .unique(["graph_id", "rec"], keep="first", maintain_order=True)
    )
    records = index.records[links["rec"]]
    # The primary: lowest (kind rank, role rank, CRM id); records are numbered in CRM-id order.
    rank = records["kind_rank"].cast(pl.Int64) * 2**40 + (links["order"] // 2**32) * 2**32 + links["rec"].cast(pl.Int64)
    return pl.DataFrame(
        {
            "graph_id": links["graph_id"],
            "crm_id": records["crm_id"],
            "crm_kind": records["crm_kind"],
            "matched_address": address.gather(links["row"]),
            "rank": rank,
        }
    ).select(*list(MATCH_SCHEMA)[:4], (pl.col("rank") == pl.col("rank").min().over("graph_id")).alias("is_primary"))
