"""One place that builds httpx clients, so every outbound call trusts the same CA bundle and timeouts."""

from __future__ import annotations

import ssl

import httpx

from o365sync.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext:
    if settings.ca_bundle:
        return ssl.create_default_context(cafile=str(settings.ca_bundle))
    return ssl.create_default_context()


def make_http_client(settings: Settings, **kwargs: object) -> httpx.Client:
    # trust_env=False: REQUESTS_CA_BUNDLE/proxy variables must not override the configured bundle (with requests, MSAL's
    # own `verify=` lost to them).
    return httpx.Client(verify=ssl_context(settings), timeout=settings.http_timeout_s, trust_env=False, **kwargs)  # type: ignore[arg-type]
