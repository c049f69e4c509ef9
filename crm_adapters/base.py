"""What every CRM adapter produces: a `CrmSnapshot` of three Polars frames with fixed schemas, plus the
errors adapters raise. Exception messages carry HTTP statuses and error codes only (no bodies, no tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from o365sync.domains import registrable_domain

PEOPLE_SCHEMA = pl.Schema(
    {"crm_id": pl.String, "kind": pl.String, "email": pl.String, "account_id": pl.String, "name": pl.String}
)
ACCOUNTS_SCHEMA = pl.Schema({"crm_id": pl.String, "name": pl.String, "domain": pl.String})
OPPORTUNITIES_SCHEMA = pl.Schema(
    {
        "crm_id": pl.String,
        "account_id": pl.String,
        "name": pl.String,
        "is_closed": pl.Boolean,
        "created_at": pl.Datetime("us", "UTC"),
    }
)


class CrmError(Exception):
    """A CRM call failed in a way the adapter could not recover from (message: status and error code)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        # set by adapters when the refresh token rotated before the failure: persist it anyway
        self.rotated_refresh_token: str | None = None


class CrmAuthError(CrmError):
    """The stored refresh token is dead (revoked/expired/rotated away): the tenant must reconnect the CRM."""


class CrmQuotaExhausted(CrmError):
    """The CRM's API allowance is used up (Salesforce 403 REQUEST_LIMIT_EXCEEDED). Do not retry in a loop."""


@dataclass
class CrmSnapshot:
    people: pl.DataFrame  # PEOPLE_SCHEMA: contacts and (unconverted) leads with a normalised email
    accounts: pl.DataFrame  # ACCOUNTS_SCHEMA: domain from the free-text website, may be null
    opportunities: pl.DataFrame  # OPPORTUNITIES_SCHEMA
    rotated_refresh_token: str | None = None  # persist it: the old one may already be invalid


def empty_snapshot() -> CrmSnapshot:
    return CrmSnapshot(
        people=PEOPLE_SCHEMA.to_frame(),
        accounts=ACCOUNTS_SCHEMA.to_frame(),
        opportunities=OPPORTUNITIES_SCHEMA.to_frame(),
    )


def normalise_email(expr: pl.Expr) -> pl.Expr:
    """Trimmed and lower-cased; blank becomes null. Nothing else changes (plus-addressing matters)."""
    cleaned = expr.str.strip_chars().str.to_lowercase()
    return pl.when(cleaned != "").then(cleaned)  # keeps the input's name; otherwise null


def people_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """Normalise emails, drop rows without one, and conform to PEOPLE_SCHEMA (column order and types)."""
    return (
        frame.with_columns(normalise_email(pl.col("email")).alias("email"))
        .filter(pl.col("email").is_not_null())
        .select([pl.col(name).cast(dtype) for name, dtype in PEOPLE_SCHEMA.items()])
    )


def website_domain(website: str | None) -> str | None:
    """The registrable domain (public-suffix aware, `o365sync.domains`) of a free-text website or domain.

    "WWW.ACME.COM" -> "acme.com"; "http://x.io/en/home" -> "x.io"; "https://shop.acme.co.uk/en" -> "acme.co.uk";
    "acme.github.io" stays (github.io is a public suffix). None when there is no plausible host (blank, no dot,
    spaces) or the host is itself a public suffix ("co.uk").
    """
    if website is None:
        return None
    text = website.strip().lower()
    if not text:
        return None
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.removeprefix("//")
    for sep in ("/", "?", "#", "\\"):
        text = text.split(sep, 1)[0]
    text = text.rpartition("@")[2]  # user:pass@host
    text = text.split(":", 1)[0].strip().rstrip(".")
    if "." not in text or any(ch.isspace() for ch in text) or text.startswith(".") or ".." in text:
        return None
    return registrable_domain(text)
