"""Access tokens shared by the identity simulator (which issues them) and the Graph simulator (which checks
them). RS256 JWTs shaped like Entra's v1 Graph tokens; the product treats them as opaque."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

GRAPH_AUDIENCE = "https://graph.microsoft.com"
SIGNED_CACHE_SIZE = 4096


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenError(Exception):
    """The token is unknown, tampered with, expired or revoked (Graph answers 401 InvalidAuthenticationToken)."""


@dataclass(frozen=True)
class AccessClaims:
    tid: str
    oid: str
    scopes: frozenset[str]  # short form, e.g. {"Mail.Read", "User.Read"}
    upn: str
    exp: float


class TokenAuthority:
    """Signs and verifies JWTs with one RSA key; `clock` is injectable so tests can make time pass."""

    def __init__(self, clock: Callable[[], float] = time.time, kid: str = "sim-key-1"):
        self.clock = clock
        self.kid = kid
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._revoked_before: dict[str, float] = {}  # oid -> tokens issued before this instant are dead
        # access token -> its claims, once its signature checked out: the key never changes, so a token that verified
        # once always will; audience, expiry and revocation are still checked on every use (`verify_access_token`)
        self._signed: dict[str, dict] = {}
        self._lock = threading.Lock()

    def sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(sig)}"

    def jwks(self) -> dict:
        nums = self._key.public_key().public_numbers()
        n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        return {"keys": [{"kty": "RSA", "use": "sig", "kid": self.kid, "n": b64url(n), "e": b64url(e)}]}

    def issue_access_token(
        self, tid: str, oid: str, upn: str, scopes: list[str], client_id: str, ttl_s: int = 3599
    ) -> str:
        now = self.clock()
        return self.sign(
            {
                "aud": GRAPH_AUDIENCE,
                "iss": f"https://sts.windows.net/{tid}/",
                "iat": int(now),
                "nbf": int(now),
                "exp": int(now + ttl_s),
                "appid": client_id,
                "oid": oid,
                "tid": tid,
                "upn": upn,
                "scp": " ".join(scopes),
                "ver": "1.0",
                "uti": uuid.uuid4().hex,
                "_iat_f": now,
            }
        )

    def decode(self, token: str) -> dict:
        try:
            head, payload, sig = token.split(".")
            self._key.public_key().verify(
                b64url_decode(sig), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            return json.loads(b64url_decode(payload))
        except (ValueError, InvalidSignature) as exc:
            raise TokenError("CompactToken parsing failed with error code: 80049217") from exc

    def verify_access_token(self, token: str) -> AccessClaims:
        """The token's claims, or TokenError. Every inner request of a Graph `$batch` carries the outer request's
        token, so the RSA check and parse are remembered per token (`_signed`); the rest is checked each time."""
        claims = self._signed.get(token)
        if claims is None:
            claims = self.decode(token)
            if len(self._signed) >= SIGNED_CACHE_SIZE:
                self._signed.clear()  # a test run issues a few thousand tokens at most; keep memory bounded anyway
            self._signed[token] = claims
        if claims.get("aud") != GRAPH_AUDIENCE:
            raise TokenError("Invalid audience.")
        if claims["exp"] <= self.clock():
            raise TokenError("Lifetime validation failed, the token is expired.")
        with self._lock:
            if claims.get("_iat_f", 0) < self._revoked_before.get(claims["oid"], 0):
                raise TokenError("Access token has expired or is not yet valid.")
        return AccessClaims(
            claims["tid"], claims["oid"], frozenset(claims.get("scp", "").split()), claims.get("upn", ""), claims["exp"]
        )

    def revoke_access_tokens(self, oid: str) -> None:
        """Make every access token issued so far for this user fail (tests: force the client's 401 path)."""
        with self._lock:
            self._revoked_before[oid] = self.clock() + 1e-6
