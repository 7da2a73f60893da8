"""The four Grafana dashboards, as code: plain dicts in Grafana's dashboard JSON model.

Plain dicts rather than grafana-foundation-sdk: they are the JSON Grafana stores, one to
one, so a reader of the generated file finds each line here; the lint tests and the
end-to-end test (every query run on a real Prometheus) hold them honest.
Target: Grafana 11/12, schemaVersion 41.

Counts are of probes and their findings, never of series: every query first takes one
value per probe (`max by (probe, …)` or `max without (instance, job)`), so collector
replicas and duplicate scrape jobs change no number, and counts of names come from
`blockprobe_domains` (the true counts), not from the capped per-name series.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DASHBOARDS", "FILTER"]

DS = {"type": "prometheus", "uid": "${datasource}"}
# The variables every findings query honours.
FILTER = 'country=~"$country",region=~"$region",resolver=~"$resolver",transport=~"$transport"'
# The copies of one series that replicated collectors or several scrape jobs export.
ONE = "max without (instance, job)"
BY_ORDER = ',list=~"$order"'  # a leak's list is its order
# The compliance series are the collector's, over every probe: no probe or region label.
COMPLIANCE = 'country=~"$country",resolver=~"$resolver",transport=~"$transport",order=~"$order"'
_KEY = "order, country, resolver, transport"


def _per_probe(finding: str, extra: str = "") -> str:
    """Names with a finding, one value per probe × resolver × transport × list (duplicates folded)."""
    return (
        f"max by (probe, country, region, resolver, transport, list) "
        f'(blockprobe_domains{{{FILTER},finding="{finding}"{extra}}})'
    )


def _var(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"var-{name}"},
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "refresh": 2,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


TEMPLATING = {
    "list": [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "refresh": 1,
            "current": {},
        },
        _var("country", "Country", "label_values(blockprobe_domains, country)"),
        _var("region", "Region", "label_values(blockprobe_domains, region)"),
        _var("resolver", "Resolver", "label_values(blockprobe_domains, resolver)"),
        _var("transport", "Transport", "label_values(blockprobe_domains, transport)"),
        _var("order", "Order", "label_values(blockprobe_order_enforcement_ratio, order)"),
        {
            "name": "collector_url",
            "label": "Collector URL",
            "type": "textbox",
            "query": "http://127.0.0.1:8478",
            "current": {"text": "http://127.0.0.1:8478", "value": "http://127.0.0.1:8478"},
        },
    ]
}

EVIDENCE_LINK = {
    "title": "evidence at the collector",
    "url": "${collector_url}/evidence?probe=${__data.fields.probe}&resolver=${__data.fields.resolver}"
    "&transport=${__data.fields.transport}&qtype=${__data.fields.qtype}&domain=${__data.fields.domain}",
    "targetBlank": True,
}


def _panel(
    pid: int,
    kind: str,
    title: str,
    exprs: list[tuple[str, str]],
    unit: str,
    pos: tuple[int, int, int, int],
    *,
    instant: bool = False,
    description: str = "",
    links: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    x, y, w, h = pos
    targets = []
    for i, (expr, legend) in enumerate(exprs):
        t: dict[str, Any] = {"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend}
        if instant:
            t.update(instant=True, range=False, format="table")
        targets.append(t)
    panel: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "links": links or []}, "overrides": []},
        "options": {},
    }
    if kind == "table":
        panel["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True}}}
        ]
    return panel


def _merged(panel: dict[str, Any]) -> dict[str, Any]:
    """A table of several instant queries joined on their labels, one row per label set."""
    panel["transformations"].insert(0, {"id": "merge", "options": {}})
    return panel


def _dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["blockprobe"],
        "timezone": "utc",
        "schemaVersion": 41,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "1m",
        "time": {"from": "now-24h", "to": "now"},
        "templating": TEMPLATING,
        "annotations": {"list": []},
        "links": [{"title": "blockprobe", "type": "dashboards", "tags": ["blockprobe"], "asDropdown": True}],
        "panels": panels,
    }


OVERVIEW = _dashboard(
    "blockprobe-overview",
    "blockprobe · block efficacy",
    "Are court-ordered blocks enforced, per country, resolver and transport?",
    [
        _panel(
            1,
            "stat",
            "Current leaks",
            [(f"sum({_per_probe('leak', BY_ORDER)}) or vector(0)", "leaks")],
            "none",
            (0, 0, 6, 4),
            description="Names × qtypes ordered blocked here that still resolve, summed over probes, resolvers "
            "and transports.",
        ),
        _panel(
            2,
            "stat",
            "Current overblocks",
            [(f"sum({_per_probe('overblock')}) or vector(0)", "overblocks")],
            "none",
            (6, 0, 6, 4),
            description="Names × qtypes that must resolve here but are blocked, summed over probes, resolvers "
            "and transports.",
        ),
        _panel(
            3,
            "stat",
            "Probes reporting",
            [
                (
                    "count(time() - max by (probe) (blockprobe_probe_last_report_timestamp_seconds"
                    '{country=~"$country",region=~"$region"}) < 900) or vector(0)',
                    "probes",
                )
            ],
            "none",
            (12, 0, 6, 4),
        ),
        _panel(
            4,
            "table",
            "Enforcement ratio by country × resolver × transport",
            [
                (
                    "avg by (country, resolver, transport) (blockprobe_order_enforcement_ratio"
                    '{country=~"$country",resolver=~"$resolver",transport=~"$transport",order=~"$order"})',
                    "",
                )
            ],
            "percentunit",
            (0, 4, 24, 10),
            instant=True,
            description="Enforced / (enforced + leak) over current series, averaged over the selected orders.",
        ),
        _panel(
            5,
            "timeseries",
            "Leaks and overblocks over time",
            [
                (f"sum by (country) ({_per_probe('leak')})", "leaks {{country}}"),
                (f"sum by (country) ({_per_probe('overblock')})", "overblocks {{country}}"),
            ],
            "short",
            (0, 14, 12, 8),
        ),
        _panel(
            6,
            "timeseries",
            "Names by finding",
            [
                (
                    "sum by (finding) (max by (probe, country, region, resolver, transport, list, finding) "
                    f"(blockprobe_domains{{{FILTER}}}))",
                    "{{finding}}",
                )
            ],
            "short",
            (12, 14, 12, 8),
        ),
    ],
)

LEAKS = _dashboard(
    "blockprobe-leaks",
    "blockprobe · leaks",
    "Every current leak: a name an order requires blocked here still resolves.",
    [
        _panel(
            1,
            "table",
            "Current leaks",
            [(f'{ONE} (blockprobe_leak{{{FILTER},order=~"$order"}})', "")],
            "none",
            (0, 0, 24, 12),
            instant=True,
            links=[EVIDENCE_LINK],
            description="One row per probe × resolver × transport × qtype × name, up to the collector's cap per "
            "probe × resolver × transport × order (the full list is on the collector's status page); the link "
            "opens the raw responses.",
        ),
        _panel(
            2,
            "table",
            "Leaking since",
            [
                (
                    f'{ONE} (blockprobe_finding_since_timestamp_seconds{{{FILTER},finding="leak",rule=~"$order"}})'
                    " * 1000",
                    "",
                )
            ],
            "dateTimeAsIso",
            (0, 12, 24, 10),
            instant=True,
            links=[EVIDENCE_LINK],
        ),
        _panel(
            3,
            "timeseries",
            "Leaks by order",
            [(f"sum by (list) ({_per_probe('leak', BY_ORDER)})", "{{list}}")],
            "short",
            (0, 22, 12, 8),
        ),
        _panel(
            4,
            "timeseries",
            "Leaks by transport",
            [(f"sum by (transport) ({_per_probe('leak', BY_ORDER)})", "{{transport}}")],
            "short",
            (12, 22, 12, 8),
        ),
        _merged(
            _panel(
                5,
                "table",
                "Orders not enforced: probes and names per order × resolver × transport × country",
                [
                    (
                        f"count by (list, country, resolver, transport) ({_per_probe('leak', BY_ORDER)} > 0)",
                        "",
                    ),
                    (f"max by (list, country, resolver, transport) ({_per_probe('leak', BY_ORDER)})", ""),
                ],
                "none",
                (0, 30, 24, 10),
                instant=True,
                description="What the BlockprobeLeak alerts see: Value #A is how many probes see the order leak, "
                "Value #B how many names × qtypes leak for the probe that sees most.",
            )
        ),
        _merged(
            _panel(
                6,
                "table",
                "Deadlines: time to enforce, missed or met, names still leaking",
                [
                    (f"max by ({_KEY}) (blockprobe_order_time_to_enforce_seconds{{{COMPLIANCE}}})", ""),
                    (f"max by ({_KEY}) (blockprobe_order_deadline_missed{{{COMPLIANCE}}})", ""),
                    (f"max by ({_KEY}) (blockprobe_order_names_leaking{{{COMPLIANCE}}})", ""),
                ],
                "none",
                (0, 40, 24, 10),
                instant=True,
                description="The collector's compliance pass, per order × country × resolver × transport (over "
                "every probe): Value #A seconds from `effective` to enforcement first seen, Value #B 1 when "
                "the deadline was missed (proven by a leak measured after it), 0 when met, empty while it "
                "cannot be said; Value #C names of the order leaking now. The timeline: "
                "`collector report --order ID --timeline`.",
            )
        ),
        _panel(
            7,
            "table",
            "What a user meets at the leaks (answer checks)",
            [
                (
                    "sum by (list, country, resolver, transport, reach) (max by (probe, country, resolver, "
                    f'transport, list, reach) (blockprobe_reach_domains{{{FILTER},finding="leak"{BY_ORDER}}}))',
                    "",
                )
            ],
            "none",
            (0, 50, 12, 10),
            instant=True,
            description="Leaking name × qtype series by what their answer leads to: `reachable` is a proven "
            "leak (a certificate valid for the name), `http_451` or `unreachable` leak nothing a user could "
            "use, `unchecked` where a probe does not check answers.",
        ),
        _panel(
            8,
            "table",
            "IP-level blocks (inferred by the collector)",
            [(f'{ONE} (blockprobe_ip_block{{country=~"$country",order=~"$order"}})', "")],
            "none",
            (12, 50, 12, 10),
            instant=True,
            description="Addresses unreachable from probes in the ordering country while probes elsewhere "
            "completed a TLS handshake valid for the name, within the collector's ip_block_window; the "
            "status page names the probes on each side.",
        ),
    ],
)

OVERBLOCKING = _dashboard(
    "blockprobe-overblocking",
    "blockprobe · overblocking",
    "Names that must resolve but are blocked: control names, and blocks applied outside the "
    "jurisdiction that ordered them.",
    [
        _panel(
            1,
            "table",
            "Blocked control names",
            [(f'{ONE} (blockprobe_overblock{{{FILTER},kind="control"}})', "")],
            "none",
            (0, 0, 24, 10),
            instant=True,
            links=[EVIDENCE_LINK],
            description="`list` names the control list that says the name must resolve.",
        ),
        _panel(
            2,
            "table",
            "Blocks outside the ordering jurisdiction",
            [(f'{ONE} (blockprobe_overblock{{{FILTER},kind="order",list=~"$order"}})', "")],
            "none",
            (0, 10, 24, 10),
            instant=True,
            links=[EVIDENCE_LINK],
            description="`list` names the order that blocks the name elsewhere, not here.",
        ),
        _panel(
            3,
            "timeseries",
            "Overblocks by country",
            [(f"sum by (country) ({_per_probe('overblock')})", "{{country}}")],
            "short",
            (0, 20, 24, 8),
        ),
    ],
)

FLEET = _dashboard(
    "blockprobe-fleet",
    "blockprobe · fleet health",
    "Probes, their last reports, measurement rates, failures, spools, and resolver reachability.",
    [
        _panel(
            1,
            "table",
            "Seconds since each probe's last report",
            [
                (
                    f"time() - {ONE} "
                    '(blockprobe_probe_last_report_timestamp_seconds{country=~"$country",region=~"$region"})',
                    "",
                )
            ],
            "s",
            (0, 0, 12, 8),
            instant=True,
        ),
        _panel(
            2,
            "timeseries",
            "Measurements per second by transport",
            [
                (
                    'sum by (transport) (rate(blockprobe_probe_queries_total{transport=~"$transport"}[$__rate_interval]))',
                    "{{transport}}",
                )
            ],
            "reqps",
            (12, 0, 12, 8),
        ),
        _panel(
            3,
            "timeseries",
            "Timeouts and errors by transport",
            [
                (
                    'sum by (transport, outcome) (rate(blockprobe_probe_queries_total{transport=~"$transport",'
                    'outcome=~"timeout|error"}[$__rate_interval]))',
                    "{{transport}} {{outcome}}",
                )
            ],
            "reqps",
            (0, 8, 12, 8),
        ),
        _panel(
            4,
            "timeseries",
            "Spool depth (results not yet acknowledged)",
            [("sum by (instance) (blockprobe_probe_spool_results)", "{{instance}}")],
            "short",
            (12, 8, 12, 8),
        ),
        _panel(
            5,
            "timeseries",
            "Push failures by reason",
            [
                (
                    "sum by (reason) (rate(blockprobe_probe_push_failures_total[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
            "reqps",
            (0, 16, 12, 8),
        ),
        _panel(
            6,
            "table",
            "Resolver reachability",
            [(f"{ONE} (blockprobe_resolver_reachable{{{FILTER}}})", "")],
            "bool_yes_no",
            (12, 16, 12, 8),
            instant=True,
        ),
        _panel(
            7,
            "timeseries",
            "Resolver latency (mean over current series)",
            [
                (
                    f"{ONE} (blockprobe_resolver_latency_seconds{{{FILTER}}})",
                    "{{resolver}} {{transport}} {{probe}}",
                )
            ],
            "s",
            (0, 24, 24, 8),
        ),
        _panel(
            8,
            "timeseries",
            "Collector ingest and rejections",
            [
                ("sum(rate(blockprobe_collector_results_total[$__rate_interval]))", "results stored"),
                (
                    "sum by (reason) (rate(blockprobe_collector_rejected_total[$__rate_interval]))",
                    "rejected: {{reason}}",
                ),
            ],
            "reqps",
            (0, 32, 24, 8),
        ),
    ],
)

DASHBOARDS = {"overview": OVERVIEW, "leaks": LEAKS, "overblocking": OVERBLOCKING, "fleet": FLEET}
