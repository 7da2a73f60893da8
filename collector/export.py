"""Every current leak or overblock, page by page: `GET /api/v1/findings` (JSON or CSV).

Prometheus gets a capped sample of the per-name series (docs/metrics.md); this is
where the whole list lives, for the rights holder who must act on every name and the ISP
that must fix every one. Pages follow the latest_names index from a cursor (the last
series of the page), so the ten-thousandth page costs what the first does, and a series
that appears or goes between two requests never shifts the others (no offsets).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from collector.pages import decode_cursor, encode_cursor, evidence_url
from collector.report import _iso, cell
from collector.store import Store

__all__ = ["FIELDS", "FindingsPage", "findings_page"]

FIELDS = [
    "probe",
    "region",
    "country",
    "resolver",
    "transport",
    "qtype",
    "domain",
    "finding",
    "order",
    "list",
    "outcome",
    "answers",
    "reach",
    "since",
    "measured",
    "evidence",
]

# The query's filters and the store's columns they narrow.
FILTERS = {
    "country": "country",
    "resolver": "resolver",
    "transport": "transport",
    "probe": "probe_id",
    "order": "rule",
}


@dataclass
class FindingsPage:
    finding: str
    series: int  # every current series with this finding that the filters select
    rows: list[dict[str, Any]]
    next: str | None  # the next page's path and query, or None on the last page

    def json(self) -> bytes:
        body = {"finding": self.finding, "series": self.series, "findings": self.rows, "next": self.next}
        return json.dumps(body, separators=(",", ":")).encode()

    def csv(self) -> bytes:
        out = io.StringIO()
        # CRLF, as RFC 4180 has it: the writer then quotes any cell holding a CR or LF.
        w = csv.DictWriter(out, FIELDS, lineterminator="\r\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: cell(" ".join(v) if k == "answers" else v) for k, v in r.items()})
        return out.getvalue().encode()


def findings_page(
    store: Store,
    since: float,
    finding: str,
    filters: dict[str, str | None],
    after: str | None,
    limit: int,
    fmt: str,
) -> FindingsPage:
    """One page of current `finding` series, `limit` at most, after the cursor `after`.
    ValueError (with the reason) for a cursor this collector did not make."""
    key = None if after is None else decode_cursor(after, 6)
    where = {FILTERS[k]: v for k, v in filters.items() if v is not None}
    found = store.problem_series(since, finding, key, limit + 1, **where)
    more = len(found) > limit
    rows = [_row(p) for p in found[:limit]]
    next_query = None
    if more:
        last = found[limit - 1]
        cursor = encode_cursor([last[k] for k in store.SERIES_ORDER])
        query = {"finding": finding, **{k: v for k, v in filters.items() if v is not None}}
        query.update(limit=str(limit), format=fmt, after=cursor)
        next_query = "/api/v1/findings?" + urlencode(query)
    return FindingsPage(finding, _series(store, since, finding, where), rows, next_query)


def _series(store: Store, since: float, finding: str, where: dict[str, str]) -> int:
    """The true total, from the counts the ingest keeps (no scan of the series)."""
    columns = ("probe_id", "region", "country", "resolver", "transport", "rule", "finding")
    total = 0
    for c in store.counts(since):
        group = dict(zip(columns, c[:7], strict=True))
        if group["finding"] != finding or group["rule"] == "canary":
            continue
        if all(group[column] == value for column, value in where.items()):
            total += int(c[7])
    return total


def _row(p: dict[str, Any]) -> dict[str, Any]:
    kind = p["rule_kind"]
    return {
        "probe": p["probe_id"],
        "region": p["region"],
        "country": p["country"],
        "resolver": p["resolver"],
        "transport": p["transport"],
        "qtype": p["qtype"],
        "domain": p["domain"],
        "finding": p["finding"],
        "order": p["rule"] if kind == "order" else None,
        "list": p["rule"] if kind == "control" else None,
        "outcome": p["outcome"],
        "answers": _answers(p["answers"]),
        "reach": p["reach"] or "unchecked",
        "since": _iso(p["since"]),
        "measured": _iso(p["time"]),
        "evidence": evidence_url(p["probe_id"], p["resolver"], p["transport"], p["qtype"], p["domain"]),
    }


def _answers(text: str) -> Sequence[str]:
    answers = json.loads(text)
    return [str(a) for a in answers] if isinstance(answers, list) else []
