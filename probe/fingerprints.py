"""Known block-page addresses and CNAME targets (data/fingerprints.csv)."""

from __future__ import annotations

import csv
import functools
import ipaddress
from dataclasses import dataclass
from importlib import resources

__all__ = ["Fingerprint", "Fingerprints", "load_fingerprints"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Fingerprint:
    id: str
    scope: str
    countries: str
    source: str

    def describe(self) -> str:
        return f"{self.id} ({self.source})"


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: a cache key in classify
class Fingerprints:
    addresses: dict[IPAddress, Fingerprint]
    names: dict[str, Fingerprint]

    def address(self, ip: IPAddress) -> Fingerprint | None:
        return self.addresses.get(ip)

    def name(self, name: str) -> Fingerprint | None:
        return self.names.get(name.lower().rstrip("."))


def parse_fingerprints(text: str) -> Fingerprints:
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    addresses: dict[IPAddress, Fingerprint] = {}
    names: dict[str, Fingerprint] = {}
    for row in rows:
        fp = Fingerprint(row["id"], row["scope"], row["countries"], row["source"])
        pattern = row["pattern"].strip().lower()
        try:
            addresses[ipaddress.ip_address(pattern)] = fp
        except ValueError:
            names[pattern.rstrip(".")] = fp
    return Fingerprints(addresses, names)


@functools.cache
def load_fingerprints() -> Fingerprints:
    """The fingerprints shipped in the package, parsed once per process."""
    return parse_fingerprints(resources.files("probe").joinpath("data/fingerprints.csv").read_text())
