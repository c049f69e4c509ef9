"""The static API tokens of the CRM simulators (HubSpot private-app tokens, Pipedrive API tokens): one live token
per tenant until a test expires them all; then each tenant gets a fresh one, and the old ones stay known as expired
(HubSpot answers them differently from tokens it never issued). Callers hold their simulator's lock."""

from __future__ import annotations

from collections.abc import Callable


class StaticTokens:
    def __init__(self, new_token: Callable[[], str]):
        self._new_token = new_token
        self._tenant_of: dict[str, str] = {}  # live token -> tid
        self._current: dict[str, str] = {}  # tid -> its live token
        self._expired: set[str] = set()

    def issue(self, tid: str) -> str:
        """A new live token for `tid` (its current one from now on)."""
        token = self._new_token()
        self._tenant_of[token] = tid
        self._current[tid] = token
        return token

    def current(self, tid: str) -> str:
        return self._current[tid]

    def tenant(self, token: str) -> str | None:
        """The tenant of a live token; None for an expired or unknown one."""
        return self._tenant_of.get(token)

    def is_expired(self, token: str) -> bool:
        return token in self._expired

    def expire_all(self) -> None:
        """Every token issued so far stops working; each tenant gets a fresh one."""
        self._expired.update(self._tenant_of)
        self._tenant_of.clear()
        for tid in list(self._current):
            self.issue(tid)
