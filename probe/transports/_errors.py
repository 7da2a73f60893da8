"""The single place where library and OS exceptions become failure values."""

from __future__ import annotations

import asyncio
import errno
import ssl
from typing import Any

from probe.transports.base import Failure

__all__ = ["expire", "failure_from", "timeout"]


def timeout(phase: str = "dns_round_trip") -> Failure:
    return Failure("timeout", phase, f"{phase}: timed out")


def failure_from(exc: BaseException, phase: str) -> Failure:
    """Translate any exception raised under `phase` into the most specific failure."""
    if isinstance(exc, TimeoutError):
        return timeout(phase)
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or "certificate verify failed"
        return Failure("error", "tls_handshake", f"tls: certificate verify failed: {reason}")
    if isinstance(exc, ssl.SSLError):
        return Failure("error", "tls_handshake", f"tls: {exc.reason or exc}".lower())
    if isinstance(exc, ConnectionRefusedError):
        return Failure("error", phase, f"{phase}: connection refused")
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return Failure("error", phase, f"{phase}: connection reset", retriable=True)
    if isinstance(exc, EOFError | ConnectionAbortedError):
        return Failure("error", phase, f"{phase}: connection closed by peer", retriable=True)
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        detail = exc.strerror or str(exc) or type(exc).__name__
        return Failure("error", phase, f"{phase}: {detail}" + (f" ({name})" if name else ""))
    # aioquic, h2 and httpx2 raise their own families; only their names are stable.
    module = type(exc).__module__.split(".")[0]
    if module == "aioquic":
        return Failure("error", phase, f"quic: {exc}" if str(exc) else f"quic: {type(exc).__name__}")
    if module in ("h2", "hpack"):
        return Failure("error", "http", f"http2: {type(exc).__name__}: {exc}", retriable=True)
    if module in ("httpx2", "httpcore2"):
        return Failure("error", "http", f"http: {type(exc).__name__}: {exc}")
    return Failure("error", phase, f"{phase}: {type(exc).__name__}: {exc}")


def expire(fut: asyncio.Future[Any]) -> None:
    """The timer callback of every exchange: a future still waiting then fails with TimeoutError."""
    if not fut.done():
        fut.set_exception(TimeoutError())
