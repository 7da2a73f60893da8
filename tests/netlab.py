"""A private network namespace with web servers at public-looking addresses, for answer checks.

Why a namespace: the probe judges loopback answers to be sinkholes, so a lab that serves a
"genuine site" on 127.0.0.1 tests nothing. The servers need addresses that look public.

Why these addresses are safe: 198.51.100.0/24, 203.0.113.0/24, 192.0.2.0/24 (RFC 5737) and
2001:db8::/32 (RFC 3849) are documentation ranges, never routed on the internet. More than
that, the namespace holds only its own loopback interface: no veth, no route out (a connect to
any address not configured here fails with ENETUNREACH, which `NetLab` checks before any test
runs). The servers AND the client under test both run inside it, on threads that entered it
with setns(2): a network namespace is per thread on Linux, and a socket stays in the namespace
its thread was in when it was created. So no packet of these tests can leave the namespace,
let alone the machine. Only IP literals are used (a host name would be resolved by asyncio's
executor threads, which are outside).

Needs root (CI runs as root) and iproute2. The namespace is deleted on exit, even when a test
fails; namespaces left behind by a killed run (their PID is gone) are swept on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import trustme

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
PREFIX = "bp-answers-"

# Addresses inside the namespace (all on its loopback interface).
SITE = "198.51.100.10"  # a genuine site: a certificate for its names from the trusted lab CA
SITE_V6 = "2001:db8::10"  # the same site over IPv6
CDN = "198.51.100.20"  # a CDN edge: several names, 451 for one, a redirect to a block page for another
BLOCKPAGE_KNOWN = "203.0.113.30"  # a block page whose certificate names a fingerprinted host
BLOCKPAGE_UNKNOWN = "203.0.113.31"  # a block page nobody has fingerprinted: valid cert for its own name
REFUSES = "203.0.113.40"  # nothing listens: the kernel answers the SYN with RST
DROPS = "203.0.113.41"  # a full accept queue: SYNs are dropped, connect times out
STALLS = "203.0.113.42"  # TCP completes, nobody reads the ClientHello: handshake times out
RESETS = "203.0.113.43"  # reads the ClientHello, then RST (as SNI filters do)
NO_ROUTE = "192.0.2.1"  # configured nowhere: no route inside the namespace

SITE_NAMES = ("leaky.example", "*.leaky.example")  # any name under it: distinct cache keys for benches
CDN_NAMES = ("cdn-site.example", "blocked-at-cdn.example", "redirected.example", "forbidden.example")
KNOWN_BLOCKPAGE_HOST = "internet-positif.org"  # in probe/data/fingerprints.csv (ooni.id_44)
UNKNOWN_BLOCKPAGE_HOST = "stop.isp-unknown.example"

ADDRESSES = (SITE, CDN, BLOCKPAGE_KNOWN, BLOCKPAGE_UNKNOWN, REFUSES, DROPS, STALLS, RESETS)


@dataclass
class Request:
    """What a server saw: where, the SNI it was asked for, and the raw request head and body."""

    address: str
    sni: str | None
    head: str
    extra: bytes
    done: threading.Event = field(default_factory=threading.Event)  # the server finished with it


@dataclass
class NetLab:
    """The namespace, its servers (one thread, one event loop) and a way to run clients inside."""

    name: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    requests: list[Request] = field(default_factory=list)
    accepted: dict[str, int] = field(default_factory=dict)  # TCP connections served, per address

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="blockprobe-netlab-"))
        self.ca = trustme.CA()  # the trusted lab CA: its file is the checker's ca_file
        self.rogue_ca = trustme.CA()  # a CA nobody trusts, as a block page's self-made chain is
        self.ca_file = str(self.dir / "lab-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._issued: dict[tuple[int, tuple[str, ...]], trustme.LeafCert] = {}

    # --- lifecycle ---

    def __enter__(self) -> NetLab:
        sweep_stale()
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            for address in ADDRESSES:
                _ip("-n", self.name, "addr", "add", f"{address}/32", "dev", "lo")
            _ip("-n", self.name, "addr", "add", f"{SITE_V6}/128", "dev", "lo", "nodad")
            self._assert_sealed()
            self._thread = threading.Thread(target=self._serve, name="netlab-servers", daemon=True)
            self._thread.start()
            if not self._ready.wait(15) or self._failure is not None:
                raise RuntimeError(f"netlab servers did not start: {self._failure!r}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._loop is not None and self._stop is not None:
                with contextlib.suppress(RuntimeError):  # the loop may already be gone
                    self._loop.call_soon_threadsafe(self._stop.set)
            if self._thread is not None:
                self._thread.join(10)
        finally:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            shutil.rmtree(self.dir, ignore_errors=True)

    def _assert_sealed(self) -> None:
        """Refuse to run unless the namespace has no way out: only `lo`, and no default route."""
        links = _ip("-n", self.name, "-o", "link", "show").splitlines()
        if len(links) != 1 or ": lo:" not in links[0]:
            raise RuntimeError(f"namespace {self.name} has links other than lo: {links}")
        for family in ("-4", "-6"):
            if "default" in _ip("-n", self.name, family, "route", "show"):
                raise RuntimeError(f"namespace {self.name} has a default route")

    # --- running code inside ---

    def enter(self) -> None:
        """Move the calling thread into the namespace (for threads this lab created only)."""
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def run(self, factory: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
        """Run `factory()` on a fresh event loop in a fresh thread inside the namespace."""
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                self.enter()
                box["result"] = asyncio.run(_call(factory))
            except BaseException as exc:  # noqa: BLE001 - carried to the caller's thread and raised there
                box["error"] = exc

        thread = threading.Thread(target=body, name="netlab-client", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"netlab client still running after {timeout} s")
        if "error" in box:
            raise box["error"]
        return cast(T, box["result"])  # what factory() returned

    def served(self, address: str) -> int:
        with self._lock:
            return self.accepted.get(address, 0)

    def requests_to(self, address: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.address == address]

    # --- the servers ---

    def _serve(self) -> None:
        try:
            self.enter()
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread, which fails the start with it
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        holders: list[socket.socket] = []
        servers: list[asyncio.Server] = []
        try:
            servers.append(await self._tls(SITE, self.ca, SITE_NAMES, _site_answer))
            servers.append(await self._tls(SITE_V6, self.ca, SITE_NAMES, _site_answer))
            servers.append(await self._tls(CDN, self.ca, CDN_NAMES, _cdn_answer, strict_sni=True))
            servers.append(
                await self._tls(BLOCKPAGE_KNOWN, self.rogue_ca, (KNOWN_BLOCKPAGE_HOST,), _block_answer)
            )
            servers.append(
                await self._tls(BLOCKPAGE_UNKNOWN, self.ca, (UNKNOWN_BLOCKPAGE_HOST,), _unknown_block_answer)
            )
            servers.append(await asyncio.start_server(self._resetter, RESETS, 443))
            holders += _dropping_listener(DROPS)
            stall = socket.create_server((STALLS, 443), backlog=64)  # never accept()ed
            holders.append(stall)
            self._ready.set()
            await self._stop.wait()
        finally:
            for server in servers:
                server.close()
            for server in servers:
                await server.wait_closed()
            for sock in holders:
                sock.close()

    async def _tls(
        self,
        address: str,
        ca: trustme.CA,
        names: tuple[str, ...],
        answer: Callable[[str], bytes | None],
        strict_sni: bool = False,
    ) -> asyncio.Server:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        key = (id(ca), names)  # one certificate per site, whatever address serves it, as CDNs do
        if key not in self._issued:
            self._issued[key] = ca.issue_cert(*names)
        self._issued[key].configure_cert(ctx)
        ctx.set_alpn_protocols(["http/1.1"])
        seen: dict[int, str | None] = {}

        def on_sni(obj: ssl.SSLObject, sni: str | None, _ctx: ssl.SSLContext) -> int | None:
            seen[id(obj)] = sni
            if strict_sni and sni not in names:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        ctx.sni_callback = on_sni

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            obj = writer.get_extra_info("ssl_object")
            self._count(address)
            request: Request | None = None
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request = Request(address, seen.pop(id(obj), None), head, b"")
                with self._lock:
                    self.requests.append(request)
                response = answer(_header(head, "host") or "")
                if response is None:  # hold the connection, answer nothing
                    await reader.read()
                    return
                writer.write(response)
                await writer.drain()
                # Anything after the head would be a body; the client closes once it has the answer.
                with contextlib.suppress(TimeoutError):
                    request.extra = await asyncio.wait_for(reader.read(1024), 1)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass  # a TLS-only check closes after the handshake
            finally:
                if request is not None:
                    request.done.set()
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1)

        return await asyncio.start_server(handle, address, 443, ssl=ctx)

    async def _resetter(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wait for the ClientHello, then RST: SO_LINGER 0 makes close() send a reset."""
        self._count(RESETS)
        with contextlib.suppress(ConnectionError):
            await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    def _count(self, address: str) -> None:
        with self._lock:
            self.accepted[address] = self.accepted.get(address, 0) + 1


def _dropping_listener(address: str) -> list[socket.socket]:
    """A listener whose accept queue (backlog 0 holds one) is filled at once and never drained:
    Linux then drops further SYNs, so a client's connect gets no answer at all, as from a
    firewall that drops, without needing iptables."""
    listener = socket.create_server((address, 443), backlog=0)
    filler = socket.create_connection((address, 443), timeout=5)
    return [listener, filler]


def _http(status: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [
        f"HTTP/1.1 {status}",
        "Content-Length: 0",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _site_answer(host: str) -> bytes | None:
    if host == "slow.leaky.example":
        return None
    return _http("200 OK", (("Set-Cookie", "session=1"),))


def _cdn_answer(host: str) -> bytes:
    if host == "blocked-at-cdn.example":
        return _http("451 Unavailable For Legal Reasons")
    if host == "redirected.example":
        return _http("302 Found", (("Location", f"https://{KNOWN_BLOCKPAGE_HOST}/?site={host}"),))
    if host == "forbidden.example":
        return _http("403 Forbidden")
    return _http("200 OK")


# The answer callbacks of _tls are given the SNI host; these two answer the same to every host.
def _block_answer(_host: str) -> bytes:
    return _http("302 Found", (("Location", f"http://{KNOWN_BLOCKPAGE_HOST}/"),))


def _unknown_block_answer(_host: str) -> bytes:
    return _http("200 OK")


def _header(head: str, key: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        k, sep, v = line.partition(":")
        if sep and k.strip().lower() == key:
            return v.strip()
    return None


async def _call(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def sweep_stale() -> None:
    """Delete namespaces a killed run left behind (their PID is gone)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        ns = line.split()[0] if line.split() else ""
        if not ns.startswith(PREFIX):
            continue
        pid = ns.removeprefix(PREFIX)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def unavailable() -> str | None:
    """Why this machine cannot host the lab, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None
