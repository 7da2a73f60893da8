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
from rich.text import Text

from probe.model import Finding, Measurement, Outcome, Transport

__all__ = ["WIDTH", "json_line", "render_answer", "render_rows", "short_resolver", "summary_line"]

WIDTH = 80  # the narrowest terminal people still use; wider terminals get the same layout

# One mark per finding, so that a cell of six transports' counts fits in 80 columns.
_MARK = {
    Finding.LEAK: "L",
    Finding.OVERBLOCK: "O",
    Finding.INCONCLUSIVE: "?",
    Finding.ENFORCED: "E",
    Finding.OK: "✓",
}
_STYLE = {
    Finding.LEAK: "bold red",
    Finding.OVERBLOCK: "bold magenta",
    Finding.INCONCLUSIVE: "yellow",
    Finding.ENFORCED: "bold green",
    Finding.OK: "green",
}
_WORDS = {
    Finding.LEAK: "leak",
    Finding.OVERBLOCK: "overblock",
    Finding.INCONCLUSIVE: "inconclusive",
    Finding.ENFORCED: "enforced (blocked as ordered)",
    Finding.OK: "ok (resolves as it should)",
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


# Findings worst first, then what the answers were where nothing was expected.
_CELL_ORDER = [(_MARK[f], _STYLE[f]) for f in _ORDER if f is not None]
_CELL_ORDER += [(mark, style) for mark, (_w, style) in _BARE.items()]


def _cell(ms: Sequence[Measurement]) -> tuple[Text, set[str]]:
    """A matrix cell: counts of each finding, worst first (and the marks it used, for the legend)."""
    counts: Counter[str] = Counter()
    for m in ms:
        if m.finding is None:
            counts[_bare(m)] += 1
        else:
            counts[_MARK[m.finding]] += 1
    text = Text()
    used = set()
    for mark, style in _CELL_ORDER:
        if counts[mark]:
            if text:
                text.append(" ")
            text.append(f"{counts[mark]}{mark}", style=style)
            used.add(mark)
    return text, used


def _print(console: Console, line: Text) -> None:
    """One line laid out here to fit WIDTH: Rich must neither wrap nor crop it (a longer one
    holds a single name longer than the terminal, which is shown whole rather than cut)."""
    console.print(line, soft_wrap=True)


def _columns(cells: Sequence[Text], widths: Sequence[int], indent: int = 0) -> Text:
    """Cells padded to their column widths, one space apart; nothing trails the last."""
    line = Text(" " * indent)
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        line.append_text(cell)
        if i < len(cells) - 1:
            line.append(" " * (width - cell.cell_len + 1))
    line.rstrip()
    return line


def _packed(items: Sequence[Text], width: int = WIDTH, indent: int = 0) -> list[Text]:
    """Items two spaces apart, a new line only between items (an item is never split)."""
    lines: list[Text] = []
    line = Text()
    for item in items:
        if line and line.cell_len + 2 + item.cell_len > width:
            lines.append(line)
            line = Text(" " * indent)
        elif line:
            line.append("  ")
        line.append_text(item)
    if line:
        lines.append(line)
    return lines


def _wrapped(text: str, width: int, indent: str = "", subsequent: str | None = None) -> list[str]:
    """Wrapped at spaces only: a name, an address or a token is never broken."""
    return textwrap.wrap(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=indent if subsequent is None else subsequent,
        break_long_words=False,
        break_on_hyphens=False,
    )


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


_INDENT = 2  # the cells under a resolver's name, when the name cannot stand beside them


def _print_matrix(console: Console, measurements: Sequence[Measurement], names: dict[str, str]) -> set[str]:
    """Resolver × transport counts; returns the marks used, for the legend.

    A row is the name, then one cell per transport. When that does not fit WIDTH (a long
    name, or cells that count four kinds of finding), each name stands on its own line
    with its cells below it, and the transports go in as many groups as it takes to fit:
    no cell wraps and no name is cut.
    """
    by_resolver: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_resolver[names[m.resolver]].append(m)
    transports = _transports(measurements)
    used: set[str] = set()
    rows: list[tuple[str, list[Text]]] = []
    for name, ms in sorted(by_resolver.items()):
        cells = []
        for t in transports:
            text, marks = _cell([m for m in ms if m.transport is t])
            cells.append(text)
            used |= marks
        rows.append((name, cells))
    heads = [Text(str(t), style="bold") for t in transports]
    widths = [max([h.cell_len] + [cells[i].cell_len for _n, cells in rows]) for i, h in enumerate(heads)]
    name_width = max([len("resolver")] + [Text(n).cell_len for n, _c in rows])
    if name_width + sum(1 + w for w in widths) <= WIDTH:
        _print(console, _columns([Text("resolver", style="bold"), *heads], [name_width, *widths]))
        for name, cells in rows:
            _print(console, _columns([Text(name), *cells], [name_width, *widths]))
        return used
    groups: list[list[int]] = [[]]
    for i, w in enumerate(widths):
        if groups[-1] and _INDENT + sum(1 + widths[j] for j in groups[-1]) + w > WIDTH:
            groups.append([])
        groups[-1].append(i)
    for group in groups:
        _print(console, Text("resolver", style="bold"))
        _print(console, _columns([heads[i] for i in group], [widths[i] for i in group], _INDENT))
        for name, cells in rows:
            _print(console, Text(name))
            _print(console, _columns([cells[i] for i in group], [widths[i] for i in group], _INDENT))
    return used


def _print_legend(console: Console, measurements: Sequence[Measurement], used: set[str]) -> None:
    legend = [(_MARK[f], _WORDS[f], _STYLE[f]) for f in _ORDER if f is not None]
    legend += [(mark, words, style) for mark, (words, style) in _BARE.items()]
    items = [Text.assemble((mark, style), f" {words}") for mark, words, style in legend if mark in used]
    if any(m.finding is None for m in measurements):
        items.append(Text("(nothing expected)"))
    for line in _packed(items):
        _print(console, line)


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
            _print(console, Text(line))
    for mark, title in (("b", "look like blocks"), ("x", "got no answer")):
        bare = [m for m in measurements if m.finding is None and _bare(m) == mark]
        if not bare:
            continue
        console.print()
        console.print(
            Text(f"{len(bare)} {title} (nothing was expected of these names)", style=_BARE[mark][1])
        )
        for line in _grouped(bare, names):
            _print(console, Text(line))


def _print_inconclusive(console: Console, measurements: Sequence[Measurement]) -> None:
    inconclusive = [m for m in measurements if m.finding is Finding.INCONCLUSIVE]
    if inconclusive:
        console.print()
        reasons = Counter(_answered(m).split(" (")[0] for m in inconclusive)
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(4))
        said = f"{len(inconclusive)} inconclusive (cannot tell whether blocked): {top}"
        for line in _wrapped(said, WIDTH, subsequent="  "):
            _print(console, Text(line, style=_STYLE[Finding.INCONCLUSIVE]))


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
        lines += _wrapped(head.strip(), WIDTH, "  ", "      ")
        lines += _wrapped(tail, WIDTH, "    ", "      ")
    return lines


_MIN_ANSWER = 16  # narrower than this, an answer column would hold a word or two a line


def render_rows(measurements: Iterable[Measurement], file: IO[str] | None = None) -> None:
    """Every row (`--all`), grouped by resolver; only the answer column wraps.

    The answer wraps at its spaces within its column; when a word of it is wider than the
    column (an IPv6 address beside a long name), the whole answer goes on the lines below
    its row, indented, so that no address or name is ever broken.
    """
    console = _console(file)
    measurements = list(measurements)
    names = _names(measurements)
    by_resolver: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_resolver[names[m.resolver]].append(m)
    heads = ["name", "type", "via", "outcome", "finding"]
    for name, ms in sorted(by_resolver.items()):
        first = ms[0]
        about = ", ".join(x for x in (first.kind, first.operator) if x and x != name)
        console.print()
        for line in _wrapped(name + (f" ({about})" if about else ""), WIDTH, subsequent="  "):
            _print(console, Text(line, style="bold"))
        rows = []
        for m in sorted(ms, key=lambda m: (m.domain, m.qtype, list(Transport).index(m.transport))):
            style = _STYLE.get(m.finding) if m.finding else None
            fixed = [
                Text(m.domain),
                Text(m.qtype),
                Text(str(m.transport)),
                Text(str(m.outcome)),
                Text(str(m.finding) if m.finding else "-", style=style or ""),
            ]
            rows.append((fixed, _answered(m, brief=True) or "-"))
        widths = [max([len(h)] + [r[0][i].cell_len for r in rows]) for i, h in enumerate(heads)]
        start = sum(1 + w for w in widths)
        room = WIDTH - start
        header = [Text(h, style="bold") for h in heads]
        if room >= len("answer"):
            _print(console, _columns([*header, Text("answer", style="bold")], [*widths, 0]))
        else:  # the answers all go below their rows: so does the heading
            _print(console, _columns(header, widths))
            _print(console, Text("    answer", style="bold"))
        for fixed, answer in rows:
            lines = _wrapped(answer, room) if room >= _MIN_ANSWER else []
            if lines and all(len(line) <= room for line in lines):
                _print(console, _columns([*fixed, Text(lines[0])], [*widths, 0]))
                for line in lines[1:]:
                    _print(console, Text(" " * start + line))
            else:
                _print(console, _columns(fixed, widths))
                for line in _wrapped(answer, WIDTH, indent="    "):
                    _print(console, Text(line))


def summary_line(measurements: Iterable[Measurement]) -> str:
    """`N measurements: a enforced, b leak, …`, in a fixed order; unjudged ones by what they got."""
    ms = list(measurements)
    counts = Counter(m.finding for m in ms)
    parts = [f"{counts[f]} {f}" for f in Finding if counts[f]]
    bare = Counter(_bare(m) for m in ms if m.finding is None)
    parts += [f"{bare[mark]} {words}" for mark, (words, _style) in _BARE.items() if bare[mark]]
    noun = "measurement" if len(ms) == 1 else "measurements"
    return f"{len(ms)} {noun}" + (": " + ", ".join(parts) if parts else "")
