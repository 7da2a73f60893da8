"""Every metric the collector exposes: names, help and labels in one place (STYLE.md 8).

The series of docs/metrics.md are rendered at each scrape from the store's
latest state: nothing about findings is kept in process memory, so any collector
process in front of the same PostgreSQL renders the same numbers. "Current" means
reported within the staleness window; a series that stopped being reported disappears
rather than lie. Per-domain series exist only for problems, so cardinality follows
what is wrong, not the size of the lists.

The findings families are written straight to the exposition text: at 100 probes × 50
endpoints with 5,000 leaks, prometheus_client's generic writer took longer than the
database. The collector's own health uses prometheus_client as usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from collector.compliance import deadline_missed, time_to_enforce
from collector.reach import PROBLEM_REACH, ip_blocks
from collector.store import Store

__all__ = ["FAMILIES", "Health", "make_registry", "render_findings"]

COMPLIANCE_LABELS = ("order", "country", "resolver", "transport")

# name → (type, help, label names). Label values come from the store; label names live here.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "blockprobe_leak": (
        "gauge",
        "1 for each current leak: a name ordered blocked here still resolves.",
        ("probe", "region", "country", "resolver", "transport", "order", "domain", "qtype"),
    ),
    "blockprobe_overblock": (
        "gauge",
        "1 for each current overblock: a name that must resolve here is blocked.",
        ("probe", "region", "country", "resolver", "transport", "list", "domain", "qtype", "kind"),
    ),
    "blockprobe_finding_since_timestamp_seconds": (
        "gauge",
        "When each current leak or overblock was first seen in its current state (the longest-standing "
        "per probe × resolver × transport × rule).",
        ("probe", "region", "country", "resolver", "transport", "rule", "domain", "qtype", "finding"),
    ),
    "blockprobe_domains": (
        "gauge",
        "How many current series have each finding.",
        ("probe", "region", "country", "resolver", "transport", "list", "finding"),
    ),
    "blockprobe_order_enforcement_ratio": (
        "gauge",
        "Per order: enforced / (enforced + leak) over current series.",
        ("order", "country", "resolver", "transport"),
    ),
    "blockprobe_resolver_reachable": (
        "gauge",
        "1 when the endpoint answered some of its current queries, 0 when none.",
        ("probe", "region", "country", "resolver", "transport"),
    ),
    "blockprobe_resolver_latency_seconds": (
        "gauge",
        "Mean query latency over the endpoint's current series (connection set-up excluded).",
        ("probe", "region", "country", "resolver", "transport"),
    ),
    "blockprobe_probe_last_report_timestamp_seconds": (
        "gauge",
        "When each probe's last batch arrived.",
        ("probe", "region", "country"),
    ),
    "blockprobe_canary_failing": (
        "gauge",
        "1 for each current canary whose fate was not the expected one.",
        ("probe", "region", "country", "resolver", "transport", "domain", "qtype", "outcome"),
    ),
    "blockprobe_domain_series_capped": (
        "gauge",
        "Per-domain series left out of blockprobe_leak/blockprobe_overblock by the caps "
        "(limits.max_domain_series, limits.max_exported_series_per_probe).",
        ("probe", "region", "country", "resolver", "transport", "rule", "finding"),
    ),
    "blockprobe_control_failure_ratio": (
        "gauge",
        "Share of the control resolver's answers that failed in the probe's last batch.",
        ("probe", "region", "country"),
    ),
    # Compliance over time (collector/compliance.py), per order × country × resolver × transport.
    "blockprobe_order_effective_timestamp_seconds": (
        "gauge",
        "When the order took effect (from the lists the probes judged by).",
        COMPLIANCE_LABELS,
    ),
    "blockprobe_order_due_timestamp_seconds": (
        "gauge",
        "When enforcement of the order was due (effective + deadline).",
        COMPLIANCE_LABELS,
    ),
    "blockprobe_order_enforced_timestamp_seconds": (
        "gauge",
        "When enforcement was first seen: no leaking series, at least one enforced.",
        COMPLIANCE_LABELS,
    ),
    "blockprobe_order_time_to_enforce_seconds": (
        "gauge",
        "From the order's effective instant to enforcement first seen (an upper bound).",
        COMPLIANCE_LABELS,
    ),
    "blockprobe_order_deadline_missed": (
        "gauge",
        "1 when a leak was measured after the due instant (beyond the accepted probe clock error) "
        "with no enforcement seen by then; 0 when enforcement was seen by then and held; "
        "absent when it cannot be said.",
        COMPLIANCE_LABELS,
    ),
    "blockprobe_order_names_leaking": (
        "gauge",
        "Distinct names of the order that currently leak.",
        COMPLIANCE_LABELS,
    ),
    # Answer checks (issue 16): what a user would meet at the answer, beside the DNS finding.
    "blockprobe_reach": (
        "gauge",
        "1 for each current series of a name with an expectation, not enforced, whose answer does not lead "
        "to the site (reach http_451, blockpage, tls_error or unreachable).",
        (
            "probe",
            "region",
            "country",
            "resolver",
            "transport",
            "order",
            "domain",
            "qtype",
            "finding",
            "reach",
        ),
    ),
    "blockprobe_reach_domains": (
        "gauge",
        "How many current series of names with an expectation have each finding and reach.",
        ("probe", "region", "country", "resolver", "transport", "list", "finding", "reach"),
    ),
    "blockprobe_reach_series_capped": (
        "gauge",
        "Per-domain series left out of blockprobe_reach by the caps "
        "(limits.max_domain_series, limits.max_exported_series_per_probe).",
        ("probe", "region", "country", "resolver", "transport", "rule", "finding"),
    ),
    "blockprobe_ip_block": (
        "gauge",
        "1 for each address inferred blocked at the IP level in a country: unreachable from probes "
        "there, reachable with a valid certificate from probes elsewhere, within ip_block_window.",
        ("country", "address", "order"),
    ),
    "blockprobe_ip_block_addresses": (
        "gauge",
        "How many addresses of each order are inferred blocked at the IP level in each country (uncapped).",
        ("country", "order"),
    ),
}


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    return repr(float(v)) if v == v else "NaN"


class _Writer:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def family(self, name: str, rows: Iterable[tuple[Sequence[Any], float]]) -> None:
        kind, help_text, labels = FAMILIES[name]
        order = sorted(
            range(len(labels)), key=lambda i: labels[i]
        )  # sorted label names, as Prometheus prints them
        prefix = [f'{labels[i]}="' for i in order]
        self.parts.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        append = self.parts.append
        for values, v in rows:
            inner = '",'.join(p + _escape(values[i]) for p, i in zip(prefix, order, strict=True))
            append(f'{name}{{{inner}"}} {_value(v)}\n')

    def text(self) -> str:
        return "".join(self.parts)


def cap_problems(
    problems: list[dict[str, Any]], per_group: int
) -> tuple[list[dict[str, Any]], dict[tuple[str, ...], int]]:
    """At most `per_group` per-domain rows per probe × resolver × transport × rule × finding
    (docs/metrics.md), the first by name; and how many each group left out."""
    kept: list[dict[str, Any]] = []
    seen: dict[tuple[str, ...], int] = {}
    left_out: dict[tuple[str, ...], int] = {}
    for p in sorted(problems, key=lambda p: (p["domain"], p["qtype"])):
        group = _left_out_key(p)
        n = seen.get(group, 0)
        seen[group] = n + 1
        if n < per_group:
            kept.append(p)
        else:
            left_out[group] = left_out.get(group, 0) + 1
    return kept, left_out


def _group_of(p: dict[str, Any]) -> tuple[str, ...]:
    """Probe × resolver × transport × rule: the group a per-domain row belongs to."""
    return (p["probe_id"], p["region"], p["country"], p["resolver"], p["transport"], p["rule"] or "")


def _series(p: dict[str, Any]) -> list[Any]:
    """The label values every per-domain family starts with, in FAMILIES' order."""
    return [*_group_of(p), p["domain"], p["qtype"]]


# Per group, how many of the capped per-name series also get their `since`: the oldest ones say
# how long the group has been wrong; a line per name for all of them doubled /metrics at a mass
# leak (20 probes × 3 transports × 100 names: 2.6 MB, over issue 12's 2 MB).
SINCE_PER_GROUP = 10


def _oldest(problems: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The `n` longest-standing rows of each probe × resolver × transport × rule × finding."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p in problems:
        groups.setdefault((p["probe_id"], p["resolver"], p["transport"], p["rule"], p["finding"]), []).append(
            p
        )
    return [
        p
        for rows in groups.values()
        for p in sorted(rows, key=lambda r: (r["since"], r["domain"], r["qtype"]))[:n]
    ]


def _capped(
    store: Store, since: float, counts: Sequence[Sequence[Any]], per_group: int
) -> tuple[list[dict[str, Any]], dict[tuple[str, ...], int]]:
    """What `cap_problems` keeps and leaves out, with the capping done by the database: the groups
    and their true sizes come from `counts`, only the kept rows are read (a mass leak of 45,000
    names per probe read whole took most of a render: bench/collector_scale.py)."""
    groups = [c[:7] for c in counts if c[6] in ("leak", "overblock") and c[5] != "canary" and c[7] > 0]
    kept = store.capped_problems(since, groups, per_group)
    kept.sort(key=lambda p: (p["domain"], p["qtype"]))
    left_out: dict[tuple[str, ...], int] = {
        (probe, region, country, resolver, transport, rule or "", finding): n - per_group
        for probe, region, country, resolver, transport, rule, finding, n, *_ in counts
        if finding in ("leak", "overblock") and rule != "canary" and n > per_group
    }
    return kept, left_out


class _Budget:
    """Per probe, the per-name lines still allowed on /metrics (limits.max_exported_series_per_probe):
    without it a probe at its group quota (2,000 groups × 100 names) could export 200,000."""

    def __init__(self, per_probe: int) -> None:
        self.per_probe = per_probe
        self.left: dict[str, int] = {}

    def take(self, rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the rows that fit, in order; those that do not)."""
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for r in rows:
            n = self.left.get(r["probe_id"], self.per_probe)
            if n > 0:
                self.left[r["probe_id"]] = n - 1
                kept.append(r)
            else:
                dropped.append(r)
        return kept, dropped


def _left_out_key(p: dict[str, Any]) -> tuple[str, ...]:
    return (*_group_of(p), p["finding"])


def render_findings(
    store: Store,
    stale_after: float,
    now: float | None = None,
    max_domain_series: int = 100,
    ip_block_window: float = 3600.0,
    max_exported_series_per_probe: int = 10_000,
) -> str:
    """The findings families as Prometheus text, from the latest state within the staleness window.

    Per-domain families are capped per group, and all of a probe's per-domain lines together
    at `max_exported_series_per_probe` (leaks and overblocks first, then canaries, the `since`
    of the longest-standing, reach); the true counts stay in blockprobe_domains and
    blockprobe_reach_domains, what was left out in the *_capped families.
    """
    now = time.time() if now is None else now
    since = now - stale_after
    counts, reach_counts = store.counts_and_reach(since)
    problems, left_out = _capped(store, since, counts, max_domain_series)
    budget = _Budget(max_exported_series_per_probe)
    problems, dropped = budget.take(problems)
    for p in dropped:
        key = _left_out_key(p)
        left_out[key] = left_out.get(key, 0) + 1
    canary_rows, _ = budget.take(store.capped_problems(since, canaries_of(counts), max_domain_series))
    since_rows, _ = budget.take(_oldest(problems, SINCE_PER_GROUP))
    probes = store.probes()
    w = _Writer()
    w.family(
        "blockprobe_leak",
        (
            (
                _series(p),
                1,
            )
            for p in problems
            if p["finding"] == "leak"
        ),
    )
    w.family(
        "blockprobe_overblock",
        (
            (
                [*_series(p), p["rule_kind"] or "control"],
                1,
            )
            for p in problems
            if p["finding"] == "overblock"
        ),
    )
    w.family(
        "blockprobe_finding_since_timestamp_seconds",
        (
            (
                [*_series(p), p["finding"]],
                p["since"],
            )
            for p in since_rows
        ),
    )
    orders: dict[tuple[str, str, str, str], list[int]] = {}
    endpoints: dict[tuple[str, str, str, str, str], list[float]] = {}
    domains = []
    for probe, region, country, resolver, transport, rule, finding, n, answered, lat_sum, lat_n in counts:
        if finding is not None and rule != "canary":
            domains.append(([probe, region, country, resolver, transport, rule or "", finding], n))
        if finding in ("enforced", "leak") and rule != "canary":
            o = orders.setdefault((rule or "", country, resolver, transport), [0, 0])
            o[0 if finding == "enforced" else 1] += int(n)
        e = endpoints.setdefault((probe, region, country, resolver, transport), [0, 0.0, 0])
        e[0] += int(answered or 0)
        e[1] += float(lat_sum or 0)
        e[2] += int(lat_n or 0)
    w.family("blockprobe_domains", domains)
    w.family("blockprobe_domain_series_capped", ((list(k), n) for k, n in sorted(left_out.items())))
    w.family(
        "blockprobe_order_enforcement_ratio",
        ((list(k), c[0] / (c[0] + c[1])) for k, c in sorted(orders.items())),
    )
    w.family("blockprobe_resolver_reachable", ((list(k), 1 if e[0] else 0) for k, e in endpoints.items()))
    w.family(
        "blockprobe_resolver_latency_seconds",
        ((list(k), e[1] / e[2] / 1000) for k, e in endpoints.items() if e[2]),
    )
    w.family(
        "blockprobe_probe_last_report_timestamp_seconds",
        (([p["probe_id"], p["region"], p["country"]], p["last_report"]) for p in probes),
    )
    w.family(
        "blockprobe_canary_failing",
        (
            (
                [
                    c["probe_id"],
                    c["region"],
                    c["country"],
                    c["resolver"],
                    c["transport"],
                    c["domain"],
                    c["qtype"],
                    c["outcome"],
                ],
                1,
            )
            for c in canary_rows
        ),
    )
    w.family(
        "blockprobe_control_failure_ratio",
        (
            ([p["probe_id"], p["region"], p["country"]], p["control_failure_ratio"])
            for p in probes
            if p["control_failure_ratio"] is not None
        ),
    )
    _write_compliance(w, store, since)
    _render_reach(w, store, since, max_domain_series, reach_counts, budget)
    _render_ip_blocks(w, store, now, ip_block_window, max_domain_series)
    return w.text()


def _write_compliance(w: _Writer, store: Store, since: float) -> None:
    """The compliance families, from what the compliance passes saw within the staleness window:
    a key no pass has seen lately (its series went stale, its order expired) disappears."""
    rows = store.compliance(since)

    def family(name: str, value: Callable[[dict[str, Any]], float | None]) -> None:
        values = ((r, value(r)) for r in rows)
        w.family(
            name,
            (
                ([r["order_id"], r["country"], r["resolver"], r["transport"]], v)
                for r, v in values
                if v is not None
            ),
        )

    family("blockprobe_order_effective_timestamp_seconds", lambda r: r["effective"])
    family("blockprobe_order_due_timestamp_seconds", lambda r: r["due"])
    family("blockprobe_order_enforced_timestamp_seconds", lambda r: r["first_enforced"])
    family("blockprobe_order_time_to_enforce_seconds", time_to_enforce)
    family("blockprobe_order_deadline_missed", deadline_missed)
    family("blockprobe_order_names_leaking", lambda r: r["names_leaking"])


def canaries_of(counts: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    """The groups of canaries whose fate was not the expected one, read per group as the leaks are."""
    return [c[:7] for c in counts if c[5] == "canary" and c[6] not in (None, "ok", "enforced") and c[7] > 0]


def _render_reach(
    w: _Writer,
    store: Store,
    since: float,
    per_group: int,
    counts: Sequence[Sequence[Any]],
    budget: _Budget,
) -> None:
    """blockprobe_reach (capped per probe × resolver × transport × order × finding, like the leak
    series) and the true counts in blockprobe_reach_domains."""
    problems = [
        c
        for c in counts
        if c[7] in PROBLEM_REACH and c[6] not in (None, "enforced") and c[5] != "canary" and c[8] > 0
    ]
    # Each reach value's first names, then the group's first names across them: what capping
    # every row of the group would keep (a CDN answering 451 for a whole order is a mass event too).
    kept, _ = cap_problems(store.capped_reach(since, [c[:8] for c in problems], per_group), per_group)
    totals: dict[tuple[Any, ...], int] = {}
    for probe, region, country, resolver, transport, rule, finding, _reach, n in problems:
        key = (probe, region, country, resolver, transport, rule or "", finding)
        totals[key] = totals.get(key, 0) + int(n)
    left_out = {k: n - per_group for k, n in totals.items() if n > per_group}
    kept, dropped = budget.take(kept)
    for r in dropped:
        over = _left_out_key(r)
        left_out[over] = left_out.get(over, 0) + 1
    w.family(
        "blockprobe_reach",
        (
            (
                [*_series(r), r["finding"], r["reach"]],
                1,
            )
            for r in kept
        ),
    )
    w.family(
        "blockprobe_reach_domains",
        (
            ([probe, region, country, resolver, transport, rule or "", finding, reach], n)
            for probe, region, country, resolver, transport, rule, finding, reach, n in counts
        ),
    )
    w.family("blockprobe_reach_series_capped", ((list(k), n) for k, n in sorted(left_out.items())))


def _render_ip_blocks(w: _Writer, store: Store, now: float, window: float, per_group: int) -> None:
    """blockprobe_ip_block, at most `per_group` addresses per country × order (the first by address),
    and the true count per country × order."""
    counts: dict[tuple[str, str], int] = {}
    shown = []
    for b in ip_blocks(store, now, window):
        n = counts.get((b.country, b.order), 0)
        counts[(b.country, b.order)] = n + 1
        if n < per_group:
            shown.append(([b.country, b.address, b.order], 1))
    w.family("blockprobe_ip_block", shown)
    w.family("blockprobe_ip_block_addresses", ((list(k), n) for k, n in sorted(counts.items())))


class Health:
    """The collector's own health, in process (counters of what this process did)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.batches = Counter(
            "blockprobe_collector_batches", "Batches received, by result.", ["result"], registry=registry
        )
        for r in ("stored", "duplicate"):
            self.batches.labels(r)
        self.results = Counter(
            "blockprobe_collector_results", "Measurements stored in the archive.", registry=registry
        )
        self.rejected = Counter(
            "blockprobe_collector_rejected", "Requests rejected, by reason.", ["reason"], registry=registry
        )
        for r in (
            "unauthorized",
            "forbidden",
            "too_large",
            "invalid",
            "clock",
            "bad_encoding",
            "quota",
            "busy",
            "slow_body",
            "read_unauthorized",
            "read_busy",
        ):
            self.rejected.labels(r)
        # Labelled by probe: only authenticated probes get here, so the label set is bounded by the tokens.
        self.throttled = Counter(
            "blockprobe_collector_throttled",
            "Batches refused with 429, by probe and quota (results, series, groups, busy).",
            ["probe", "quota"],
            registry=registry,
        )
        self.clamped = Counter(
            "blockprobe_collector_clamped_results",
            "Measurements whose future timestamps were clamped to the receive time.",
            registry=registry,
        )
        self.ingest = Histogram(
            "blockprobe_collector_ingest_seconds",
            "Time to validate and store one batch.",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.render = Histogram(
            "blockprobe_collector_metrics_render_seconds",
            "Time to render the findings series.",
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.db_errors = Counter(
            "blockprobe_collector_database_errors", "Database operations that failed.", registry=registry
        )

    def findings(
        self,
        store: Store,
        stale_after: float,
        max_domain_series: int = 100,
        ip_block_window: float = 3600.0,
        max_exported_series_per_probe: int = 10_000,
    ) -> bytes:
        """The findings families from the store (the slow part of a scrape, cached by the app)."""
        started = time.perf_counter()
        try:
            findings = render_findings(
                store,
                stale_after,
                max_domain_series=max_domain_series,
                ip_block_window=ip_block_window,
                max_exported_series_per_probe=max_exported_series_per_probe,
            )
        except Exception:
            self.db_errors.inc()
            raise
        self.render.observe(time.perf_counter() - started)
        return findings.encode()

    def own(self) -> bytes:
        """This process's health, always fresh."""
        return generate_latest(self.registry)


def make_registry() -> tuple[CollectorRegistry, Health]:
    registry = CollectorRegistry()
    return registry, Health(registry)
