"""Answer checks: what an answered address serves for the queried name (docs/measurement.md).

A DNS answer alone cannot prove a leak: an ISP may redirect a blocked name to a block page that
no fingerprint knows yet, or a CDN may answer HTTP 451 at the address the resolver gave. So each
distinct answered address is asked for the name itself, as Iris and CERTainty do: a TLS handshake
on port 443 with the name as SNI, validated against the system trust store (plus --ca-file), and
optionally one `HEAD /`. An impostor or block page cannot present a certificate valid for the
name; CDN and geo-DNS differences, which make plain answer comparison noisy, pass.

This module does the checks (`AnswerChecker`) and the two pure judgements built on them
(`manipulated`, `reach_of`). The engine decides which names and addresses to check and when
(after the DNS round, never delaying it); the judge folds the verdicts into the measurement.

Nothing here turns a silence or a connection failure into a block: only a certificate that was
actually presented and is not valid for the name counts against an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from probe.fingerprints import Fingerprints, load_fingerprints
from probe.transports.tls import client_context

__all__ = [
    "PORT",
    "AddressCheck",
    "AnswerChecker",
    "CertInfo",
    "CheckMode",
    "CheckStatus",
    "Manipulation",
    "Phase",
    "Reach",
    "addresses_of",
    "manipulated",
    "reach_of",
    "same_addresses",
]

PORT = 443  # the only port ever checked: a politeness rule of issue 16, not a default
_HEAD_LIMIT = 16_384  # a HEAD answer's status line and headers; anything longer is not a web server's
_CLOSE_GRACE = 1.0  # seconds granted to a polite TLS close_notify after the result is known
_PRUNE_EVERY = 1024  # cache inserts between sweeps of expired entries


class CheckMode(StrEnum):
    """`verify:` in the config. `off` exists because some operators must not connect to listed sites."""

    OFF = "off"
    TLS = "tls"
    HTTP = "http"


class CheckStatus(StrEnum):
    """What one address gave for one name."""

    VALID = "valid"  # a certificate valid for the name (and, with HTTP, an answer other than 451)
    INVALID_CERT = "invalid_cert"  # a certificate was presented and it is not valid for the name
    HTTP_451 = "http_451"  # valid certificate, then 451 Unavailable For Legal Reasons
    HTTP_STATUS = "http_status"  # valid certificate, then a 4xx/5xx other than 451 (code kept)
    BLOCKPAGE = "blockpage"  # a known block page: by its certificate or by where it redirects
    REFUSED = "refused"  # the connection was refused (RST to the SYN)
    RESET = "reset"  # the connection was reset after it was made (e.g. an SNI filter)
    TIMEOUT = "timeout"  # nothing in time, in the phase recorded
    UNREACHABLE = "unreachable"  # the network said there is no way there (ICMP unreachable)
    TLS_FAILED = "tls_failed"  # the handshake failed without a certificate to judge (alert, close)
    ERROR = "error"  # the probe could not check (its own routing, a malformed name, a bug): no evidence


class Phase(StrEnum):
    """Where a check ended, as OONI records the operation that failed."""

    CONNECT = "connect"
    TLS = "tls_handshake"
    HTTP = "http"


class Manipulation(StrEnum):
    """The verdict of `manipulated`: four values, because "the check cannot tell" has two meanings."""

    MANIPULATED = "manipulated"  # every address fails the name while the control's validates: a block
    NOT_MANIPULATED = "not_manipulated"  # an address validates: the answer is genuine (a proven leak)
    CANNOT_TELL = "cannot_tell"  # all fail, the control fails too, and the answers differ: blocked null
    STANDS = "stands"  # the checks say nothing that changes the DNS judgement


class Reach(StrEnum):
    """What a user would meet at the answer: the second dimension beside the DNS finding."""

    REACHABLE = "reachable"
    HTTP_451 = "http_451"
    BLOCKPAGE = "blockpage"
    TLS_ERROR = "tls_error"
    UNREACHABLE = "unreachable"
    UNCHECKED = "unchecked"


@dataclass(frozen=True, slots=True)
class CertInfo:
    """The evidence a certificate gives: who it names, who issued it, and its hash to compare runs."""

    subject: str
    issuer: str
    names: tuple[str, ...]  # subjectAltName DNS names and addresses; the subject CN when there are none
    not_before: str
    not_after: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "names": list(self.names),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, slots=True)
class AddressCheck:
    """One check of one (name, address): a value, never an exception, logged whole in the evidence."""

    name: str
    address: str
    mode: CheckMode
    status: CheckStatus
    phase: Phase | None = None  # where it ended when it did not succeed
    cert_valid: bool | None = None  # None: no certificate was seen (no handshake)
    verify_error: str | None = None  # OpenSSL's reason when the certificate was not valid
    cert: CertInfo | None = None
    http_code: int | None = None
    location: str | None = None  # a redirect's target, recorded and never followed
    blockpage: dict[str, str] | None = None  # {"match": ..., "source": ...} like `sinkhole`
    error: str | None = None
    elapsed_ms: float | None = None  # connect + handshake (+ HEAD), queueing excluded
    connections: int = 0  # new connections this check opened (2 when the certificate was refetched)
    time: str = ""
    cached: bool = False

    @property
    def presents_invalid_cert(self) -> bool:
        """A certificate was shown and it is not valid for the name: the only thing that counts against an answer."""
        return self.cert_valid is False

    @property
    def connection_failed(self) -> bool:
        """No handshake completed (refused, reset, silent, unreachable, failed TLS): a silence in
        HEAD after a valid certificate is not one, the address did answer for the name."""
        return self.status in _NO_HANDSHAKE and self.cert_valid is None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "port": PORT,
            "mode": str(self.mode),
            "status": str(self.status),
            "phase": None if self.phase is None else str(self.phase),
            "cert_valid": self.cert_valid,
            "verify_error": self.verify_error,
            "cert": None if self.cert is None else self.cert.to_json(),
            "http_code": self.http_code,
            "location": self.location,
            "blockpage": self.blockpage,
            "error": self.error,
            "elapsed_ms": self.elapsed_ms,
            "connections": self.connections,
            "time": self.time,
            "cached": self.cached,
        }


_NO_HANDSHAKE = frozenset(
    {
        CheckStatus.REFUSED,
        CheckStatus.RESET,
        CheckStatus.TIMEOUT,
        CheckStatus.UNREACHABLE,
        CheckStatus.TLS_FAILED,
    }
)


# --- the judgements (pure: no I/O, no clock) ---------------------------------------------------


_HINT = re.compile(r'\bipv[46]hint=("[^"]*"|\S+)')


def addresses_of(qtype: str, answers: Sequence[str]) -> list[str]:
    """The distinct addresses an answer points at, in order: A and AAAA data, and the HTTPS
    record's ipv4hint/ipv6hint (presentation format, as in a measurement's `answers`).
    IPv4-mapped addresses become IPv4; anything that is not an address is skipped."""
    found: list[str] = []
    for text in answers:
        if qtype in ("A", "AAAA"):
            found.append(text)
        elif qtype == "HTTPS":
            for value in _HINT.findall(text):
                found += value.strip('"').split(",")
    out: dict[str, None] = {}
    for candidate in found:
        normal = _normal_address(candidate)
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(normal)
            out[normal] = None
    return list(out)


def same_addresses(resolver_answer: Sequence[str], control_answer: Sequence[str], qtype: str) -> bool:
    """Whether two answers point at the same set of addresses (what `manipulated` is told)."""
    return set(addresses_of(qtype, resolver_answer)) == set(addresses_of(qtype, control_answer))


def manipulated(
    resolver_checks: Sequence[AddressCheck], control_checks: Sequence[AddressCheck], same_addresses: bool
) -> Manipulation:
    """docs/measurement.md, "Answer checks", for one answer (one name and type, one resolver).

    `resolver_checks` are the checks of every distinct address of the resolver's answer,
    `control_checks` those of the control's answer for the same name and type, and
    `same_addresses` whether the two answers hold the same set of addresses.

    An answer is manipulated only when *every* one of its addresses presented a certificate not
    valid for the name and an address of the control's answer validated. One address that failed
    to connect is enough to withhold the verdict: a silence or a connection failure is never
    evidence of a block. When the control does not validate either (its addresses fail, or it
    has none), nobody can tell a block page from a broken site: if the resolver answered what
    the control answered, the DNS judgement stands; if it answered something else, `blocked`
    must be null (it may be a block page no fingerprint knows).
    """
    if not resolver_checks:
        return Manipulation.STANDS
    if any(c.cert_valid is True for c in resolver_checks):
        return Manipulation.NOT_MANIPULATED
    if not all(c.presents_invalid_cert for c in resolver_checks):
        return Manipulation.STANDS
    if any(c.cert_valid is True for c in control_checks):
        return Manipulation.MANIPULATED
    return Manipulation.STANDS if same_addresses else Manipulation.CANNOT_TELL


def reach_of(checks: Sequence[AddressCheck], manipulation: Manipulation | None = None) -> Reach:
    """What a user would meet at an answer whose addresses gave `checks`.

    A browser that gets several addresses tries the next when one fails, so the best thing any
    address offers wins: the site if any address serves it, then a 451, then a block page, then
    a TLS error, and only when every checked address failed to connect or hand shake,
    `unreachable`. A certificate that validated but whose HEAD got no answer is neither reachable
    (the contract asks for an answer) nor unreachable (the handshake completed): `unchecked`,
    like checks the probe could not make at all (`error`).
    """
    if manipulation is Manipulation.MANIPULATED:
        return Reach.BLOCKPAGE
    statuses = {c.status for c in checks}
    if statuses & {CheckStatus.VALID, CheckStatus.HTTP_STATUS}:
        return Reach.REACHABLE
    if CheckStatus.HTTP_451 in statuses:
        return Reach.HTTP_451
    if CheckStatus.BLOCKPAGE in statuses:
        return Reach.BLOCKPAGE
    if CheckStatus.INVALID_CERT in statuses:
        return Reach.TLS_ERROR
    judged = [c for c in checks if c.status is not CheckStatus.ERROR]
    if judged and all(c.connection_failed for c in judged):
        return Reach.UNREACHABLE
    return Reach.UNCHECKED


# --- the checks -------------------------------------------------------------------------------


class _Pacer:
    """At most `rate` new connections per second, evenly spaced: politeness toward listed sites
    (and the probe's own uplink) matters more than bursts, so there is no burst allowance.
    Callers pass one at a time and the next slot counts from when the last one actually left,
    so a caller woken late by a busy loop cannot bunch up with the next."""

    def __init__(self, rate: float | None, clock: Callable[[], float]) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.clock = clock
        self.next_slot = float("-inf")
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            delay = self.next_slot - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self.next_slot = self.clock() + self.interval


class AnswerChecker:
    """Checks (name, address) pairs on port 443, cached, paced, bounded; never raises.

    One checker serves a whole probe: the cache is what keeps a name answered alike by ten
    resolvers at one check per address, and the pacer and semaphore are what a probe operator
    promises the sites (`rate` new connections per second, `concurrency` at once).

    `timeout` is one deadline per check covering connect, handshake and HEAD, as a DNS query has
    one per attempt; time spent waiting for the pacer or a free slot does not count against it,
    since a queue on the probe says nothing about the address. Refetching a certificate that
    failed validation, for the evidence, is a second connection with its own deadline.

    `concurrency` should be at least `rate` × `timeout`: a silent address holds its slot for the
    whole deadline, and with fewer slots silences, not the rate, would set the pace.
    """

    def __init__(
        self,
        mode: CheckMode | str = CheckMode.TLS,
        *,
        ca_file: str | None = None,
        timeout: float = 5.0,
        ttl: float = 6 * 3600.0,
        concurrency: int = 32,
        rate: float | None = 5.0,
        fingerprints: Fingerprints | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "blockprobe answer check (+https://github.com/blockprobe)",
    ) -> None:
        self.mode = CheckMode(mode)
        if timeout <= 0:
            raise ValueError(f"timeout: {timeout!r} is not a positive number of seconds")
        if concurrency < 1:
            raise ValueError(f"concurrency: {concurrency!r} is not a positive integer")
        if rate is not None and rate <= 0:
            raise ValueError(f"rate: {rate!r} is not a positive number of connections per second")
        if ttl < 0:
            raise ValueError(f"ttl: {ttl!r} is negative")
        self.timeout = timeout
        self.ttl = ttl
        self.clock = clock
        self.fingerprints = fingerprints if fingerprints is not None else load_fingerprints()
        self.user_agent = user_agent
        self.verifying = ssl_context if ssl_context is not None else client_context(ca_file, ("http/1.1",))
        if self.verifying.verify_mode != ssl.CERT_REQUIRED or not self.verifying.check_hostname:
            # A context that does not check would turn every impostor into a proven leak.
            raise ValueError("ssl_context: must verify the chain and the host name")
        # Only to read the certificate a verifying handshake refused; never used to send a request.
        self.unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.unverified.check_hostname = False
        self.unverified.verify_mode = ssl.CERT_NONE
        self.unverified.set_alpn_protocols(["http/1.1"])
        self._slots = asyncio.Semaphore(concurrency)
        self._pacer = _Pacer(rate, clock)
        self._cache: dict[tuple[str, str], tuple[float, AddressCheck]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[AddressCheck]] = {}
        self._certs: dict[str, CertInfo] = {}
        self._inserts = 0
        self.connections = 0  # opened since creation: the figure the connection budget is about

    @property
    def enabled(self) -> bool:
        return self.mode is not CheckMode.OFF

    async def check_all(self, name: str, addresses: Iterable[str]) -> list[AddressCheck]:
        """Check every distinct address of one answer concurrently, in first-seen order; [] when off."""
        if not self.enabled:
            return []
        distinct = list(dict.fromkeys(_normal_address(a) for a in addresses))
        return list(await asyncio.gather(*(self.check(name, a) for a in distinct)))

    async def check(self, name: str, address: str) -> AddressCheck:
        """One (name, address), from the cache when fresh; concurrent callers share one check."""
        name = _normal_name(name)
        address = _normal_address(address)
        if not self.enabled:
            return self._error(name, address, "answer checks are off")
        key = (name, address)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self.clock():
            return replace(hit[1], cached=True)
        pending = self._inflight.get(key)
        if pending is not None:
            return replace(await asyncio.shield(pending), cached=True)
        future: asyncio.Future[AddressCheck] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._guarded(name, address)
        except BaseException as exc:  # cancellation: the waiters get an error value, never hang
            future.set_result(self._error(name, address, f"check cancelled: {type(exc).__name__}"))
            raise
        finally:
            del self._inflight[key]
        future.set_result(result)
        if result.status is not CheckStatus.ERROR:  # a local failure is not the address's doing
            self._remember(key, result)
        return result

    def _remember(self, key: tuple[str, str], result: AddressCheck) -> None:
        """Cache a result. The cache holds at most `rate` × `ttl` entries (about 0.55 KB each, see
        bench/answers.py), so expired ones are swept now and then rather than on every lookup."""
        now = self.clock()
        self._cache[key] = (now + self.ttl, result)
        self._inserts += 1
        if self._inserts % _PRUNE_EVERY == 0:
            for k in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[k]
            live = {r.cert.sha256 for _, r in self._cache.values() if r.cert is not None}
            self._certs = {h: c for h, c in self._certs.items() if h in live}

    def _cert(self, der: bytes) -> CertInfo | None:
        """One parsed certificate per distinct certificate: a name's addresses usually share one."""
        digest = hashlib.sha256(der).hexdigest()
        cert = self._certs.get(digest)
        if cert is None:
            cert = _parse_cert(der, digest)
            if cert is not None:
                self._certs[digest] = cert
        return cert

    def _error(self, name: str, address: str, text: str) -> AddressCheck:
        return AddressCheck(name, address, self.mode, CheckStatus.ERROR, error=text, time=_now())

    async def _guarded(self, name: str, address: str) -> AddressCheck:
        try:
            return await self._check(name, address)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must cost one check, not the round
            return self._error(name, address, f"check failed: {type(exc).__name__}: {exc}")

    async def _check(self, name: str, address: str) -> AddressCheck:
        problem = _unfit(name, address)
        if problem:
            return self._error(name, address, problem)
        async with self._slots:
            await self._pacer.wait()
            started = _now()
            result = await self._attempt(name, address, self.verifying)
            result = replace(result, time=started, connections=1)
            if result.status is CheckStatus.INVALID_CERT:
                await self._pacer.wait()
                refetch = await self._attempt(name, address, self.unverified)
                result = replace(
                    result,
                    connections=2,
                    cert=refetch.cert,
                    error=None
                    if refetch.cert
                    else f"certificate not refetched: {refetch.error or 'unparsable'}",
                )
                result = self._blockpage_by_cert(result)
        self.connections += result.connections
        return result

    async def _attempt(self, name: str, address: str, ctx: ssl.SSLContext) -> AddressCheck:
        """One connection under one deadline, timed up to the verdict (the polite close after it,
        bounded by _CLOSE_GRACE, is not the address's latency)."""
        opened: list[asyncio.StreamWriter] = []
        t0 = time.perf_counter()
        try:
            result = await self._connect_and_check(name, address, ctx, opened)
            return replace(result, elapsed_ms=round((time.perf_counter() - t0) * 1000, 3))
        finally:
            for writer in opened:
                await _close(writer)

    async def _connect_and_check(  # noqa: C901 - one except per status the contract names, in its order
        self, name: str, address: str, ctx: ssl.SSLContext, opened: list[asyncio.StreamWriter]
    ) -> AddressCheck:
        """Connect, hand shake (and HEAD); every failure becomes a status with its phase."""
        loop = asyncio.get_running_loop()
        base = AddressCheck(name, address, self.mode, CheckStatus.VALID)
        phase = Phase.CONNECT
        writer: asyncio.StreamWriter | None = None
        ip = ipaddress.ip_address(address)
        sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    await loop.sock_connect(sock, (address, PORT))
                    phase = Phase.TLS
                    reader, writer = await asyncio.open_connection(
                        sock=sock, ssl=ctx, server_hostname=name, ssl_handshake_timeout=self.timeout
                    )
                except BaseException:
                    if writer is None:
                        sock.close()
                    raise
                opened.append(writer)
                der = _peer_der(writer)
                if der is None:  # never call a handshake without a certificate valid
                    return replace(
                        base, status=CheckStatus.TLS_FAILED, phase=phase, error=f"{phase}: no certificate"
                    )
                cert = self._cert(der)
                if ctx is self.unverified:
                    return replace(base, cert=cert)
                # Kept in `base` so that a failure in HEAD still reports the certificate it saw.
                base = result = replace(base, cert=cert, cert_valid=True)
                if self.mode is CheckMode.HTTP:
                    phase = Phase.HTTP
                    result = await self._head(reader, writer, result)
        except TimeoutError:
            return replace(base, status=CheckStatus.TIMEOUT, phase=phase, error=f"{phase}: timed out")
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or "certificate verify failed"
            return replace(
                base, status=CheckStatus.INVALID_CERT, phase=Phase.TLS, cert_valid=False, verify_error=reason
            )
        except (ssl.SSLError, asyncio.IncompleteReadError, EOFError, ConnectionAbortedError) as exc:
            status = CheckStatus.TLS_FAILED if phase is Phase.TLS else CheckStatus.RESET
            return replace(base, status=status, phase=phase, error=f"{phase}: {_describe(exc)}")
        except ConnectionRefusedError:
            return replace(
                base, status=CheckStatus.REFUSED, phase=phase, error=f"{phase}: connection refused"
            )
        except (ConnectionResetError, BrokenPipeError) as exc:
            if exc.errno is None and phase is Phase.TLS:  # asyncio's word for a FIN mid-handshake
                return replace(
                    base,
                    status=CheckStatus.TLS_FAILED,
                    phase=phase,
                    error=f"{phase}: connection closed by peer",
                )
            return replace(base, status=CheckStatus.RESET, phase=phase, error=f"{phase}: connection reset")
        except OSError as exc:
            return _os_failure(base, phase, exc)
        return result

    async def _head(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: AddressCheck
    ) -> AddressCheck:
        """One `HEAD /` with Host = the name: no body, no cookies, the redirect recorded, not followed."""
        request = (
            f"HEAD / HTTP/1.1\r\nHost: {result.name}\r\nUser-Agent: {self.user_agent}\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            head = exc.partial  # closed after the headers without the blank line: still an answer
        except asyncio.LimitOverrunError:
            head = await reader.read(_HEAD_LIMIT)
        code, location = _parse_head(head)
        if code is None:
            return replace(
                result, status=CheckStatus.ERROR, phase=Phase.HTTP, error="http: not an HTTP/1 response"
            )
        result = replace(result, http_code=code, location=location)
        if code == 451:
            return replace(result, status=CheckStatus.HTTP_451)
        match = self._blockpage_host(location)
        if match is not None:
            return replace(result, status=CheckStatus.BLOCKPAGE, blockpage=match)
        if code >= 400:
            return replace(result, status=CheckStatus.HTTP_STATUS)
        return result

    def _blockpage_host(self, location: str | None) -> dict[str, str] | None:
        if not location:
            return None
        host = (urlsplit(location).hostname or "").rstrip(".")
        if not host:
            return None
        try:
            fp = self.fingerprints.address(ipaddress.ip_address(host))
        except ValueError:
            fp = self.fingerprints.name(host)
        return None if fp is None else {"match": host, "source": fp.describe()}

    def _blockpage_by_cert(self, result: AddressCheck) -> AddressCheck:
        """A refused certificate that names a known block page (or is issued by one) says which."""
        if result.cert is None:
            return result
        candidates = [*result.cert.names, _cn(result.cert.subject), _cn(result.cert.issuer)]
        for candidate in candidates:
            if not candidate:
                continue
            host = candidate.lower().removeprefix("*.")
            fp = self.fingerprints.name(host)
            if fp is not None:
                return replace(
                    result, status=CheckStatus.BLOCKPAGE, blockpage={"match": host, "source": fp.describe()}
                )
        return result


# --- helpers ----------------------------------------------------------------------------------


def _normal_name(name: str) -> str:
    normal = name.lower().rstrip(".")
    return name if normal == name else normal  # keep the caller's string: the cache holds many


def _normal_address(address: str) -> str:
    """Text form for the cache key and the connection; an IPv4-mapped address is its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    text = str(ip)
    return address if text == address else text


def _unfit(name: str, address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"address {address!r} is not an IP address"
    if ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255":
        return f"address {address}: not a unicast address"
    if not name or not name.isascii() or " " in name or len(name) > 253:
        return f"name {name!r} is not an A-label host name"
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"tls: {(exc.reason or str(exc)).lower()}"
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return "connection closed by peer"
    return str(exc) or type(exc).__name__


def _os_failure(base: AddressCheck, phase: Phase, exc: OSError) -> AddressCheck:
    """ENETUNREACH/EHOSTUNREACH are evidence only when they came from the network: a probe with no
    route there (no IPv6, say) learns nothing about the address, so ask the kernel for a route
    (a UDP connect sends no packet) before calling it unreachable."""
    code = exc.errno or 0
    text = f"{phase}: {exc.strerror or exc} ({errno.errorcode.get(code, code)})"
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH) and _has_route(base.address):
        return replace(base, status=CheckStatus.UNREACHABLE, phase=phase, error=text)
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        text = f"{phase}: no route from this probe ({errno.errorcode.get(code, code)})"
    return replace(base, status=CheckStatus.ERROR, phase=phase, error=text)


def _has_route(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, PORT))
        except OSError:
            return False
    return True


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close politely (TLS close_notify), but never wait long for a peer that does not answer it."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_GRACE):
            await writer.wait_closed()
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _peer_der(writer: asyncio.StreamWriter) -> bytes | None:
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der or None


def _parse_cert(der: bytes, digest: str) -> CertInfo | None:
    """The parts of a certificate worth keeping as evidence; None if it does not even parse."""
    try:
        cert = x509.load_der_x509_certificate(der)
        names: list[str] = []
        try:
            san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        except x509.ExtensionNotFound:
            san = None
        if isinstance(san, x509.SubjectAlternativeName):
            names += san.get_values_for_type(x509.DNSName)
            names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        if not names:
            names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return CertInfo(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            names=tuple(names),
            not_before=cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
            not_after=cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
            sha256=digest,
        )
    except (ValueError, TypeError):
        return None


def _cn(rfc4514: str) -> str:
    for part in rfc4514.split(","):
        key, _, value = part.partition("=")
        if key.strip().upper() == "CN":
            return value.strip()
    return ""


def _parse_head(head: bytes) -> tuple[int | None, str | None]:
    """(status code, Location) from an HTTP/1 status line and headers; (None, None) if it is not one."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith("HTTP/1.")
        or not (parts[1].isdigit() and len(parts[1]) == 3)
    ):
        return None, None
    location = None
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "location":
            location = value.strip()[:2048]
    return int(parts[1]), location
