"""`probe run`: schedule, spool, push — against the lab resolver and a local collector that misbehaves on command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probe.daemon.config import ConfigError, load_config, parse_config
from probe.daemon.run import Daemon
from probe.daemon.spool import Spool
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone

from .conftest import start_lab, truth_zone
from .fake_collector import FakeCollector, wait_for

D = "blockprobe-lab.net"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def isp(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    zone = Zone()
    zone.set(f"*.{D}", Behaviour(records={"A": ("93.184.216.34",)}))
    zone.set(f"pirate.{D}", Behaviour(rcode="NXDOMAIN"))
    return start_lab(lab_thread, zone, "127.53.1.5", lab_ca, transports=("udp", "tcp"))


@pytest.fixture(scope="module")
def control(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    return start_lab(lab_thread, truth_zone(), "127.53.1.6", lab_ca, transports=("udp",))


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    c = FakeCollector(TOKEN)
    yield c
    c.stop()


def _config_text(tmp: Path, isp: LabServer, control: LabServer, url: str, **over: Any) -> str:
    (tmp / "token").write_text(TOKEN + "\n")
    lists = Path(__file__).parent / "lists" / "lab-orders.yaml"
    doc: dict[str, Any] = {
        "probe": {"id": "it-test-1", "region": "it-lab", "country": "IT"},
        "collector": {
            "url": url,
            "token_file": str(tmp / "token"),
            "timeout": 1,
            "batch_size": 50,
            "retry": {"base": 0.05, "max": 0.3},
            "rate": 0,
        },
        "resolvers": [{"spec": isp.specs()["udp"], "kind": "isp", "operator": "tim"}, isp.specs()["tcp"]],
        "lists": [str(lists)],
        "controls": [control.specs()["udp"]],
        "schedule": {"interval": 1, "jitter": 0, "push_interval": 0.2},
        "qtypes": ["A"],
        "timeout": 3,  # per query: generous, so a loaded CI machine cannot turn a control into a timeout
        "udp_linger": 0,
        "qps": 0,
        "state_dir": str(tmp / "state"),
        "verify": {"mode": "off"},  # the lab answers public addresses: no answer checks off loopback
        "log": {"format": "json"},
    }
    for key, value in over.items():
        doc[key] = value
    return json.dumps(doc)  # JSON is YAML


def _write_config(tmp: Path, *args: Any, **over: Any) -> Path:
    path = tmp / "probe.yaml"
    path.write_text(_config_text(tmp, *args, **over))
    return path


class _Running:
    """A Daemon on its own event loop in a thread, stopped through its stop_event."""

    def __init__(self, config_path: Path) -> None:
        self.daemon = Daemon(load_config(config_path))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.daemon.run(grace=5),))
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.stop_event.set)
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.loop.close()


PER_ROUND = 5 * 2  # 5 listed names to query × 2 endpoints × 1 qtype


def _sample(daemon: Daemon, name: str, **labels: str) -> float:
    """A metric's value as a scrape would see it (0 when the series does not exist yet)."""
    return daemon.registry.get_sample_value(name, labels) or 0.0


def _unique(c: FakeCollector) -> None:
    keys = c.keys()
    assert len(keys) == len(set(keys)), "a result arrived twice"


def test_rounds_run_on_schedule_and_every_result_arrives_once(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    run = _Running(_write_config(tmp_path, isp, control, collector.url))
    try:
        wait_for(
            lambda: run.daemon.rounds_done >= 2 and len(collector.results()) >= 2 * PER_ROUND,
            30,
            "two rounds pushed",
        )
    finally:
        run.stop()
    _unique(collector)
    results = collector.results()
    assert {r["finding"] for r in results if r["domain"] == f"pirate.{D}"} == {"enforced"}
    assert all(r["probe"] == "it-test-1" and r["country"] == "IT" for r in results)
    spool = Spool(tmp_path / "state" / "spool.sqlite3")
    assert spool.depth() == 0
    assert spool.pending_batches() == []
    assert len(results) == run.daemon.rounds_done * PER_ROUND


def test_collector_down_for_rounds_then_back_loses_nothing(
    tmp_path: Path, isp: LabServer, control: LabServer
) -> None:
    dark = FakeCollector()
    port = dark.port  # learn a free port, then leave it dark
    dark.stop()
    run = _Running(_write_config(tmp_path, isp, control, f"http://127.0.0.1:{port}"))
    try:
        wait_for(lambda: run.daemon.rounds_done >= 3, 30, "three rounds with the collector down")
        assert run.daemon.spool.depth() >= 3 * PER_ROUND
        back = FakeCollector(TOKEN, port=port)
        try:
            wait_for(
                lambda: run.daemon.spool.depth() == 0 and len(back.results()) >= 3 * PER_ROUND, 30, "catch-up"
            )
            run.stop()
            _unique(back)
            assert len(back.results()) == run.daemon.rounds_done * PER_ROUND
        finally:
            back.stop()
    finally:
        if run.thread.is_alive():
            run.stop()
    assert _sample(run.daemon, "blockprobe_probe_push_failures_total", reason="connect") >= 1


@pytest.mark.parametrize(
    ("mode", "reason"), [("500", "http 500"), ("401", "http 401"), ("413", "http 413"), ("hang", "timeout")]
)
def test_collector_refusals_are_retried_and_nothing_is_lost(
    mode: str, reason: str, tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    collector.mode = mode
    collector.failures_left = 3
    collector.max_batch = 4  # for 413: anything above 4 results is too large
    run = _Running(_write_config(tmp_path, isp, control, collector.url))
    try:
        wait_for(
            lambda: (
                run.daemon.rounds_done >= 2
                and run.daemon.spool.depth() == 0
                and len(collector.results()) >= 2 * PER_ROUND
            ),
            40,
            f"recovery from {mode}",
        )
        collector.release.set()
    finally:
        run.stop()
    _unique(collector)
    assert len(collector.results()) == run.daemon.rounds_done * PER_ROUND
    assert _sample(run.daemon, "blockprobe_probe_push_failures_total", reason=reason) >= 1
    if mode == "413":
        assert (
            max(n for _, n, status in collector.requests if status == 200) <= 4
        )  # split into smaller batches


def test_spool_bound_drops_least_important_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_rows=6)
    rows = [
        {"finding": f, "domain": f"{f}-{i}"}
        for i, f in enumerate(["leak", "ok", "enforced", "overblock", "inconclusive", None, "ok", "leak"])
    ]
    dropped = spool.add(rows)
    assert dropped == 2
    assert spool.depth() == 6
    kept = [m["domain"] for m in spool.next_batch(100).measurements]  # type: ignore[union-attr]
    # The two oldest of the least important (ok, enforced, none) went; leaks and overblocks stay.
    assert kept == ["leak-0", "overblock-3", "inconclusive-4", "None-5", "ok-6", "leak-7"]
    assert spool.dropped() == {"ok": 1, "enforced": 1}
    # Batched rows are not dropped one by one: a whole batch goes, oldest first, and is counted.
    more = [{"finding": "leak", "domain": f"late-{i}"} for i in range(6)]
    spool.add(more)
    assert spool.depth() <= 6
    assert sum(spool.dropped().values()) >= 8
    spool.close()


def test_kill_9_mid_push_then_restart_loses_nothing_and_sends_no_batch_twice(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    config = _write_config(
        tmp_path, isp, control, collector.url, schedule={"interval": 60, "jitter": 0, "push_interval": 0.2}
    )
    collector.mode = "hang"
    first = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(collector.in_flight.is_set, 30, "a push in flight")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    hung = collector.requests[-1][0] if collector.requests else None
    collector.mode = "ack"
    collector.release.set()
    second = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(collector.results()) >= 2 * PER_ROUND, 30, "both processes' rounds delivered")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    _unique(collector)
    assert len(collector.results()) == 2 * PER_ROUND  # one round per process (interval 60 s)
    sent_ids = [b for b, _, status in collector.requests if status == 200]
    assert hung is None or hung in sent_ids  # the interrupted batch was resent under its own id
    status = subprocess.run(
        [sys.executable, "-m", "probe.cli", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    life = json.loads(status.stdout)["lifetime"]
    assert life["unclean_starts_total"] == 1
    assert life["rounds_total"] == 2
    assert life["written_total"] == life["pushed_total"] == 2 * PER_ROUND


def test_probe_run_subprocess_two_rounds_then_sigterm_exits_0(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    config = _write_config(tmp_path, isp, control, collector.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(collector.results()) >= 2 * PER_ROUND, 30, "two rounds")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines
    assert all(line["probe"] == "it-test-1" for line in lines)
    acks = [line["message"] for line in lines if " acknowledged: " in line["message"]]
    assert acks
    assert all(
        re.fullmatch(r"batch [0-9a-f-]{36} acknowledged: \d+ results, (new|a duplicate \(.*\))", a)
        for a in acks
    )
    assert TOKEN not in stderr
    status = subprocess.run(
        [sys.executable, "-m", "probe.cli", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc = json.loads(status.stdout)
    assert doc["spool_results"] == 0
    assert doc["last_round_s_ago"] is not None
    assert doc["last_push_s_ago"] is not None


def test_bad_new_lists_file_is_rejected_and_the_old_one_stays(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    lists = tmp_path / "orders.yaml"
    lists.write_text((Path(__file__).parent / "lists" / "lab-orders.yaml").read_text())
    run = _Running(_write_config(tmp_path, isp, control, collector.url, lists=[str(lists)]))
    try:
        wait_for(lambda: run.daemon.rounds_done >= 1, 30, "a round")
        lists.write_text("orders:\n  - id: broken\n    jurisdictions: [ITA]\n")
        os.utime(lists, (1, 1))  # a different mtime, whatever the clock's granularity
        wait_for(
            lambda: _sample(run.daemon, "blockprobe_probe_lists_rejected_total") == 1, 30, "the rejection"
        )
        assert run.daemon.lists is not None
        assert run.daemon.lists.orders[0].id == "agcom-lab-1"
    finally:
        run.stop()


INVALID = [
    (
        {"probe": {"id": "x", "region": "r", "country": "ITA"}},
        "probe.country: 'ITA' is not an ISO 3166-1 alpha-2 code",
    ),
    (
        {"resolvers": ["tls//x"]},
        "resolvers[0].spec: 'tls//x' is not a resolver spec: expected SCHEME://HOST[:PORT] or HOST[:PORT]",
    ),
    (
        {"resolvers": [{"spec": "udp://192.0.2.1", "kind": "evil"}]},
        "resolvers[0].kind: 'evil' is not one of isp, public, system",
    ),
    ({"schedule": {"interval": 10, "jitter": 20}}, "schedule.jitter: 20 must be less than the interval (10)"),
    ({"schedule": {"interval": "often"}}, "schedule.interval: 'often' is not a number"),
    (
        {"colour": "blue"},
        "colour: unknown key (one of ca_file, canaries, collector, concurrency, confirm_after, controls, lists, log, metrics, probe, qps, qtypes, resolvers, schedule, spool, state_dir, timeout, udp_linger, verify)",
    ),
    ({"qtypes": ["MX"]}, "qtypes: ['MX'] must be a non-empty list of A, AAAA, HTTPS"),
    (
        {"collector": {"url": "ftp://x", "token_env": "BLOCKPROBE_NO_SUCH_VAR"}},
        "collector.url: 'ftp://x' is not an http(s) URL",
    ),
]


@pytest.mark.parametrize(("override", "message"), INVALID)
def test_each_config_mistake_is_named(
    tmp_path: Path, isp: LabServer, control: LabServer, override: dict[str, Any], message: str
) -> None:
    doc = json.loads(_config_text(tmp_path, isp, control, "http://127.0.0.1:9"))
    doc.update(override)
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(doc), "probe.yaml")
    assert f"probe.yaml: {message}" in info.value.errors


def test_check_config_prints_a_summary_without_the_token(
    tmp_path: Path, isp: LabServer, control: LabServer
) -> None:
    config = _write_config(tmp_path, isp, control, "http://127.0.0.1:9")
    ok = subprocess.run(
        [sys.executable, "-m", "probe.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "probe it-test-1 in region it-lab, country IT" in ok.stdout
    assert TOKEN not in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        _config_text(tmp_path, isp, control, "http://127.0.0.1:9")
        .replace('"IT"', '"ITA"')
        .replace('"interval": 1', '"interval": -5')
    )
    result = subprocess.run(
        [sys.executable, "-m", "probe.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"probe: {bad}: probe.country: 'ITA' is not an ISO 3166-1 alpha-2 code",
        f"probe: {bad}: schedule.interval: -5 must be at least 1",
    ]


def test_health_metrics_are_served(
    tmp_path: Path, isp: LabServer, control: LabServer, collector: FakeCollector
) -> None:
    import urllib.request

    from .real import free_port

    port = free_port("127.0.0.1")
    run = _Running(
        _write_config(tmp_path, isp, control, collector.url, metrics={"listen": f"127.0.0.1:{port}"})
    )
    try:
        wait_for(
            lambda: (
                run.daemon.rounds_done >= 1
                and run.daemon.spool.depth() == 0
                and len(collector.results()) >= PER_ROUND
            ),
            30,
            "a pushed round",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        run.stop()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['blockprobe_probe_rounds_total{result="ok"}'] >= 1
    assert samples['blockprobe_probe_queries_total{outcome="nxdomain",transport="udp"}'] >= 1
    assert samples["blockprobe_probe_spool_results"] == 0
    assert samples["blockprobe_probe_pushed_results_total"] >= PER_ROUND
    assert samples["blockprobe_probe_last_push_timestamp_seconds"] > 1.7e9
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_answer_checks_and_the_confirmation_delay_are_configured_strictly(tmp_path: Path) -> None:
    base = {"probe": {"id": "t", "region": "r", "country": "IT"}, "resolvers": ["udp://127.0.0.1"]}
    config = parse_config(json.dumps(base), "probe.yaml", tmp_path)
    assert (config.verify.mode, config.confirm_after) == ("tls", 10)  # checks on unless said otherwise
    with pytest.raises(ConfigError) as err:
        parse_config(
            json.dumps({**base, "verify": {"mode": "maybe"}, "confirm_after": -1}), "probe.yaml", tmp_path
        )
    assert err.value.errors == [
        "probe.yaml: verify.mode: 'maybe' is not one of off, tls, http",
        "probe.yaml: confirm_after: -1 must be between 0 and 300",
    ]


def test_a_plain_http_collector_off_this_machine_is_refused(tmp_path: Path) -> None:
    base = {"probe": {"id": "t", "region": "r", "country": "IT"}, "resolvers": ["udp://127.0.0.1"]}
    collector: dict[str, Any] = {"url": "http://192.0.2.8:8478", "token": "t0ken"}
    remote = {**base, "collector": collector}
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(remote), "probe.yaml", tmp_path)
    assert err.value.errors == [
        "probe.yaml: collector.url: 'http://192.0.2.8:8478' sends the token in clear text off this "
        "machine: use https:// (or collector.allow_plain_http: true behind a trusted tunnel)"
    ]
    allowed = {**base, "collector": {**collector, "allow_plain_http": True}}
    assert parse_config(json.dumps(allowed), "probe.yaml", tmp_path).collector is not None
    local = {**base, "collector": {"url": "http://127.0.0.1:8478", "token": "t0ken"}}
    assert parse_config(json.dumps(local), "probe.yaml", tmp_path).collector is not None
