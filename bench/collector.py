"""Collector throughput and /metrics render time, on SQLite and (when installed) PostgreSQL.

    python -m bench.collector [--batches 200] [--senders 50] [--stores sqlite,postgresql] [--hammer 8]

Starts `collector serve` as a real process, sends batches of 1,000 measurements from 50
concurrent senders (httpx2, gzip) through the whole authentication-first path, and
reports results stored per second against the store's own rate in this process (the
reference: the same batches straight into a fresh store) and the server's peak RSS.
Then it fills the latest state to 100 probes × 50 resolver endpoints with 5,000 current
leaks and times /metrics: alone, and while four clients hammer `/` and `/metrics`
(with a probe pushing 1,000-result batches meanwhile, whose latency is reported too).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import multiprocessing
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx2

from collector.auth import hash_token, new_token
from collector.metrics import render_findings
from collector.store import open_store
from tests.real import free_port

HOST = "127.0.0.1"


def _measurement(i: int, finding: str) -> dict[str, Any]:
    return {
        "domain": f"n{i}.pirate-{i % 50}.example",
        "qtype": "A",
        "resolver": f"udp://192.0.2.{i % 50}",
        "transport": "udp",
        "outcome": "resolved" if finding == "leak" else "nxdomain",
        "blocked": finding != "leak",
        "expected": "blocked",
        "finding": finding,
        "rcode": "NOERROR",
        "ede": [],
        "answers": ["93.184.216.34"],
        "cname": [],
        "sinkhole": None,
        "control": {"outcome": "resolved", "answers": ["93.184.216.34"]},
        "latency_ms": 12.5,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "error": None,
        "wire": "AAGBgAABAAEAAAABAmlpB2V4YW1wbGUDb3JnAAABAAHADAABAAEAAAA8AARduNgiAAApBNAAAAAAAAA=",
        "expected_by": {"order": "bench-order"},
    }


def _rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


async def _send_all(url: str, tokens: dict[str, str], batches: int, senders: int) -> float:
    bodies = []
    for b in range(batches):
        probe = f"p{b % len(tokens)}"
        ms = [_measurement(b * 1000 + i, "enforced") for i in range(1000)]
        doc = {
            "probe": {"id": probe, "region": "r", "country": "IT"},
            "batch_id": str(uuid.uuid4()),
            "measurements": ms,
        }
        bodies.append((probe, gzip.compress(json.dumps(doc).encode(), 5)))
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    async with httpx2.AsyncClient(timeout=120, limits=httpx2.Limits(max_connections=senders)) as client:

        async def sender() -> None:
            while not queue.empty():
                probe, body = queue.get_nowait()
                r = await client.post(
                    f"{url}/api/v1/results",
                    content=body,
                    headers={
                        "authorization": f"Bearer {tokens[probe]}",
                        "content-encoding": "gzip",
                        "content-type": "application/json",
                    },
                )
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(senders)))
        return time.perf_counter() - t0


def _direct_rate(work: Path, batches: int) -> float:
    """The reference: the same kind of batches stored straight into a fresh SQLite store, no HTTP."""
    store = open_store(f"sqlite:///{work / 'direct.sqlite3'}")
    docs = [[_measurement(b * 1000 + i, "enforced") for i in range(1000)] for b in range(min(batches, 50))]
    t0 = time.perf_counter()
    for ms in docs:
        store.ingest({"id": "p0", "region": "r", "country": "IT"}, str(uuid.uuid4()), ms, time.time())
    elapsed = time.perf_counter() - t0
    store.close()
    return len(docs) * 1000 / elapsed


def _until(start: float) -> None:
    time.sleep(max(0.0, start - time.time()))


def _reader(url: str, path: str, start: float, stop: float, out: Any) -> None:
    _until(start)
    n = 0
    with httpx2.Client(base_url=url, timeout=30) as c:
        while time.time() < stop:
            c.get(path).raise_for_status()
            n += 1
    out.put(("reader", n))


def _timer(url: str, start: float, stop: float, out: Any) -> None:
    _until(start)
    times = []
    with httpx2.Client(base_url=url, timeout=30) as c:
        while time.time() < stop:
            t0 = time.perf_counter()
            c.get("/metrics").raise_for_status()
            times.append(time.perf_counter() - t0)
            time.sleep(0.1)
    out.put(("metrics", times))


def _pusher(url: str, token: str, start: float, stop: float, out: Any) -> None:
    _until(start)
    times = []
    with httpx2.Client(base_url=url, timeout=30) as c:
        while time.time() < stop:
            doc = {
                "probe": {"id": "p0", "region": "r", "country": "IT"},
                "batch_id": str(uuid.uuid4()),
                "measurements": [_measurement(i, "enforced") for i in range(1000)],
            }
            body = gzip.compress(json.dumps(doc).encode(), 5)
            t0 = time.perf_counter()
            c.post(
                "/api/v1/results",
                content=body,
                headers={
                    "authorization": f"Bearer {token}",
                    "content-encoding": "gzip",
                    "content-type": "application/json",
                },
            ).raise_for_status()
            times.append(time.perf_counter() - t0)
            time.sleep(0.2)
    out.put(("pushes", times))


def _hammer(url: str, token: str, seconds: float) -> dict[str, float]:
    """Four clients loop on / and /metrics; a fifth times /metrics; a probe pushes meanwhile.
    Each is its own process, as real clients are: in threads of one process they waited for
    each other's turn at the interpreter, and that wait was counted as the collector's."""
    httpx2.get(f"{url}/metrics", timeout=60).raise_for_status()  # warm, as a scraped collector is
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 5  # time for the processes to start and import
    stop = start + seconds
    procs = [ctx.Process(target=_reader, args=(url, p, start, stop, out)) for p in ("/", "/metrics") * 2]
    procs += [
        ctx.Process(target=_timer, args=(url, start, stop, out)),
        ctx.Process(target=_pusher, args=(url, token, start, stop, out)),
    ]
    for p in procs:
        p.start()
    got: dict[str, list[float]] = {"metrics": [], "pushes": [], "reader": []}
    for _ in procs:
        kind, value = out.get(timeout=seconds + 120)
        if isinstance(value, list):
            got[kind] += value
        else:
            got[kind].append(value)
    for p in procs:
        p.join(60)
    metrics = sorted(got["metrics"])
    pushes = got["pushes"]
    return {
        "hammer_reads": sum(got["reader"]),
        "hammer_metrics_n": len(metrics),
        "hammer_metrics_over_500": sum(1 for m in metrics if m > 0.5),
        "hammer_metrics_p50_ms": metrics[len(metrics) // 2] * 1000,
        "hammer_metrics_p95_ms": metrics[int(len(metrics) * 0.95)] * 1000,
        "hammer_metrics_max_ms": metrics[-1] * 1000,
        "hammer_push_p50_ms": statistics.median(pushes) * 1000,
        "hammer_push_max_ms": max(pushes) * 1000,
    }


def run(database: str, work: Path, batches: int, senders: int, hammer_s: float = 8) -> dict[str, float]:
    port = free_port(HOST)
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "collector.yaml"
    cfg.write_text(
        f"listen: {HOST}:{port}\nstate_dir: {work / 'state'}\ndatabase: {database}\nstale_after: 3600\n"
    )
    store = open_store(database)
    tokens = {}
    for p in range(100):
        tokens[f"p{p}"] = new_token()
        store.set_token(f"p{p}", hash_token(tokens[f"p{p}"]))
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx2.get(f"{url}/healthz", timeout=1).raise_for_status()
                break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline, "collector did not start"
                time.sleep(0.2)
        elapsed = asyncio.run(_send_all(url, tokens, batches, senders))
        # The state to render: 100 probes × 50 resolver endpoints × 20 names (100,000 current series
        # on top of what the ingest left), one leak per probe and endpoint: 5,000 current leaks.
        store = open_store(database)
        with store.tx() as cur:  # only that state: not the series the ingest run left behind
            cur.execute("DELETE FROM latest")
        for p in range(100):
            ms = []
            for e in range(50):
                for n in range(20):
                    m = _measurement(n, "leak" if n == 0 else "enforced")
                    m["resolver"] = f"udp://198.51.100.{e}"
                    ms.append(m)
            store.ingest({"id": f"p{p}", "region": "r", "country": "IT"}, str(uuid.uuid4()), ms, time.time())
        store.close()
        # The render itself, uncached (the reference for /metrics under load), in this process.
        store = open_store(database)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            text = render_findings(store, 3600)
            times.append(time.perf_counter() - t0)
        store.close()
        leaks = sum(1 for line in text.splitlines() if line.startswith("blockprobe_leak{"))
        hammer = _hammer(url, tokens["p0"], hammer_s)
        rss = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "results_per_s": batches * 1000 / elapsed,
        "render_ms": sorted(times)[2] * 1000,
        "leak_series": leaks,
        "peak_rss_mib": rss,
        "exit": proc.returncode,
        **hammer,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--senders", type=int, default=50)
    ap.add_argument("--stores", default="sqlite,postgresql", help="Which stores to run, comma-separated.")
    ap.add_argument("--hammer", type=float, default=8, help="Seconds of hammering / and /metrics.")
    args = ap.parse_args()
    stores = args.stores.split(",")
    work = Path(tempfile.mkdtemp(prefix="blockprobe-collector-bench-"))
    direct = _direct_rate(work, args.batches)
    rows = []
    if "sqlite" in stores:
        rows.append(
            (
                "sqlite",
                run(
                    f"sqlite:///{work / 'sqlite' / 'c.sqlite3'}",
                    work / "sqlite",
                    args.batches,
                    args.senders,
                    args.hammer,
                ),
            )
        )
    from tests.pg import TempPostgres, find_pg_bin

    if "postgresql" in stores and find_pg_bin() is not None:
        pg = TempPostgres()
        try:
            rows.append(
                (
                    "postgresql",
                    run(pg.fresh_database("bench"), work / "pg", args.batches, args.senders, args.hammer),
                )
            )
        finally:
            pg.stop()
    load = Path("/proc/loadavg").read_text().split()[0]
    print(
        f"reference: {direct:.0f} results/s straight into a SQLite store in this process; load average {load}\n"
    )
    print(
        f"| store | results/s over HTTP ({args.batches} × 1,000, {args.senders} senders) | ÷ reference | "
        "render (ms, median of 5) | /metrics under 4 readers p50 / p95 / max (ms) | of them over 500 ms (readers' requests) "
        "| push of 1,000 meanwhile p50 / max (ms) "
        "| leak series | peak RSS (MiB) | exit on SIGTERM |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['results_per_s']:.0f} | {r['results_per_s'] / direct:.2f} | {r['render_ms']:.0f} | "
            f"{r['hammer_metrics_p50_ms']:.0f} / {r['hammer_metrics_p95_ms']:.0f} / {r['hammer_metrics_max_ms']:.0f} | "
            f"{r['hammer_metrics_over_500']:.0f} of {r['hammer_metrics_n']:.0f} ({r['hammer_reads']:.0f} reads) | "
            f"{r['hammer_push_p50_ms']:.0f} / {r['hammer_push_max_ms']:.0f} | {r['leak_series']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['exit']} |"
        )


if __name__ == "__main__":
    main()
