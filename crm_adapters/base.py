"""What the CRM adapters share beyond the library's snapshot model (`o365sync.crm`: frames, errors, the
`CrmAdapter` Protocol they implement): secrets, an empty snapshot, the snapshot's three frames in their schemas
and a website's domain."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from o365sync.crm import ACCOUNTS_SCHEMA, OPPORTUNITIES_SCHEMA, PEOPLE_SCHEMA, CrmError, CrmSnapshot, normalise_email
from o365sync.domains import registrable_domain

if TYPE_CHECKING:
    from o365sync.tenants import TenantConfig


def stored_secret(tenant: TenantConfig, secrets: dict[str, str], name: str) -> str:
    """The CRM secret `name`, or CrmError saying how to store it."""
    if not secrets.get(name):
        raise CrmError(
            f"tenant {tenant.id}: the {tenant.crm_kind} {name} is not stored "
            "(o365sync tenant update --crm-secrets-stdin)"
        )
    return secrets[name]


def empty_snapshot() -> CrmSnapshot:
    return CrmSnapshot(
        people=PEOPLE_SCHEMA.to_frame(),
        accounts=ACCOUNTS_SCHEMA.to_frame(),
        opportunities=OPPORTUNITIES_SCHEMA.to_frame(),
    )


def conform(frame: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """The columns of `schema`, in its order and types (what the snapshot's frames hold)."""
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


def people_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """Normalise emails, drop rows without one, and conform to PEOPLE_SCHEMA."""
    normalised = frame.with_columns(normalise_email(pl.col("email")).alias("email"))
    return conform(normalised.filter(pl.col("email").is_not_null()), PEOPLE_SCHEMA)


def accounts_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` conformed to ACCOUNTS_SCHEMA."""
    return conform(frame, ACCOUNTS_SCHEMA)


def opportunities_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` conformed to OPPORTUNITIES_SCHEMA."""
    return conform(frame, OPPORTUNITIES_SCHEMA)


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
    if (
        "." not in text
        or any(ch.isspace() for ch in text)
        or text.startswith(".")
        or ".." in text
        or len(text) > 253
        or any(len(label) > 63 for label in text.split("."))
    ):
        return None  # RFC 1035 limits: a longer host is not a domain name
    return registrable_domain(text)
