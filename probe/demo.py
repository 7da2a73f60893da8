"""`probe demo`: an offline lab of ISPs and public resolvers on loopback, measured for real.

Each lab resolver gets its own loopback address and speaks UDP, TCP, DoT, DoH and
DoQ. The scenario imitates block signals seen in the wild: an ISP that blocks by
NXDOMAIN, one that redirects to a block page but passes AAAA through (a leak),
one whose block also catches a control name (an overblock), a public resolver that
leaks, and one that refuses with EDE 16 (Censored).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from probe.lab import Behaviour, LabCA, LabServer, Zone
from probe.lists import Lists, parse_lists
from probe.specs import Endpoint, Resolver, parse_endpoint

__all__ = ["DEMO_DOMAINS", "DemoLab", "demo_lists", "demo_zones"]

BLOCKED = ("calcio-pirata.example", "streaming-illegale.example")
CONTROLS = ("wikipedia.example", "drive.usercontent.google.example")
DEMO_DOMAINS = BLOCKED + CONTROLS

# What the authoritative side of the world says (documentation-range-free, plausible addresses).
_TRUTH = {
    "calcio-pirata.example": Behaviour(
        records={
            "A": ("185.199.108.10",),
            "AAAA": ("2a04:4e42::10",),
            "HTTPS": ('1 . alpn="h2,h3" ipv4hint=185.199.108.10',),
        }
    ),
    "streaming-illegale.example": Behaviour(
        records={
            "A": ("185.199.109.20",),
            "AAAA": ("2a04:4e42::20",),
            "HTTPS": ('1 . alpn="h2" ipv4hint=185.199.109.20',),
        }
    ),
    "wikipedia.example": Behaviour(
        records={"A": ("185.15.58.224",), "AAAA": ("2a02:ec80:600:ed1a::1",), "HTTPS": ('1 . alpn="h2"',)}
    ),
    "drive.usercontent.google.example": Behaviour(
        records={"A": ("142.250.180.1",), "AAAA": ("2a00:1450:4002::1",), "HTTPS": ('1 . alpn="h2,h3"',)}
    ),
}


def _zone(
    nsid: str, overrides: dict[str, Behaviour], by_type: dict[tuple[str, str], Behaviour] | None = None
) -> Zone:
    zone = Zone(nsid=nsid)
    for name, b in {**_TRUTH, **overrides}.items():
        zone.set(name, b)
    for (name, qtype), b in (by_type or {}).items():
        zone.set(name, b, qtype)
    return zone


def demo_zones() -> dict[str, tuple[str, str, str | None, Zone]]:
    """name → (loopback address, kind, operator, zone) for every lab resolver.

    Each operator is the resolver's lab name, so the collector's pages (which know a
    resolver by its operator) and `probe demo` call it the same.
    """
    nx = Behaviour(rcode="NXDOMAIN", soa=False)
    page = Behaviour(records={"A": ("83.224.65.74",)})  # the AGCOM copyright page
    censored = Behaviour(rcode="REFUSED", ede=((16, "blocked by a court order"),))
    return {
        "isp-nxdomain": ("127.53.0.1", "isp", "isp-nxdomain", _zone("isp-a-1", dict.fromkeys(BLOCKED, nx))),
        "isp-blockpage": (
            "127.53.0.2",
            "isp",
            "isp-blockpage",
            # A-only zone template: A is rewritten, AAAA passes through (the classic leak);
            # the block also catches a control name (collateral damage).
            _zone(
                "isp-b-1",
                {},
                {
                    **{(n, "A"): page for n in (*BLOCKED, "drive.usercontent.google.example")},
                    **{(n, "HTTPS"): Behaviour() for n in BLOCKED},
                },
            ),
        ),
        "public-leaky": ("127.53.0.3", "public", "public-leaky", _zone("leaky-fra1", {})),
        "public-censor": (
            "127.53.0.4",
            "public",
            "public-censor",
            _zone("censor-mil1", dict.fromkeys(BLOCKED, censored)),
        ),
        "control": ("127.53.0.9", "public", "control", _zone("control-1", {})),
    }


def demo_lists() -> Lists:
    """The demo's lists file, shipped in the package."""
    text = resources.files("probe").joinpath("data/demo-lists.yaml").read_text()
    return parse_lists(text, "demo-lists.yaml")


@dataclass
class DemoLab:
    """The lab's servers, certificates and the resolvers that point at them."""

    ca: LabCA
    servers: dict[str, LabServer]
    kinds: dict[str, tuple[str, str | None]]

    @classmethod
    def build(cls) -> DemoLab:
        ca = LabCA(hosts=("127.0.0.1", "localhost", *(a for a, *_ in demo_zones().values())))
        servers = {}
        kinds = {}
        for name, (addr, kind, operator, zone) in demo_zones().items():
            servers[name] = LabServer(zone, addr, ca)
            kinds[name] = (kind, operator)
        return cls(ca, servers, kinds)

    def resolver(self, name: str) -> Resolver:
        kind, operator = self.kinds[name]
        eps: list[Endpoint] = [parse_endpoint(spec)[0] for spec in self.servers[name].specs().values()]
        return Resolver(name, kind, operator, tuple(eps))
