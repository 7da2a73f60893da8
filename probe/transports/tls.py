"""TLS client contexts: system trust plus --ca-file, host names always checked."""

from __future__ import annotations

import functools
import ssl

__all__ = ["client_context"]


@functools.cache
def client_context(ca_file: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """A verifying client context; one per (trust, ALPN) pair, shared by every connection."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.check_hostname = True  # never skip the name check, IP literals included
    ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx
