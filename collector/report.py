"""Evidence export: every leak and overblock, grouped per series, for a regulator or a court."""

from __future__ import annotations

import csv
import html
import io
import json
from typing import Any

from collector.reach import reach_of
from collector.store import Store

__all__ = ["build_report", "render_report"]

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
