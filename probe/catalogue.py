"""The catalogue of public resolvers (data/resolvers.yaml): operators, addresses, endpoints."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

import yaml

from probe.errors import CatalogueError, SpecError
from probe.model import Transport
from probe.specs import Endpoint, Resolver, parse_endpoint, system_nameservers

__all__ = ["Catalogue", "CatalogueEntry", "load_catalogue", "resolve_spec"]


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    name: str
    operator: str
    title: str
    addresses: tuple[str, ...]
    hostnames: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]

    def bootstrap_for(self, host: str) -> str | None:
        """The address to reach one of this operator's host names without asking DNS."""
        for ep in self.endpoints:
            if ep.host == host and ep.address:
                return ep.address
        return self.addresses[0] if self.addresses else None


@dataclass(frozen=True, slots=True)
class Catalogue:
    entries: dict[str, CatalogueEntry]
    control: str

    def owner_of(self, host: str | None) -> CatalogueEntry | None:
        """The entry whose address or host name this is, if any."""
        if not host:
            return None
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            host = host.lower().rstrip(".")
        for entry in self.entries.values():
            if host in entry.addresses or host in entry.hostnames:
                return entry
        return None


def _parse(doc: Any) -> Catalogue:
    if not isinstance(doc, dict) or not isinstance(doc.get("resolvers"), dict):
        raise CatalogueError("resolvers: missing or not a mapping")
    entries: dict[str, CatalogueEntry] = {}
    for name, body in doc["resolvers"].items():
        try:
            endpoints = tuple(parse_endpoint(s)[0] for s in body["endpoints"])
            addresses = tuple(str(ipaddress.ip_address(a)) for a in body.get("addresses", []))
            entries[name] = CatalogueEntry(
                name,
                body["operator"],
                body.get("title", name),
                addresses,
                tuple(h.lower() for h in body.get("hostnames", [])),
                endpoints,
            )
        except (KeyError, TypeError, ValueError, SpecError) as exc:
            raise CatalogueError(f"resolvers.{name}: {exc}") from None
    control = doc.get("control", "")
    if control not in entries:
        raise CatalogueError(f"control: {control!r} is not a catalogue entry")
    return Catalogue(entries, control)


@functools.cache
def load_catalogue() -> Catalogue:
    """The built-in catalogue, parsed once per process."""
    text = resources.files("probe").joinpath("data/resolvers.yaml").read_text()
    return _parse(yaml.safe_load(text))


def resolve_spec(spec: str, catalogue: Catalogue | None = None) -> Resolver:
    """Turn what the user typed into a Resolver, applying the kind/operator rules of resolver specs."""
    cat = catalogue if catalogue is not None else load_catalogue()
    name = spec.strip()
    if not name:
        raise SpecError("'' is not a resolver spec")
    if name == "system":
        servers = system_nameservers()
        if not servers:
            raise SpecError("'system' has no nameservers in /etc/resolv.conf")
        eps = tuple(Endpoint(Transport.UDP, s, 53) for s in servers)
        return Resolver("system", "system", None, eps)
    entry = cat.entries.get(name.lower())
    if entry is not None:
        return Resolver(name, "public", entry.operator, entry.endpoints)
    endpoint, options = parse_endpoint(name)
    operator = options.get("operator")
    kind = options.get("kind")
    owner = cat.owner_of(endpoint.host) or (cat.owner_of(endpoint.address) if endpoint.address else None)
    if owner is not None:
        operator = operator or owner.operator
        kind = kind or "public"
        if endpoint.address is None and not endpoint.host_is_ip:
            endpoint = replace(endpoint, address=owner.bootstrap_for(endpoint.host))
    return Resolver(name, kind or "isp", operator, (endpoint,))
