"""The single place where library and OS exceptions become failure values."""

from __future__ import annotations

import errno
import ssl

from probe.transports.base import Failure, FailureKind, Phase

__all__ = ["Broken", "error", "failure_from", "timeout"]

ERROR = FailureKind.ERROR


class Broken(Exception):
    """A failure already classified, carried up through code that only knows exceptions."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


def timeout(phase: Phase = Phase.DNS_ROUND_TRIP) -> Failure:
    """No answer in time. Only in the DNS round trip (silent) or while a response was still
    arriving is that a `timeout`; anywhere else the transport failed to carry the query at
    all (a connection or handshake timeout is an `error`). Only the silent one can be a block."""
    kind = FailureKind.TIMEOUT if phase in (Phase.DNS_ROUND_TRIP, Phase.DNS_RESPONSE) else ERROR
    return Failure(kind, phase, f"{phase}: timed out")


def error(phase: Phase, text: str, retriable: bool = False) -> Failure:
    return Failure(ERROR, phase, text, retriable)


def failure_from(exc: BaseException, phase: Phase) -> Failure:  # noqa: C901 - a table of exception types, most specific first
    """Translate any exception raised under `phase` into the most specific failure."""
    if isinstance(exc, Broken):
        return exc.failure
    # TimeoutError is an OSError: it must be tested first, or a TLS stall reads as "connect".
    if isinstance(exc, TimeoutError):
        return timeout(phase)
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or "certificate verify failed"
        return error(Phase.TLS_HANDSHAKE, f"tls: certificate verify failed: {reason}")
    if isinstance(exc, ssl.SSLError):
        return error(Phase.TLS_HANDSHAKE, f"tls: {exc.reason or exc}".lower())
    if isinstance(exc, ConnectionRefusedError):
        return error(phase, f"{phase}: connection refused")
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return error(phase, f"{phase}: connection reset", retriable=True)
    if isinstance(exc, EOFError | ConnectionAbortedError):
        return error(phase, f"{phase}: connection closed by peer", retriable=True)
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        detail = exc.strerror or str(exc) or type(exc).__name__
        return error(phase, f"{phase}: {detail}" + (f" ({name})" if name else ""))
    # aioquic, h2 and httpx2 raise their own families; only their names are stable.
    module = type(exc).__module__.split(".")[0]
    if module == "aioquic":
        return error(phase, f"quic: {exc}" if str(exc) else f"quic: {type(exc).__name__}")
    if module in ("h2", "hpack"):
        return error(Phase.HTTP, f"http2: {type(exc).__name__}: {exc}", retriable=True)
    if module in ("httpx2", "httpcore2"):
        if type(exc).__name__.endswith("Timeout"):
            return timeout(phase)
        return error(Phase.HTTP, f"http: {type(exc).__name__}: {exc}")
    return error(phase, f"{phase}: {type(exc).__name__}: {exc}")
