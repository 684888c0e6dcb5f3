"""Signing a bundle: the key file of ``--sign-key``, ``signature.json`` (an HMAC-SHA256 of
``manifest.json``) and the ``signature`` check of ``verify``."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from qkd_deploy.deploy.bundle.files import (
    DAMAGED,
    MANIFEST,
    MAX_SMALL_FILE_BYTES,
    SIGNATURE,
    check_result,
    read_json,
    required_field,
)
from qkd_deploy.errors import UserError

SIGNATURE_ALGORITHM = "HMAC-SHA256"
MIN_KEY_BYTES = 16


def read_sign_key(path: str | os.PathLike) -> bytes:
    """The bytes of a key file for ``--sign-key`` (at least ``MIN_KEY_BYTES``; any bytes, e.g.
    ``head -c 32 /dev/urandom > bundle.key``)."""
    path = Path(path)
    make = f"make one with: head -c 32 /dev/urandom > {path}"
    if not path.is_file():
        raise UserError(f"--sign-key {path}: no such file; {make}")
    size = path.stat().st_size
    if size > MAX_SMALL_FILE_BYTES:
        raise UserError(f"--sign-key {path} is {size} bytes; a key file holds a few bytes")
    key = path.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise UserError(
            f"--sign-key {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {make}"
        )
    return key


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _key_id(key: bytes) -> str:
    """A short name for the key (not the key): tells two keys apart in messages."""
    return _mac(key, b"qkd-deploy bundle key id")[:16]


def sign_manifest(manifest: Path, key: bytes) -> dict[str, str]:
    return {
        "algorithm": SIGNATURE_ALGORITHM,
        "signed_file": MANIFEST,
        "key_id": _key_id(key),
        "hmac": _mac(key, manifest.read_bytes()),
    }


def check_signature(folder: Path, key: bytes | None) -> dict[str, Any] | None:
    """The ``signature`` check: None for an unsigned bundle verified without a key; a passed
    note for a signed one verified without a key (not authenticated); with a key, passed only
    when ``signature.json`` holds the HMAC of this ``manifest.json`` under it."""
    path = folder / SIGNATURE
    if key is None:
        if not path.exists():
            return None
        return check_result(
            "signature",
            True,
            f"signed, but not authenticated: give --sign-key KEY to check {SIGNATURE}",
        )
    if not path.is_file():
        return check_result("signature", False, f"not signed (no {SIGNATURE}): not authenticated")
    try:
        signature = read_json(path, DAMAGED)
        algorithm = required_field(signature, "algorithm", str, path)
        expected_mac = required_field(signature, "hmac", str, path)
    except UserError as error:
        return check_result("signature", False, f"unreadable: {error}")
    if algorithm != SIGNATURE_ALGORITHM:
        return check_result(
            "signature", False, f"{algorithm!r} signature; {SIGNATURE_ALGORITHM} expected"
        )
    mac = _mac(key, (folder / MANIFEST).read_bytes())
    if not hmac.compare_digest(expected_mac.encode("utf-8"), mac.encode("ascii")):
        key_note = ""
        if signature.get("key_id") not in (None, _key_id(key)):
            key_note = f" (signed with key id {signature['key_id']}, --sign-key is {_key_id(key)})"
        return check_result(
            "signature",
            False,
            f"HMAC of {MANIFEST} does not match{key_note}: the bundle was changed after it was "
            "signed, or signed with another key; do not deploy it",
        )
    return check_result("signature", True, f"{SIGNATURE_ALGORITHM} of {MANIFEST}: authenticated")
