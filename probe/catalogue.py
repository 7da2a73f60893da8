"""The catalogue of public resolvers (data/resolvers.yaml): operators, addresses, endpoints."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from probe.errors import CatalogueError, SpecError
from probe.specs import Endpoint, parse_endpoint

__all__ = ["Catalogue", "CatalogueEntry", "load_catalogue"]


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
