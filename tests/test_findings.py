"""Findings end to end: lists × country × resolver × transport × qtype, identity and canaries.

Three lab resolvers: an Italian ISP that blocks by NXDOMAIN on A and AAAA but passes the
HTTPS record (address hints and all) and also blocks a control name; a resolver posing
as Cloudflare that resolves everything and proves its identity; and one posing as
Google whose identity answer is an ISP's address (port 53 intercepted).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from probe.cli import cli
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone

from .conftest import start_lab, truth_zone

D = "blockprobe-lab.net"
REAL = Behaviour(
    records={
        "A": ("93.184.216.34",),
        "AAAA": ("2606:2800:220:1::248",),
        "HTTPS": ('1 . alpn="h2" ipv4hint=93.184.216.34',),
    }
)
LISTS = "tests/lists/lab-orders.yaml"


def _isp() -> Zone:
    zone = Zone(nsid="isp-it-1")
    zone.set(f"*.{D}", REAL)
    nx = Behaviour(rcode="NXDOMAIN")
    for name in (f"pirate.{D}", f"www.calcio.{D}", f"drive.{D}"):
        zone.set(name, nx, "A")
        zone.set(name, nx, "AAAA")
        zone.set(name, REAL, "HTTPS")  # the HTTPS record and its hints pass: a leak route
    zone.set(f"dead.{D}", nx)
    return zone


def _posing_cloudflare() -> Zone:
    zone = Zone()
    zone.set(f"*.{D}", REAL)
    zone.set(f"dead.{D}", Behaviour(rcode="NXDOMAIN"))
    zone.set("whoami.cloudflare", Behaviour(records={"TXT": ('"198.51.100.7"',)}), "TXT")
    return zone


def _posing_google() -> Zone:
    zone = _posing_cloudflare()
    zone.set(
        "o-o.myaddr.l.google.com", Behaviour(records={"TXT": ('"151.99.125.2"',)}), "TXT"
    )  # an ISP's address
    return zone


@pytest.fixture(scope="module")
def labs(lab_thread: LabThread, lab_ca: LabCA) -> dict[str, LabServer]:
    return {
        "isp": start_lab(lab_thread, _isp(), "127.53.1.11", lab_ca, transports=("udp", "tcp", "dot", "doh")),
        "cf": start_lab(lab_thread, _posing_cloudflare(), "127.53.1.3", lab_ca, transports=("udp", "tcp")),
        "gg": start_lab(lab_thread, _posing_google(), "127.53.1.4", lab_ca, transports=("udp",)),
        "control": start_lab(lab_thread, truth_zone(), "127.53.1.9", lab_ca, transports=("udp",)),
    }


def _run(
    labs: dict[str, LabServer], lab_ca: LabCA, *extra: str
) -> tuple[int, dict[tuple[str, str, str, str], Any]]:
    isp, cf, gg = labs["isp"].specs(), labs["cf"].specs(), labs["gg"].specs()
    args = [
        "once",
        "--json",
        "--list",
        LISTS,
        "--ca-file",
        str(lab_ca.ca_file),
        "--timeout",
        "3",
        "--qps",
        "0",
        "--udp-linger",
        "0",
        "--control",
        labs["control"].specs()["udp"],
        "-r",
        isp["udp"] + "#kind=isp,operator=tim",
        "-r",
        isp["dot"] + "#kind=isp,operator=tim",
        "-r",
        isp["doh"] + "#kind=isp,operator=tim",
        "-r",
        cf["udp"] + "#kind=public,operator=cloudflare",
        "-r",
        cf["tcp"] + "#kind=public,operator=cloudflare",
        "-r",
        gg["udp"] + "#kind=public,operator=google",
        *extra,
    ]
    result = CliRunner().invoke(cli, args)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    who = {
        isp["udp"]: "isp",
        isp["dot"]: "isp",
        isp["doh"]: "isp",
        cf["udp"]: "cf",
        cf["tcp"]: "cf",
        gg["udp"]: "gg",
    }
    table = {
        (
            who[r["resolver"].split("#")[0]],
            r["transport"],
            r["domain"].split(".")[0] if r["domain"] != f"www.calcio.{D}" else "calcio",
            r["qtype"],
        ): r
        for r in rows
    }
    return result.exit_code, table


# who, transport, name, qtype → finding, for a probe in Italy
ITALY = [
    ("isp", "udp", "pirate", "A", "enforced"),
    ("isp", "dot", "pirate", "AAAA", "enforced"),
    ("isp", "doh", "pirate", "HTTPS", "leak"),  # the HTTPS record's hints pass while A/AAAA are blocked
    ("isp", "udp", "calcio", "A", "enforced"),  # *.calcio: probed as www.calcio
    ("isp", "udp", "drive", "A", "overblock"),  # a control name blocked
    ("isp", "udp", "wiki", "A", "ok"),
    ("isp", "udp", "dead", "A", "inconclusive"),  # NXDOMAIN for the control too: a dead name
    ("cf", "udp", "pirate", "A", "leak"),  # the order addresses Cloudflare, which resolves
    ("cf", "tcp", "pirate", "AAAA", "leak"),
    ("cf", "udp", "wiki", "A", "ok"),
    ("gg", "udp", "pirate", "A", "inconclusive"),  # answered by someone other than Google
]


@pytest.fixture(scope="module")
def italy(labs: dict[str, LabServer], lab_ca: LabCA) -> tuple[int, dict[tuple[str, str, str, str], Any]]:
    return _run(labs, lab_ca, "--country", "IT")


@pytest.mark.parametrize(("who", "transport", "name", "qtype", "finding"), ITALY)
def test_findings_in_italy(
    italy: tuple[int, dict[tuple[str, str, str, str], Any]],
    who: str,
    transport: str,
    name: str,
    qtype: str,
    finding: str,
) -> None:
    code, table = italy
    row = table[(who, transport, name, qtype)]
    assert row["finding"] == finding, row
    assert code == 1


def test_reasons_are_kept(italy: tuple[int, dict[tuple[str, str, str, str], Any]]) -> None:
    _, table = italy
    assert table[("isp", "udp", "pirate", "A")]["expected_by"]["order"] == "agcom-lab-1"
    assert table[("isp", "udp", "drive", "A")]["expected_by"] == {"list": "controls", "pattern": f"drive.{D}"}
    gg = table[("gg", "udp", "pirate", "A")]
    assert gg["intercepted"] is True
    assert gg["evidence"]["identity"]["answers"] == ["151.99.125.2"]
    assert gg["evidence"]["inconclusive_reason"] == "answered by someone other than google"
    cf = table[("cf", "udp", "pirate", "A")]
    assert cf["intercepted"] is False
    assert cf["evidence"]["identity"]["ok"] is True
    assert "identity" not in table[("isp", "udp", "pirate", "A")]["evidence"]  # no operator to check


def test_from_france_the_italian_blocks_are_overblocks(labs: dict[str, LabServer], lab_ca: LabCA) -> None:
    code, table = _run(labs, lab_ca, "--country", "FR")
    assert code == 1
    assert table[("isp", "udp", "pirate", "A")]["finding"] == "overblock"
    assert table[("isp", "udp", "pirate", "A")]["expected_by"]["reason"] == "ordered in IT, not in FR"
    assert table[("cf", "udp", "pirate", "A")]["finding"] == "ok"


def test_failed_canary_makes_the_resolvers_findings_inconclusive(
    labs: dict[str, LabServer], lab_ca: LabCA
) -> None:
    # The ISP blocks drive.*: as a `resolves` canary it fails there, and only there.
    _, table = _run(labs, lab_ca, "--country", "IT", "--canary", f"resolves=drive.{D}")
    isp = table[("isp", "udp", "pirate", "A")]
    assert isp["finding"] == "inconclusive"
    assert isp["evidence"]["inconclusive_reason"] == f"canary drive.{D} should resolve but got nxdomain"
    assert table[("cf", "udp", "pirate", "A")]["finding"] == "leak"


def test_list_and_expect_together_is_bad_usage() -> None:
    result = CliRunner().invoke(cli, ["once", "--list", LISTS, "--expect", "blocked", "a.example"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "probe: --expect and --list cannot be used together"
    result = CliRunner().invoke(cli, ["once", "--list", LISTS, "a.example"])
    assert result.stderr.strip() == "probe: --country is required with --list"


def test_lists_check_cli() -> None:
    ok = CliRunner().invoke(cli, ["lists", "check", "--json", LISTS])
    assert ok.exit_code == 0
    assert json.loads(ok.stdout)["jurisdictions"] == ["IT"]
    bad = CliRunner().invoke(cli, ["lists", "check", "tests/lists/invalid-date.yaml"])
    assert bad.exit_code == 2
    assert (
        bad.stderr
        == "probe: tests/lists/invalid-date.yaml: orders[0].effective: '2026-13-45' is not a date (YYYY-MM-DD)\n"
    )
