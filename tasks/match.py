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

from crm_adapters.base import normalise_email
from o365sync.domains import FREE_MAIL_DOMAINS, registrable_domain, registrable_domains

MATCH_SCHEMA = {"graph_id": pl.String, "crm_id": pl.String, "crm_kind": pl.String, "matched_address": pl.String,
                "is_primary": pl.Boolean}
# The primary link of a message: contact > person account > lead > account; ties go to the participant who sent
# the mail, then To, then Cc, then the smallest CRM id (deterministic).
KIND_RANK = {"contact": 0, "person_account": 1, "lead": 2, "account": 3}
ROLE_RANK = {"from": 0, "sender": 1, "to": 2, "cc": 3}


normalise_address = normalise_email  # one rule for CRM and mail addresses: trim + lower-case, blank = null


@dataclass(frozen=True)
class CrmIndex:
    """The CRM snapshot in the shape matching needs: address -> record and domain -> account."""

    people: pl.DataFrame  # email, crm_id, crm_kind
    accounts: pl.DataFrame  # domain, crm_id, crm_kind
    own_domains: frozenset[str]


def build_index(people: pl.DataFrame, accounts: pl.DataFrame, own_domains: Iterable[str]) -> CrmIndex:
    """people: crm_id, kind, email; accounts: crm_id, domain (as snapshotted)."""
    own = frozenset(d.strip().lower() for d in own_domains)
    excluded = list(FREE_MAIL_DOMAINS | own | {r for d in own if (r := registrable_domain(d))})
    p = (people.select(normalise_address(pl.col("email")).alias("email"), "crm_id",
                       pl.col("kind").cast(pl.String).alias("crm_kind"))
         .filter(pl.col("email").str.contains("@")).unique())
    a = accounts.select(normalise_address(pl.col("domain")).alias("domain"), "crm_id",
                        pl.lit("account").alias("crm_kind"))
    a = (a.with_columns(registrable_domains(a["domain"]).alias("domain"))
         .filter(pl.col("domain").is_not_null() & (pl.col("domain") != "") & ~pl.col("domain").is_in(excluded))
         .unique())
    return CrmIndex(people=p, accounts=a, own_domains=own)


def match_participants(participants: pl.DataFrame, index: CrmIndex) -> pl.DataFrame:
    """participants: graph_id, address (raw), optionally role. Returns one row per (message, CRM record) with
    MATCH_SCHEMA; exactly one row per matched message has is_primary."""
    role = pl.col("role") if "role" in participants.columns else pl.lit(None, dtype=pl.String)
    parts = participants.select("graph_id", normalise_address(pl.col("address")).alias("address"),
                                role.replace_strict(ROLE_RANK, default=len(ROLE_RANK), return_dtype=pl.Int8)
                                .alias("role_rank"))
    parts = parts.with_columns(pl.col("address").str.split("@").list.last().alias("domain"))
    external = parts.filter(~pl.col("domain").is_in(list(index.own_domains)) & pl.col("address").str.contains("@"))
    distinct = external.select("address", "domain").unique()
    by_address = distinct.join(index.people, left_on="address", right_on="email", how="inner").select(
        "address", "crm_id", "crm_kind")
    distinct = distinct.with_columns(registrable_domains(distinct["domain"]).alias("domain"))
    by_domain = distinct.join(index.accounts, on="domain", how="inner").select("address", "crm_id", "crm_kind")
    hits = pl.concat([by_address, by_domain])
    if hits.is_empty():
        return pl.DataFrame(schema=MATCH_SCHEMA)
    links = (external.select("graph_id", "address", "role_rank").join(hits, on="address", how="inner")
             .sort("graph_id", "role_rank", "crm_id")
             .group_by("graph_id", "crm_id", maintain_order=True)
             .agg(pl.col("crm_kind").first(), pl.col("address").first().alias("matched_address"),
                  pl.col("role_rank").min()))
    primary = (links.with_columns(pl.col("crm_kind").replace_strict(KIND_RANK, return_dtype=pl.Int8).alias("kind_rank"))
               .sort("graph_id", "kind_rank", "role_rank", "crm_id")
               .group_by("graph_id", maintain_order=True).agg(pl.col("crm_id").first().alias("primary_id")))
    return (links.join(primary, on="graph_id", how="left")
            .with_columns((pl.col("crm_id") == pl.col("primary_id")).alias("is_primary"))
            .select(list(MATCH_SCHEMA)))
