"""Evidence export: every leak and overblock, grouped per series, for a regulator or a court."""

from __future__ import annotations

import csv
import html
import io
import json
from typing import Any

from collector.compliance import deadline_missed, enforcement_watched, time_to_enforce, verdict_words
from collector.reach import reach_of
from collector.store import Store

__all__ = ["build_report", "build_timeline", "render_report", "render_timeline"]

FIELDS = [
    "finding",
    "rule",
    "country",
    "resolver",
    "transport",
    "qtype",
    "domain",
    "first_seen",
    "last_seen",
    "measurements",
    "probes",
    "answers",
    "reach",
    "rcode",
    "ede",
    "wire",
]


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_report(
    store: Store, since: float, order: str | None = None, country: str | None = None
) -> list[dict[str, Any]]:
    """One row per (finding, order/list, country, resolver, transport, qtype, name): first and last
    seen, the probes that saw it, and the latest answers with what a user met there (reach) and
    the raw response."""
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for probe, region, ctry, t, finding, rule, body in store.archive_problems(since, order, country):
        m = json.loads(body)
        key = (finding, rule or "", ctry, m["resolver"], m["transport"], m["qtype"], m["domain"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "finding": finding,
                "rule": rule or "",
                "country": ctry,
                "resolver": m["resolver"],
                "transport": m["transport"],
                "qtype": m["qtype"],
                "domain": m["domain"],
                "first_seen": t,
                "last_seen": t,
                "measurements": 0,
                "probes": set(),
            }
        g["measurements"] += 1
        g["probes"].add(f"{probe} ({region})")
        g["first_seen"] = min(g["first_seen"], t)
        if t >= g["last_seen"]:
            g["last_seen"] = t
            g.update(
                answers=m.get("answers", []), rcode=m.get("rcode"), ede=m.get("ede", []), wire=m.get("wire")
            )
            # What a user met at those answers (issue 16); words outside the probe's vocabulary are not repeated.
            g["reach"] = reach_of(m) or "unchecked"
    rows = []
    for g in sorted(
        groups.values(), key=lambda g: (g["finding"], g["rule"], g["country"], g["resolver"], g["domain"])
    ):
        rows.append(
            {
                **g,
                "first_seen": _iso(g["first_seen"]),
                "last_seen": _iso(g["last_seen"]),
                "probes": sorted(g["probes"]),
            }
        )
    return rows


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: one that would start a formula gets a leading quote
    (OWASP's advice against CSV injection; the quote shows, the formula never runs)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def render_report(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        # CRLF as RFC 4180 has it: the writer then quotes any cell holding a CR or LF, so none can
        # break a row in two.
        w = csv.DictWriter(out, FIELDS, lineterminator="\r\n")
        w.writeheader()
        for r in rows:
            flat = {
                **r,
                "probes": "; ".join(r["probes"]),
                "answers": "; ".join(r.get("answers") or []),
                "ede": "; ".join(f"{e['code']} {e.get('text', '')}".strip() for e in r.get("ede") or []),
            }
            w.writerow({k: cell(v) for k, v in flat.items() if k in FIELDS})
        return out.getvalue()
    cells = "".join(f"<th>{html.escape(f)}</th>" for f in FIELDS)
    body = []
    for r in rows:
        vals = {
            **r,
            "probes": ", ".join(r["probes"]),
            "answers": ", ".join(r.get("answers") or []),
            "ede": ", ".join(str(e["code"]) for e in r.get("ede") or []),
        }
        body.append(
            "<tr>" + "".join(f"<td>{html.escape(str(vals.get(f) or ''))}</td>" for f in FIELDS) + "</tr>"
        )
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>blockprobe evidence report</title>"
        "<style>td,th{border:1px solid #ccc;padding:3px 6px;font:12px sans-serif;word-break:break-all}</style>"
        f"<h1>blockprobe evidence report</h1><p>{len(rows)} findings</p><table><tr>{cells}</tr>"
        + "".join(body)
        + "</table></html>\n"
    )


# The compliance timeline of one order (`collector report --order ID --timeline`) ----------------

# The key's columns, then one change of its counts per CSV row.
TIMELINE_KEY_FIELDS = 12
TIMELINE_FIELDS = [
    "order",
    "country",
    "resolver",
    "transport",
    "effective",
    "due",
    "first_enforced",
    "time_to_enforce_seconds",
    "time_to_enforce_is_bound",
    "deadline",
    "names_leaking",
    "last_pass",
    "time",
    "enforced",
    "leaking",
    "names_leaking_then",
]


def _iso_or_none(t: float | None) -> str | None:
    return None if t is None else _iso(t)


def build_timeline(
    store: Store, order: str, since: float, now: float, country: str | None = None
) -> list[dict[str, Any]]:
    """Per country × resolver × transport of one order: its instants, time to enforce, the deadline
    verdict (met, missed, pending, unknown, no deadline; collector/compliance.py says when each is
    claimed), names leaking at the last pass that saw it, and the changes of its counts since `since`."""
    keys = [
        r
        for r in store.compliance(order=order)
        if (country is None or r["country"] == country) and r["updated"]  # 0: no pass has seen it yet
    ]
    history: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for h in store.compliance_history([order], since):
        history.setdefault((h["country"], h["resolver"], h["transport"]), []).append(
            {
                "time": _iso(h["time"]),
                "enforced": h["enforced"],
                "leaking": h["leaking"],
                "names_leaking": h["names_leaking"],
            }
        )
    out = []
    for r in keys:
        out.append(
            {
                "order": r["order_id"],
                "country": r["country"],
                "resolver": r["resolver"],
                "transport": r["transport"],
                "effective": _iso_or_none(r["effective"]),
                "due": _iso_or_none(r["due"]),
                "first_enforced": _iso_or_none(r["first_enforced"]),
                "time_to_enforce_seconds": time_to_enforce(r),
                # True: already blocked when first measured, so the figure is only an upper bound.
                "time_to_enforce_is_bound": time_to_enforce(r) is not None and not enforcement_watched(r),
                "deadline": verdict_words(r, now),
                "deadline_missed": deadline_missed(r),
                "names_leaking": r["names_leaking"],
                "enforced": r["enforced"],
                "leaking": r["leaking"],
                "inconclusive": r["inconclusive"],
                "last_pass": _iso(r["updated"]),
                "history": history.get((r["country"], r["resolver"], r["transport"]), []),
            }
        )
    return out


def render_timeline(keys: list[dict[str, Any]], fmt: str) -> str:
    """JSON: the keys, each with its history; CSV: one row per change (a key without changes since
    the start, one row), key columns repeated; HTML: a summary table, then each key's changes."""
    if fmt == "json":
        return json.dumps(keys, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        w = csv.DictWriter(out, TIMELINE_FIELDS, lineterminator="\r\n")
        w.writeheader()
        for k in keys:
            base = {f: k.get(f) for f in TIMELINE_FIELDS[:TIMELINE_KEY_FIELDS]}
            for h in k["history"] or [{}]:
                row = {
                    **base,
                    "time": h.get("time"),
                    "enforced": h.get("enforced"),
                    "leaking": h.get("leaking"),
                }
                row["names_leaking_then"] = h.get("names_leaking")
                w.writerow({f: cell(v) for f, v in row.items()})
        return out.getvalue()
    head = TIMELINE_FIELDS[1:TIMELINE_KEY_FIELDS]
    summary = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_shown(k.get(f)))}</td>" for f in head) + "</tr>" for k in keys
    )
    changes = []
    for k in keys:
        title = html.escape(f"{k['country']} · {k['resolver']} · {k['transport']}")
        rows = "".join(
            f"<tr><td>{html.escape(h['time'])}</td><td>{h['enforced']}</td><td>{h['leaking']}</td>"
            f"<td>{h['names_leaking']}</td></tr>"
            for h in k["history"]
        )
        changes.append(
            f"<h2>{title}</h2><table><tr><th>time</th><th>enforced series</th><th>leaking series</th>"
            f"<th>names leaking</th></tr>{rows}</table>"
        )
    order = html.escape(keys[0]["order"]) if keys else ""
    missed = sum(1 for k in keys if k["deadline"] == "missed")
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>blockprobe compliance timeline</title>"
        "<style>td,th{border:1px solid #ccc;padding:3px 6px;font:12px sans-serif;word-break:break-all}</style>"
        f"<h1>Compliance timeline {order}</h1><p>{len(keys)} country × resolver × transport; "
        f"deadline missed on {missed}</p><table><tr>"
        + "".join(f"<th>{html.escape(f)}</th>" for f in head)
        + f"</tr>{summary}</table>"
        + "".join(changes)
        + "</html>\n"
    )


def _shown(value: Any) -> str:
    return "" if value is None else str(value)
