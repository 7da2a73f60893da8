"""`probe run` in `schedule.mode: slices`: the per-name scheduler wired into the daemon, against
the lab resolver and a local collector, on the wall clock (short intervals, waits with deadlines)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from probe.daemon.config import ConfigError, load_config, parse_config
from probe.daemon.run import Daemon
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.lists import ListsError

from .conftest import start_lab, truth_zone
from .fake_collector import FakeCollector, wait_for
from .test_daemon import _Running

D = "blockprobe-lab.net"
TOKEN = "s3cret-token"
FAST = 2.0  # schedule.fast_interval in these tests
FULL = 8.0  # schedule.full_pass
SLICE = 0.5
LISTED = [f"pirate.{D}", f"www.calcio.{D}", f"dead.{D}", f"wiki.{D}", f"drive.{D}"]  # lab-orders.yaml


@pytest.fixture(scope="module")
def isp(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    zone = Zone()
    zone.set(f"*.{D}", Behaviour(records={"A": ("93.184.216.34",)}))
    zone.set(f"pirate.{D}", Behaviour(rcode="NXDOMAIN"))
    zone.set(f"gone.{D}", Behaviour(rcode="NXDOMAIN"))
    return start_lab(lab_thread, zone, "127.53.12.5", lab_ca, transports=("udp", "tcp"))


@pytest.fixture(scope="module")
def control(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    return start_lab(lab_thread, truth_zone(), "127.53.12.6", lab_ca, transports=("udp",))


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    c = FakeCollector(TOKEN)
    yield c
    c.stop()


def _doc(tmp: Path, isp: LabServer, control: LabServer, url: str, lists: Path, **over: Any) -> dict[str, Any]:
    (tmp / "token").write_text(TOKEN + "\n")
    doc: dict[str, Any] = {
        "probe": {"id": "it-sched-1", "region": "it-lab", "country": "IT"},
        "collector": {
            "url": url,
            "token_file": str(tmp / "token"),
            "timeout": 1,
            "rate": 0,
            "retry": {"base": 0.05, "max": 0.3},
        },
        "resolvers": [
            {"spec": isp.specs()["udp"], "kind": "isp", "operator": "tim"},
            {"spec": isp.specs()["tcp"], "kind": "isp", "operator": "tim"},
        ],
        "lists": [str(lists)],
        "controls": [control.specs()["udp"]],
        "schedule": {
            "mode": "slices",
            "slice": SLICE,
            "fast_interval": FAST,
            "full_pass": FULL,
            "push_interval": 0.2,
        },
        "qtypes": ["A"],
        "timeout": 3,
        "udp_linger": 0,
        "confirm_after": 0,
        "qps": 0,
        "state_dir": str(tmp / "state"),
        "verify": {"mode": "off"},  # the lab answers public addresses: no answer checks off loopback
        "log": {"format": "json"},
    }
    doc.update(over)
    return doc


def _write(tmp: Path, doc: dict[str, Any]) -> Path:
    path = tmp / "probe.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _lab_orders(tmp: Path, extra: str = "") -> Path:
    path = tmp / "orders.yaml"
    path.write_text((Path(__file__).parent / "lists" / "lab-orders.yaml").read_text() + extra)
    return path


def _when(result: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(result["time"])


def _by_lane(results: list[dict[str, Any]]) -> dict[tuple[str, str], list[datetime]]:
    out: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for r in results:
        out[(r["domain"], r["transport"])].append(_when(r))
    for times in out.values():
        times.sort()
    return out


def test_every_listed_name_reaches_the_collector_within_full_pass_and_no_faster(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    config = _write(tmp_path, _doc(tmp_path, isp, control, collector.url, _lab_orders(tmp_path)))
    started = datetime.now(UTC)
    run = _Running(config)
    lanes = {(name, t) for name in LISTED for t in ("udp", "tcp")}
    try:
        wait_for(
            lambda: lanes <= set(_by_lane(collector.results())), 3 * FULL, "every name on every endpoint"
        )
        # A second pass, to see the pace: each name once per pass, not once per slice.
        wait_for(lambda: datetime.now(UTC) > started + timedelta(seconds=1.5 * FULL), 3 * FULL, "a pass more")
        wait_for(lambda: run.daemon.spool.depth() == 0, 30, "everything pushed")
        behind = run.daemon.registry.get_sample_value(
            "blockprobe_probe_schedule_behind_seconds",
            {"resolver": isp.specs()["udp"], "endpoint": isp.specs()["udp"]},
        )
        slices = run.daemon.rounds_done
    finally:
        run.stop()
    seen = _by_lane(collector.results())
    assert set(seen) >= lanes
    for lane in lanes:
        assert seen[lane][0] <= started + timedelta(seconds=FULL), f"{lane} first measured after full_pass"
    elapsed = (max(t for times in seen.values() for t in times) - started).total_seconds()
    passes = elapsed / (0.9 * FULL)  # a pass is planned in 90 % of full_pass
    # A leak (www.calcio on this lab) is chased every fast_interval until enforced, whatever
    # its order's age; every other name is measured once per pass.
    leaking = {(r["domain"], r["transport"]) for r in collector.results() if r.get("finding") == "leak"}
    assert (f"www.calcio.{D}", "udp") in leaking
    for lane in lanes:
        # Politeness: a slice every 0.5 s that measured every name would give ~elapsed / 0.5.
        # (A name due within a slice is planned at its start: every fast_interval - slice at most.)
        most = elapsed / (FAST - SLICE) + 2 if lane in leaking else passes + 2
        assert len(seen[lane]) <= most, (lane, len(seen[lane]), passes)
    assert slices > 2 * passes  # slices ran often; each measured only its share
    assert behind is not None
    assert 0 <= behind < FULL


def test_a_new_order_is_measured_within_fast_interval_of_its_effective_instant(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    effective = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    names = [f"fresh1.{D}", f"fresh2.{D}"]
    order = (
        "  - id: ticket-new\n    authority: AGCOM\n    jurisdictions: [IT]\n    applies_to: [isp]\n"
        f"    effective: {effective.isoformat().replace('+00:00', 'Z')}\n    deadline: 30m\n"
        f"    domains: [{', '.join(names)}]\n"
    )
    lists = _lab_orders(tmp_path)
    text = lists.read_text().replace("controls:\n", order + "controls:\n", 1)
    lists.write_text(text)
    run = _Running(_write(tmp_path, _doc(tmp_path, isp, control, collector.url, lists)))
    lanes = {(name, t) for name in names for t in ("udp", "tcp")}

    def after() -> dict[tuple[str, str], list[datetime]]:
        got = _by_lane([r for r in collector.results() if _when(r) >= effective])
        return {k: v for k, v in got.items() if k in lanes}

    try:
        # The names leak (the lab answers them): they stay in the fast lane, measured again
        # every fast_interval; wait for a second measurement on each endpoint.
        wait_for(
            lambda: len(after()) == len(lanes) and all(len(v) >= 2 for v in after().values()),
            30,
            "the new order's names measured twice after it took effect",
        )
        urgent = sum(
            run.daemon.registry.get_sample_value(
                "blockprobe_probe_schedule_fast_lane_names",
                {"resolver": isp.specs()[t], "endpoint": isp.specs()[t]},
            )
            or 0
            for t in ("udp", "tcp")
        )
    finally:
        run.stop()
    seen = after()
    for lane in lanes:
        first, second = seen[lane][:2]
        assert first <= effective + timedelta(seconds=FAST), (
            f"{lane}: first measured {first}, effective {effective}"
        )
        # Due again fast_interval later, started by the next slice (0.5 s), sent within a second.
        assert second - first <= timedelta(seconds=FAST + SLICE + 1.5), (lane, first, second)
    post = [r for r in collector.results() if r["domain"] in names and _when(r) >= effective]
    assert {r["finding"] for r in post} == {"leak"}  # measured as bound by the order, not before it
    assert urgent >= 1


def test_an_order_published_while_running_is_chased_from_when_it_is_loaded(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    lists = _lab_orders(tmp_path)
    run = _Running(_write(tmp_path, _doc(tmp_path, isp, control, collector.url, lists)))
    name, enforced = f"late.{D}", f"gone.{D}"
    try:
        wait_for(lambda: run.daemon.rounds_done >= 1, 30, "a first slice")
        # Effective months ago, older than the fast lane's chase window: only its publication
        # is new, which is what a ticket fetched from the collector looks like.
        order = (
            "  - id: ticket-late\n    authority: AGCOM\n    jurisdictions: [IT]\n    applies_to: [isp]\n"
            f"    effective: 2026-02-01\n    domains: [{name}, {enforced}]\n"
        )
        lists.write_text(lists.read_text().replace("controls:\n", order + "controls:\n", 1))
        os.utime(lists, (1, 1))  # a different mtime, whatever the clock's granularity
        wait_for(
            lambda: (
                run.daemon.lists is not None and any(o.id == "ticket-late" for o in run.daemon.lists.orders)
            ),
            30,
            "the new lists loaded",
        )
        loaded = datetime.now(UTC)  # at or after the load
        lanes = {(n, t) for n in (name, enforced) for t in ("udp", "tcp")}
        wait_for(lambda: lanes <= set(_by_lane(collector.results())), 30, "the new names measured")

        def chased(t: str) -> float | None:
            spec = isp.specs()[t]
            labels = {"resolver": spec, "endpoint": spec}
            return run.daemon.registry.get_sample_value("blockprobe_probe_schedule_fast_lane_names", labels)

        def leaks(t: str) -> set[str]:
            latest = {
                r["domain"]: r["finding"]
                for r in sorted(collector.results(), key=_when)
                if r["transport"] == t
            }
            return {d for d, f in latest.items() if f == "leak"}

        # The enforced name leaves the fast lane once its result is recorded; the leak stays,
        # beside the lab's older leaks (www.calcio, dead), chased until enforced too.
        wait_for(
            lambda: all(name in leaks(t) and chased(t) == len(leaks(t)) for t in ("udp", "tcp")),
            30,
            "only the leaking names chased",
        )
        assert enforced not in leaks("udp") | leaks("tcp")
    finally:
        run.stop()
    seen = _by_lane(collector.results())
    for lane in lanes:
        assert seen[lane][0] <= loaded + timedelta(seconds=FAST), (lane, seen[lane][0], loaded)


def test_check_config_prints_the_budget_and_rejects_an_impossible_one(
    tmp_path: Path, isp: LabServer, control: LabServer
) -> None:
    lists = _lab_orders(tmp_path)
    doc = _doc(tmp_path, isp, control, "http://127.0.0.1:9", lists, qps=1)
    doc["schedule"] = {"mode": "slices", "fast_interval": "1m", "full_pass": "1h"}
    ok = subprocess.run(
        [sys.executable, "-m", "probe.cli", "check-config", str(_write(tmp_path, doc))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "schedule: 5 names × 1 qtypes; fast lane every 1m, every name at least once per 1h" in ok.stdout
    assert "5 × 1 ÷ 1 = 5s per pass" in ok.stdout
    assert "slices of 15s" in ok.stdout
    doc["schedule"] = {"mode": "slices", "fast_interval": 1, "full_pass": 3}
    bad = _write(tmp_path, doc)
    refused = subprocess.run(
        [sys.executable, "-m", "probe.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    lines = refused.stderr.splitlines()
    assert lines
    assert all(line.startswith(f"probe: {bad}: schedule.full_pass: 3s cannot be met on ") for line in lines)
    assert "5 names × 1 qtypes ÷ 1 qps = 5s per pass" in lines[0]
    # `probe run` refuses it the same way, before measuring anything.
    daemon = Daemon(load_config(bad))
    with pytest.raises(ListsError) as info:
        asyncio.run(daemon.run())
    assert info.value.errors[0].startswith(f"{bad}: schedule.full_pass: 3s cannot be met")


INVALID = [
    ({"mode": "often"}, "schedule.mode: 'often' is not one of rounds, slices"),
    (
        {"mode": "slices", "interval": 60},
        "schedule.interval: 60 is for schedule.mode rounds (this config runs slices)",
    ),
    (
        {"mode": "rounds", "slice": 5},
        "schedule.slice: 5 is for schedule.mode slices (this config runs rounds)",
    ),
    (
        {"mode": "rounds", "full_pass": "6h"},
        "schedule.full_pass: '6h' is for schedule.mode slices (this config runs rounds)",
    ),
    # A config from before slices (an interval, no mode) keeps rounds, so a slices key is a mistake.
    (
        {"interval": 60, "full_pass": "6h"},
        "schedule.full_pass: '6h' is for schedule.mode slices (this config runs rounds)",
    ),
    (
        {"mode": "slices", "fast_interval": "soon"},
        "schedule.fast_interval: 'soon' is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)",
    ),
    (
        {"mode": "slices", "fast_interval": "2m", "full_pass": "1m"},
        "schedule.full_pass: '1m' must be longer than schedule.fast_interval (2m)",
    ),
    (
        {"mode": "slices", "fast_interval": 10, "slice": 20},
        "schedule.slice: 20 must not be longer than schedule.fast_interval (10s)",
    ),
    (
        {"mode": "slices", "chase": "a day"},
        "schedule.chase: 'a day' is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)",
    ),
    (
        {"mode": "slices", "fast_interval": "2m", "chase": 60},
        "schedule.chase: 60 must be at least schedule.fast_interval (2m): "
        "the fast lane would never measure a new order",
    ),
    (
        {"mode": "rounds", "chase": "12h"},
        "schedule.chase: '12h' is for schedule.mode slices (this config runs rounds)",
    ),
]


@pytest.mark.parametrize(("schedule", "message"), INVALID)
def test_each_schedule_mistake_is_named(
    tmp_path: Path, isp: LabServer, control: LabServer, schedule: dict[str, Any], message: str
) -> None:
    doc = _doc(tmp_path, isp, control, "http://127.0.0.1:9", tmp_path / "orders.yaml", schedule=schedule)
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(doc), "probe.yaml")
    assert f"probe.yaml: {message}" in info.value.errors


def test_schedule_defaults(tmp_path: Path) -> None:
    base = {"probe": {"id": "t", "region": "r", "country": "IT"}, "resolvers": ["udp://127.0.0.1"]}
    sliced = parse_config(json.dumps(base), "probe.yaml", tmp_path)
    assert (sliced.mode, sliced.slice, sliced.jitter, sliced.round_deadline) == ("slices", 15, 0, 600)
    assert (sliced.settings.fast_interval, sliced.settings.full_pass) == (120, 6 * 3600)
    assert sliced.settings.chase == 24 * 3600
    chased = parse_config(json.dumps({**base, "schedule": {"chase": "12h"}}), "probe.yaml", tmp_path)
    assert chased.settings.chase == 12 * 3600
    assert "new orders every 2m for 12h or until enforced" in "\n".join(chased.summary())
    rounds = parse_config(json.dumps({**base, "schedule": {"mode": "rounds"}}), "probe.yaml", tmp_path)
    assert (rounds.mode, rounds.interval, rounds.round_deadline) == ("rounds", 300, 3600)
    # Configs written before slices were the default said how often; they keep their rounds.
    for legacy in ({"interval": 120}, {"jitter": 5}):
        old = parse_config(json.dumps({**base, "schedule": legacy}), "probe.yaml", tmp_path)
        assert old.mode == "rounds", legacy


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probe.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _order(path: Path, names: int) -> Path:
    doc = {
        "orders": [
            {
                "id": "big",
                "authority": "T",
                "jurisdictions": ["IT"],
                "applies_to": ["isp"],
                "domains": [f"n{i}.{D}" for i in range(names)],
            }
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_check_config_counts_the_lists_fetched_from_the_collector(
    tmp_path: Path, isp: LabServer, control: LabServer
) -> None:
    doc = _doc(tmp_path, isp, control, "http://127.0.0.1:9", tmp_path / "unused.yaml", qps=1)
    doc["lists"] = []  # every list from the collector
    doc["collector"]["fetch_lists"] = True
    doc["schedule"] = {"mode": "slices", "fast_interval": "1m", "full_pass": "1h"}
    path = _write(tmp_path, doc)
    # Nothing fetched yet: said so, not a budget of 0 names.
    first = _check_config(path)
    assert first.returncode == 0, first.stderr
    assert "lists from the collector: none fetched yet; budget checked when fetched" in first.stdout
    assert "0 names" not in first.stdout
    assert "queries per pass" not in first.stdout
    # As last fetched, in the state directory: counted.
    cached = _order(tmp_path / "state" / "collector-lists" / "orders.yaml", 100)
    counted = _check_config(path)
    assert counted.returncode == 0, counted.stderr
    assert "lists from the collector: 1 files as last fetched into" in counted.stdout
    assert "schedule: 100 names × 1 qtypes" in counted.stdout
    # Past the budget at 1 q/s: 5,000 names × 1 qtype take 83 minutes, full_pass is 1h.
    _order(cached, 5000)
    refused = _check_config(path)
    assert refused.returncode == 2
    assert f"probe: {path}: with the lists from the collector as last fetched: schedule.full_pass: 1h" in (
        refused.stderr
    )


def test_fetched_lists_past_the_budget_are_measured_but_said_in_the_log_metric_and_status(
    tmp_path: Path, isp: LabServer, control: LabServer, caplog: pytest.LogCaptureFixture
) -> None:
    doc = _doc(tmp_path, isp, control, "http://127.0.0.1:9", _lab_orders(tmp_path), qps=1)
    doc["collector"]["fetch_lists"] = True
    doc["schedule"] = {"mode": "slices", "fast_interval": "1m", "full_pass": "1h"}
    path = _write(tmp_path, doc)
    daemon = Daemon(load_config(path))

    def over() -> float:
        return daemon.registry.get_sample_value("blockprobe_probe_schedule_over_budget") or 0.0

    daemon.reload_lists(initial=True)
    assert over() == 0
    # What the collector published after the start: far more than an hour at 1 q/s.
    daemon.fetched_lists = (_order(tmp_path / "state" / "collector-lists" / "big.yaml", 5000),)
    with caplog.at_level("ERROR", logger="probe.daemon"):
        daemon.reload_lists()
    assert over() == 1
    assert daemon.lists is not None
    assert len(daemon.lists.query_names()) == 5005  # measured anyway, late
    assert any(
        "the lists (with those from the collector), 5005 names, cannot be measured within full_pass"
        in r.getMessage()
        for r in caplog.records
    )
    daemon.writer.shutdown()  # the meta is written
    status = subprocess.run(
        [sys.executable, "-m", "probe.cli", "status", "--json", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "schedule.full_pass: 1h cannot be met" in json.loads(status.stdout)["schedule_over_budget"]
    daemon.spool.close()
