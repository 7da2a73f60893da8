"""What a user would meet at a leak's addresses, and IP-level blocks inferred across probes (issue 16).

A probe checks each answered address of a name with an expectation (probe/answers.py): a TLS
handshake on port 443 with the name as SNI. Each measurement carries the verdict (`reach`) and
every check (`evidence.answer_checks`, and `evidence.control_checks` for the control's
addresses). The collector keeps `reach` on each series and, for names an order names, each
check's result per probe and time (`address_checks`), so that it can say what no single probe
can: an address that no connection reaches from probes in the ordering country while probes
elsewhere complete a valid handshake with it, in the same window, is blocked at the IP level
there (Piracy Shield orders IPv4 addresses blocked at the ISPs).

Inconclusive beats wrong, so the inference needs, for one name and one address within one
window: a probe in the ordering country whose latest check failed to connect, and a probe
elsewhere whose latest check validated. Only a failure to connect counts (a reset during the
handshake is a filter on the name, not on the address), and a silence alone (`timeout`)
never counts while any probe elsewhere also failed to reach the address: a slow or
overloaded site explains both. Everything a probe sends is checked against the probe's own
vocabulary here; anything else is dropped, never guessed at.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

__all__ = [
    "CHECK_STATUSES",
    "MAX_CHECKS",
    "PROBLEM_REACH",
    "REACH",
    "CheckRows",
    "IpBlock",
    "address_checks_of",
    "infer_ip_blocks",
    "ip_blocks",
    "reach_of",
]

# probe/answers.py's Reach and CheckStatus, copied so that the collector does not import the
# probe's TLS stack; tests/test_reach.py fails when they drift apart.
REACH = ("reachable", "http_451", "blockpage", "tls_error", "unreachable", "unchecked")
# What blockprobe_reach shows: a user meets something other than the site.
PROBLEM_REACH = ("http_451", "blockpage", "tls_error", "unreachable")
CHECK_STATUSES = (
    "valid",
    "invalid_cert",
    "http_451",
    "http_status",
    "blockpage",
    "refused",
    "reset",
    "timeout",
    "unreachable",
    "tls_failed",
    "error",
)
_CONNECT_FAILURES = frozenset({"refused", "reset", "timeout", "unreachable"})
_HANDSHAKE_FAILURES = frozenset({"reset", "timeout", "tls_failed"})

# The result of one check, as the inference reads it (column address_checks.result).
OK = "ok"  # a certificate valid for the name: the address is reachable from there
CONNECT_FAIL = "connect_fail"  # no TCP connection: what an IP-level block looks like
TLS_FAIL = "tls_fail"  # connected, then no handshake: not IP-level, but not reachable either

INSIDE = "inside"  # the probe's country is one the order names
OUTSIDE = "outside"  # the order was made elsewhere: a block here would be over-reach

# At most this many checks are read from one measurement (its answer's and the control's): an
# answer rarely holds more than a handful of addresses, and a body may hold a million small
# objects in one measurement's evidence, which must not become a million rows.
MAX_CHECKS = 32

# probe/expect.py's words for an order that does not bind at the probe.
_ELSEWHERE = re.compile(r"^ordered in ((?:[A-Z]{2}, )*[A-Z]{2}), not in ([A-Z]{2})$")
_HERE_NOT_BINDING = ("the order does not address ", "the order is not in force")


def reach_of(m: dict[str, Any]) -> str | None:
    """A measurement's `reach` when it is one of the probe's words, else None (read as unchecked)."""
    value = m.get("reach")
    return value if isinstance(value, str) and value in REACH else None


def _side(m: dict[str, Any], country: str) -> tuple[str, str] | None:
    """(order, inside or outside) for a measurement judged against an order; None otherwise."""
    why = m.get("expected_by") or (m.get("evidence") or {}).get("expected_by")
    if not isinstance(why, dict) or "canary" in why or not isinstance(why.get("order"), str):
        return None
    order = why["order"][:128]
    if m.get("expected") == "blocked":
        return order, INSIDE  # the order binds here, so this country is one it names
    if m.get("expected") != "resolves":
        return None
    jurisdictions = why.get("jurisdictions")
    if isinstance(jurisdictions, list) and all(isinstance(j, str) for j in jurisdictions):
        return order, INSIDE if country in jurisdictions else OUTSIDE
    reason = why.get("reason")
    if not isinstance(reason, str):
        return None
    elsewhere = _ELSEWHERE.match(reason)
    if elsewhere:
        named = elsewhere.group(1).split(", ")
        if elsewhere.group(2) != country or country in named:
            return None  # the probe's words contradict its own identity: no side
        return order, OUTSIDE
    if reason.startswith(_HERE_NOT_BINDING):
        return order, INSIDE
    return None


def _result(check: dict[str, Any]) -> str | None:
    status, phase, valid = check.get("status"), check.get("phase"), check.get("cert_valid")
    if valid is True:
        return OK
    if valid is not None:
        return None
    if status in _CONNECT_FAILURES and phase == "connect":
        return CONNECT_FAIL
    if status in _HANDSHAKE_FAILURES and phase == "tls_handshake":
        return TLS_FAIL
    return None


def address_checks_of(m: dict[str, Any], country: str, t: float) -> list[tuple[Any, ...]]:
    """The checks a measurement carries that the inference can use, as
    (order, side, name, address, time, status, result): the name's own checks only, each
    address in its canonical text, each time no later than the measurement's `t` (which the
    ingest has already kept from the future). Malformed entries are skipped one by one."""
    side = _side(m, country)
    ev = m.get("evidence")
    if side is None or not isinstance(ev, dict):
        return []
    name = str(m.get("domain", ""))
    out = []
    for key in ("answer_checks", "control_checks"):
        checks = ev.get(key)
        if not isinstance(checks, list):
            continue
        for c in checks[:MAX_CHECKS]:
            if not isinstance(c, dict) or c.get("name") != name or c.get("status") not in CHECK_STATUSES:
                continue
            result = _result(c)
            when = _time(c.get("time"))
            address = _shared_address(c.get("address"))
            if result is None or when is None or address is None:
                continue
            out.append((*side, name, address, min(when, t), c["status"], result))
    return out[:MAX_CHECKS]


# Addresses that name a different host in each network: reachability compared across probes means nothing.
_LOCAL = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "fc00::/7")
)


def _shared_address(value: Any) -> str | None:
    """The address in canonical text (an IPv4-mapped one as IPv4, as the probe checks it), or None
    when it is not one every probe would reach the same host at."""
    return _canonical(value) if isinstance(value, str) and len(value) <= 64 else None


# A probe reports the same few addresses with every qtype and resolver of a name: parsing each
# once halves what the checks cost the ingest.
@functools.lru_cache(maxsize=65536)
def _canonical(value: str) -> str | None:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return None
    if any(ip.version == n.version and ip in n for n in _LOCAL):
        return None
    return str(ip)


def _time(value: Any) -> float | None:
    return _instant(value) if isinstance(value, str) and len(value) <= 40 else None


@functools.lru_cache(maxsize=65536)
def _instant(value: str) -> float | None:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


@dataclass
class IpBlock:
    """An address unreachable from probes in `country` while probes elsewhere reached it."""

    country: str
    address: str
    order: str
    names: list[str] = field(default_factory=list)
    unreachable_from: dict[str, str] = field(default_factory=dict)  # probe → status of its latest check
    reachable_from: dict[str, str] = field(default_factory=dict)  # probe → its country
    reachable_inside: list[str] = field(default_factory=list)  # probes in `country` that reached it
    first: float = 0.0  # the window's checks that made the inference: the earliest ...
    last: float = 0.0  # ... and the latest

    def to_json(self) -> dict[str, Any]:
        return {
            "country": self.country,
            "address": self.address,
            "order": self.order,
            "names": self.names,
            "unreachable_from": self.unreachable_from,
            "reachable_from": self.reachable_from,
            "reachable_inside": self.reachable_inside,
            "first": self.first,
            "last": self.last,
        }


# Which of a probe's rows at the same instant counts, when a probe sent contradicting ones:
# the reading that claims less (inside: reached; outside: failed).
_INSIDE_RANK = {OK: 0, TLS_FAIL: 1, CONNECT_FAIL: 2}
_OUTSIDE_RANK = {CONNECT_FAIL: 0, TLS_FAIL: 1, OK: 2}


class Check(NamedTuple):
    """One stored check, as address_check_rows reads it."""

    probe: str
    country: str
    side: str
    order: str
    name: str
    address: str
    time: float
    status: str
    result: str


def _latest_per_probe(checks: Iterable[Check]) -> dict[str, Check]:
    latest: dict[str, Check] = {}
    for c in checks:
        rank = _INSIDE_RANK if c.side == INSIDE else _OUTSIDE_RANK
        held = latest.get(c.probe)
        if held is None or (c.time, -rank[c.result]) > (held.time, -rank[held.result]):
            latest[c.probe] = c
    return latest


def _add(
    block: IpBlock, name: str, failed: list[Check], reached: list[Check], inside_ok: list[Check]
) -> None:
    used = [c.time for c in (*failed, *reached)]
    block.first = min(block.first, *used) if block.names else min(used)
    block.last = max(block.last, *used)
    if name not in block.names:
        block.names.append(name)
    block.unreachable_from.update((c.probe, c.status) for c in failed)
    block.reachable_from.update((c.probe, c.country) for c in reached)
    block.reachable_inside.extend(c.probe for c in inside_ok if c.probe not in block.reachable_inside)


def infer_ip_blocks(rows: Iterable[Sequence[Any]]) -> list[IpBlock]:
    """IP-level blocks from check rows of one window:
    (probe, country, side, order, name, address, time, status, result).

    Per order, name and address, each probe's latest check in the window speaks for it. An
    inference needs a probe in the ordering country whose latest check failed to connect and a
    probe elsewhere whose latest check validated; when every such failure is a silence
    (`timeout`) and any check elsewhere in the window failed too, nothing is inferred.
    """
    groups: dict[tuple[str, str, str], list[Check]] = {}
    for row in rows:
        c = Check(*row)
        groups.setdefault((c.order, c.name, c.address), []).append(c)
    blocks: dict[tuple[str, str, str], IpBlock] = {}
    for (order, name, address), checks in sorted(groups.items()):
        latest = list(_latest_per_probe(checks).values())
        reached = [c for c in latest if c.side == OUTSIDE and c.result == OK]
        failing_elsewhere = any(c.side == OUTSIDE and c.result != OK for c in checks)
        for country in sorted({c.country for c in latest if c.side == INSIDE}):
            mine = [c for c in latest if c.side == INSIDE and c.country == country]
            failed = [c for c in mine if c.result == CONNECT_FAIL]
            if not failed or not reached:
                continue
            if all(c.status == "timeout" for c in failed) and failing_elsewhere:
                continue  # a silence, while the site fails elsewhere too: cannot tell
            block = blocks.setdefault((country, address, order), IpBlock(country, address, order))
            _add(block, name, failed, reached, [c for c in mine if c.result == OK])
    out = list(blocks.values())
    for b in out:
        b.names.sort()
        b.reachable_inside.sort()
        b.unreachable_from = dict(sorted(b.unreachable_from.items()))
        b.reachable_from = dict(sorted(b.reachable_from.items()))
    out.sort(key=lambda b: (b.country, b.order, b.address))
    return out


class CheckRows(Protocol):
    """Where ip_blocks reads the checks from: collector.store.Store, which imports this module
    (so this one names what it needs instead of importing the store back)."""

    def address_check_rows(self, since: float) -> list[tuple[Any, ...]]: ...


def ip_blocks(store: CheckRows, now: float, window: float) -> list[IpBlock]:
    """The IP-level blocks inferred from the checks of the last `window` seconds."""
    return infer_ip_blocks(store.address_check_rows(now - window))
