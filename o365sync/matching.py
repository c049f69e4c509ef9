"""CRM matching, vectorised in Polars.

Participants are normalised (trim + lower-case), reduced to *distinct* external addresses, and only those are
joined against the CRM snapshot: a mailbox page repeats the same few hundred addresses thousands of times, so
matching distinct addresses and joining the hits back beats joining every participant row.
Rules: exact address -> contacts and unconverted leads; the address's registrable domain (public-suffix aware, so
mail from eu.acme.co.uk reaches the account acme.co.uk) -> accounts, never for free-mail domains or the tenant's own
domains; a message is kept when at least one external participant matched; every matched CRM
record is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

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
# the mail, then To, then Cc, then the smallest CRM id (deterministic).
KIND_RANK = {"contact": 0, "person_account": 1, "lead": 2, "account": 3}
ROLE_RANK = {"from": 0, "sender": 1, "to": 2, "cc": 3}


normalise_address = normalise_email  # one rule for CRM and mail addresses: trim + lower-case, blank = null


@dataclass(frozen=True)
class CrmIndex:
    """The CRM snapshot in the shape matching needs, built once per run: address -> record and domain -> account,
    each frame sorted by its key so a page's few hundred distinct keys are found by binary search
    (`search_sorted`) instead of hashing the whole snapshot again for every page (bench/crm_snapshot.py: at 1M
    contacts a hash join per 500-message page cost 66-190 ms)."""

    people: pl.DataFrame  # email, crm_id, crm_kind — sorted by email
    accounts: pl.DataFrame  # domain, crm_id, crm_kind — sorted by domain
    own_domains: frozenset[str]


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
        .filter(pl.col("email").str.contains("@"))
        .unique()
        .sort("email")
    )
    a = accounts.select(
        normalise_address(pl.col("domain")).alias("domain"), "crm_id", pl.lit("account").alias("crm_kind")
    )
    a = (
        a.with_columns(registrable_domains(a["domain"]).alias("domain"))
        .filter(pl.col("domain").is_not_null() & (pl.col("domain") != "") & ~pl.col("domain").is_in(excluded))
        .unique()
        .sort("domain")
    )
    return CrmIndex(people=p, accounts=a, own_domains=own)


def _lookup(index: pl.DataFrame, key: str, wanted: pl.Series) -> pl.DataFrame:
    """(key, crm_id, crm_kind) for every index row whose `key` is in `wanted` (index sorted by `key`)."""
    keys = wanted.drop_nulls().unique().sort()
    column = index[key]
    found = pl.DataFrame(
        {key: keys, "lo": column.search_sorted(keys, side="left"), "hi": column.search_sorted(keys, side="right")}
    ).filter(pl.col("hi") > pl.col("lo"))
    rows = found.select(key, pl.int_ranges("lo", "hi").alias("row")).explode("row")
    return pl.concat([rows.select(key), index[rows["row"]].select("crm_id", "crm_kind")], how="horizontal")


def match_participants(participants: pl.DataFrame, index: CrmIndex) -> pl.DataFrame:
    """participants: graph_id, address (raw), optionally role. Returns one row per (message, CRM record) with
    MATCH_SCHEMA; exactly one row per matched message has is_primary."""
    role = pl.col("role") if "role" in participants.columns else pl.lit(None, dtype=pl.String)
    parts = participants.select(
        "graph_id",
        normalise_address(pl.col("address")).alias("address"),
        role.replace_strict(ROLE_RANK, default=len(ROLE_RANK), return_dtype=pl.Int8).alias("role_rank"),
    )
    parts = parts.with_columns(pl.col("address").str.split("@").list.last().alias("domain"))
    external = parts.filter(~pl.col("domain").is_in(list(index.own_domains)) & pl.col("address").str.contains("@"))
    distinct = external.select("address", "domain").unique()
    by_address = _lookup(index.people, "email", distinct["address"]).rename({"email": "address"})
    distinct = distinct.with_columns(registrable_domains(distinct["domain"]).alias("domain"))
    by_domain = distinct.join(_lookup(index.accounts, "domain", distinct["domain"]), on="domain").select(
        "address", "crm_id", "crm_kind"
    )
    hits = pl.concat([by_address, by_domain])
    if hits.is_empty():
        return pl.DataFrame(schema=MATCH_SCHEMA)
    # A link is (message, record); a record is (crm_id, kind) — Pipedrive numbers persons and organizations apart.
    links = (
        external.select("graph_id", "address", "role_rank")
        .join(hits, on="address", how="inner")
        .sort("graph_id", "role_rank", "crm_id")
        .group_by("graph_id", "crm_id", "crm_kind", maintain_order=True)
        .agg(pl.col("address").first().alias("matched_address"), pl.col("role_rank").min())
    )
    return (
        links.with_columns(pl.col("crm_kind").replace_strict(KIND_RANK, return_dtype=pl.Int8).alias("kind_rank"))
        .sort("graph_id", "kind_rank", "role_rank", "crm_id")
        .with_columns((pl.int_range(pl.len()).over("graph_id") == 0).alias("is_primary"))
        .select(list(MATCH_SCHEMA))
    )
