"""Finding content in files the product keeps: raw bytes plus anything that decodes as base64 (Prefect stores
results as base64 cloudpickle). Shared by the privacy and erasure tests."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path


def decoded_variants(data: bytes) -> list[bytes]:
    """The raw bytes plus anything that decodes as base64."""
    out = [data]
    for chunk in re.findall(rb"[A-Za-z0-9+/=]{40,}", data):
        try:
            out.append(base64.b64decode(chunk, validate=False))
        except (binascii.Error, ValueError):
            pass
    return out


def file_hits(files: list[Path], needles: list[bytes], lower: bool = False) -> list[tuple[Path, bytes]]:
    """(file, needle) for every needle found in a file (case-insensitively with `lower`: needles lower-case)."""
    found: set[tuple[Path, bytes]] = set()
    for path in files:
        for blob in decoded_variants(path.read_bytes()):
            blob = blob.lower() if lower else blob
            found |= {(path, n) for n in needles if n in blob}
    return sorted(found)
