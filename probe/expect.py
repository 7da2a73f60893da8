"""Expectations from the lists (docs/lists.md): pure, no I/O, no clock.

(probe country, resolver kind and operator, name, time) → blocked / resolves / null,
with the reason kept as `expected_by`. Expected `blocked` if some order binds here
(country in its jurisdictions, the resolver among its addressees, the instant within
[effective, expires): a date is 00:00 UTC, a timestamp that very second); otherwise `resolves` if any order (wherever and whenever it binds) or control
list names the name — a block here would be over-reach; otherwise nothing is expected.
When several rules match, the most specific is the one reported (an exact name beats a
wildcard, a deeper wildcard beats a shallower one); every binding order is listed.
An order's `deadline` never changes what is expected: the reason carries `effective`, the
instant the order took effect, and `due`, the instant enforcement was due, for compliance
reporting (time to enforce, deadline met or missed).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from probe.lists import ControlList, Lists, Order, Pattern, format_instant
from probe.model import Expectation

__all__ = ["OrderIndex", "Rule"]


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: Pattern
    order: Order | None = None
    control: ControlList | None = None

    @property
    def specificity(self) -> tuple[int, int]:
        return (0 if self.pattern.wildcard else 1, self.pattern.name.count(".") + 1)


class OrderIndex:
    """An index of a Lists by name, for lookups in time proportional to the name's depth."""

    def __init__(self, lists: Lists) -> None:
        self.lists = lists
        self._exact: dict[str, list[Rule]] = defaultdict(list)
        self._below: dict[str, list[Rule]] = defaultdict(list)
        for order in lists.orders:
            for p in order.domains:
                (self._below if p.wildcard else self._exact)[p.name].append(Rule(p, order=order))
        for control in lists.controls:
            for p in control.domains:
                (self._below if p.wildcard else self._exact)[p.name].append(Rule(p, control=control))

    def rules_for(self, name: str) -> list[Rule]:
        """Every rule whose pattern matches `name` (`*.x` matches names strictly below x)."""
        rules = list(self._exact.get(name, ()))
        labels = name.split(".")
        for i in range(1, len(labels)):
            rules.extend(self._below.get(".".join(labels[i:]), ()))
        return rules

    def expect(
        self, country: str, kind: str, operator: str | None, name: str, when: dt.datetime
    ) -> tuple[Expectation | None, dict[str, Any] | None]:
        """The expectation for `name` on this resolver at the instant `when` (aware; a naive
        time is refused, as it would shift every order by the host's offset)."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("expect() needs an aware datetime, not a naive one")
        rules = self.rules_for(name)
        if not rules:
            return None, None
        country = country.upper()
        binding = [
            r
            for r in rules
            if r.order is not None
            and country in r.order.jurisdictions
            and r.order.addresses(kind, operator)
            and r.order.binds_at(when)
        ]
        if binding:
            best = max(binding, key=lambda r: r.specificity)
            assert best.order is not None
            why = {
                "order": best.order.id,
                "authority": best.order.authority,
                "pattern": str(best.pattern),
                "orders": sorted({r.order.id for r in binding if r.order is not None}),
                "jurisdictions": sorted(best.order.jurisdictions),
            }
            if best.order.effective is not None:
                why["effective"] = format_instant(best.order.effective)
            due = best.order.due
            if due is not None:
                why["due"] = format_instant(due)
            return Expectation.BLOCKED, why
        best = max(rules, key=lambda r: r.specificity)
        if best.control is not None:
            return Expectation.RESOLVES, {"list": best.control.id, "pattern": str(best.pattern)}
        order = best.order
        assert order is not None
        if country not in order.jurisdictions:
            reason = f"ordered in {', '.join(sorted(order.jurisdictions))}, not in {country}"
        elif not order.addresses(kind, operator):
            reason = f"the order does not address {operator or kind} resolvers"
        else:
            reason = "the order is not in force at this time"
        why = {
            "list": order.id,
            "order": order.id,
            "pattern": str(best.pattern),
            "reason": reason,
            # Structured, so the collector can tell probes inside the ordering country from probes
            # outside (IP-level block inference) without reading the reason's words.
            "jurisdictions": sorted(order.jurisdictions),
        }
        return Expectation.RESOLVES, why
