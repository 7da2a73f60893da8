"""The two HTML pages people read: the status page (`/`) and the evidence page (`/evidence`).

Plain server-rendered HTML (Jinja2, autoescaped), no JavaScript. The status page
leads with the answer: a matrix of country × resolver × transport with the count of
each finding, then the leaks, then the overblocks, each saying what the resolver
answered and for how long. Identical problems seen over several transports or by
several probes are one row, so a resolver that leaks a name over six transports to
two probes is one line, not twelve. The evidence page leads with the judgement in
words, then the history as runs of identical results, the raw wire data folded away.
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx2
from jinja2 import Environment, PackageLoader, select_autoescape

from collector.compliance import enforcement_watched, time_to_enforce, verdict_words
from collector.reach import ip_blocks
from collector.store import Store

__all__ = ["Pages", "decode_cursor", "display_name", "encode_cursor", "reach_said", "runs_of"]

TRANSPORTS = ("udp", "tcp", "dot", "doh", "doh3", "doq")
FINDINGS = ("leak", "overblock", "inconclusive", "enforced", "ok")
PAGE = 50  # names per section on the status page
SHOW_PAGE = 500  # names per page of one section (`?show=leak`)
NAMES_COUNTED = 1000  # names per section counted for the header; beyond: "1000+"
HISTORY = 500  # archived measurements of one series read for its evidence page

_OUTCOME_WORDS = {
    "timeout": "no answer in time",
    "error": "a transport failure",
    "ede_blocked": "a policy refusal (Extended DNS Error)",
    "sinkhole": "a block page or sinkhole address",
    "nxdomain": "NXDOMAIN (no such name)",
    "refused": "REFUSED",
    "servfail": "SERVFAIL",
    "nodata": "no records of this type (NODATA)",
    "resolved": "the records",
}


def display_name(resolver: str, operator: str | None) -> str:
    """A resolver as people name it: a catalogue or lab name as given; for a spec, its operator or host."""
    if "://" not in resolver:
        return resolver.split("#", 1)[0]
    if operator:
        return operator
    parts = urlsplit(resolver.split("#", 1)[0])
    host = parts.hostname or resolver
    return f"{host}:{parts.port}" if parts.port else host


def fmt_time(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_age(seconds: float) -> str:
    """3 s, 4 min, 2 h 5 min, 3 d 4 h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def said(m: dict[str, Any]) -> str:
    """What a resolver answered, in a few words: outcome, rcode, answers, EDE, block-page match."""
    outcome = str(m.get("outcome"))
    if outcome in ("timeout", "error"):
        return _OUTCOME_WORDS[outcome] + (f": {m['error']}" if m.get("error") else "")
    bits = []
    answers = m.get("answers") or []
    sink = m.get("sinkhole")
    if isinstance(sink, dict):
        # The block page itself says more than the addresses that led to it.
        bits.append(f"block page {sink.get('match')} ({sink.get('source')})")
    elif answers:
        bits.append(", ".join(answers[:4]) + (" …" if len(answers) > 4 else ""))
    if outcome not in ("resolved", "sinkhole") or not (answers or sink):
        rcode = m.get("rcode")
        shown = rcode and rcode not in ("NOERROR", outcome.upper())
        bits.append(outcome + (f" ({rcode})" if shown else ""))
    for e in m.get("ede") or []:
        bits.append(f"EDE {e.get('code')}" + (f" “{e.get('text')}”" if e.get("text") else ""))
    return "; ".join(bits)


@dataclass
class Cell:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINDINGS, 0))

    @property
    def worst(self) -> str:
        for f in ("leak", "overblock", "inconclusive"):
            if self.counts[f]:
                return f
        return "fine" if self.counts["enforced"] or self.counts["ok"] else "none"


@dataclass
class Problem:
    """Identical current leaks or overblocks, merged across transports and probes."""

    finding: str
    country: str
    resolver: str
    kind: str
    domain: str
    qtype: str
    rule: str | None
    outcome: str
    answers: list[str]
    since: float
    transports: list[str]
    probes: list[str]
    key: tuple[str, str, str, str, str]  # one series, for the evidence link and the details
    said: str = ""
    reach: dict[str, list[str]] = field(default_factory=dict)  # what a user would meet → probes that saw it
    reach_said: str = ""


class Pages:
    """Renders both pages from a store snapshot; one instance per app."""

    def __init__(
        self,
        store: Store,
        stale_after: float,
        prometheus_url: str | None = None,
        ip_block_window: float = 3600.0,
    ) -> None:
        self.store = store
        self.stale_after = stale_after
        self.prometheus_url = prometheus_url
        self.ip_block_window = ip_block_window
        self.env = Environment(loader=PackageLoader("collector", "templates"), autoescape=select_autoescape())
        self.env.globals.update(fmt_time=fmt_time, fmt_age=fmt_age, evidence_url=evidence_url)

    # the status page --------------------------------------------------------------------
    def status(
        self, show: str | None = None, now: float | None = None, after: Sequence[str] | None = None
    ) -> str:
        """The status page; `show` = "leak" or "overblock" pages through that section, SHOW_PAGE
        names a page from the name after `after` (country, domain, qtype).

        Each section reads its page of names through an index and the series counts from the
        counts the ingest keeps, so a page costs what it shows, not how many names leak."""
        now = time.time() if now is None else now
        since = now - self.stale_after
        resolvers = self.store.resolvers()
        names = {
            resolver: (display_name(resolver, operator), kind or "")
            for resolver, (operator, kind) in resolvers.items()
        }
        # The operator beside the name only where it says something the name does not.
        operators = {
            resolver: operator
            for resolver, (operator, _kind) in resolvers.items()
            if operator and operator.casefold() != names[resolver][0].casefold()
        }
        matrix, transports, totals = self._matrix(since, names, operators)
        sections = []
        counted = {}
        for finding, title, explain in (
            ("leak", "Leaks", "names an order requires blocked here that still resolve"),
            ("overblock", "Overblocks", "names that must resolve here but are blocked"),
        ):
            size = SHOW_PAGE if show == finding else PAGE
            keys = self.store.problem_names(since, finding, after if show == finding else None, size + 1)
            more = len(keys) > size
            keys = keys[:size]
            rows = self._problems(self.store.problems_of(since, finding, keys), names)
            for p in rows:
                p.said = self._said(p)
                p.reach_said = reach_said(p.finding, p.reach)
            counted[finding] = self.store.count_names(since, finding, NAMES_COUNTED + 1)
            sections.append(
                {
                    "finding": finding,
                    "title": title,
                    "explain": explain,
                    "rows": rows,
                    "names": _counted(counted[finding]),
                    "series": totals[finding],
                    "more": more,
                    "next": encode_cursor(keys[-1]) if more and show == finding else None,
                    "paged": show == finding,
                    # A column of "not checked" on every row (probes with `verify: off`) says nothing.
                    "checked": any(set(p.reach) - {"unchecked"} for p in rows),
                }
            )
        # The front page asks Prometheus; the pages after it (rendered on demand) do not.
        alerts, alerts_error = self._alerts() if after is None else (None, None)
        return self.env.get_template("status.html").render(
            now=now,
            stale_after=self.stale_after,
            matrix=matrix,
            transports=transports,
            totals=totals,
            sections=sections,
            leak_series=totals["leak"],
            overblock_series=totals["overblock"],
            leaks=_counted(counted["leak"]),
            overblocks=_counted(counted["overblock"]),
            probes=self.store.probes(),
            alerts=alerts,
            alerts_error=alerts_error,
            prometheus_url=self.prometheus_url,
            bar=_bar(totals),
            page_size=SHOW_PAGE,
            compliance=self._compliance(since, now, names),
            ip_blocks=ip_blocks(self.store, now, self.ip_block_window),
            ip_block_window=self.ip_block_window,
        )

    def _matrix(
        self, since: float, names: dict[str, tuple[str, str]], operators: dict[str, str]
    ) -> tuple[list[dict[str, Any]], list[str], dict[str, int]]:
        cells: dict[tuple[str, str, str], dict[str, Cell]] = defaultdict(lambda: defaultdict(Cell))
        row_operators: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        totals = dict.fromkeys(FINDINGS, 0)
        seen_transports = set()
        for _probe, _region, country, resolver, transport, rule, finding, n, *_ in self.store.counts(since):
            if rule == "canary" or finding not in FINDINGS:
                continue  # canaries say whether a resolver can be judged, not whether an order holds
            name, kind = names.get(resolver, (display_name(resolver, None), ""))
            cells[(country, name, kind)][transport].counts[finding] += int(n)
            if resolver in operators:
                row_operators[(country, name, kind)].add(operators[resolver])
            totals[finding] += int(n)
            seen_transports.add(transport)
        transports = [t for t in TRANSPORTS if t in seen_transports]
        rows = []
        for (country, name, kind), by_t in sorted(cells.items(), key=lambda kv: _row_order(kv[0], kv[1])):
            rows.append(
                {
                    "country": country,
                    "name": name,
                    "kind": kind,
                    "operator": ", ".join(sorted(row_operators[(country, name, kind)])),
                    "cells": [by_t.get(t) for t in transports],
                }
            )
        return rows, transports, totals

    def _problems(self, series: Sequence[dict[str, Any]], names: dict[str, tuple[str, str]]) -> list[Problem]:
        merged: dict[tuple[Any, ...], Problem] = {}
        for p in series:
            name, kind = names.get(p["resolver"], (display_name(p["resolver"], None), ""))
            answers = json.loads(p["answers"])
            k = (
                p["finding"],
                p["country"],
                name,
                p["domain"],
                p["qtype"],
                p["rule"],
                p["outcome"],
                tuple(answers),
            )
            key = (p["probe_id"], p["resolver"], p["transport"], p["qtype"], p["domain"])
            if k not in merged:
                merged[k] = Problem(
                    p["finding"],
                    p["country"],
                    name,
                    kind,
                    p["domain"],
                    p["qtype"],
                    p["rule"],
                    p["outcome"],
                    answers,
                    p["since"],
                    [],
                    [],
                    key,
                )
            row = merged[k]
            row.since = min(row.since, p["since"])
            if p["transport"] not in row.transports:
                row.transports.append(p["transport"])
            if p["probe_id"] not in row.probes:
                row.probes.append(p["probe_id"])
            seen_by = row.reach.setdefault(p.get("reach") or "unchecked", [])
            if p["probe_id"] not in seen_by:
                seen_by.append(p["probe_id"])
        out = list(merged.values())
        for row in out:
            row.transports.sort(key=lambda t: TRANSPORTS.index(t) if t in TRANSPORTS else 99)
            row.probes.sort()
        # The page's order: country, name, type, then resolver.
        out.sort(key=lambda r: (r.finding != "leak", r.country, r.domain, r.qtype, r.resolver))
        return out

    def _compliance(self, since: float, now: float, names: dict[str, tuple[str, str]]) -> dict[str, Any]:
        """Per order with current compliance data, worst first: a resolver × transport matrix coloured
        by enforcement share (numbers written too) and an SVG timeline of that share."""
        by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.store.compliance(since):
            by_order[r["order_id"]].append(r)
        orders = [_order_view(order, rows, now, names) for order, rows in by_order.items()]
        orders.sort(key=lambda o: (-o["missed"], o["share"] if o["share"] is not None else 2, o["order"]))
        shown = orders[:ORDERS_SHOWN]
        history = self.store.compliance_history([o["order"] for o in shown], now - TIMELINE_SPAN)
        for o in shown:
            o["chart"] = _timeline_chart([h for h in history if h["order_id"] == o["order"]], o, now)
        return {
            "orders": shown,
            "total": len(orders),
            "missed": sum(o["missed"] for o in orders),
            "missed_orders": sum(1 for o in orders if o["missed"]),
        }

    def _said(self, p: Problem) -> str:
        rows = self.store.evidence(p.key, limit=1)
        return said(rows[0]) if rows else said({"outcome": p.outcome, "answers": p.answers})

    def _alerts(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """(alerts Prometheus reports as firing, or None without a Prometheus; why it could not be asked)."""
        if not self.prometheus_url:
            return None, None
        try:
            doc = httpx2.get(self.prometheus_url.rstrip("/") + "/api/v1/alerts", timeout=2).json()
            found = doc["data"]["alerts"]
        except (httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:200]
        alerts = [a for a in found if a.get("state") == "firing"]
        alerts = [a for a in alerts if str(a.get("labels", {}).get("alertname", "")).startswith("Blockprobe")]
        alerts.sort(
            key=lambda a: (a["labels"].get("severity") != "critical", a["labels"].get("alertname", ""))
        )
        return alerts, None

    # the evidence page -----------------------------------------------------------------
    def evidence(self, key: Sequence[str]) -> tuple[list[dict[str, Any]], str]:
        """(the archived rows of one series, newest first; the HTML page)."""
        rows = self.store.evidence(key, limit=HISTORY)
        series = dict(zip(("probe", "resolver", "transport", "qtype", "domain"), key, strict=True))
        latest = rows[0] if rows else None
        html = self.env.get_template("evidence.html").render(
            series=series,
            latest=latest,
            judgement=judgement(latest) if latest else None,
            checks=checks_of(latest) if latest else [],
            runs=runs_of(rows),
            rows=rows,
            json_url=evidence_url(*key) + "&format=json",
            name=display_name(key[1], latest.get("operator") if latest else None),
        )
        return rows, html


ORDERS_SHOWN = 10  # orders with a matrix on the status page, worst first; the report has every one
TIMELINE_SPAN = 7 * 86400  # how far back an order's chart reaches
CHART_W, CHART_H = 300, 60


def _counted(n: int) -> str:
    """A section's name count for the header: exact up to NAMES_COUNTED, then "1000+"."""
    return f"{NAMES_COUNTED}+" if n > NAMES_COUNTED else str(n)


def encode_cursor(key: Sequence[str]) -> str:
    """Where the next page starts, for a link: the last key of this page, opaque."""
    return (
        base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode().rstrip("=")
    )


def decode_cursor(text: str, parts: int) -> list[str]:
    """The key a cursor holds; ValueError (with the reason) for anything else."""
    try:
        key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError) as exc:
        raise ValueError("not a cursor this collector made") from exc
    if (
        not isinstance(key, list)
        or len(key) != parts
        or not all(isinstance(k, str) and len(k) <= 253 for k in key)
    ):
        raise ValueError("not a cursor this collector made")
    return key


def _share(enforced: int, leaking: int) -> float | None:
    return enforced / (enforced + leaking) if enforced + leaking else None


def _share_class(share: float | None) -> str:
    if share is None:
        return "inconclusive"
    return "fine" if share == 1 else ("leak" if share == 0 else "partial")


def _order_view(
    order: str, rows: list[dict[str, Any]], now: float, names: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """One order's matrix: rows country × resolver (by name), columns transports, cells with the share."""
    seen = {r["transport"] for r in rows}
    transports = [t for t in TRANSPORTS if t in seen] + sorted(seen - set(TRANSPORTS))
    cells: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        name, kind = names.get(r["resolver"], (display_name(r["resolver"], None), ""))
        share = _share(r["enforced"], r["leaking"])
        cells[(r["country"], name, kind)][r["transport"]] = {
            "share": share,
            "percent": None if share is None else int(share * 100),  # 99.6 % is not 100 %: never rounded up
            "cls": _share_class(share),
            "enforced": r["enforced"],
            "series": r["enforced"] + r["leaking"],
            "inconclusive": r["inconclusive"],
            "names_leaking": r["names_leaking"],
            "verdict": verdict_words(r, now),
            "time_to_enforce": time_to_enforce(r),
            "time_to_enforce_bound": not enforcement_watched(r),
        }
    enforced = sum(r["enforced"] for r in rows)
    leaking = sum(r["leaking"] for r in rows)
    verdicts = [verdict_words(r, now) for r in rows]
    effective = [r["effective"] for r in rows if r["effective"] is not None]
    due = [r["due"] for r in rows if r["due"] is not None]
    return {
        "order": order,
        "transports": transports,
        "rows": [
            {"country": c, "name": n, "kind": k, "cells": [by_t.get(t) for t in transports]}
            for (c, n, k), by_t in sorted(cells.items())
        ],
        "share": _share(enforced, leaking),
        "enforced": enforced,
        "series": enforced + leaking,
        "names_leaking": max((r["names_leaking"] for r in rows), default=0),
        "missed": verdicts.count("missed"),
        "met": verdicts.count("met"),
        "key_count": len(rows),
        "effective": min(effective) if effective else None,
        "due": max(due) if due else None,
    }


def _timeline_chart(
    history: list[dict[str, Any]], order: dict[str, Any], now: float
) -> dict[str, Any] | None:
    """The order's enforcement share over time as a step line (SVG coordinates), from the recorded
    changes of every key: at each change, enforced / (enforced + leaking) over all keys."""
    if not history:
        return None
    first = float(history[0]["time"])
    effective = order["effective"]
    # From the order's effective instant when that leaves room for what was measured: an order
    # that took effect months before its first measurement would squeeze the line to a sliver.
    near = effective is not None and first - effective <= now - first
    start = max(min(first, effective) if near else first, now - TIMELINE_SPAN)
    span = max(now - start, 1.0)

    def x(t: float) -> float:
        return round(CHART_W * (max(t, start) - start) / span, 1)

    def y(share: float) -> float:
        return round(CHART_H - CHART_H * share, 1)

    state: dict[tuple[str, str, str], tuple[int, int]] = {}
    points: list[tuple[float, float]] = []
    last: float | None = None
    for i, h in enumerate(history):
        state[(h["country"], h["resolver"], h["transport"])] = (h["enforced"], h["leaking"])
        if i + 1 < len(history) and history[i + 1]["time"] == h["time"]:
            continue  # one pass's changes are one step
        share = _share(sum(e for e, _ in state.values()), sum(lk for _, lk in state.values()))
        if share is None or share == last:
            continue
        if last is not None:
            points.append((x(h["time"]), y(last)))
        points.append((x(h["time"]), y(share)))
        last = share
    if last is None:
        return None
    points.append((float(CHART_W), y(last)))
    due = order["due"]
    return {
        "points": " ".join(f"{px:g},{py:g}" for px, py in points),
        "due_x": x(due) if due is not None and start <= due <= now else None,
        "start": start,
        "last": int(last * 100),
        "w": CHART_W,
        "h": CHART_H,
    }


def _row_order(row: tuple[str, str, str], by_t: dict[str, Cell]) -> tuple[Any, ...]:
    worst = min(
        (("leak", "overblock", "inconclusive", "fine", "none").index(c.worst) for c in by_t.values()),
        default=9,
    )
    return (row[0], worst, row[1])


def _bar(totals: dict[str, int]) -> list[dict[str, Any]]:
    """Segments of a 100-unit stacked bar of every current series by finding (an inline SVG)."""
    total = sum(totals.values())
    out, x = [], 0.0
    for f in FINDINGS:
        if not totals[f] or not total:
            continue
        w = 100 * totals[f] / total
        out.append({"finding": f, "x": round(x, 3), "w": round(w, 3), "n": totals[f]})
        x += w
    return out


def evidence_url(probe: str, resolver: str, transport: str, qtype: str, domain: str) -> str:
    q = {"probe": probe, "resolver": resolver, "transport": transport, "qtype": qtype, "domain": domain}
    return "/evidence?" + urlencode(q)


def _signature(m: dict[str, Any]) -> tuple[Any, ...]:
    return (
        m.get("outcome"),
        m.get("finding"),
        m.get("rcode"),
        tuple(m.get("answers") or ()),
        tuple(e.get("code") for e in m.get("ede") or ()),
        m.get("error"),
    )


def runs_of(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest-first rows collapsed into runs of identical results: (first seen, last seen, count)."""
    runs: list[dict[str, Any]] = []
    for m in rows:
        sig = _signature(m)
        if runs and runs[-1]["sig"] == sig:
            runs[-1]["first"] = m["time"]
            runs[-1]["count"] += 1
        else:
            runs.append(
                {"sig": sig, "first": m["time"], "last": m["time"], "count": 1, "row": m, "said": said(m)}
            )
    return runs


_REACH_WORDS = {
    "reachable": "the site itself (a certificate valid for the name)",
    "http_451": "HTTP 451 Unavailable For Legal Reasons",
    "blockpage": "a block page",
    "tls_error": "no valid certificate anywhere (the site's own fault)",
    "unreachable": "nothing: no connection or handshake in time",
    "unchecked": "",
}


# What a user would meet, in a word or two for the status page's problem rows.
_REACH_SHORT = {
    "reachable": "the site itself (a valid certificate)",
    "http_451": "HTTP 451 (Unavailable For Legal Reasons)",
    "blockpage": "a block page",
    "tls_error": "no valid certificate",
    "unreachable": "no connection",
    "unchecked": "not checked",
}
# A leak at which every probe that checked met one of these delivers nothing of the site.
_LEAKS_NOTHING = frozenset({"http_451", "unreachable", "blockpage"})


def reach_said(finding: str, by_reach: dict[str, list[str]]) -> str:
    """What users of a problem row's answer would meet, per probe when the probes disagree:
    a DNS leak that leads nowhere says that it leaks nothing."""
    if not by_reach or set(by_reach) == {"unchecked"}:
        return _REACH_SHORT["unchecked"]
    order = list(_REACH_SHORT)
    ranked = sorted(by_reach.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    several = len(ranked) > 1
    text = "; ".join(
        _REACH_SHORT.get(r, r) + (f" from {', '.join(sorted(probes))}" if several else "")
        for r, probes in ranked
    )
    if finding == "leak" and set(by_reach) <= _LEAKS_NOTHING:
        return f"leaks nothing: {text}"
    if finding == "leak" and set(by_reach) == {"reachable"}:
        return f"a proven leak: {text}"
    return text


def checks_of(m: dict[str, Any]) -> list[dict[str, str]]:
    """The answer checks a measurement logged (its answer's addresses, then the control's), as
    text for the evidence page; whatever is not a check is left out."""
    ev = m.get("evidence")
    out: list[dict[str, str]] = []
    if not isinstance(ev, dict):
        return out
    for whose, key in (("answer", "answer_checks"), ("control", "control_checks")):
        checks = ev.get(key)
        for c in checks[:64] if isinstance(checks, list) else []:
            if not isinstance(c, dict):
                continue
            cert = c.get("cert") if isinstance(c.get("cert"), dict) else {}
            assert isinstance(cert, dict)
            names = cert.get("names") if isinstance(cert.get("names"), list) else []
            assert isinstance(names, list)
            seen = []
            if cert:
                seen.append(
                    f"certificate for {', '.join(str(n) for n in names[:5]) or '?'} from {cert.get('issuer')}"
                )
            if c.get("verify_error"):
                seen.append(f"not valid: {c['verify_error']}")
            if c.get("http_code") is not None:
                seen.append(f"HTTP {c['http_code']}" + (f" → {c['location']}" if c.get("location") else ""))
            if c.get("error"):
                seen.append(str(c["error"]))
            out.append(
                {
                    "whose": whose,
                    "address": str(c.get("address", "")),
                    "status": str(c.get("status", "")),
                    "seen": "; ".join(seen),
                    "time": str(c.get("time", "")) + (" (cached)" if c.get("cached") is True else ""),
                }
            )
    return out


def _same_as_control(m: dict[str, Any]) -> bool:
    control = m.get("control")
    return (
        isinstance(control, dict)
        and bool(m.get("answers"))
        and (sorted(control.get("answers") or []) == sorted(m.get("answers") or []))
    )


def _block_words(m: dict[str, Any]) -> str:
    """Why an answer counts as a block, in words."""
    outcome = m.get("outcome")
    if outcome == "ede_blocked":
        codes = ", ".join(str(e.get("code")) for e in m.get("ede") or [])
        return f"with a policy Extended DNS Error (EDE {codes}), a block"
    if outcome == "sinkhole":
        sink = m.get("sinkhole") or {}
        return (
            f"with a block page or sinkhole ({sink.get('match')}, matched by {sink.get('source')}), a block"
        )
    if outcome in ("nxdomain", "nodata", "refused"):
        return f"{_OUTCOME_WORDS[str(outcome)]} while the control has records for it, a block"
    if outcome == "timeout":
        return "nothing, while it kept answering later questions (the silence was proven), a block"
    return _OUTCOME_WORDS.get(str(outcome), str(outcome))


def _expectation(m: dict[str, Any], why: dict[str, Any], expected: Any) -> str:
    """What was expected of the name here, and on whose word."""
    if "order" in why and expected == "blocked":
        rule = f"Order {why['order']}" + (f" ({why['authority']})" if why.get("authority") else "")
        expectation = f"{rule} requires {m['domain']} to be blocked on this resolver here"
        if why.get("pattern") and why["pattern"] != m["domain"]:
            expectation += f" (pattern {why['pattern']})"
        return expectation
    elif expected == "resolves" and "reason" in why:
        return f"{m['domain']} is named by order {why.get('order')}, which does not bind here: {why['reason']}; so it must resolve"
    elif expected == "resolves" and "list" in why:
        return f"Control list {why['list']} names {m['domain']}: it must resolve everywhere"
    elif expected == "resolves" and "canary" in why:
        return f"{m['domain']} is a canary that must resolve"
    elif expected:
        return f"Expected {expected}" + (f" ({', '.join(f'{k} {v}' for k, v in why.items())})" if why else "")
    else:
        return "Nothing is expected of this name here"


def judgement(m: dict[str, Any]) -> dict[str, Any]:
    """The judgement of one measurement in words: expected, answered, control, why."""
    why = m.get("expected_by") or (m.get("evidence") or {}).get("expected_by") or {}
    expected = m.get("expected")
    finding = m.get("finding")
    blocked = m.get("blocked")
    expectation = _expectation(m, why, expected)
    control = m.get("control")
    if isinstance(control, dict):
        c_answers = control.get("answers") or []
        control_said = (", ".join(c_answers) if c_answers else "") + (
            f" ({control.get('outcome')})" if control.get("outcome") != "resolved" or not c_answers else ""
        )
    else:
        control_said = "no control was asked"
    blocked_words = {True: "a block", False: "not a block", None: "cannot be told"}[blocked]
    reasons = {
        "leak": "The name must be blocked, but the resolver answered with records"
        + (" — the same as the control's, the real site" if _same_as_control(m) else "")
        + ": the block leaks.",
        "overblock": f"The name must resolve, but the resolver answered {_block_words(m)}: this is over-reach.",
        "enforced": f"The name must be blocked, and the resolver answered {_block_words(m)}.",
        "ok": "The name must resolve, and it did.",
        "inconclusive": "Whether this answer is a block cannot be told"
        + (
            f": {(m.get('evidence') or {}).get('inconclusive_reason')}"
            if (m.get("evidence") or {}).get("inconclusive_reason")
            else " (no control records for the name, a failure, or an unproven silence), so it is neither a leak nor an enforcement."
        ),
    }
    ev = m.get("evidence") or {}
    transport = [f"endpoint {m.get('endpoint') or m.get('resolver')}"]
    if ev.get("http_version"):
        transport.append(str(ev["http_version"]))
    if m.get("latency_ms") is not None:
        transport.append(f"latency {m['latency_ms']:g} ms")
    if ev.get("connect_ms") is not None:
        transport.append(f"connection set-up {ev['connect_ms']:g} ms")
    if ev.get("tc_fallback"):
        transport.append("truncated over UDP, retried over TCP")
    if ev.get("injected"):
        transport.append("racing answers seen (possible injection)")
    return {
        "expectation": expectation,
        "said": said(m),
        "blocked": blocked_words,
        "control": control_said,
        "reason": reasons.get(str(finding), "No finding: nothing is expected of this name here."),
        "operator": m.get("operator") or "-",
        "kind": m.get("kind") or "-",
        "nsid": ev.get("nsid") or "-",
        "ede": ", ".join(f"{e.get('code')} {e.get('text') or ''}".strip() for e in m.get("ede") or [])
        or "none",
        "transport": "; ".join(transport),
        "cname": " → ".join(m.get("cname") or []) or "",
        "reach": _REACH_WORDS.get(str(m.get("reach")), str(m.get("reach") or "")),
    }
