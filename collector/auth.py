"""Probe tokens: random, shown once, stored only as a hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["hash_token", "new_token", "owner_of"]


def new_token() -> str:
    return "bp_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of randomness: a plain SHA-256 cannot be brute-forced back.
    return hashlib.sha256(token.encode()).hexdigest()


def owner_of(digest: str, tokens: list[tuple[str, str]]) -> str | None:
    """The probe whose stored hash equals `digest`: every hash compared, each in constant time."""
    owner = None
    for probe_id, stored in tokens:
        if hmac.compare_digest(stored, digest):
            owner = probe_id
    return owner
