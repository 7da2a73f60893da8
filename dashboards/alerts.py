"""The alert and recording rules, defined once; build.py writes them for Prometheus and for Grafana.

Each alert names the order or list, the resolver, the transport and where, carries a
severity, and links to its section of RUNBOOK.md. Persistence (`for`) is what keeps a
single-round blip from paging anyone; a second probe seeing the same thing is what
makes a warning critical.

Rules count probes, never series (docs/metrics.md): every expression first takes
one value per probe (`max by (probe, …)`), so two collector replicas in front of one
database, or one collector scraped by two jobs, change no alert. Leaks and overblocks
alert once per order (or list) × resolver × transport × country, from the true counts in
`blockprobe_domains`, with the count and a few example names in the annotations: a
resolver that ignores a 45,000-name order is one alert, not 45,000. Below a small threshold
(`NAME_ALERTS_MAX` distinct names in the group) each leaking or overblocked name also gets
an alert of its own (BlockprobeLeakName, BlockprobeOverblockName): a few names are worth
naming one by one, many are one cause.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALERTS", "NAME_ALERTS_MAX", "RECORDING", "RUNBOOK_URL", "Alert", "Recording"]

# Where the runbook lives; `python -m dashboards.build --runbook-base URL` points the rules at a published copy.
RUNBOOK_URL = "dashboards/RUNBOOK.md"

# Per-name alerts fire only while the order (or list) × resolver × transport × country has at
# most this many distinct leaking (or overblocked) names, counted over every probe and qtype;
# above it the grouped alert alone speaks for them, so a mass leak cannot become an alert storm.
NAME_ALERTS_MAX = 5


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
    # Grafana's alert templates have no `query` function: where the Prometheus annotations
    # look up the count and example names, Grafana gets these (summary, description) instead.
    grafana: tuple[str, str] | None = None

    def annotations(self, base: str = RUNBOOK_URL, *, for_grafana: bool = False) -> dict[str, str]:
        summary, description = (
            self.grafana if for_grafana and self.grafana else (self.summary, self.description)
        )
        return {"summary": summary, "description": description, "runbook_url": self.runbook(base)}

    def runbook(self, base: str = RUNBOOK_URL) -> str:
        return f"{base}#{self.anchor}"


# The finding counts, one value per probe: `max` folds the copies that replicated collectors
# or duplicate scrape jobs export (they differ only in `instance`/`job`), so nothing after
# this can count a probe twice. A leak's `list` is the order that requires the block.
_LEAKING = (
    "max by (probe, country, resolver, transport, order) (label_replace("
    'blockprobe_domains{finding="leak"}, "order", "$1", "list", "(.+)")) > 0'
)
_OVERBLOCKED = (
    'max by (probe, country, resolver, transport, list) (blockprobe_domains{finding="overblock"}) > 0'
)
_ORDER = "order, country, resolver, transport"
_LIST = "list, country, resolver, transport"

RECORDING = [
    Recording("blockprobe:order_leaking:max_by_probe", _LEAKING),
    Recording(
        "blockprobe:order_leak_probes:count", f"count by ({_ORDER}) (blockprobe:order_leaking:max_by_probe)"
    ),
    Recording("blockprobe:list_overblocked:max_by_probe", _OVERBLOCKED),
    Recording(
        "blockprobe:list_overblock_probes:count",
        f"count by ({_LIST}) (blockprobe:list_overblocked:max_by_probe)",
    ),
    # Per name, one value per probe, as above; then how many probes see each name, and how
    # many distinct names the group has (over every probe and qtype).
    Recording(
        "blockprobe:order_leak_name:max_by_probe", f"max by (probe, {_ORDER}, domain) (blockprobe_leak)"
    ),
    Recording(
        "blockprobe:order_leak_name_probes:count",
        f"count by ({_ORDER}, domain) (blockprobe:order_leak_name:max_by_probe)",
    ),
    Recording(
        "blockprobe:order_leak_names:count", f"count by ({_ORDER}) (blockprobe:order_leak_name_probes:count)"
    ),
    Recording(
        "blockprobe:list_overblock_name:max_by_probe",
        f"max by (probe, {_LIST}, domain) (blockprobe_overblock)",
    ),
    Recording(
        "blockprobe:list_overblock_name_probes:count",
        f"count by ({_LIST}, domain) (blockprobe:list_overblock_name:max_by_probe)",
    ),
    Recording(
        "blockprobe:list_overblock_names:count",
        f"count by ({_LIST}) (blockprobe:list_overblock_name_probes:count)",
    ),
    Recording(
        "blockprobe:resolver_reachable:max_by_region",
        "max by (region, country, resolver, transport) (blockprobe_resolver_reachable)",
    ),
]

_WHERE = "{{ $labels.resolver }} over {{ $labels.transport }} in {{ $labels.country }}"
_SELECT = "country=%q,resolver=%q,transport=%q}"
_ARGS = "$labels.country $labels.resolver $labels.transport"


def _count(family: str, key: str) -> str:
    """How many name × qtype series have the finding, as seen by the probe that sees most."""
    query = f'max(blockprobe_domains{{finding="{family}",list=%q,{_SELECT})'
    return f"{{{{ with printf `{query}` $labels.{key} {_ARGS} | query }}}}{{{{ . | first | value | printf `%.0f` }}}}{{{{ end }}}}"


def _examples(metric: str, key: str) -> str:
    """The first three names in alphabetical order (sorted, so the annotation is stable)."""
    query = f"max by (domain) ({metric}{{{key}=%q,{_SELECT})"
    return (
        f"{{{{ range $i, $s := printf `{query}` $labels.{key} {_ARGS} | query | sortByLabel `domain` }}}}"
        "{{ if lt $i 3 }}{{ if $i }}, {{ end }}{{ $s.Labels.domain }}{{ end }}{{ end }}"
    )


def _qtypes(metric: str, key: str) -> str:
    """The qtypes one name has the finding for, over every probe (sorted, so the annotation is stable)."""
    query = f"max by (qtype) ({metric}{{{key}=%q,domain=%q,{_SELECT})"
    return (
        f"{{{{ range $i, $s := printf `{query}` $labels.{key} $labels.domain {_ARGS} | query | sortByLabel `qtype` }}}}"
        "{{ if $i }}, {{ end }}{{ $s.Labels.qtype }}{{ end }}"
    )


def _per_name(probes: str, names: str, key: str, finding: str) -> str:
    """Each name's probe count, kept only where the group has at most NAME_ALERTS_MAX names, all
    of them in the per-name series: a group the collector capped for some probe has more names
    than the series show, so its count proves nothing and only the grouped alert speaks."""
    keys = f"{key}, country, resolver, transport"
    capped = (
        f"max by ({keys}) (label_replace("
        f'blockprobe_domain_series_capped{{finding="{finding}"}}, "{key}", "$1", "rule", "(.+)"))'
    )
    return f"{probes} and on ({keys}) ({names} <= {NAME_ALERTS_MAX}) unless on ({keys}) {capped}"


_LEAK_COUNT, _LEAK_EXAMPLES = _count("leak", "order"), _examples("blockprobe_leak", "order")
_OVER_COUNT, _OVER_EXAMPLES = _count("overblock", "list"), _examples("blockprobe_overblock", "list")
_LEAK_GRAFANA = (
    f"order {{{{ $labels.order }}}} is not enforced on {_WHERE}",
    "{{ $labels.order }} requires names blocked on this resolver, but {{ $value }} probe(s) see some "
    "resolve; the leaks dashboard and the collector's status page list them.",
)
_OVER_GRAFANA = (
    f"names of {{{{ $labels.list }}}} are blocked on {_WHERE} but must resolve",
    "{{ $value }} probe(s) see names that must resolve here blocked; the overblocking dashboard and "
    "the collector's status page list them.",
)

ALERTS = [
    Alert(
        "BlockprobeLeak",
        "blockprobe:order_leak_probes:count >= 1",
        "15m",
        "warning",
        f"order {{{{ $labels.order }}}} is not enforced on {_WHERE}: {_LEAK_COUNT} leaking name(s) × qtype(s), "
        f"e.g. {_LEAK_EXAMPLES}",
        "Order {{ $labels.order }} requires these names blocked on this resolver in {{ $labels.country }}, "
        "but {{ $value }} probe(s) have seen some of them resolve for 15 minutes.",
        "blockprobeleak",
        _LEAK_GRAFANA,
    ),
    Alert(
        "BlockprobeLeakConfirmed",
        "blockprobe:order_leak_probes:count >= 2",
        "10m",
        "critical",
        f"order {{{{ $labels.order }}}} leaks on {_WHERE}, confirmed by {{{{ $value }}}} probes",
        f"Order {{{{ $labels.order }}}}: {{{{ $value }}}} independent probes see names it requires blocked resolve "
        f"on {{{{ $labels.resolver }}}} over {{{{ $labels.transport }}}}: {_LEAK_COUNT} name(s) × qtype(s), "
        f"e.g. {_LEAK_EXAMPLES}.",
        "blockprobeleakconfirmed",
        _LEAK_GRAFANA,
    ),
    Alert(
        "BlockprobeOverblock",
        "blockprobe:list_overblock_probes:count >= 1",
        "15m",
        "warning",
        f"names of {{{{ $labels.list }}}} are blocked on {_WHERE} but must resolve: {_OVER_COUNT} name(s) × "
        f"qtype(s), e.g. {_OVER_EXAMPLES}",
        "{{ $labels.list }} names them as names that must resolve in {{ $labels.country }} (a control list, or "
        "a block ordered elsewhere); {{ $value }} probe(s) have seen them blocked for 15 minutes.",
        "blockprobeoverblock",
        _OVER_GRAFANA,
    ),
    Alert(
        "BlockprobeOverblockConfirmed",
        "blockprobe:list_overblock_probes:count >= 2",
        "10m",
        "critical",
        f"names of {{{{ $labels.list }}}} are over-blocked on {_WHERE}, confirmed by {{{{ $value }}}} probes",
        f"{{{{ $labels.list }}}}: {{{{ $value }}}} independent probes see names that must resolve blocked on "
        f"{{{{ $labels.resolver }}}} over {{{{ $labels.transport }}}} in {{{{ $labels.country }}}}: {_OVER_COUNT} "
        f"name(s) × qtype(s), e.g. {_OVER_EXAMPLES}.",
        "blockprobeoverblockconfirmed",
        _OVER_GRAFANA,
    ),
    Alert(
        "BlockprobeLeakName",
        _per_name(
            "blockprobe:order_leak_name_probes:count", "blockprobe:order_leak_names:count", "order", "leak"
        ),
        "15m",
        "warning",
        f"{{{{ $labels.domain }}}} resolves on {_WHERE}, though order {{{{ $labels.order }}}} requires it "
        f"blocked ({_qtypes('blockprobe_leak', 'order')})",
        "{{ $value }} probe(s) have seen {{ $labels.domain }} resolve for 15 minutes. Order {{ $labels.order }} "
        f"leaks at most {NAME_ALERTS_MAX} names on this resolver and transport in {{{{ $labels.country }}}}, so "
        "each has an alert of its own; BlockprobeLeak counts them.",
        "blockprobeleakname",
        (
            f"{{{{ $labels.domain }}}} resolves on {_WHERE}, though order {{{{ $labels.order }}}} requires it blocked",
            "{{ $labels.domain }} has been seen to resolve for 15 minutes. Order {{ $labels.order }} leaks at most "
            f"{NAME_ALERTS_MAX} names on this resolver and transport in {{{{ $labels.country }}}}, so each has an "
            "alert of its own; BlockprobeLeak counts them.",
        ),
    ),
    Alert(
        "BlockprobeOverblockName",
        _per_name(
            "blockprobe:list_overblock_name_probes:count",
            "blockprobe:list_overblock_names:count",
            "list",
            "overblock",
        ),
        "15m",
        "warning",
        f"{{{{ $labels.domain }}}} is blocked on {_WHERE} but must resolve ({{{{ $labels.list }}}}; "
        f"{_qtypes('blockprobe_overblock', 'list')})",
        "{{ $value }} probe(s) have seen {{ $labels.domain }} blocked for 15 minutes; {{ $labels.list }} names it "
        "as a name that must resolve in {{ $labels.country }}. At most "
        f"{NAME_ALERTS_MAX} names of it are blocked on this resolver and transport there, so each has an "
        "alert of its own; BlockprobeOverblock counts them.",
        "blockprobeoverblockname",
        (
            f"{{{{ $labels.domain }}}} is blocked on {_WHERE} but must resolve ({{{{ $labels.list }}}})",
            "{{ $labels.domain }} has been seen blocked for 15 minutes; {{ $labels.list }} names it as a name "
            f"that must resolve in {{{{ $labels.country }}}}. At most {NAME_ALERTS_MAX} names of it are blocked "
            "on this resolver and transport there, so each has an alert of its own; BlockprobeOverblock counts them.",
        ),
    ),
    Alert(
        "BlockprobeOrderDeadlineMissed",
        # The collector claims "missed" only with proof (a leak measured after `due`, and no
        # enforcement seen by then); the alert lasts while names still leak, so an order
        # enforced late stops paging and its miss stays in the metric and the report.
        f"max by ({_ORDER}) (blockprobe_order_names_leaking) > 0 and on ({_ORDER}) "
        f"max by ({_ORDER}) (blockprobe_order_deadline_missed) == 1",
        "2m",
        "warning",
        f"order {{{{ $labels.order }}}} was not enforced by its deadline on {_WHERE}: "
        "{{ $value }} name(s) still leak",
        "Order {{ $labels.order }} had to be enforced on this resolver in {{ $labels.country }} by its "
        "deadline; a leak was measured after it and {{ $value }} of its names still resolve. The timeline: "
        "collector report --order {{ $labels.order }} --timeline.",
        "blockprobeorderdeadlinemissed",
    ),
    Alert(
        "BlockprobeProbeSilent",
        "time() - max by (probe, region, country) (blockprobe_probe_last_report_timestamp_seconds) > 900",
        "5m",
        "warning",
        "probe {{ $labels.probe }} in {{ $labels.region }} has not reported for over 15 minutes",
        "No batch from {{ $labels.probe }} ({{ $labels.region }}, {{ $labels.country }}) for over 15 minutes: "
        "its findings are going stale and will disappear from the dashboards.",
        "blockprobeprobesilent",
    ),
    Alert(
        "BlockprobeResolverUnreachable",
        "blockprobe:resolver_reachable:max_by_region == 0",
        "15m",
        "warning",
        "{{ $labels.resolver }} over {{ $labels.transport }} is unreachable from all of {{ $labels.region }}",
        "No probe in {{ $labels.region }} ({{ $labels.country }}) got any answer from {{ $labels.resolver }} over "
        "{{ $labels.transport }}: its blocks cannot be judged (timeouts are not counted as blocks then).",
        "blockproberesolverunreachable",
    ),
    Alert(
        "BlockprobeCanaryFailing",
        "max by (probe, region, country, resolver, transport) (blockprobe_canary_failing) == 1",
        "15m",
        "warning",
        "canaries fail on {{ $labels.resolver }} over {{ $labels.transport }} at {{ $labels.probe }}",
        "A canary of known fate did not get it on {{ $labels.resolver }} over {{ $labels.transport }} "
        "({{ $labels.probe }}, {{ $labels.region }}): that resolver's findings are inconclusive until it recovers.",
        "blockprobecanaryfailing",
    ),
    Alert(
        "BlockprobeControlFailing",
        "max by (probe, region, country) (blockprobe_control_failure_ratio) > 0.5",
        "15m",
        "warning",
        "the control resolver fails for probe {{ $labels.probe }} in {{ $labels.region }}",
        "{{ $value | humanizePercentage }} of control answers failed in {{ $labels.probe }}'s last batch: "
        "NXDOMAIN, NODATA, REFUSED and SERVFAIL answers cannot be told apart from dead names.",
        "blockprobecontrolfailing",
    ),
]
