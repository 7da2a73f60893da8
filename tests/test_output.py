"""The terminal answer at 80 columns, for real `probe once` and `probe demo` runs against loopback labs.

What can go wrong at 80 columns: a long resolver name cut with an ellipsis, a matrix cell
that holds four kinds of finding wrapping inside the matrix, an answer column folded in the
middle of an address. Each run here has all of them to lay out.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import probe.demo
from probe.cli import cli
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.model import Finding, Measurement, Outcome, Transport
from probe.output import render_answer

from .conftest import start_lab, truth_zone

LONG = "resolver-with-a-rather-long-name-for-a-terminal.isp-example.net"  # 63 characters
V6 = "2606:2800:220:1::248"
NAMES = {
    # ordered blocked, resolves; a name this long leaves the answer column too narrow for V6
    "leak": "leaky.behind-a-long-label.blockprobe-lab.net",
    "enforced": "pirate.blockprobe-lab.net",  # ordered blocked, NXDOMAIN, the control resolves it
    "inconclusive": "dead.blockprobe-lab.net",  # ordered blocked, NXDOMAIN at the control too
    "overblock": "wiki.blockprobe-lab.net",  # a control name, NXDOMAIN here
}
LISTS = f"""\
orders:
  - id: screen-order-1
    authority: AGCOM (test)
    jurisdictions: [IT]
    applies_to: [isp]
    domains: [{NAMES["leak"]}, {NAMES["enforced"]}, {NAMES["inconclusive"]}]
controls:
  - id: controls
    domains: [{NAMES["overblock"]}]
"""


@pytest.fixture(scope="module")
def mixed(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    """An ISP whose every transport shows each finding at once (so a matrix cell holds four kinds)."""
    nx = Behaviour(rcode="NXDOMAIN", soa=False)
    zone = Zone(nsid="screen-isp")
    zone.set(NAMES["leak"], Behaviour(records={"A": ("93.184.216.34",), "AAAA": (V6,)}))
    for name in (NAMES["enforced"], NAMES["inconclusive"], NAMES["overblock"]):
        zone.set(name, nx)
    return start_lab(lab_thread, zone, "127.53.1.11", lab_ca)


@pytest.fixture(scope="module")
def truth(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    return start_lab(lab_thread, truth_zone(), "127.53.1.10", lab_ca, transports=("udp",))


def _words(lines: list[str]) -> list[str]:
    return [w.strip(",;()[]") for line in lines for w in line.split()]


def test_probe_once_all_fits_80_columns_and_breaks_no_name(
    mixed: LabServer, truth: LabServer, lab_ca: LabCA, tmp_path: Path
) -> None:
    (tmp_path / "lists.yaml").write_text(LISTS)
    specs = mixed.specs()
    host, port = specs["udp"].removeprefix("udp://").rsplit(":", 1)
    tcp_port = specs["tcp"].rsplit(":", 1)[1]
    resolvers = [
        # One resolver known by a long host name (reached at the lab's address), one by its address.
        f"udp://{LONG}:{port}#address={host}",
        f"tcp://{LONG}:{tcp_port}#address={host}",
        *(specs[t] for t in ("udp", "tcp", "dot", "doh", "doq")),
    ]
    args = ["once", "--list", str(tmp_path / "lists.yaml"), "--country", "IT", "-t", "A", "-t", "AAAA"]
    args += ["--control", truth.specs()["udp"], "--ca-file", str(lab_ca.ca_file), "--no-identity"]
    args += ["--timeout", "3", "--udp-linger", "0", "--qps", "0", "--all"]
    for r in resolvers:
        args += ["-r", r]
    result = CliRunner().invoke(cli, args, env={"NO_COLOR": "1"})
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert [line for line in lines if len(line) > 80] == []
    # Every finding is there, enforced counted on its own.
    summary = lines[0]
    for finding in ("enforced", "leak", "overblock", "inconclusive"):
        assert re.search(rf"\b\d+ {finding}\b", summary), summary
    # The matrix: the long name whole on a line of its own, its cells below it; the cell of
    # the lab's UDP (four kinds of finding) on one line, not wrapped.
    end = next(i for i, line in enumerate(lines) if line.startswith("L leak"))
    matrix = lines[1:end]
    assert LONG in matrix
    assert "…" not in result.stdout
    row = matrix.index(host)
    assert matrix[row + 1].split()[:4] == ["2L", "2O", "2?", "2E"]  # A and AAAA of each name, over udp
    assert matrix[0] == "resolver"
    assert matrix[1].split() == ["udp", "tcp", "dot", "doh", "doq"]
    legend = " ".join(lines[end : end + 2])
    assert "E enforced (blocked as ordered)" in legend
    assert "? inconclusive" in legend
    # No name, address or resolver broken anywhere: every such word is whole.
    whole = {*NAMES.values(), V6, "93.184.216.34", LONG, host}
    broken = [
        w
        for w in _words(lines)
        if ("blockprobe-lab" in w or "isp-example" in w or w.startswith(("2606", "93.18", "127.53")))
        and w not in whole
    ]
    assert broken == []
    # `--all`: a row per measurement, the leaking AAAA's address whole (below its row if the
    # answer column is too narrow for it).
    assert LONG + " (isp)" in lines
    start = lines.index(host + " (isp)")  # the first group: names sort before letters
    rows = lines[start:]
    # The answer column has no room beside names this long: it goes below, heading and all.
    assert rows[1].split() == ["name", "type", "via", "outcome", "finding"]
    assert rows[2] == "    answer"
    assert sum(NAMES["leak"] in line for line in rows) == 2 * 7  # A and AAAA on 7 endpoints
    assert sum(V6 in line for line in rows) == 7
    assert f"    {V6}" in rows  # on the line below its row, indented
    row_of_v6 = rows.index(f"    {V6}") - 1
    assert rows[row_of_v6].split() == [NAMES["leak"], "AAAA", "udp", "resolved", "leak"]


def test_probe_demo_exits_3_when_its_lab_answers_nothing_it_can_judge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every lab resolver and the control SERVFAIL (an upstream outage): nothing can be judged."""
    real = probe.demo.demo_zones

    def broken() -> dict[str, tuple[str, str, str | None, Zone]]:
        return {
            name: (addr, kind, operator, Zone(default=Behaviour(rcode="SERVFAIL"), nsid=zone.nsid))
            for name, (addr, kind, operator, zone) in real().items()
        }

    monkeypatch.setattr(probe.demo, "demo_zones", broken)
    result = CliRunner().invoke(cli, ["demo", "--timeout", "2"], env={"NO_COLOR": "1"})
    assert result.exit_code == 3, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"288 measurements: 288 inconclusive", lines[7]), lines[7]
    assert "Nothing could be judged: no answers, or every finding inconclusive (exit 3)." in lines
    assert [line for line in lines if len(line) > 80] == []


def test_a_matrix_too_wide_for_one_line_goes_in_groups_of_transports_with_cells_whole() -> None:
    """Hundreds of each finding on six transports: no row of six cells fits 80 columns."""
    base = Measurement(
        *("a.example", "A", "isp-a", Transport.UDP, Outcome.RESOLVED, False, None, None, "NOERROR"),
        *((), (), (), None, None, 1.0, "2026-12-01T00:00:00.000Z", None, None),
    )
    ms = [
        replace(base, domain=f"n{i}.example", transport=t, finding=f)
        for t in Transport
        for f in Finding
        for i in range(100)
    ]
    out = io.StringIO()
    render_answer(ms, out)
    lines = out.getvalue().splitlines()
    assert [line for line in lines if len(line) > 80] == []
    end = next(i for i, line in enumerate(lines) if line.startswith("L leak"))
    matrix = lines[:end]
    heads = [line.split() for line in matrix if line.startswith("  ") and not line.split()[0][0].isdigit()]
    assert len(heads) > 1  # more than one group of transports
    assert [t for group in heads for t in group] == [str(t) for t in Transport]  # each once, in order
    cells = [line for line in matrix if line.startswith("  ") and line.split()[0][0].isdigit()]
    assert all(
        line.split() == ["100L", "100O", "100?", "100E", "100✓"] * (len(line.split()) // 5) for line in cells
    )
    assert sum(len(line.split()) for line in cells) == 5 * len(Transport)
