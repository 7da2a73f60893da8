"""A probe that keeps reporting for months: hostile answers, refusals, backoff, stops, restarts, watchdog.

Against the lab resolver (one that sends oversized and deeply nested answers) and a local
collector that misbehaves on command (tests/fake_collector.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import pytest
from pydantic import ValidationError

from collector.schema import Batch as BatchIn
from probe import limits
from probe.daemon.config import ConfigError, load_config, parse_config
from probe.daemon.notify import Notifier
from probe.daemon.push import Backoff, Pusher, retry_after
from probe.daemon.run import Daemon
from probe.daemon.spool import ReadOnlySpool, Spool, SpoolThread, encode
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.wire import parse_ede

from .conftest import start_lab, truth_zone
from .fake_collector import FakeCollector, HostileResolver, _depth, wait_for
from .test_daemon import TOKEN, _sample, _unique, _write_config

D = "blockprobe-lab.net"
DEEP = "{" + '"a":{' * 254 + '"b":1' + "}" * 255  # 255 levels of JSON in an EDE text
INF = '{"c":1e999,"d":[-1e999]}'
HOSTILE = {
    f"many.{D}": Behaviour(records={"A": tuple(f"93.184.{i // 256}.{i % 256}" for i in range(300))}),
    f"edes.{D}": Behaviour(records={"A": ("93.184.216.34",)}, ede=tuple((0, f"note {i}") for i in range(20))),
    f"long.{D}": Behaviour(records={"A": ("93.184.216.34",)}, ede=((0, "x" * 5000),)),
    f"deep.{D}": Behaviour(records={"A": ("93.184.216.34",)}, ede=((0, DEEP),)),
    # JSON by its grammar, but beyond a double: Python reads inf and would write Infinity.
    f"inf.{D}": Behaviour(records={"A": ("93.184.216.34",)}, ede=((0, INF),)),
}
# Not cut, but not kept as structured JSON either: the EDE text stays as it came.
AS_TEXT = {f"inf.{D}"}
FINE = [f"fine{i}.{D}" for i in range(6)]
SLOW = [f"slow{i}.{D}" for i in range(4)]


@pytest.fixture(scope="module")
def hostile(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    zone = Zone()
    zone.set(f"*.{D}", Behaviour(records={"A": ("93.184.216.34",)}))
    for name in SLOW:
        zone.set(name, Behaviour(records={"A": ("93.184.216.34",)}, delay=30))
    for name, behaviour in HOSTILE.items():
        zone.set(name, behaviour)
    return start_lab(lab_thread, zone, "127.53.1.7", lab_ca, transports=("udp", "tcp"))


@pytest.fixture(scope="module")
def control(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    return start_lab(lab_thread, truth_zone(), "127.53.1.10", lab_ca, transports=("udp",))


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    c = FakeCollector(TOKEN)
    yield c
    c.stop()


def _lists(tmp: Path, names: list[str]) -> Path:
    path = tmp / "orders.yaml"
    doc = {
        "orders": [
            {"id": "t", "authority": "T", "jurisdictions": ["IT"], "applies_to": ["isp"], "domains": names}
        ]
    }
    path.write_text(json.dumps(doc))
    return path


def _config(tmp: Path, server: LabServer, ctl: LabServer, url: str, names: list[str], **over: Any) -> Path:
    over.setdefault("resolvers", [{"spec": server.specs()["tcp"], "kind": "isp"}])
    return _write_config(tmp, server, ctl, url, lists=[str(_lists(tmp, names))], **over)


class _Running:
    def __init__(self, config_path: Path, grace: float = 5, notifier: Notifier | None = None) -> None:
        self.daemon = Daemon(load_config(config_path), notifier=notifier)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.daemon.run(grace=grace),)
        )
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.stop_event.set)
            self.thread.join(30)
            assert not self.thread.is_alive()
            self.loop.close()


def _measured(daemon: Daemon) -> int:
    return int(
        sum(
            s.value
            for metric in daemon.metrics.queries.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        )
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probe.cli", *args], capture_output=True, text=True, timeout=60
    )


# -- limits -------------------------------------------------------------------------------


def _hostile_measurement() -> dict[str, Any]:
    return {
        "domain": "x.example",
        "qtype": "A",
        "resolver": "r" * 300,
        "transport": "udp",
        "outcome": "resolved",
        "blocked": False,
        "expected": None,
        "finding": None,
        "rcode": "NOERROR",
        "ede": [{"code": 0, "text": "y" * 5000, "json": json.loads(DEEP)}] + [{"code": 0, "text": ""}] * 20,
        "answers": ["93.184.0.1"] * 300 + ["z" * 5000],
        "cname": [f"c{i}.example" for i in range(40)],
        "sinkhole": None,
        "control": None,
        "latency_ms": 1.0,
        "time": "2026-12-01T10:00:00.000Z",
        "error": "e" * 2000,
        "wire": "A" * 100_000,
        "evidence": {"deep": json.loads(DEEP)},
    }


def test_clamp_brings_a_hostile_measurement_within_every_bound_and_says_so() -> None:
    m = _hostile_measurement()
    c = limits.clamp(m)
    assert len(c["answers"]) == limits.MAX_ANSWERS
    assert len(c["ede"]) == limits.MAX_EDE
    assert len(c["ede"][0]["text"]) == limits.MAX_EDE_TEXT
    assert len(c["error"]) == limits.MAX_ERROR_CHARS
    assert len(c["cname"]) == limits.MAX_CNAME
    assert len(c["resolver"]) == limits.MAX_LABEL_CHARS
    assert c["wire"] is None
    assert _depth(c) + 2 <= limits.MAX_JSON_DEPTH  # within the bound even counted from the batch body
    said = " | ".join(c["evidence"]["truncated"])
    for what in (
        "answers: 301 items, kept 256",
        "ede: 21 options, kept 16",
        "ede[0].text: 5000 characters",
        "cname: 40 items",
        "wire:",
        "error:",
        "deeper than 32 levels",
    ):
        assert what in said, what
    # The collector's own body model accepts it (its strictest bounds apart from nesting).
    batch = {"probe": {"id": "p", "region": "r", "country": "IT"}, "batch_id": "b" * 8, "measurements": [c]}
    BatchIn.model_validate(batch)
    with pytest.raises(ValidationError, match=r"validation errors? for Batch"):
        BatchIn.model_validate({**batch, "measurements": [m]})
    # Clamping twice changes nothing; a measurement within bounds is returned as it is.
    assert limits.clamp(c) is c
    small = {
        **_hostile_measurement(),
        "resolver": "r",
        "ede": [],
        "answers": ["1.2.3.4"],
        "cname": [],
        "error": None,
        "wire": "AAAA",
        "evidence": {"x": [1, {"y": 2}]},
    }
    assert limits.clamp(small) is small


@pytest.mark.parametrize("text", [INF, '{"c":-1e400}', '{"c":NaN}', '{"c":[Infinity]}'])
def test_ede_json_that_only_python_reads_is_kept_as_text(text: str) -> None:
    """1e999 is JSON by its grammar, but Python makes it inf and writes it back as Infinity,
    which the collector refuses: such an EDE keeps its text and no structured JSON."""
    ede = parse_ede(dns.edns.EDEOption(dns.edns.EDECode(0), text))
    assert (ede.text, ede.json) == (text, None)
    assert parse_ede(dns.edns.EDEOption(dns.edns.EDECode(0), '{"c":1e300}')).json == {"c": 1e300}


def test_a_number_json_cannot_hold_is_spooled_as_null_and_said() -> None:
    m = {"domain": "x.example", "finding": "leak", "latency_ms": math.inf, "evidence": {"r": [math.nan]}}
    finding, body = encode(m)
    doc = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in the spooled JSON"))
    assert finding == "leak"
    assert (doc["latency_ms"], doc["evidence"]["r"]) == (None, [None])
    assert doc["evidence"]["truncated"] == [
        "latency_ms: inf is not a JSON number, not kept",
        "evidence.r[0]: nan is not a JSON number, not kept",
    ]
    assert m["latency_ms"] == math.inf  # the caller's measurement is not changed


# -- a hostile resolver end to end -----------------------------------------------------------


def test_hostile_resolver_answers_are_clamped_and_every_result_is_accepted(
    tmp_path: Path, hostile: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    collector.strict = True  # refuses what the real collector refuses
    names = [*HOSTILE, *FINE]
    server = HostileResolver(HOSTILE)
    resolvers = [{"spec": server.spec, "kind": "isp"}]
    run = _Running(_config(tmp_path, hostile, control, collector.url, names, timeout=5, resolvers=resolvers))
    try:
        wait_for(
            lambda: (
                run.daemon.rounds_done >= 1
                and run.daemon.spool.depth() == 0
                and len(collector.results()) >= len(names)
            ),
            30,
            "a round accepted",
        )
    finally:
        run.stop()
        server.shutdown()
        server.server_close()
    _unique(collector)
    assert all(status == 200 for _, _, status in collector.requests)
    assert run.daemon.spool.totals()["quarantined_total"] == 0
    by_name = {m["domain"]: m for m in collector.results()}
    assert len(by_name[f"many.{D}"]["answers"]) == limits.MAX_ANSWERS
    for name in set(HOSTILE) - AS_TEXT:
        assert by_name[name]["evidence"]["truncated"], name
    assert "truncated" not in by_name[FINE[0]]["evidence"]
    for name in AS_TEXT:
        assert by_name[name]["ede"] == [{"code": 0, "text": INF}], name


# -- permanent refusals -----------------------------------------------------------------------


def test_refused_measurements_are_quarantined_listed_exported_and_resent(
    tmp_path: Path, hostile: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    bad = {FINE[1], FINE[4]}
    collector.refuse = lambda m: "domain: refused by this collector" if m["domain"] in bad else None
    config = _config(
        tmp_path,
        hostile,
        control,
        collector.url,
        FINE,
        schedule={"interval": 60, "jitter": 0, "push_interval": 0.2},
    )
    run = _Running(config)
    try:
        wait_for(
            lambda: run.daemon.rounds_done >= 1 and run.daemon.spool.depth() == 0, 30, "the round settled"
        )
    finally:
        run.stop()
    delivered = {m["domain"] for m in collector.results()}
    assert delivered == set(FINE) - bad  # the rest was sent, not held behind the refused ones
    assert run.daemon.spool.totals()["quarantined_total"] == 2
    status = json.loads(_cli("status", "--json", "--config", str(config)).stdout)
    assert status["quarantined"] == 2
    assert status["spool_results"] == 0
    assert {q["reason"] for q in status["quarantine"]} == {
        "http 422: measurements[0].domain: refused by this collector"
    }
    text = _cli("status", "--config", str(config)).stdout
    assert "quarantine: 2 measurements the collector refuses" in text
    exported = [
        json.loads(line) for line in _cli("spool", "export", "--config", str(config)).stdout.splitlines()
    ]
    assert {e["measurement"]["domain"] for e in exported} == bad
    # Still refused: the resend keeps them, exit 1.
    again = _cli("spool", "resend", "--config", str(config))
    assert again.returncode == 1
    assert "0 acknowledged, 2 still refused" in again.stdout
    collector.refuse = lambda _m: None  # the collector was fixed
    ok = _cli("spool", "resend", "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert "2 acknowledged, 0 still refused" in ok.stdout
    _unique(collector)
    assert {m["domain"] for m in collector.results()} == set(FINE)
    final = json.loads(_cli("status", "--json", "--config", str(config)).stdout)
    assert final["quarantined"] == 0
    assert final["lifetime"]["pushed_total"] == len(FINE)


def test_results_older_than_the_collector_accepts_are_quarantined_not_blocking(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3")
    spool.add([{"domain": "old.example", "finding": None}])
    spool.db.execute("UPDATE results SET created = created - 100 * 86400")
    spool.add([{"domain": "new.example", "finding": None}])
    batch = spool.next_batch(10, max_age=90 * 86400)
    assert batch is not None
    assert [m["domain"] for m in batch.measurements] == ["new.example"]
    [q] = spool.quarantined()
    assert q.measurement["domain"] == "old.example"
    assert q.reason.startswith("older than the collector accepts")
    assert spool.depth() == 1
    assert spool.quarantine_depth() == 1
    assert spool.totals()["quarantined_total"] == 1
    spool.close()


def test_making_a_batch_reads_the_oldest_rows_not_the_whole_spool(tmp_path: Path) -> None:
    """The work of next_batch (with the age check) does not grow with the spool's depth."""
    spool = Spool(tmp_path / "s.sqlite3", max_rows=10**6)

    def steps(depth: int) -> int:
        spool.add_encoded([(None, '{"domain":"x.example"}')] * (depth - spool.depth()))
        count = [0]

        def tick() -> int:
            count[0] += 1
            return 0

        spool.db.set_progress_handler(tick, 100)  # called every 100 SQLite VM instructions
        batch = spool.next_batch(50, max_age=90 * 86400)
        spool.db.set_progress_handler(None, 0)
        assert batch is not None
        assert len(batch.bodies) == 50
        spool.ack(batch.batch_id)
        return count[0]

    small, large = steps(1_000), steps(50_000)
    # Scanning or sorting the unbatched rows would take 50 times the work at 50 times the rows.
    assert large < 3 * small + 50, (small, large)
    spool.close()


# -- backoff ----------------------------------------------------------------------------------


def _pusher(tmp: Path, url: str, **collector: Any) -> tuple[Pusher, SpoolThread]:
    text = json.dumps(
        {
            "probe": {"id": "it-test-1", "region": "it-lab", "country": "IT"},
            "collector": {"url": url, "token": TOKEN, "batch_size": 10, "timeout": 2, **collector},
            "resolvers": ["udp://127.0.0.1"],
            "controls": [],
            "state_dir": str(tmp / "state"),
        }
    )
    config = parse_config(text)
    thread = SpoolThread(Spool(tmp / "state" / "spool.sqlite3"))
    return Pusher(config, thread), thread


def _drain(pusher: Pusher, thread: SpoolThread, seconds: float) -> None:
    """Push until the spool is empty (or `seconds` pass), each try after the backoff, then stop."""

    async def go() -> None:
        deadline = time.monotonic() + seconds
        while thread.spool.depth() and time.monotonic() < deadline:
            await pusher.push()
            await asyncio.sleep(pusher.backoff.remaining() + 0.01)
        await pusher.aclose()

    asyncio.run(go())
    thread.shutdown()


def test_backoff_is_one_state_per_collector_and_the_backlog_drains_at_once(
    tmp_path: Path, collector: FakeCollector
) -> None:
    pusher, thread = _pusher(tmp_path, collector.url, retry={"base": 0.2, "max": 0.4}, rate=0)
    thread.spool.add([{"domain": f"n{i}.example", "finding": None, "time": "t"} for i in range(400)])
    collector.mode, collector.failures_left = "500", 3

    async def go() -> list[int]:
        sent = []
        for _ in range(200):
            out = await pusher.push()
            sent.append(out.sent_batches)
            if thread.spool.depth() == 0:
                break
            await asyncio.sleep(0.02)
        await pusher.aclose()
        return sent

    sent = asyncio.run(go())
    thread.shutdown()
    # While the collector fails, one request per backoff period, not one per batch.
    failing = [s for _, _, s in collector.requests if s == 500]
    assert len(failing) == 3
    assert collector.requests[3][2] == 200
    assert all(b - a >= 0.1 for a, b in zip(collector.times[:3], collector.times[1:4], strict=True))
    # The first success resets it: all 40 batches go in that same push, back to back.
    assert sent[-1] == 40
    assert collector.times[-1] - collector.times[3] < 5
    assert len(collector.results()) == 400


def test_a_recovery_is_noticed_within_a_second_or_two_whatever_retry_max(
    tmp_path: Path, hostile: LabServer, control: LabServer
) -> None:
    """While nobody listens, the daemon looks every second whether the collector is back,
    instead of sleeping out a backoff of 15 to 30 s here."""
    dark = FakeCollector()
    port = dark.port
    dark.stop()
    path = _config(
        tmp_path,
        hostile,
        control,
        f"http://127.0.0.1:{port}",
        FINE,
        schedule={"interval": 60, "jitter": 0, "push_interval": 0.2},
    )
    doc = json.loads(path.read_text())
    doc["collector"]["retry"] = {"base": 30, "max": 60}
    path.write_text(json.dumps(doc))
    run = _Running(path)
    try:
        pusher = run.daemon.pusher
        assert pusher is not None
        wait_for(lambda: run.daemon.rounds_done >= 1 and pusher.backoff.failures >= 1, 30, "a failed push")
        assert pusher.backoff.remaining() > 10
        back = FakeCollector(TOKEN, port=port)
        try:
            wait_for(
                lambda: run.daemon.spool.depth() == 0 and len(back.results()) >= len(FINE),
                10,
                "the spool sent",
            )
        finally:
            back.stop()
    finally:
        run.stop()


@pytest.mark.parametrize("status", ["429", "503"])
def test_429_and_503_honour_retry_after(tmp_path: Path, collector: FakeCollector, status: str) -> None:
    pusher, thread = _pusher(tmp_path, collector.url, retry={"base": 0.01, "max": 0.02}, rate=0)
    thread.spool.add([{"domain": "a.example", "finding": None, "time": "t"}])
    collector.mode, collector.failures_left, collector.retry_after = status, 1, "1"

    async def go() -> None:
        await pusher.push()
        assert pusher.backoff.remaining() > 0.9  # Retry-After, not the 10 ms backoff
        while thread.spool.depth():
            await pusher.push()
            await asyncio.sleep(0.05)
        await pusher.aclose()

    asyncio.run(go())
    thread.shutdown()
    assert [s for _, _, s in collector.requests] == [int(status), 200]
    assert collector.times[1] - collector.times[0] >= 1.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after("120") == 120.0
    assert retry_after("soon") is None
    b = Backoff(1, 2)
    assert 3600 >= b.failed(retry_after=10**9) >= 3600  # a hostile Retry-After is capped at an hour


def test_collector_level_refusals_are_not_bisected(tmp_path: Path, collector: FakeCollector) -> None:
    """A 401 says nothing about the measurements: bisecting it would quarantine them all."""
    pusher, thread = _pusher(tmp_path, collector.url, retry={"base": 5, "max": 5})
    thread.spool.add([{"domain": f"n{i}.example", "finding": None, "time": "t"} for i in range(20)])
    collector.mode = "401"
    out = asyncio.run(pusher.push())
    asyncio.run(pusher.aclose())
    thread.shutdown()
    assert out.failure
    assert out.failure.startswith("http 401")
    assert len(collector.requests) == 1
    assert thread.spool.quarantine_depth() == 0
    assert thread.spool.depth() == 20


# -- stops, deadlines, duplicates --------------------------------------------------------------


def test_sigterm_mid_round_stores_everything_measured(
    tmp_path: Path, hostile: LabServer, control: LabServer
) -> None:
    dark = FakeCollector()
    port = dark.port
    dark.stop()  # nothing pushed: what was measured must all be in the spool
    config = _config(tmp_path, hostile, control, f"http://127.0.0.1:{port}", FINE + SLOW, timeout=40)
    run = _Running(config, grace=0.2)
    try:
        wait_for(lambda: _measured(run.daemon) >= len(FINE), 30, "the fast names measured")
    finally:
        run.stop()
    measured = _measured(run.daemon)
    assert measured < len(FINE + SLOW) + 1  # the slow names were still in flight
    ro = ReadOnlySpool(tmp_path / "state" / "spool.sqlite3")
    assert ro.depth() == measured
    assert ro.counters()["written_total"] == measured
    ro.close()


def test_measurements_reach_the_spool_within_seconds_while_queries_hang(
    tmp_path: Path, hostile: LabServer, control: LabServer
) -> None:
    """No new measurement comes while the slow names hang; the timer flushes what came
    before them anyway, so a kill -9 now would lose nothing."""
    dark = FakeCollector()
    port = dark.port
    dark.stop()
    config = _config(tmp_path, hostile, control, f"http://127.0.0.1:{port}", FINE + SLOW, timeout=40)
    run = _Running(config, grace=0.2)
    try:
        wait_for(lambda: _measured(run.daemon) >= len(FINE), 30, "the fast names measured")
        measured = _measured(run.daemon)
        wait_for(
            lambda: run.daemon.spool.totals()["written_total"] == measured, 10, "the measurements spooled"
        )
        assert run.daemon._round_task is not None  # the slow names still hang: the round runs on
        assert _measured(run.daemon) == measured
    finally:
        run.stop()


def test_a_round_that_ignores_its_cancellation_does_not_keep_its_measurements_from_the_disk(
    tmp_path: Path, hostile: LabServer, control: LabServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probe.daemon import run as run_module

    monkeypatch.setattr(run_module, "FLUSH_EVERY", 3600.0)  # only the stop writes
    monkeypatch.setattr(run_module, "CANCEL_WAIT", 0.5)
    dark = FakeCollector()
    port = dark.port
    dark.stop()
    run = _Running(_config(tmp_path, hostile, control, f"http://127.0.0.1:{port}", FINE), grace=0.2)
    started, release = threading.Event(), threading.Event()

    async def stubborn() -> None:
        run.daemon._buffer.append(encode({"domain": "stuck.example", "finding": "leak"}))
        started.set()
        while not release.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                continue  # as a round stuck in a library that swallows cancellation

    run.daemon.round = stubborn  # type: ignore[method-assign]
    try:
        assert started.wait(30)
        run.loop.call_soon_threadsafe(run.daemon.stop_event.set)
        run.thread.join(30)
        assert not run.thread.is_alive(), "the stop waited for a round that ignores its cancellation"
    finally:
        release.set()
        if not run.thread.is_alive():
            run.loop.run_until_complete(asyncio.sleep(0.1))  # let the stubborn round end
            run.loop.close()
    assert _sample(run.daemon, "blockprobe_probe_rounds_total", result="cancelled") == 1
    ro = ReadOnlySpool(tmp_path / "state" / "spool.sqlite3")
    assert [json.loads(b)["domain"] for (b,) in ro.db.execute("SELECT body FROM results")] == [
        "stuck.example"
    ]
    ro.close()


def test_a_round_past_its_deadline_is_cut_recorded_and_its_results_kept(
    tmp_path: Path, hostile: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    config = _config(
        tmp_path,
        hostile,
        control,
        collector.url,
        FINE + SLOW,
        timeout=40,
        schedule={"interval": 60, "jitter": 0, "push_interval": 0.2, "round_deadline": 2},
    )
    run = _Running(config)
    try:
        wait_for(lambda: run.daemon.rounds_hit_deadline == 1, 30, "the deadline")
        wait_for(
            lambda: run.daemon.spool.depth() == 0 and len(collector.results()) >= len(FINE), 30, "pushed"
        )
    finally:
        run.stop()
    assert _sample(run.daemon, "blockprobe_probe_rounds_total", result="deadline") == 1
    assert {m["domain"] for m in collector.results()} >= set(FINE)
    status = json.loads(_cli("status", "--json", "--config", str(config)).stdout)
    assert status["last_round_deadline_s_ago"] is not None


def test_a_chunk_is_never_stored_twice_nor_lost_when_the_spool_errs(tmp_path: Path) -> None:
    config = parse_config(
        json.dumps(
            {
                "probe": {"id": "t", "region": "r", "country": "IT"},
                "resolvers": ["udp://127.0.0.1"],
                "controls": [],
                "state_dir": str(tmp_path / "state"),
            }
        )
    )
    daemon = Daemon(config)
    spool = daemon.spool
    real_bound, real_add = spool._enforce_bound, spool.add_encoded
    fail_before_commit = [True]

    def locked_after_commit() -> int:
        raise sqlite3.OperationalError("database is locked")

    def locked_before_commit(encoded: list[tuple[str | None, str]]) -> int:
        if fail_before_commit[0]:
            fail_before_commit[0] = False
            raise sqlite3.OperationalError("database is locked")
        return real_add(encoded)

    async def go() -> None:
        spool._enforce_bound = locked_after_commit  # type: ignore[method-assign]
        daemon._buffer = [encode({"n": i}) for i in range(7)]
        await daemon._flush()  # committed, then the bound check failed: not stored again
        spool._enforce_bound = real_bound  # type: ignore[method-assign]
        spool.add_encoded = locked_before_commit  # type: ignore[method-assign]
        daemon._buffer = [encode({"n": i}) for i in range(7, 10)]
        await daemon._flush()  # not committed: kept for the next flush
        assert daemon._unstored
        await daemon._flush()

    asyncio.run(go())
    daemon.writer.shutdown()
    assert sorted(json.loads(b)["n"] for (b,) in spool.db.execute("SELECT body FROM results")) == list(
        range(10)
    )
    assert spool.totals()["written_total"] == 10
    assert spool.depth() == 10
    spool.close()


def test_spool_writes_run_on_the_spool_thread_not_the_event_loop(
    tmp_path: Path, hostile: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    threads: set[str] = set()
    real = Spool.add_encoded

    def add(self: Spool, encoded: list[tuple[str | None, str]]) -> int:
        threads.add(threading.current_thread().name)
        return real(self, encoded)

    Spool.add_encoded = add  # type: ignore[method-assign]
    try:
        run = _Running(_config(tmp_path, hostile, control, collector.url, FINE))
        try:
            wait_for(lambda: run.daemon.rounds_done >= 1, 30, "a round")
        finally:
            run.stop()
    finally:
        Spool.add_encoded = real  # type: ignore[method-assign]
    assert threads
    assert all(t.startswith("spool") for t in threads)


# -- lifetime counts, status ------------------------------------------------------------------


def test_lifetime_counts_and_round_numbers_survive_restarts(
    tmp_path: Path, hostile: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    config = _config(
        tmp_path,
        hostile,
        control,
        collector.url,
        FINE,
        schedule={"interval": 60, "jitter": 0, "push_interval": 0.2},
    )
    seen = []
    for _ in range(2):
        run = _Running(config)
        try:

            def pushed(r: _Running = run) -> bool:
                return r.daemon.rounds_done >= 1 and r.daemon.spool.depth() == 0

            wait_for(pushed, 30, "a pushed round")
        finally:
            run.stop()
        samples = {s.name: s.value for m in run.daemon.registry.collect() for s in m.samples}
        seen.append(samples)
    first, second = seen
    assert first["blockprobe_probe_measurements_written_total"] == len(FINE)
    assert second["blockprobe_probe_measurements_written_total"] == 2 * len(FINE)
    assert second["blockprobe_probe_measurements_pushed_total"] == 2 * len(FINE)
    assert second["blockprobe_probe_rounds_started_total"] == 2
    assert second["blockprobe_probe_unclean_starts_total"] == 0


def test_status_opens_the_spool_read_only_and_creates_nothing(
    tmp_path: Path, hostile: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    config = _config(tmp_path, hostile, control, collector.url, FINE)
    run = _Running(config)
    try:
        wait_for(lambda: run.daemon.rounds_done >= 1, 30, "a round")
        live = _cli("status", "--json", "--config", str(config))  # beside the running daemon
        assert live.returncode == 0, live.stderr
    finally:
        run.stop()
    state = tmp_path / "state"
    path = state / "spool.sqlite3"
    assert not (state / "spool.sqlite3-wal").exists()  # a clean stop leaves none
    before = (path.stat().st_mtime_ns, path.read_bytes())
    result = _cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("spool")) == ["spool.sqlite3"]
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    # An older probe's spool (no quarantine table): read as it is, not upgraded.
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "spool.sqlite3")
    db.executescript(
        "CREATE TABLE results (id INTEGER PRIMARY KEY, created REAL, priority INTEGER, finding TEXT,"
        " body TEXT, batch_id TEXT); CREATE TABLE batches (batch_id TEXT PRIMARY KEY, created REAL,"
        " attempts INTEGER, next_attempt REAL, last_error TEXT); CREATE TABLE meta (key TEXT PRIMARY KEY,"
        " value TEXT); CREATE TABLE dropped (finding TEXT PRIMARY KEY, count INTEGER);"
    )
    db.close()
    ro = ReadOnlySpool(old / "spool.sqlite3")
    assert ro.quarantine_depth() == 0
    assert ro.depth() == 0
    ro.close()
    tables = {r[0] for r in sqlite3.connect(old / "spool.sqlite3").execute("SELECT name FROM sqlite_master")}
    assert "quarantine" not in tables


def test_an_unclean_stop_is_counted_at_the_next_start(tmp_path: Path) -> None:
    a = Spool(tmp_path / "s.sqlite3")
    assert a.mark_start() is False
    a.close()  # no mark_stop: as after kill -9 or a watchdog restart
    b = Spool(tmp_path / "s.sqlite3")
    assert b.mark_start() is True
    assert b.totals()["unclean_starts_total"] == 1
    b.mark_stop()
    b.close()
    c = Spool(tmp_path / "s.sqlite3")
    assert c.mark_start() is False
    assert c.totals()["unclean_starts_total"] == 1
    c.close()


# -- watchdog ---------------------------------------------------------------------------------


def test_watchdog_pings_while_healthy_and_stops_when_a_round_is_stuck(
    tmp_path: Path, hostile: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                return messages

    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == 0.1
    config = _config(
        tmp_path,
        hostile,
        control,
        collector.url,
        FINE,
        schedule={"interval": 60, "jitter": 0, "push_interval": 0.2},
    )
    run = _Running(config, notifier=notifier)
    try:
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 3, 10, "watchdog pings")
        assert messages[0].startswith("READY=1\n")
        wait_for(lambda: run.daemon.rounds_done == 1, 30, "the one round of the minute")
        # A round that has run past its deadline (and ignored its cancellation): pings stop.
        run.daemon._round_started = time.monotonic() - run.daemon.config.round_deadline - 120
        wait_for(
            lambda: _sample(run.daemon, "blockprobe_probe_watchdog_withheld_total") >= 1,
            10,
            "the pings withheld",
        )
        drain()
        messages.clear()
        time.sleep(0.5)  # several ping intervals: an absence can only be observed over time
        assert "WATCHDOG=1" not in drain()
        assert run.daemon.healthy() is not None
        assert "past its deadline" in str(run.daemon.healthy())
    finally:
        run.daemon._round_started = None
        run.stop()
        try:
            assert "STOPPING=1" in drain()
        finally:
            sock.close()


def test_notifier_speaks_abstract_sockets_and_is_silent_outside_systemd() -> None:
    name = f"blockprobe-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
    assert sock.recv(100) == b"READY=1"
    sock.close()
    quiet = Notifier({})
    assert not quiet.enabled
    assert quiet.watchdog_interval is None
    assert quiet.send("READY=1") is False
    assert (
        Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval
        is None
    )


# -- the token ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token_yaml",
    [
        "1234567890123",
        "[s3cretlisttoken]",
        "{k: s3cretmaptoken}",
        "12345.678e+9",
        '"s3cret token with spaces"',
        "s3cret: [unclosed",
    ],
)
def test_check_config_never_echoes_the_token_whatever_yaml_makes_of_it(
    tmp_path: Path, token_yaml: str
) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(
        "probe: {id: t, region: r, country: IT}\n"
        f"collector:\n  url: http://127.0.0.1:9\n  token: {token_yaml}\n"
        "resolvers: [udp://127.0.0.1]\ncontrols: []\n"
    )
    result = _cli("check-config", str(path))
    assert result.returncode == 2
    assert "collector" in result.stderr or "not YAML" in result.stderr
    for secret in ("1234567890", "s3cret", "12345.678"):
        assert secret not in result.stdout + result.stderr
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert not any("s3cret" in e or "1234567890" in e for e in info.value.errors)


# -- the systemd unit and the config the Ansible role writes ---------------------------------------


def test_the_role_writes_a_notify_unit_with_a_watchdog_and_a_config_the_daemon_accepts(
    tmp_path: Path,
) -> None:
    import jinja2
    import yaml

    role = Path(__file__).parent.parent / "ansible" / "roles" / "probe"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["to_json"] = json.dumps
    env.filters["bool"] = bool
    variables = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    variables.update(
        ansible_managed="managed",
        inventory_hostname="it-milan-1.example",
        blockprobe_collector_url="https://collector.example:8443",
    )
    # Defaults refer to each other ("{{ probe_home }}/venv"): render them until they settle.
    for _ in range(3):
        variables = {
            k: env.from_string(v).render(**variables) if isinstance(v, str) else v
            for k, v in variables.items()
        }
    unit = env.from_string((role / "templates" / "blockprobe-probe.service.j2").read_text()).render(
        **variables
    )
    lines = set(unit.splitlines())
    assert {"Type=notify", "NotifyAccess=main", "WatchdogSec=120", "Restart=on-failure"} <= lines
    text = env.from_string((role / "templates" / "probe.yaml.j2").read_text()).render(**variables)
    (tmp_path / "etc").mkdir()
    doc = yaml.safe_load(text)
    doc["collector"]["token_file"] = str(tmp_path / "token")
    doc["state_dir"] = str(tmp_path / "state")
    (tmp_path / "token").write_text("t0ken")
    config = parse_config(json.dumps(doc), "probe.yaml", tmp_path)
    # The role deploys the per-name scheduler, with the daemon's own deadline per slice.
    assert (config.mode, config.slice, config.round_deadline) == ("slices", 15, 600)
    assert (config.settings.fast_interval, config.settings.full_pass, config.settings.chase) == (
        120,
        6 * 3600,
        24 * 3600,
    )
    assert config.collector is not None
    assert (config.collector.retry_base, config.collector.retry_max) == (1, 5)


def test_a_collector_that_refuses_everything_is_waited_for_not_emptied_into_the_quarantine(
    tmp_path: Path, collector: FakeCollector
) -> None:
    from probe.daemon.push import SUSPECT_AFTER

    pusher, thread = _pusher(tmp_path, collector.url, retry={"base": 0.05, "max": 0.1}, rate=0)
    thread.spool.add([{"domain": f"n{i}.example", "finding": None, "time": "t"} for i in range(60)])
    collector.refuse = lambda _m: "qtype: a bad deploy refuses everything"

    async def go() -> None:
        out = await pusher.push()
        assert out.quarantined == SUSPECT_AFTER
        assert out.failure
        assert "a bad deploy" in out.failure
        assert pusher.backoff.remaining() > 0
        collector.refuse = lambda _m: None  # fixed
        while thread.spool.depth():
            await asyncio.sleep(0.05)
            await pusher.push()
        await pusher.aclose()

    asyncio.run(go())
    thread.shutdown()
    assert len(collector.results()) == 60 - SUSPECT_AFTER
    assert thread.spool.quarantine_depth() == SUSPECT_AFTER


@pytest.mark.parametrize("run_length", [8, 25])
def test_a_run_of_refused_measurements_never_blocks_what_comes_after(
    tmp_path: Path, collector: FakeCollector, run_length: int
) -> None:
    """More adjacent refusals than SUSPECT_AFTER: the collector still accepts what is behind
    them, so they are all set aside and everything else is delivered."""
    pusher, thread = _pusher(tmp_path, collector.url, retry={"base": 0.02, "max": 0.05}, rate=0)
    domains = [f"n{i}.example" for i in range(60)]
    thread.spool.add([{"domain": d, "finding": None, "time": "t"} for d in domains])
    bad = set(domains[20 : 20 + run_length])
    # As the real collector does, the refusal names the measurement: measurements[i].domain.
    collector.refuse = lambda m: "domain: refused by this collector" if m["domain"] in bad else None

    _drain(pusher, thread, 20)
    assert thread.spool.depth() == 0
    delivered = [m["domain"] for m in collector.results()]
    assert sorted(delivered) == sorted(set(domains) - bad)  # each once
    assert {q.measurement["domain"] for q in thread.spool.quarantined()} == bad
    assert thread.spool.totals()["quarantined_total"] == run_length


def test_a_run_of_refusals_by_the_real_collector_is_set_aside_and_the_rest_stored(tmp_path: Path) -> None:
    """The collector itself (FastAPI, SQLite), refusing 8 adjacent measurements of 60 (a qtype
    it does not know), names each as measurements[i]: all 8 set aside, the 52 others stored."""
    from collector.store import open_store

    from .test_collector import Server, measurement

    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    live = Server(store)
    try:
        pusher, thread = _pusher(
            tmp_path, live.url, token=live.token("it-test-1"), retry={"base": 0.02, "max": 0.05}, rate=0
        )
        bad = range(20, 28)
        thread.spool.add(
            [measurement(f"n{i}.example", qtype="BOGUS" if i in bad else "A") for i in range(60)]
        )

        _drain(pusher, thread, 30)
        assert thread.spool.depth() == 0
        quarantined = thread.spool.quarantined()
        assert sorted(q.measurement["domain"] for q in quarantined) == sorted(f"n{i}.example" for i in bad)
        assert all(q.reason.startswith("http 422: measurements[0].qtype") for q in quarantined)
        with live.store.tx() as cur:
            cur.execute("SELECT count(*) FROM archive")
            (rows,) = cur.fetchone()
        assert rows == 52
    finally:
        live.stop()
        store.close()


def test_the_collectors_age_bound_is_learnt_from_its_refusal(
    tmp_path: Path, collector: FakeCollector
) -> None:
    pusher, thread = _pusher(tmp_path, collector.url)
    thread.spool.add([{"domain": "old.example", "finding": None, "time": "t"}])
    thread.spool.db.execute("UPDATE results SET created = created - 40 * 86400")
    thread.spool.add([{"domain": "new.example", "finding": None, "time": "t"}])
    collector.refuse = lambda m: (
        "time: 2026-10-01T00:00:00Z is more than 30 days old (check the probe's clock)"
        if m["domain"] == "old.example"
        else None
    )
    asyncio.run(pusher.push())
    asyncio.run(pusher.aclose())
    thread.shutdown()
    assert pusher.max_age_days == 30
    assert [m["domain"] for m in collector.results()] == ["new.example"]
    assert [q.measurement["domain"] for q in thread.spool.quarantined()] == ["old.example"]


def test_hostile_answers_are_stored_by_the_real_collector(
    tmp_path: Path, hostile: LabServer, control: LabServer
) -> None:
    """The same hostile resolver, against the collector itself (FastAPI, SQLite): nothing refused."""
    from collector.store import open_store

    from .test_collector import Server

    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    live = Server(store)
    server = HostileResolver(HOSTILE)
    names = [*HOSTILE, *FINE]
    try:
        config = _config(
            tmp_path,
            hostile,
            control,
            live.url,
            names,
            timeout=5,
            resolvers=[{"spec": server.spec, "kind": "isp"}],
        )
        (tmp_path / "token").write_text(live.token("it-test-1"))
        run = _Running(config)
        try:
            wait_for(
                lambda: run.daemon.rounds_done >= 1 and run.daemon.spool.depth() == 0, 30, "a round pushed"
            )
        finally:
            run.stop()
        assert run.daemon.spool.totals()["quarantined_total"] == 0
        with live.store.tx() as cur:
            cur.execute("SELECT count(*) FROM archive")
            (rows,) = cur.fetchone()
        assert rows == run.daemon.spool.totals()["pushed_total"] >= len(names)
    finally:
        server.shutdown()
        server.server_close()
        live.stop()


def test_each_acknowledged_batch_is_logged_with_whether_it_was_a_duplicate(
    tmp_path: Path, collector: FakeCollector, caplog: pytest.LogCaptureFixture
) -> None:
    pusher, thread = _pusher(tmp_path, collector.url)
    thread.spool.add([{"domain": f"n{i}.example", "finding": None, "time": "t"} for i in range(15)])
    first = thread.spool.next_batch(10)
    assert first is not None

    async def go() -> None:
        # The collector stored the first batch, but its answer never reached the probe.
        assert (await pusher.send(first.batch_id, first.bodies)).ok
        with caplog.at_level("INFO", logger="probe.daemon.push"):
            await pusher.push()
        await pusher.aclose()

    asyncio.run(go())
    thread.shutdown()
    acks = [r.getMessage() for r in caplog.records if "acknowledged" in r.getMessage()]
    assert (
        acks[0]
        == f"batch {first.batch_id} acknowledged: 10 results, a duplicate (the collector had it already)"
    )
    assert acks[1].endswith("acknowledged: 5 results, new")
    assert len(acks) == 2
    assert len(collector.results()) == 15


@pytest.mark.parametrize(
    ("collector_keys", "message"),
    [
        ({"retry": {"base": 10, "max": 2}}, "collector.retry.max: 2 must be at least retry.base (10)"),
        ({"retry": {"base": 1, "maximum": 2}}, "collector.retry.maximum: unknown key (one of base, max)"),
        ({"retry": "fast"}, "collector.retry: 'fast' must be a mapping with base and max"),
        ({"rate": -1}, "collector.rate: -1 must be at least 0"),
        ({"batch_size": 50000}, "collector.batch_size: 50000 must be between 1 and 20000"),
    ],
)
def test_push_settings_are_checked(collector_keys: dict[str, Any], message: str) -> None:
    doc = {
        "probe": {"id": "t", "region": "r", "country": "IT"},
        "collector": {"url": "http://127.0.0.1:9", "token": "t0ken", **collector_keys},
        "resolvers": ["udp://127.0.0.1"],
        "controls": [],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(doc), "probe.yaml")
    assert info.value.errors == [f"probe.yaml: {message}"]
