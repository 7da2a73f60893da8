"""`probe` on the command line: click's runner and real subprocesses, all against loopback labs."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli import cli as collector_cli
from probe.cli import cli
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone

from .conftest import start_lab, truth_zone

REQUIRED = {
    "domain",
    "qtype",
    "resolver",
    "transport",
    "outcome",
    "blocked",
    "expected",
    "finding",
    "rcode",
    "ede",
    "answers",
    "cname",
    "sinkhole",
    "control",
    "latency_ms",
    "time",
    "error",
    "wire",
}


@pytest.fixture(scope="module")
def isp(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    zone = Zone()
    zone.set("pirate.blockprobe-lab.net", Behaviour(rcode="NXDOMAIN", soa=False))
    zone.set("leaky.blockprobe-lab.net", Behaviour(records={"A": ("93.184.216.34",)}))
    zone.set("*.blockprobe-lab.net", Behaviour(records={"A": ("93.184.216.34",)}))
    return start_lab(lab_thread, zone, "127.53.1.8", lab_ca)


@pytest.fixture(scope="module")
def control(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    return start_lab(lab_thread, truth_zone(), "127.53.1.10", lab_ca, transports=("udp", "tcp"))


def _args(isp: LabServer, control: LabServer, lab_ca: LabCA, *extra: str) -> list[str]:
    s = isp.specs()
    return [
        "once",
        "--json",
        "-t",
        "A",
        "--ca-file",
        str(lab_ca.ca_file),
        "--control",
        control.specs()["udp"],
        "-r",
        s["udp"],
        "-r",
        s["tcp"],
        "-r",
        s["dot"],
        "-r",
        s["doh"],
        "-r",
        s["doq"],
        "--timeout",
        "3",
        "--udp-linger",
        "0",
        "--qps",
        "0",
        *extra,
    ]


def test_enforced_block_exits_0_with_contract_json(isp: LabServer, control: LabServer, lab_ca: LabCA) -> None:
    result = CliRunner().invoke(
        cli, _args(isp, control, lab_ca, "--expect", "blocked", "Pirate.Blockprobe-Lab.NET.")
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 5
    assert {d["transport"] for d in lines} == {"udp", "tcp", "dot", "doh", "doq"}
    for d in lines:
        assert d.keys() >= REQUIRED
        assert d["domain"] == "pirate.blockprobe-lab.net"
        assert (d["outcome"], d["blocked"], d["expected"], d["finding"]) == (
            "nxdomain",
            True,
            "blocked",
            "enforced",
        )
        assert d["control"]["outcome"] == "resolved"
        assert d["rcode"] == "NXDOMAIN"
        assert d["time"].endswith("Z")
        assert d["wire"]


def test_leak_exits_1(isp: LabServer, control: LabServer, lab_ca: LabCA) -> None:
    result = CliRunner().invoke(
        cli, _args(isp, control, lab_ca, "--expect", "blocked", "leaky.blockprobe-lab.net")
    )
    assert result.exit_code == 1
    assert {json.loads(line)["finding"] for line in result.stdout.splitlines()} == {"leak"}


def test_overblock_exits_1(isp: LabServer, control: LabServer, lab_ca: LabCA) -> None:
    result = CliRunner().invoke(
        cli, _args(isp, control, lab_ca, "--expect", "resolves", "pirate.blockprobe-lab.net")
    )
    assert result.exit_code == 1
    assert {json.loads(line)["finding"] for line in result.stdout.splitlines()} == {"overblock"}


def test_human_output_leads_with_the_answer(isp: LabServer, control: LabServer, lab_ca: LabCA) -> None:
    args = [
        a
        for a in _args(isp, control, lab_ca, "--expect", "blocked", "leaky.blockprobe-lab.net")
        if a != "--json"
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "5 measurements: 5 leak"
    # The matrix: one row for the lab resolver (by host, no URL), a column per transport.
    host = isp.specs()["udp"].removeprefix("udp://").split(":")[0]
    assert lines[1].split() == ["resolver", "udp", "tcp", "dot", "doh", "doq"]
    assert lines[2].split() == [host, "1L", "1L", "1L", "1L", "1L"]
    # Five leaks that say the same thing are one entry naming the five transports.
    assert f"  leaky.blockprobe-lab.net A on {host} over udp tcp dot doh doq" in lines
    assert "    answered 93.184.216.34; option --expect" in lines
    assert "://" not in result.stdout
    rows = CliRunner().invoke(cli, [*args, "--all"]).stdout
    assert rows.count("leaky.blockprobe-lab.net") == 1 + 5  # the entry, then every row


def test_exit_3_when_nothing_answers() -> None:
    dead = shlex.split(
        "once -t A -r udp://127.0.0.1:1 --control udp://127.0.0.1:1 --timeout 0.3 --udp-linger 0 --qps 0 example.org"
    )
    result = CliRunner().invoke(cli, dead)
    assert result.exit_code == 3, result.output
    assert "Nothing could be judged" in result.stdout
    assert result.stdout.splitlines()[0] == "1 measurement: 1 no answer"
    assert "1 got no answer (nothing was expected of these names)" in result.stdout


def test_exit_3_when_every_finding_is_inconclusive(isp: LabServer, control: LabServer, lab_ca: LabCA) -> None:
    # NXDOMAIN for a name the control does not know either: no evidence of a block.
    args = _args(isp, control, lab_ca, "--no-control", "--expect", "blocked", "pirate.blockprobe-lab.net")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.output
    assert {json.loads(line)["finding"] for line in result.stdout.splitlines()} == {"inconclusive"}


def test_exit_0_when_answers_come_but_nothing_is_expected(
    isp: LabServer, control: LabServer, lab_ca: LabCA
) -> None:
    result = CliRunner().invoke(cli, _args(isp, control, lab_ca, "leaky.blockprobe-lab.net"))
    assert result.exit_code == 0, result.output
    assert {json.loads(line)["finding"] for line in result.stdout.splitlines()} == {None}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-r", "tls//x", "a.org"],
            "probe: 'tls//x' is not a resolver spec: expected SCHEME://HOST[:PORT] or HOST[:PORT]",
        ),
        (
            ["-r", "udp://127.0.0.1", "bad name.org"],
            "probe: 'bad name.org' is not a domain name: it holds characters a host name cannot",
        ),
        (
            ["-r", "udp://127.0.0.1", "-t", "MX", "a.org"],
            "probe: 'MX' is not a query type this probe asks (one of A, AAAA, HTTPS)",
        ),
        (
            ["-r", "udp://127.0.0.1", "--country", "ITA", "a.org"],
            "probe: --country: 'ITA' is not an ISO 3166-1 alpha-2 code",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["once", *args])
    assert result.exit_code == 2
    assert result.stderr.strip() == message
    assert result.stdout == ""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "probe.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_probe_once_ends_within_its_stated_bound_whatever_the_servers_do(
    lab_thread: LabThread, lab_ca: LabCA, control: LabServer
) -> None:
    """README: `probe once` ends within `confirm_after` plus twice `--timeout` (plus the rate
    limits) whatever the servers do: here a silent name and a reply dripped a byte at a time,
    on all six transports at once, in a real process (interpreter start included)."""
    zone = Zone()
    zone.set("ok.blockprobe-lab.net", Behaviour(records={"A": ("93.184.216.34",)}))
    zone.set("silent.blockprobe-lab.net", Behaviour(action="drop"))
    zone.set(
        "slow.blockprobe-lab.net",
        Behaviour(records={"A": ("93.184.216.34",)}, action="drip", drip_interval=0.3),
    )
    hostile = start_lab(lab_thread, zone, "127.53.1.12", lab_ca)
    try:
        resolvers = [a for spec in hostile.specs().values() for a in ("-r", spec)]
        timeout, confirm_after = 1.0, 2.0
        args = ["once", "--json", "-t", "A", "--ca-file", str(lab_ca.ca_file), "--qps", "0"]
        args += [
            "--timeout",
            str(timeout),
            "--confirm-after",
            str(confirm_after),
            "--control",
            control.specs()["udp"],
        ]
        names = ["ok.blockprobe-lab.net", "silent.blockprobe-lab.net", "slow.blockprobe-lab.net"]
        start = time.monotonic()
        result = _run(*args, *resolvers, *names)
        took = time.monotonic() - start
    finally:
        lab_thread.stop_server(hostile)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 * len(hostile.specs()), result.stderr
    # Every transport really talked to the lab (a handshake failure would prove nothing here).
    assert {m["transport"] for m in lines if m["outcome"] == "resolved"} == set(hostile.specs())
    # Over streams the dripped reply never completes in time: a timeout or an error, never a
    # block (over UDP the lab answers it whole).
    slow = {(m["transport"], m["blocked"]) for m in lines if m["domain"].startswith("slow.")}
    assert slow == {("udp", False)} | {(t, None) for t in ("tcp", "dot", "doh", "doh3", "doq")}
    # Two seconds for starting Python and importing the probe on a loaded machine.
    assert took < confirm_after + 2 * timeout + 2.0, took


def test_subprocess_exit_codes(isp: LabServer, control: LabServer, lab_ca: LabCA) -> None:
    ok = _run(*_args(isp, control, lab_ca, "--expect", "blocked", "pirate.blockprobe-lab.net"))
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 5
    leak = _run(*_args(isp, control, lab_ca, "--expect", "blocked", "leaky.blockprobe-lab.net"))
    assert leak.returncode == 1
    bad = _run("once", "-r", "ftp://x", "a.org")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "probe: 'ftp://x' is not a resolver spec: unknown scheme 'ftp' (one of udp, tcp, tls, https, h3, quic)"
    ]


def test_resolvers_lists_the_catalogue() -> None:
    result = CliRunner().invoke(cli, ["resolvers", "--json"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["operator"] for r in rows} == {"cloudflare", "google", "quad9", "opendns", "adguard"}
    assert any(r["transport"] == "doq" for r in rows)
    assert sum(r["control"] for r in rows) == len([r for r in rows if r["name"] == "cloudflare"])


def test_demo_runs_offline_and_shows_leaks_and_overblocks() -> None:
    result = _run("demo", "--json")
    assert result.returncode == 1, result.stderr  # leaks and overblocks, as scripted
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    findings = {(r["resolver"], r["domain"], r["qtype"], r["transport"]): r["finding"] for r in rows}
    assert findings[("public-leaky", "calcio-pirata.example", "A", "doh")] == "leak"
    assert findings[("isp-blockpage", "calcio-pirata.example", "A", "udp")] == "enforced"
    assert findings[("isp-blockpage", "calcio-pirata.example", "AAAA", "doq")] == "leak"
    assert findings[("isp-blockpage", "drive.usercontent.google.example", "A", "dot")] == "overblock"
    assert findings[("public-censor", "streaming-illegale.example", "A", "tcp")] == "enforced"
    assert findings[("isp-nxdomain", "wikipedia.example", "HTTPS", "udp")] == "ok"
    assert all(r["endpoint"].split("://")[1].startswith("127.53.0.") for r in rows)


def test_demo_fits_80_columns_and_answers_first() -> None:
    result = _run("demo")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    assert len(lines) < 60  # the answer fits a screen: not 288 rows (a layout goal, not a count)
    # Exactly the problems, each merged across the transports that showed it: 8 leaks, 1 overblock.
    assert sum(line.endswith(" over every transport") for line in lines) == 8 + 1
    assert lines[7] == "288 measurements: 96 enforced, 48 leak, 6 overblock, 138 ok"
    # Cells of four kinds do not fit beside the names: each name on its line, its cells below.
    assert lines[8] == "resolver"
    assert lines[9].split() == ["udp", "tcp", "dot", "doh", "doh3", "doq"]
    matrix = {lines[i]: lines[i + 1].split() for i in range(10, 18, 2)}
    assert matrix["public-leaky"] == ["6L", "6✓"] * 6
    assert matrix["isp-blockpage"] == ["2L", "1O", "4E", "5✓"] * 6
    assert "  calcio-pirata.example A on public-leaky over every transport" in lines
    assert "  drive.usercontent.google.example A on isp-blockpage over every transport" in lines
    # No word is broken across lines: every wrapped line is whole words of the entry.
    assert "    answered block page 83.224.65.74 [cl.dns_nat_it_agcom_block" in lines
    every = _run("demo", "--all").stdout.splitlines()
    assert not [line for line in every if len(line) > 80]
    # --all adds one row per measurement (288); the name's rows are 3 types × 6 transports × 4
    # lab resolvers, and it is named 4 times more in the leaks above the rows.
    assert sum(line.startswith("calcio-pirata.example ") for line in every) == 3 * 6 * 4
    assert sum("calcio-pirata.example" in line for line in every) == 3 * 6 * 4 + 4
    assert sum(re.match(r"[a-z0-9.-]+\.example ", line) is not None for line in every) == 288


def _occupied(port: int) -> socket.socket | None:
    """Hold a loopback port (None when someone else already holds it: busy either way)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


def test_collector_serve_on_a_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    (tmp_path / "c.yaml").write_text(f"listen: 127.0.0.1:{port}\nstate_dir: {tmp_path / 'state'}\n")
    try:
        cmd = [sys.executable, "-m", "collector.cli", "serve", "--config", str(tmp_path / "c.yaml")]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"collector: listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_collector_serve_needs_no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default state_dir is relative to where it runs
    holder = _occupied(8478)  # the default listen address, held so that serve stops at the bind
    try:
        result = CliRunner().invoke(collector_cli, ["serve"])
    finally:
        if holder is not None:
            holder.close()
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("collector: listen: cannot listen on 127.0.0.1:8478: ")
    assert (tmp_path / "collector-state" / "collector.sqlite3").exists()  # the defaults were used


def test_check_config_takes_the_file_as_argument_or_option(tmp_path: Path) -> None:
    bad = tmp_path / "probe.yaml"
    bad.write_text("probe: {id: x}\n")
    as_arg = CliRunner().invoke(cli, ["check-config", str(bad)])
    as_opt = CliRunner().invoke(cli, ["check-config", "--config", str(bad)])
    assert as_arg.exit_code == as_opt.exit_code == 2
    assert as_arg.stderr == as_opt.stderr
    assert as_arg.stderr.startswith("probe: ")
    neither = CliRunner().invoke(cli, ["check-config"])
    assert neither.exit_code == 2
    assert neither.stderr == "probe: check-config: give the config once, as FILE or --config FILE\n"
