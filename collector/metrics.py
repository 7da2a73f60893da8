"""Every metric the collector exposes: names, help and labels in one place (STYLE.md 8).

The series of CONTRACTS.md section 5 are rendered at each scrape from the store's
latest state by a custom collector; nothing about findings is kept in process memory,
so any collector process in front of the same PostgreSQL renders the same numbers.
"Current" means reported within the staleness window: a series that stopped being
reported disappears rather than lie. Per-domain series exist only for problems.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector.store import Store

__all__ = ["FindingsCollector", "Health", "make_registry"]

LEAK_LABELS = ["probe", "region", "country", "resolver", "transport", "order", "domain", "qtype"]
OVERBLOCK_LABELS = ["probe", "region", "country", "resolver", "transport", "list", "domain", "qtype"]
DOMAINS_LABELS = ["probe", "region", "country", "resolver", "transport", "list", "finding"]
ENDPOINT_LABELS = ["probe", "region", "country", "resolver", "transport"]


class FindingsCollector(Collector):
    """Renders the findings series from the store at each scrape."""

    def __init__(self, store: Store, stale_after: float, health: Health | None = None) -> None:
        self.store = store
        self.stale_after = stale_after
        self.health = health

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        since = time.time() - self.stale_after
        try:
            problems = self.store.problems(since)
            counts = self.store.counts(since)
            endpoints = self.store.endpoints(since)
            probes = self.store.probes()
        except Exception:
            if self.health is not None:
                self.health.db_errors.inc()
            raise
        leak = GaugeMetricFamily("blockprobe_leak", "1 for each current leak: a name ordered blocked here still resolves.",
                                 labels=LEAK_LABELS)  # fmt: skip
        over = GaugeMetricFamily("blockprobe_overblock",
                                 "1 for each current overblock: a name that must resolve here is blocked.",
                                 labels=OVERBLOCK_LABELS)  # fmt: skip
        for p in problems:
            labels = [p["probe_id"], p["region"], p["country"], p["resolver"], p["transport"], p["rule"] or "",
                      p["domain"], p["qtype"]]  # fmt: skip
            (leak if p["finding"] == "leak" else over).add_metric(labels, 1)
        since_fam = GaugeMetricFamily("blockprobe_finding_since_timestamp_seconds",
                                      "When each current leak or overblock was first seen in its current state.",
                                      labels=[*LEAK_LABELS[:5], "rule", "domain", "qtype", "finding"])  # fmt: skip
        for p in problems:
            since_fam.add_metric([p["probe_id"], p["region"], p["country"], p["resolver"], p["transport"],
                                  p["rule"] or "", p["domain"], p["qtype"], p["finding"]], p["since"])  # fmt: skip
        yield leak
        yield over
        yield since_fam
        domains = GaugeMetricFamily("blockprobe_domains", "How many current series have each finding.",
                                    labels=DOMAINS_LABELS)  # fmt: skip
        orders: dict[tuple[str, str, str, str], dict[str, int]] = {}
        for probe, region, country, resolver, transport, rule, finding, n in counts:
            domains.add_metric([probe, region, country, resolver, transport, rule or "", finding], n)
            if finding in ("enforced", "leak"):
                key = (rule or "", country, resolver, transport)
                orders.setdefault(key, {"enforced": 0, "leak": 0})[finding] += int(n)
        yield domains
        ratio = GaugeMetricFamily("blockprobe_order_enforcement_ratio",
                                  "Per order: enforced / (enforced + leak) over current series.",
                                  labels=["order", "country", "resolver", "transport"])  # fmt: skip
        for (order, country, resolver, transport), c in sorted(orders.items()):
            ratio.add_metric(
                [order, country, resolver, transport], c["enforced"] / (c["enforced"] + c["leak"])
            )
        yield ratio
        reach = GaugeMetricFamily("blockprobe_resolver_reachable",
                                  "1 when the endpoint answered some of its current queries, 0 when none.",
                                  labels=ENDPOINT_LABELS)  # fmt: skip
        latency = GaugeMetricFamily("blockprobe_resolver_latency_seconds",
                                    "Mean query latency over the endpoint's current series (connection set-up excluded).",
                                    labels=ENDPOINT_LABELS)  # fmt: skip
        for probe, region, country, resolver, transport, answered, _total, mean_ms in endpoints:
            reach.add_metric([probe, region, country, resolver, transport], 1 if answered else 0)
            if mean_ms is not None:
                latency.add_metric([probe, region, country, resolver, transport], float(mean_ms) / 1000)
        yield reach
        yield latency
        last = GaugeMetricFamily("blockprobe_probe_last_report_timestamp_seconds",
                                 "When each probe's last batch arrived.", labels=["probe", "region", "country"])  # fmt: skip
        for p in probes:
            last.add_metric([p["probe_id"], p["region"], p["country"]], p["last_report"])
        yield last
        if self.health is not None:
            self.health.render.observe(time.perf_counter() - started)


class Health:
    """The collector's own health, in process (counters of what this process did)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter("blockprobe_collector_batches", "Batches received, by result.", ["result"],
                               registry=registry)  # fmt: skip
        for r in ("stored", "duplicate", "rejected"):
            self.batches.labels(r)
        self.results = Counter(
            "blockprobe_collector_results", "Measurements stored in the archive.", registry=registry
        )
        self.rejected = Counter("blockprobe_collector_rejected", "Requests rejected, by reason.", ["reason"],
                                registry=registry)  # fmt: skip
        for r in ("unauthorized", "forbidden", "too_large", "invalid", "clock", "bad_encoding"):
            self.rejected.labels(r)
        self.clamped = Counter("blockprobe_collector_clamped_results",
                               "Measurements whose future timestamps were clamped to the receive time.",
                               registry=registry)  # fmt: skip
        self.ingest = Histogram("blockprobe_collector_ingest_seconds", "Time to validate and store one batch.",
                                registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))  # fmt: skip
        self.render = Histogram("blockprobe_collector_metrics_render_seconds", "Time to render the findings series.",
                                registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))  # fmt: skip
        self.db_errors = Counter("blockprobe_collector_database_errors", "Database operations that failed.",
                                 registry=registry)  # fmt: skip


def make_registry(store: Store, stale_after: float) -> tuple[CollectorRegistry, Health]:
    registry = CollectorRegistry()
    health = Health(registry)
    registry.register(FindingsCollector(store, stale_after, health))
    return registry, health
