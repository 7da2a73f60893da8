"""The alert and recording rules, defined once; build.py writes them for Prometheus and for Grafana.

Each alert names the order or list, the resolver, the transport and where, carries a
severity, and links to its section of RUNBOOK.md. Persistence (`for`) is what keeps a
single-round blip from paging anyone; a second probe seeing the same thing is what
makes a warning critical.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALERTS", "RECORDING", "RUNBOOK_URL", "Alert", "Recording"]

# Where the runbook lives; `python -m dashboards.build --runbook-base URL` points the rules at a published copy.
RUNBOOK_URL = "dashboards/RUNBOOK.md"


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    anchor: str

    def runbook(self, base: str = RUNBOOK_URL) -> str:
        return f"{base}#{self.anchor}"


RECORDING = [
    Recording("blockprobe:leak_probes:count",
              "count by (order, country, resolver, transport, domain, qtype) (blockprobe_leak == 1)"),
    Recording("blockprobe:overblock_probes:count",
              "count by (list, country, resolver, transport, domain, qtype) (blockprobe_overblock == 1)"),
    Recording("blockprobe:resolver_reachable:max_by_region",
              "max by (region, country, resolver, transport) (blockprobe_resolver_reachable)"),
]  # fmt: skip

_WHERE = "{{ $labels.resolver }} over {{ $labels.transport }} in {{ $labels.country }}"

ALERTS = [
    Alert(
        "BlockprobeLeak", "blockprobe:leak_probes:count >= 1", "15m", "warning",
        f"{{{{ $labels.domain }}}} ({{{{ $labels.qtype }}}}) still resolves on {_WHERE}",
        "Order {{ $labels.order }} requires {{ $labels.domain }} to be blocked on this resolver in "
        "{{ $labels.country }}, but {{ $value }} probe(s) have seen it resolve for 15 minutes.",
        "blockprobeleak",
    ),
    Alert(
        "BlockprobeLeakConfirmed", "blockprobe:leak_probes:count >= 2", "10m", "critical",
        f"{{{{ $labels.domain }}}} leaks on {_WHERE}, confirmed by {{{{ $value }}}} probes",
        "Order {{ $labels.order }}: {{ $value }} independent probes see {{ $labels.domain }} "
        "({{ $labels.qtype }}) resolve on {{ $labels.resolver }} over {{ $labels.transport }}.",
        "blockprobeleakconfirmed",
    ),
    Alert(
        "BlockprobeOverblock", "blockprobe:overblock_probes:count >= 1", "15m", "warning",
        f"{{{{ $labels.domain }}}} ({{{{ $labels.qtype }}}}) is blocked on {_WHERE} but must resolve",
        "{{ $labels.domain }} is named by {{ $labels.list }} as a name that must resolve in {{ $labels.country }} "
        "(a control name, or a block ordered elsewhere); {{ $value }} probe(s) have seen it blocked for 15 minutes.",
        "blockprobeoverblock",
    ),
    Alert(
        "BlockprobeOverblockConfirmed", "blockprobe:overblock_probes:count >= 2", "10m", "critical",
        f"{{{{ $labels.domain }}}} is over-blocked on {_WHERE}, confirmed by {{{{ $value }}}} probes",
        "{{ $labels.list }}: {{ $value }} independent probes see {{ $labels.domain }} blocked on "
        "{{ $labels.resolver }} over {{ $labels.transport }} in {{ $labels.country }}.",
        "blockprobeoverblockconfirmed",
    ),
    Alert(
        "BlockprobeProbeSilent", "time() - blockprobe_probe_last_report_timestamp_seconds > 900", "5m", "warning",
        "probe {{ $labels.probe }} in {{ $labels.region }} has not reported for 3 rounds",
        "No batch from {{ $labels.probe }} ({{ $labels.region }}, {{ $labels.country }}) for over 15 minutes: "
        "its findings are going stale and will disappear from the dashboards.",
        "blockprobeprobesilent",
    ),
    Alert(
        "BlockprobeResolverUnreachable", "blockprobe:resolver_reachable:max_by_region == 0", "15m", "warning",
        "{{ $labels.resolver }} over {{ $labels.transport }} is unreachable from all of {{ $labels.region }}",
        "No probe in {{ $labels.region }} ({{ $labels.country }}) got any answer from {{ $labels.resolver }} over "
        "{{ $labels.transport }}: its blocks cannot be judged (timeouts are not counted as blocks then).",
        "blockproberesolverunreachable",
    ),
    Alert(
        "BlockprobeCanaryFailing",
        "max by (probe, region, country, resolver, transport) (blockprobe_canary_failing) == 1", "15m", "warning",
        "canaries fail on {{ $labels.resolver }} over {{ $labels.transport }} at {{ $labels.probe }}",
        "A canary of known fate did not get it on {{ $labels.resolver }} over {{ $labels.transport }} "
        "({{ $labels.probe }}, {{ $labels.region }}): that resolver's findings are inconclusive until it recovers.",
        "blockprobecanaryfailing",
    ),
    Alert(
        "BlockprobeControlFailing", "blockprobe_control_failure_ratio > 0.5", "15m", "warning",
        "the control resolver fails for probe {{ $labels.probe }} in {{ $labels.region }}",
        "{{ $value | humanizePercentage }} of control answers failed in {{ $labels.probe }}'s last batch: "
        "NXDOMAIN, NODATA, REFUSED and SERVFAIL answers cannot be told apart from dead names.",
        "blockprobecontrolfailing",
    ),
]  # fmt: skip
