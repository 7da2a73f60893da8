"""Resolver specs (docs/cli.md, resolver specs) → resolvers and their endpoints."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from probe.errors import SpecError
from probe.model import Transport

__all__ = ["Endpoint", "Resolver", "parse_endpoint", "system_nameservers"]

KINDS = frozenset({"public", "isp", "system"})

_SCHEMES: dict[str, tuple[Transport, int]] = {
    "udp": (Transport.UDP, 53),
    "tcp": (Transport.TCP, 53),
    "tls": (Transport.DOT, 853),
    "https": (Transport.DOH, 443),
    "h3": (Transport.DOH3, 443),
    "quic": (Transport.DOQ, 853),
}
_SCHEME_OF = {t: s for s, (t, _) in _SCHEMES.items()}
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
_FRAGMENT_KEYS = frozenset({"kind", "operator", "address", "qps"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place to send queries: a transport, where to connect, and whom to expect there.

    `host` is what TLS verifies and what HTTP names as authority; `address`, when the
    host is a name, is the bootstrap address to connect to without asking DNS first.
    """

    transport: Transport
    host: str
    port: int
    path: str = ""
    address: str | None = None
    qps: float | None = None

    @property
    def connect_host(self) -> str:
        return self.address or self.host

    @property
    def host_is_ip(self) -> bool:
        return _is_ip(self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{_SCHEME_OF[self.transport]}://{host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class Resolver:
    """A resolver as the user named it, with the endpoints that name stands for."""

    name: str
    kind: str
    operator: str | None
    endpoints: tuple[Endpoint, ...] = field(default=())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split_host_port(spec: str, hostport: str, default_port: int) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise SpecError(f"{spec!r} is not a resolver spec: unclosed '['")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SpecError(f"{spec!r} is not a resolver spec: junk after ']'")
        port_text = rest[1:] if rest else ""
    elif hostport.count(":") > 1:
        host, port_text = hostport, ""  # a bare IPv6 literal without a port
    elif ":" in hostport:
        host, port_text = hostport.split(":", 1)
    else:
        host, port_text = hostport, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise SpecError(f"{spec!r} is not a resolver spec: bad port {port_text!r}")
        port = int(port_text)
    else:
        port = default_port
    host = host.lower()
    if not host or not (_is_ip(host) or _HOST_RE.match(host)):
        raise SpecError(f"{spec!r} is not a resolver spec: bad host {host!r}")
    return host.rstrip(".") if not _is_ip(host) else host, port


def _parse_fragment(spec: str, fragment: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, fragment.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _FRAGMENT_KEYS or not value:
            raise SpecError(
                f"{spec!r} is not a resolver spec: fragment item {item!r} "
                f"(expected key=value with key in {', '.join(sorted(_FRAGMENT_KEYS))})"
            )
        out[key] = value
    if "kind" in out and out["kind"] not in KINDS:
        raise SpecError(
            f"{spec!r} is not a resolver spec: kind {out['kind']!r} is not one of isp, public, system"
        )
    if "address" in out and not _is_ip(out["address"]):
        raise SpecError(f"{spec!r} is not a resolver spec: address {out['address']!r} is not an IP address")
    if "qps" in out:
        try:
            if float(out["qps"]) <= 0:
                raise ValueError
        except ValueError:
            raise SpecError(
                f"{spec!r} is not a resolver spec: qps {out['qps']!r} is not a positive number"
            ) from None
    return out


def parse_endpoint(spec: str) -> tuple[Endpoint, dict[str, str]]:
    """Parse one URL-style spec into an endpoint and its fragment options."""
    text, _, fragment = spec.strip().partition("#")
    options = _parse_fragment(spec, fragment)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "udp", text
        if "/" in rest:
            raise SpecError(f"{spec!r} is not a resolver spec: expected SCHEME://HOST[:PORT] or HOST[:PORT]")
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise SpecError(
            f"{spec!r} is not a resolver spec: unknown scheme {scheme!r} (one of {', '.join(_SCHEMES)})"
        )
    transport, default_port = _SCHEMES[scheme]
    hostport, slash, path = rest.partition("/")
    path = slash + path
    if transport in (Transport.DOH, Transport.DOH3):
        path = path or "/dns-query"
    elif path not in ("", "/"):
        raise SpecError(f"{spec!r} is not a resolver spec: {scheme}:// takes no path")
    else:
        path = ""
    host, port = _split_host_port(spec, hostport, default_port)
    qps = float(options["qps"]) if "qps" in options else None
    return Endpoint(transport, host, port, path, options.get("address"), qps), options


def system_nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's configured nameservers, in order."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and _is_ip(parts[1].split("%")[0]):
            out.append(parts[1].split("%")[0])
    return out
