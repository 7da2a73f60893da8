"""How measurements leave the probe on a terminal: the answer for people, JSON lines for tools.

The human form leads with the answer (docs/cli.md): a matrix of resolver × transport
with the count of each finding, then only the leaks and overblocks, one entry per
(name, type, resolver, what it answered) with the transports that showed it, so six
transports saying the same thing are one line, not six. Every row is behind `--all`.
Everything fits an 80-column terminal: names are never cut, only the last column wraps.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import IO
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table
from rich.text import Text

from probe.model import Finding, Measurement, Outcome, Transport

__all__ = ["WIDTH", "json_line", "render_answer", "render_rows", "short_resolver", "summary_line"]

WIDTH = 80  # the narrowest terminal people still use; wider terminals get the same layout

# One letter per finding, so that a cell of six transports' counts fits in 80 columns.
_MARK = {
    Finding.LEAK: "L",
    Finding.OVERBLOCK: "O",
    Finding.INCONCLUSIVE: "?",
    Finding.ENFORCED: "✓",
    Finding.OK: "✓",
}
_STYLE = {
    Finding.LEAK: "bold red",
    Finding.OVERBLOCK: "bold magenta",
    Finding.INCONCLUSIVE: "yellow",
    Finding.ENFORCED: "green",
    Finding.OK: "green",
}
_ORDER = [Finding.LEAK, Finding.OVERBLOCK, Finding.INCONCLUSIVE, Finding.ENFORCED, Finding.OK, None]
_NO_RESPONSE = (Outcome.TIMEOUT, Outcome.ERROR)


def json_line(m: Measurement) -> str:
    """One measurement as one line of JSON (docs/measurement.md)."""
    return json.dumps(m.to_json(), separators=(",", ":"), ensure_ascii=False)


def short_resolver(name: str, *, port: bool = False) -> str:
    """A resolver as a person names it: catalogue and lab names as given, a spec by its host.

    The port is left out (a resolver's transports differ only by it) unless asked for.
    """
    if "://" not in name:
        return name.split("#", 1)[0]
    parts = urlsplit(name.split("#", 1)[0])
    host = parts.hostname or name
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if port and parts.port else host


def _names(measurements: Iterable[Measurement]) -> dict[str, str]:
    """resolver → short name; host:port where two resolvers on one host share a transport."""
    specs: dict[tuple[str, Transport], set[str]] = defaultdict(set)
    for m in measurements:
        specs[(short_resolver(m.resolver), m.transport)].add(m.resolver)
    clash = {host for (host, _t), names in specs.items() if len(names) > 1}
    out = {}
    for names in specs.values():
        for n in names:
            short = short_resolver(n)
            out[n] = short_resolver(n, port=True) if short in clash else short
    return out


def _transports(ms: Iterable[Measurement]) -> list[Transport]:
    seen = {m.transport for m in ms}
    return [t for t in Transport if t in seen]


def _console(file: IO[str] | None) -> Console:
    console = Console(file=file, width=WIDTH, soft_wrap=False, highlight=False)
    return console


# Without an expectation there is no finding; the cell then says what the answers were.
_BARE = {
    "b": ("looks blocked", "magenta"),
    "r": ("resolves", "cyan"),
    "x": ("no answer", "yellow"),
    "-": ("cannot tell", "dim"),
}


def _bare(m: Measurement) -> str:
    if m.outcome in _NO_RESPONSE:
        return "x"
    return {True: "b", False: "r", None: "-"}[m.blocked]


def _cell(ms: Sequence[Measurement]) -> tuple[Text, set[str]]:
    """A matrix cell: counts of each finding, worst first (and the marks it used, for the legend)."""
    counts: Counter[str] = Counter()
    for m in ms:
        if m.finding is None:
            counts[_bare(m)] += 1
        else:
            counts[_MARK[m.finding]] += 1
    text = Text()
    order = [(_MARK[f], _STYLE[f]) for f in (Finding.LEAK, Finding.OVERBLOCK, Finding.INCONCLUSIVE)]
    order += [("✓", "green")] + [(mark, style) for mark, (_w, style) in _BARE.items()]
    used = set()
    for mark, style in order:
        if counts[mark]:
            if text:
                text.append(" ")
            text.append(f"{counts[mark]}{mark}", style=style)
            used.add(mark)
    return text, used


def _answered(m: Measurement, *, brief: bool = False) -> str:
    """What the resolver said, in a few words: outcome, rcode, EDE, the block-page match."""
    if m.outcome in _NO_RESPONSE:
        return f"{m.outcome}" + (f" ({m.error})" if m.error else "")
    bits = []
    if m.sinkhole:
        # The block page itself says more than the addresses that led to it.
        source = "" if brief else f" [{m.sinkhole.get('source', '')}]"
        bits.append(f"block page {m.sinkhole.get('match', '')}{source}")
    elif m.answers:
        bits.append(", ".join(m.answers[:3]) + (", …" if len(m.answers) > 3 else ""))
    if m.outcome not in (Outcome.RESOLVED, Outcome.SINKHOLE) or not (m.answers or m.sinkhole):
        shown_rcode = m.rcode and m.rcode not in ("NOERROR", str(m.outcome).upper())
        bits.append(f"{m.outcome}" + (f" ({m.rcode})" if shown_rcode else ""))
    for e in m.ede:
        bits.append(f"EDE {e.code}" + (f" {e.text!r}" if e.text else ""))
    if m.evidence.get("injected"):
        bits.append("racing answers seen")
    return "; ".join(bits)


def _why(m: Measurement) -> str:
    by = m.evidence.get("expected_by")
    if isinstance(by, dict):
        for key in ("order", "list", "option", "canary"):
            if by.get(key):
                return f"{key} {by[key]}"
    return ""


def render_answer(measurements: Sequence[Measurement], file: IO[str] | None = None) -> None:
    """The summary matrix, then each leak and overblock (and what kept findings inconclusive)."""
    console = _console(file)
    names = _names(measurements)
    used = _print_matrix(console, measurements, names)
    _print_legend(console, measurements, used)
    _print_problems(console, measurements, names)
    _print_inconclusive(console, measurements)


def _print_matrix(console: Console, measurements: Sequence[Measurement], names: dict[str, str]) -> set[str]:
    """Resolver × transport counts; returns the marks used, for the legend."""
    by_resolver: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_resolver[names[m.resolver]].append(m)
    transports = _transports(measurements)
    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, header_style="bold", show_edge=False)
    table.add_column("resolver", no_wrap=True, max_width=22, overflow="ellipsis")
    for t in transports:
        table.add_column(str(t))  # a crowded cell wraps at its spaces rather than lose a count
    used: set[str] = set()
    for name, ms in sorted(by_resolver.items()):
        cells = []
        for t in transports:
            text, marks = _cell([m for m in ms if m.transport is t])
            cells.append(text)
            used |= marks
        table.add_row(name, *cells)
    console.print(table)
    return used


def _print_legend(console: Console, measurements: Sequence[Measurement], used: set[str]) -> None:
    legend = [
        (_MARK[Finding.LEAK], "leak", _STYLE[Finding.LEAK]),
        (_MARK[Finding.OVERBLOCK], "overblock", _STYLE[Finding.OVERBLOCK]),
        (_MARK[Finding.INCONCLUSIVE], "inconclusive", _STYLE[Finding.INCONCLUSIVE]),
        ("✓", "as expected", "green"),
    ]
    legend += [(mark, words, style) for mark, (words, style) in _BARE.items()]
    parts: list[str | tuple[str, str]] = []
    for mark, words, style in legend:
        if mark in used:
            parts += [(mark, style), f" {words}  "]
    if any(m.finding is None for m in measurements):
        parts.append("(nothing expected)")
    console.print(Text.assemble(*parts), overflow="fold")


def _print_problems(console: Console, measurements: Sequence[Measurement], names: dict[str, str]) -> None:
    for finding, title in (
        (Finding.LEAK, "must be blocked here, but resolves"),
        (Finding.OVERBLOCK, "must resolve, but is blocked"),
    ):
        problems = [m for m in measurements if m.finding is finding]
        if not problems:
            continue
        console.print()
        console.print(
            Text(
                f"{len(problems)} {finding}{'s' if len(problems) != 1 else ''}: {title}",
                style=_STYLE[finding],
            )
        )
        for line in _grouped(problems, names):
            console.print(Text(line), overflow="fold")
    for mark, title in (("b", "look like blocks"), ("x", "got no answer")):
        bare = [m for m in measurements if m.finding is None and _bare(m) == mark]
        if not bare:
            continue
        console.print()
        console.print(
            Text(f"{len(bare)} {title} (nothing was expected of these names)", style=_BARE[mark][1])
        )
        for line in _grouped(bare, names):
            console.print(Text(line), overflow="fold")


def _print_inconclusive(console: Console, measurements: Sequence[Measurement]) -> None:
    inconclusive = [m for m in measurements if m.finding is Finding.INCONCLUSIVE]
    if inconclusive:
        console.print()
        reasons = Counter(_answered(m).split(" (")[0] for m in inconclusive)
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(4))
        for line in textwrap.wrap(
            f"{len(inconclusive)} inconclusive (cannot tell whether blocked): {top}",
            WIDTH,
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        ):
            console.print(Text(line, style=_STYLE[Finding.INCONCLUSIVE]))


def _grouped(problems: Sequence[Measurement], names: dict[str, str]) -> list[str]:
    """One entry per name × type × resolver × answer, with every transport that showed it."""
    groups: dict[tuple[str, str, str, str, str], list[Measurement]] = defaultdict(list)
    for m in problems:
        groups[(names[m.resolver], m.domain, m.qtype, _answered(m), _why(m))].append(m)
    lines = []
    for (resolver, domain, qtype, answered, why), ms in sorted(groups.items()):
        ts = _transports(ms)
        over = "every transport" if len(ts) == len(Transport) else " ".join(str(t) for t in ts)
        head = f"  {domain} {qtype} on {resolver} over {over}"
        said = f"got {answered}" if ms[0].outcome in _NO_RESPONSE else f"answered {answered}"
        tail = said + (f"; {why}" if why else "")
        for text, indent in ((head, "      "), (tail, "      ")):
            first = "  " if text is head else "    "
            lines.extend(
                textwrap.wrap(
                    text.strip(),
                    WIDTH,
                    initial_indent=first,
                    subsequent_indent=indent,
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
    return lines


def render_rows(measurements: Iterable[Measurement], file: IO[str] | None = None) -> None:
    """Every row (`--all`), grouped by resolver; only the answer column wraps."""
    console = _console(file)
    measurements = list(measurements)
    names = _names(measurements)
    by_resolver: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_resolver[names[m.resolver]].append(m)
    for name, ms in sorted(by_resolver.items()):
        first = ms[0]
        about = ", ".join(x for x in (first.kind, first.operator) if x)
        console.print()
        console.print(Text(name + (f" ({about})" if about else ""), style="bold"), overflow="fold")
        table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, header_style="bold", show_edge=False)
        for col in ("name", "type", "via", "outcome", "finding"):
            table.add_column(col, no_wrap=True)
        table.add_column("answer", overflow="fold", ratio=1, min_width=12)
        for m in sorted(ms, key=lambda m: (m.domain, m.qtype, list(Transport).index(m.transport))):
            style = _STYLE.get(m.finding) if m.finding else None
            table.add_row(
                m.domain,
                m.qtype,
                str(m.transport),
                str(m.outcome),
                Text(str(m.finding) if m.finding else "-", style=style or ""),
                _answered(m, brief=True) or "-",
            )
        console.print(table)


def summary_line(measurements: Iterable[Measurement]) -> str:
    """`N measurements: a enforced, b leak, …`, in a fixed order; unjudged ones by what they got."""
    ms = list(measurements)
    counts = Counter(m.finding for m in ms)
    parts = [f"{counts[f]} {f}" for f in Finding if counts[f]]
    bare = Counter(_bare(m) for m in ms if m.finding is None)
    parts += [f"{bare[mark]} {words}" for mark, (words, _style) in _BARE.items() if bare[mark]]
    noun = "measurement" if len(ms) == 1 else "measurements"
    return f"{len(ms)} {noun}" + (": " + ", ".join(parts) if parts else "")
