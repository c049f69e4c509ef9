"""Encryption at rest for refresh-token caches and CRM credentials: AES-256-GCM with the owner's id as
associated data, so a blob copied onto another user's (or tenant's) row fails to decrypt."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from o365sync.settings import Settings

_VERSION = b"v1"
SEALED_LOCK = ".sealed.lock"
"""One lock file per folder of sealed files (not per file: it would outlive an erased user's token, named after
them); writers of that folder take it in turn."""


class SecretError(Exception):
    """A sealed blob could not be opened: wrong key, wrong owner, or tampering."""


def load_key(settings: Settings, create: bool = True) -> bytes:
    """The 32-byte key from settings, else from `<data_dir>/secret.key` (created, mode 0600, if allowed)."""
    if settings.token_key is not None:
        raw = base64.b64decode(settings.token_key.get_secret_value())
    else:
        path = settings.key_file
        if not path.exists():
            if not create:
                raise SecretError(f"no token key: set O365SYNC_TOKEN_KEY or create {path}")
            _create_key_file(path)
        raw = base64.b64decode(path.read_bytes())
    if len(raw) != 32:
        raise SecretError("the token key must be base64 of exactly 32 bytes")
    return raw


def _create_key_file(path: Path) -> None:
    """Write a new key to a private temp file and hard-link it into place: `path` appears complete or not at all,
    and never replaces a key another process created meanwhile (that one wins; everyone reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_temp_beside(path, base64.b64encode(AESGCM.generate_key(bit_length=256)))
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _private_temp_beside(path: Path, data: bytes) -> str:
    """A new temp file (unique name, mode 0600) in `path`'s folder holding `data`, flushed to disk."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


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


@contextlib.contextmanager
def _sealed_folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder / SEALED_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_sealed(path: Path, key: bytes, owner: str, plaintext: bytes) -> None:
    """Atomically replace `path` with the sealed plaintext, mode 0600. Concurrent writers (threads or processes)
    take turns and each writes its own temp file, so readers only ever see a whole file."""
    blob = seal(key, owner, plaintext)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sealed_folder_lock(path.parent):
        tmp = _private_temp_beside(path, blob)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def read_sealed(path: Path, key: bytes, owner: str) -> bytes:
    return unseal(key, owner, path.read_bytes())
