"""One user's Graph client as every pipeline opens it: the user's delegated token provider (`o365sync.auth`), the
product's HTTP client (`o365sync.http`), and the settings' per-mailbox concurrency and request budget."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from o365sync.auth import TokenProvider
from o365sync.graph import MAIL_READ_ALLOWLIST, Allow, GraphClient
from o365sync.http import make_http_client
from o365sync.settings import Settings


@contextmanager
def user_graph_client(
    settings: Settings,
    tenant_id: str,
    oid: str,
    scopes: list[str],
    *,
    allow: Iterable[Allow] = MAIL_READ_ALLOWLIST,
    max_pages: int | None = None,
) -> Iterator[GraphClient]:
    """A client for user `oid` with `scopes`, that can make the `allow`ed calls only (and at most `max_pages`
    pages per listing); its token provider and HTTP client close when the block ends."""
    with TokenProvider(settings, tenant_id, oid, scopes) as provider, make_http_client(settings) as http:
        yield GraphClient(
            http,
            settings.graph_url,
            provider,
            max_in_flight=settings.max_requests_per_mailbox,
            budget=settings.graph_budget,
            allow=allow,
            max_pages=max_pages,
        )
