"""How measurements leave the probe on a terminal: a table for people, JSON lines for tools."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from probe.model import Finding, Measurement

__all__ = ["json_line", "render_table", "summary_line"]

_FINDING_STYLE = {
    Finding.LEAK: "bold red",
    Finding.OVERBLOCK: "bold magenta",
    Finding.ENFORCED: "green",
    Finding.OK: "green",
    Finding.INCONCLUSIVE: "yellow",
}


def json_line(m: Measurement) -> str:
    """One measurement as one line of JSON (CONTRACTS.md section 3)."""
    return json.dumps(m.to_json(), separators=(",", ":"), ensure_ascii=False)


def _answers(m: Measurement) -> str:
    if m.error:
        return m.error
    parts = list(m.answers[:3]) + (["…"] if len(m.answers) > 3 else [])
    text = ", ".join(parts)
    if m.ede:
        text = (text + " " if text else "") + " ".join(
            f"EDE {e.code}" + (f" {e.text!r}" if e.text else "") for e in m.ede
        )
    if m.sinkhole:
        text += f"  [{m.sinkhole['source']}]"
    if m.evidence.get("injected"):
        text += "  [racing answers seen]"
    if m.evidence.get("tc_fallback"):
        text += "  [TC=1, retried over tcp]"
    return text or "-"


def render_table(measurements: Iterable[Measurement], file: IO[str] | None = None) -> None:
    """A row per domain × resolver × transport × qtype; leaks and overblocks stand out."""
    rows = sorted(measurements, key=lambda m: (m.domain, m.resolver, m.transport, m.qtype))
    table = Table(show_lines=False, header_style="bold")
    for col in (
        "domain",
        "qtype",
        "resolver",
        "transport",
        "outcome",
        "blocked",
        "expected",
        "finding",
        "answer",
    ):
        table.add_column(col, overflow="fold")
    for m in rows:
        style = _FINDING_STYLE.get(m.finding) if m.finding else None
        finding = Text(str(m.finding) if m.finding else "-", style=style or "")
        table.add_row(
            m.domain,
            m.qtype,
            m.resolver,
            str(m.transport),
            str(m.outcome),
            {True: "yes", False: "no", None: "?"}[m.blocked],
            str(m.expected) if m.expected else "-",
            finding,
            _answers(m),
            style="on grey11" if m.finding in (Finding.LEAK, Finding.OVERBLOCK) else None,
        )
    console = Console(file=file)
    if not console.is_terminal:
        console.width = 220  # a pipe or a file: do not fold rows to 80 columns
    console.print(table)


def summary_line(measurements: Iterable[Measurement]) -> str:
    counts = Counter(m.finding for m in measurements)
    total = sum(counts.values())
    parts = [f"{counts[f]} {f}" for f in Finding if counts[f]]
    return f"{total} measurements" + (": " + ", ".join(parts) if parts else "")
