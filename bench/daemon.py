"""`probe run` at scale: one round of 10,000 names × 3 qtypes × 6 endpoints, memory and time.

    python -m bench.daemon [--names 10000] [--qps 0]
    python -m bench.daemon --loop-lag [--chunks 40]

`--loop-lag` measures what spool writes cost the event loop that times DNS queries: a
ticker asks to wake every millisecond and records how late it wakes, while chunks of 500
measurements are written to a spool, once on the loop itself (the old way, the
reference) and once the daemon's way (each measurement encoded on the loop as it comes,
the chunk committed by the spool's writer thread), same run.

Two unbound servers on 127.53.5.4 and 127.53.5.5 hold the names; the probe measures
them over udp, tcp, dot and doh on the first and udp and tcp on the second (six
endpoints), spools every result (a local collector acknowledges them), and we read
its RSS from /proc: after start-up, at peak, and idle after the round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from probe.lab import LabCA
from tests.fake_collector import FakeCollector, wait_for
from tests.real import start_unbound

ZONE = "round-lab.net"


def _rss(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def _measurement(i: int) -> dict[str, object]:
    return {
        "domain": f"n{i}.{ZONE}",
        "qtype": "A",
        "resolver": "udp://127.0.0.1",
        "transport": "udp",
        "outcome": "resolved",
        "blocked": False,
        "expected": "blocked",
        "finding": "leak",
        "rcode": "NOERROR",
        "ede": [],
        "answers": ["93.184.216.34"],
        "cname": [],
        "sinkhole": None,
        "control": None,
        "latency_ms": 1.2,
        "time": "2026-12-01T10:00:00.000Z",
        "error": None,
        "wire": "A" * 80,
        "endpoint": "udp://127.0.0.1:53",
        "evidence": {"nsid": "lab"},
    }


async def _lagged(write: Callable[[list[dict[str, object]]], Awaitable[object]], chunks: int) -> list[float]:
    """Write `chunks` chunks of 500 while a ticker measures how late the loop wakes it (ms)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t - 0.001) * 1000)

    task = asyncio.create_task(ticker())
    for c in range(chunks):
        await write([_measurement(c * 500 + i) for i in range(500)])
        await asyncio.sleep(0.01)  # a round hands over a chunk now and then, not back to back
    done.set()
    await task
    return lags


def loop_lag(chunks: int) -> None:
    from probe.daemon.spool import Spool, SpoolThread, encode

    work = Path(tempfile.mkdtemp(prefix="blockprobe-looplag-"))
    on_loop = Spool(work / "a.sqlite3")
    threaded = SpoolThread(Spool(work / "b.sqlite3"))

    async def direct(rows: list[dict[str, object]]) -> object:
        return on_loop.add(rows)

    async def via_thread(rows: list[dict[str, object]]) -> object:
        # As the daemon does: each measurement encoded on the loop as it comes, between
        # the engine's yields; the chunk of text then committed on the spool's thread.
        encoded = []
        for i, m in enumerate(rows):
            encoded.append(encode(m))
            if i % 50 == 49:
                await asyncio.sleep(0)
        return await threaded.call(threaded.spool.add_encoded, encoded)

    results = {}
    for name, write in (
        ("spool.add on the loop (reference)", direct),
        ("spool thread (the daemon)", via_thread),
    ):
        lags = sorted(asyncio.run(_lagged(write, chunks)))
        results[name] = (lags[len(lags) // 2], lags[int(len(lags) * 0.99)], lags[-1], len(lags))
    threaded.shutdown()
    print(f"event-loop lag while writing {chunks} chunks of 500 measurements (synchronous=FULL, WAL):")
    print("| writes | ticks | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, (p50, p99, worst, n) in results.items():
        print(f"| {name} | {n} | {p50:.2f} | {p99:.2f} | {worst:.2f} |")
    (_, ref99, refmax, _), (_, p99, worst, _) = results.values()
    print(
        f"ratio reference / daemon: p99 {ref99 / max(p99, 1e-3):.1f}x, max {refmax / max(worst, 1e-3):.1f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=10000)
    ap.add_argument("--qps", type=float, default=0, help="per-endpoint rate limit (0: none)")
    ap.add_argument("--loop-lag", action="store_true", help="only the event-loop lag of spool writes")
    ap.add_argument("--chunks", type=int, default=40, help="with --loop-lag: chunks of 500 written")
    args = ap.parse_args()
    if args.loop_lag:
        loop_lag(args.chunks)
        return
    work = Path(tempfile.mkdtemp(prefix="blockprobe-daemon-bench-"))
    ca = LabCA(hosts=("127.53.5.4", "127.53.5.5"), directory=work)
    names = [f"n{i}.{ZONE}" for i in range(args.names)]
    zone = "".join(f"n{i} 3600 IN A 93.184.{i // 256 % 256}.{i % 256}\n" for i in range(args.names))
    (work / "lists.yaml").write_text(
        json.dumps({"orders": [{"id": "bench", "authority": "B", "jurisdictions": ["IT"], "domains": names}]})
    )
    servers = [
        start_unbound(
            work / f"u{i}", f"127.53.5.{4 + i}", ca.cert_file, ca.key_file, zone_name=ZONE, zone_text=zone
        )
        for i in range(2)
    ]
    collector = FakeCollector("bench-token")
    (work / "token").write_text("bench-token")
    a, b = servers[0].specs, servers[1].specs
    config = {
        "probe": {"id": "bench-1", "region": "bench", "country": "IT"},
        "collector": {"url": collector.url, "token_file": str(work / "token"), "batch_size": 1000},
        "resolvers": [a["udp"], a["tcp"], a["dot"], a["doh"], b["udp"], b["tcp"]],
        "lists": [str(work / "lists.yaml")],
        "controls": [a["tcp"]],
        "schedule": {"interval": 3600, "jitter": 0, "push_interval": 1},
        "qps": args.qps,
        "timeout": 5,
        "udp_linger": 0.2,
        "concurrency": 100,
        "ca_file": str(ca.ca_file),
        "state_dir": str(work / "state"),
        "verify": {"mode": "off"},  # loopback only
        "log": {"format": "json"},
    }
    (work / "probe.yaml").write_text(json.dumps(config))
    proc = None
    try:
        for s in servers:
            s.wait_ready(names[0])
        # Idle: the same daemon with nothing listed, once its (empty) first round is done.
        (work / "idle.yaml").write_text(json.dumps({**config, "lists": [], "state_dir": str(work / "idle")}))
        idle = subprocess.Popen(
            [sys.executable, "-m", "probe.cli", "run", "--config", str(work / "idle.yaml")],
            stdout=subprocess.DEVNULL,
            stderr=(work / "idle.log").open("w"),
        )
        wait_for(lambda: "round 1:" in (work / "idle.log").read_text(), 60, "the idle round")
        time.sleep(1.0)
        start_rss, _ = _rss(idle.pid)
        idle.terminate()
        idle.wait(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe.cli", "run", "--config", str(work / "probe.yaml")],
            stdout=subprocess.DEVNULL,
            stderr=(work / "log").open("w"),
        )
        total = args.names * 3 * 6
        t0 = time.perf_counter()
        wait_for(lambda: "round 1:" in (work / "log").read_text(), 3600, "the round")
        round_s = time.perf_counter() - t0
        wait_for(lambda: len(collector.results()) >= total, 600, "the push")
        time.sleep(2.0)
        idle_rss, peak = _rss(proc.pid)
        log_line = next(ln for ln in (work / "log").read_text().splitlines() if "round 1:" in ln)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        for s in servers:
            s.stop()
        collector.stop()
    print(
        f"round of {args.names} names x 3 qtypes x 6 endpoints ({total} measurements), qps {args.qps or 'unlimited'}:"
    )
    print(f"  {json.loads(log_line)['message']}; wall {round_s:.1f}s from start")
    print(
        f"  RSS idle (nothing listed) {start_rss:.0f} MiB; with the round: peak {peak:.0f} MiB, "
        f"idle after it {idle_rss:.0f} MiB"
    )
    print(f"  {len(collector.results())} results acknowledged by the collector")


if __name__ == "__main__":
    main()
