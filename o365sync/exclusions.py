"""Exclusions applied before CRM matching, vectorised in Polars. Each excluded message is only counted.

First reason wins, in this order: draft, meeting_message (eventMessage* items: meeting requests/responses),
sensitive (personal/private/confidential), automated_sender (no-reply style local part of the sender),
blocklisted (any participant's address or domain on the tenant's or the user's blocklist), internal_only (no
participant outside the tenant's verified domains; X500/EX addresses without '@' count as internal). Only Inbox
and Sent Items are synced at all, so Drafts, Junk and Deleted Items never reach this point.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from o365sync.matching import normalise_address

REASONS = ("draft", "meeting_message", "sensitive", "automated_sender", "blocklisted", "internal_only")
SENSITIVE = ("personal", "private", "confidential")
AUTOMATED_LOCAL_PART = (
    r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer[-_.]?daemon|postmaster|bounces?"
    r"|notifications?|alerts?)([+-].*)?$"
)


def _blocked(address: pl.Expr, domain: pl.Expr, entries: Iterable[str]) -> pl.Expr:
    entries = {e.strip().lower() for e in entries if e.strip()}
    addresses = [e for e in entries if "@" in e]
    domains = [e.lstrip("@") for e in entries if "@" not in e]
    return address.is_in(addresses) | domain.is_in(domains)


def exclusion_reasons(
    messages: pl.DataFrame, participants: pl.DataFrame, own_domains: Iterable[str], blocklist: Iterable[str] = ()
) -> pl.DataFrame:
    """messages: graph_id, is_draft, odata_type, sensitivity, from_address; participants: graph_id, address.
    Returns (graph_id, reason) for every excluded message."""
    own = [d.strip().lower() for d in own_domains]
    parts = (
        participants.select("graph_id", normalise_address(pl.col("address")).alias("address"))
        .filter(pl.col("address").is_not_null() & (pl.col("address") != ""))
        .with_columns(
            pl.col("address").str.split("@").list.last().alias("domain"),
            pl.col("address").str.contains("@").alias("has_at"),
        )
    )
    per_message = parts.group_by("graph_id").agg(
        _blocked(pl.col("address"), pl.col("domain"), blocklist).any().alias("blocklisted"),
        (pl.col("has_at") & ~pl.col("domain").is_in(own)).any().alias("external"),
    )
    sender_local = normalise_address(pl.col("from_address")).str.split("@").list.first()
    flagged = (
        messages.select(
            "graph_id",
            pl.col("is_draft").fill_null(False).alias("draft"),
            pl.col("odata_type")
            .fill_null("")
            .str.starts_with("#microsoft.graph.eventMessage")
            .alias("meeting_message"),
            pl.col("sensitivity").fill_null("normal").str.to_lowercase().is_in(SENSITIVE).alias("sensitive"),
            sender_local.str.contains(AUTOMATED_LOCAL_PART).fill_null(False).alias("automated_sender"),
        )
        .join(per_message, on="graph_id", how="left")
        .with_columns(
            pl.col("blocklisted").fill_null(False),
            (~pl.col("external").fill_null(False)).alias("internal_only"),
        )
    )
    reason = pl.lit(None, dtype=pl.String)
    for name in reversed(REASONS):
        reason = pl.when(pl.col(name)).then(pl.lit(name)).otherwise(reason)
    return flagged.select("graph_id", reason.alias("reason")).filter(pl.col("reason").is_not_null())
