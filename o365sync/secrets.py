"""Encryption at rest for refresh-token caches and CRM credentials: AES-256-GCM with the owner's id as
associated data, so a blob copied onto another user's (or tenant's) row fails to decrypt."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from o365sync.settings import Settings

_VERSION = b"v1"


class SecretError(Exception):
    """A sealed blob could not be opened: wrong key, wrong owner, or tampering."""


def load_key(settings: Settings, create: bool = True) -> bytes:
    """The 32-byte key from settings, else from `<data_dir>/secret.key` (created with mode 0600 if allowed)."""
    if settings.token_key is not None:
        raw = base64.b64decode(settings.token_key.get_secret_value())
    else:
        path = settings.key_file
        if not path.exists():
            if not create:
                raise SecretError(f"no token key: set O365SYNC_TOKEN_KEY or create {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64encode(AESGCM.generate_key(bit_length=256)))
        raw = base64.b64decode(path.read_bytes())
    if len(raw) != 32:
        raise SecretError("the token key must be base64 of exactly 32 bytes")
    return raw


def seal(key: bytes, owner: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(12)
    return _VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, owner.encode())


def unseal(key: bytes, owner: str, blob: bytes) -> bytes:
    if blob[:2] != _VERSION:
        raise SecretError("unknown sealed-blob version")
    try:
        return AESGCM(key).decrypt(blob[2:14], blob[14:], owner.encode())
    except InvalidTag as exc:
        raise SecretError(f"cannot decrypt the secret of {owner}: wrong key or tampered data") from exc


def write_sealed(path: Path, key: bytes, owner: str, plaintext: bytes) -> None:
    """Atomically replace `path` with the sealed plaintext, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seal(key, owner, plaintext))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_sealed(path: Path, key: bytes, owner: str) -> bytes:
    return unseal(key, owner, path.read_bytes())
