"""Soak: `probe run` against lab resolvers (one hostile), a collector that flaps, and kill -9.

    python -m bench.soak            # short: about 3 minutes
    python -m bench.soak --long     # 30 minutes: the schedule of the issue, at full length

A real `probe run` process measures names on two lab resolvers in this process (UDP
and TCP) and a hostile one (TCP, hundreds of answers, kilobytes of EDE text, JSON
nested 255 deep), with a lab control. The local collector enforces the real collector's
bounds (tests/fake_collector.py, strict) and, on a schedule: goes down (its port closed),
answers 422 to everything for a while, then 429 with Retry-After. The probe is killed
with SIGKILL every few minutes and started again at once. At the end the probe is
stopped with SIGTERM and `probe spool resend` offers the quarantine again.

Reported: measurements made (each process's query counter, scraped just before its
kill -9 or SIGTERM), and of those still in memory at each kill -9 (made but not yet
written: what the kill lost); measurements written to the spool over all processes, acknowledged,
quarantined, lost (written but neither acknowledged, quarantined, dropped nor still
spooled; goal 0), duplicated (a measurement stored twice by the collector; goal 0),
time from the collector's recovery to an empty spool and the backlog it started from
(goal ≤ 10 s for 10,000 results), the longest round, and RSS per process after its
warm-up and at its end (goal: flat within 10 %).

The probe runs with the shipped defaults for pushing (retry 1 s to 5 s, 20 requests/s,
batches of 500), so the recovery figure is what a deployed probe does.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from probe.daemon.spool import ReadOnlySpool
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from tests.fake_collector import FakeCollector, HostileResolver
from tests.real import free_port

ZONE = "soak-lab.net"
TOKEN = "soak-token"
DEEP = "{" + '"a":{' * 254 + '"b":1' + "}" * 255
HOSTILE = {
    f"many.{ZONE}": Behaviour(records={"A": tuple(f"93.184.{i // 256}.{i % 256}" for i in range(300))}),
    f"edes.{ZONE}": Behaviour(
        records={"A": ("93.184.216.34",)}, ede=tuple((0, f"note {i}") for i in range(20))
    ),
    f"long.{ZONE}": Behaviour(records={"A": ("93.184.216.34",)}, ede=((0, "x" * 5000),)),
    f"deep.{ZONE}": Behaviour(records={"A": ("93.184.216.34",)}, ede=((0, DEEP),)),
    f"inf.{ZONE}": Behaviour(records={"A": ("93.184.216.34",)}, ede=((0, '{"c":1e999}'),)),
}


@dataclass
class Plan:
    """When things happen, in seconds from the start."""

    duration: float
    interval: float
    names: int
    down: list[tuple[float, float]]
    refuse: tuple[float, float]
    throttle: tuple[float, float]
    kills: list[float]


SHORT = Plan(
    duration=170,
    interval=10,
    names=1000,
    down=[(15, 50)],
    refuse=(85, 95),
    throttle=(105, 115),
    kills=[70, 130],
)
LONG = Plan(
    duration=1800,
    interval=10,
    names=1000,
    down=[(60 + 300 * k, 120 + 300 * k) for k in range(6)],
    refuse=(400, 430),
    throttle=(700, 730),
    kills=[200 + 180 * k for k in range(9)],
)


@dataclass
class Probe:
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    rss: list[list[tuple[float, float]]] = field(default_factory=list)  # per process: (t, MiB)
    written_before: list[int] = field(default_factory=list)  # the spool's count at each start
    # per process: (measured, written by it) at the last scrape before its end
    at_end: list[tuple[float, float]] = field(default_factory=list)

    def start(self) -> None:
        self.written_before.append(_written(self.config.parent / "state" / "spool.sqlite3"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "probe.cli", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("a"),
        )
        self.rss.append([])

    def sample(self, t: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        m = re.search(r"VmRSS:\s+(\d+)", text)
        if m:
            self.rss[-1].append((t, int(m.group(1)) / 1024))

    def kill(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(60)


def _written(path: Path) -> int:
    """The spool's lifetime count of measurements written (read while no probe runs)."""
    if not path.exists():
        return 0
    spool = ReadOnlySpool(path)
    try:
        return spool.counters()["written_total"]
    finally:
        spool.close()


def _measured(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("blockprobe_probe_queries_total{"))


def _scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> None:  # noqa: C901 - the soak's timeline in one place: one branch per scripted event
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", action="store_true", help="30 minutes instead of about 3")
    args = ap.parse_args()
    plan = LONG if args.long else SHORT
    work = Path(tempfile.mkdtemp(prefix="blockprobe-soak-"))
    ca = LabCA(hosts=("127.53.6.1", "127.53.6.9"), directory=work)
    names = [f"n{i}.{ZONE}" for i in range(plan.names)] + list(HOSTILE)
    zone = Zone()
    zone.set(f"*.{ZONE}", Behaviour(records={"A": ("93.184.216.34",)}))
    truth = Zone()
    truth.set(f"*.{ZONE}", Behaviour(records={"A": ("93.184.216.34",)}))
    lab = LabThread()
    isp = lab.start(LabServer(zone, "127.53.6.1", ca, transports=("udp", "tcp")))
    control = lab.start(LabServer(truth, "127.53.6.9", ca, transports=("udp",)))
    hostile = HostileResolver(HOSTILE)
    collector = FakeCollector(TOKEN)
    collector.strict = True
    port = collector.port
    metrics_port = free_port("127.0.0.1")
    (work / "token").write_text(TOKEN)
    orders = {
        "orders": [
            {"id": "soak", "authority": "S", "jurisdictions": ["IT"], "applies_to": ["isp"], "domains": names}
        ]
    }
    (work / "lists.yaml").write_text(json.dumps(orders))
    config = {
        "probe": {"id": "soak-1", "region": "soak", "country": "IT"},
        "collector": {"url": collector.url, "token_file": str(work / "token"), "timeout": 5},
        "resolvers": [
            {"spec": isp.specs()["udp"], "kind": "isp"},
            isp.specs()["tcp"],
            {"spec": hostile.spec, "kind": "isp"},
        ],
        "controls": [control.specs()["udp"]],
        "lists": [str(work / "lists.yaml")],
        "qtypes": ["A"],
        "schedule": {"interval": plan.interval, "jitter": 0, "push_interval": 2},
        "timeout": 3,
        "udp_linger": 0,
        "qps": 0,
        "concurrency": 64,
        "state_dir": str(work / "state"),
        "verify": {"mode": "off"},  # loopback only
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "log": {"format": "json", "level": "info"},
    }
    (work / "probe.yaml").write_text(json.dumps(config))
    probe = Probe(work / "probe.yaml", work / "probe.log")
    saved = collector
    recoveries: list[tuple[float, float | None]] = []  # (backlog at recovery, seconds to empty)
    kills = list(plan.kills)
    down = list(plan.down)
    print(f"soak: {plan.duration:.0f}s, work in {work}", flush=True)
    t0 = time.monotonic()
    probe.start()
    try:
        waiting_recovery: tuple[float, float] | None = None  # (t up, backlog)
        last_sample = 0.0
        while (now := time.monotonic() - t0) < plan.duration:
            if down and down[0][0] <= now < down[0][1] and collector is not None:
                print(f"{now:6.1f}s collector down", flush=True)
                saved = collector
                saved.stop()
                collector = None  # type: ignore[assignment]
            if down and now >= down[0][1] and collector is None:
                collector = FakeCollector(TOKEN, port=port)
                collector.strict = True
                collector.batches, collector.requests, collector.times = (
                    saved.batches,
                    saved.requests,
                    saved.times,
                )
                backlog = _scrape(metrics_port).get("blockprobe_probe_spool_results", -1)
                waiting_recovery = (now, backlog)
                down.pop(0)
                print(f"{now:6.1f}s collector up, backlog {backlog:.0f}", flush=True)
            if collector is not None:
                refusing = plan.refuse[0] <= now < plan.refuse[1]
                collector.refuse = (
                    (lambda _m: "qtype: refused by a bad deploy") if refusing else (lambda _m: None)
                )
                throttled = plan.throttle[0] <= now < plan.throttle[1]
                collector.mode, collector.retry_after = ("429", "3") if throttled else ("ack", None)
            if (
                waiting_recovery is not None
                and _scrape(metrics_port).get("blockprobe_probe_spool_results") == 0
            ):
                recoveries.append((waiting_recovery[1], now - waiting_recovery[0]))
                print(
                    f"{now:6.1f}s backlog empty, {now - waiting_recovery[0]:.1f}s after recovery", flush=True
                )
                waiting_recovery = None
            if kills and now >= kills[0]:
                kills.pop(0)
                last = _scrape(metrics_port)
                probe.kill(signal.SIGKILL)
                wrote = _written(work / "state" / "spool.sqlite3") - probe.written_before[-1]
                probe.at_end.append((_measured(last), wrote))
                print(
                    f"{now:6.1f}s kill -9 ({_measured(last):.0f} measured, {wrote} written by the process), "
                    "restarted",
                    flush=True,
                )
                probe.start()
            if now - last_sample >= 5:
                probe.sample(now)
                last_sample = now
            time.sleep(0.2)
        if waiting_recovery is not None:
            recoveries.append((waiting_recovery[1], None))
        last = _scrape(metrics_port)
        code = probe.kill(signal.SIGTERM)
        probe.at_end.append(
            (_measured(last), _written(work / "state" / "spool.sqlite3") - probe.written_before[-1])
        )
        if collector is None:
            collector = FakeCollector(TOKEN, port=port)
            collector.batches, collector.requests, collector.times = (
                saved.batches,
                saved.requests,
                saved.times,
            )
        collector.mode, collector.refuse = "ack", (lambda _m: None)
        resend = subprocess.run(
            [sys.executable, "-m", "probe.cli", "spool", "resend", "--config", str(probe.config)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        spool = ReadOnlySpool(work / "state" / "spool.sqlite3")
        counts = spool.counters()
        left, quarantine_left = spool.depth(), spool.quarantine_depth()
        spool.close()
    finally:
        if probe.proc is not None and probe.proc.poll() is None:
            probe.proc.kill()
        if collector is not None:
            collector.stop()
        hostile.shutdown()
        hostile.server_close()
        lab.stop()
    results = collector.results()
    keys = Counter((m["endpoint"], m["domain"], m["qtype"], m["time"]) for m in results)
    duplicated = sum(n - 1 for n in keys.values() if n > 1)
    unique = len(keys)
    lost = counts["written_total"] - unique - quarantine_left - left - counts["dropped_total"]
    rounds = []
    for line in probe.log.read_text().splitlines():
        if line.startswith("{"):
            msg = json.loads(line)["message"]
            m = re.match(r"round (\d+): (\d+) measurements in ([0-9.]+)s \((\w+)\)", msg)
            if m:
                rounds.append((float(m.group(3)), m.group(4)))
    print()
    print(
        f"soak of {plan.duration:.0f}s: {len(plan.kills)} kill -9, {len(plan.down)} collector outages, "
        f"422 for {plan.refuse[1] - plan.refuse[0]:.0f}s, 429 (Retry-After 3) for "
        f"{plan.throttle[1] - plan.throttle[0]:.0f}s; SIGTERM exit status {code}"
    )
    print(
        f"  rounds: {len(rounds)} completed, longest {max(r[0] for r in rounds):.1f}s, "
        f"results {dict(Counter(r[1] for r in rounds))}"
    )
    measured = sum(m for m, _ in probe.at_end)
    unwritten = [max(0.0, m - w) for m, w in probe.at_end[:-1]]
    print(
        f"  measured (query counters, scraped just before each kill -9 and the SIGTERM): {measured:.0f}; "
        f"of those counted before each kill -9, not written by it: {', '.join(f'{u:.0f}' for u in unwritten)}"
    )
    print(f"  measurements written to the spool: {counts['written_total']}")
    print(f"  acknowledged by the collector: {unique} unique ({len(results)} stored)")
    print(
        f"  quarantined during the run: {counts['quarantined_total']}; after `probe spool resend`: "
        f"{quarantine_left} left ({resend.stdout.strip()})"
    )
    print(f"  still in the spool: {left}; dropped (spool full): {counts['dropped_total']}")
    print(f"  lost: {lost} (goal 0); duplicated: {duplicated} (goal 0)")
    print(
        f"  unclean starts counted by the probe: {counts['unclean_starts_total']} (kill -9: {len(plan.kills)})"
    )
    for backlog, seconds in recoveries:
        took = "not emptied before the end" if seconds is None else f"{seconds:.1f}s"
        print(f"  collector recovery with {backlog:.0f} results queued: spool empty after {took}")
    for i, samples in enumerate(probe.rss):
        warm = [rss for t, rss in samples[2:]]  # after the first two samples (10 s): warmed up
        if len(warm) >= 2:
            change = (warm[-1] - warm[0]) / warm[0] * 100
            print(
                f"  process {i + 1}: RSS {warm[0]:.0f} MiB after warm-up, {warm[-1]:.0f} MiB at its end "
                f"({change:+.1f} %, {len(samples)} samples)"
            )


if __name__ == "__main__":
    main()
