"""Collector throughput and /metrics render time, on SQLite and (when installed) PostgreSQL.

    python -m bench.collector [--batches 200] [--senders 50]

Starts `collector serve` as a real process, sends batches of 1,000 measurements from 50
concurrent senders (httpx2, gzip), and reports results stored per second and the
server's peak RSS; then fills the latest state to 100 probes × 50 resolver endpoints
with 5,000 current leaks and times /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx2

from collector.auth import hash_token, new_token
from collector.store import open_store
from tests.real import free_port

HOST = "127.0.0.1"


def _measurement(i: int, probe: int, finding: str) -> dict[str, Any]:
    return {"domain": f"n{i}.pirate-{i % 50}.example", "qtype": "A", "resolver": f"udp://192.0.2.{i % 50}",
            "transport": "udp", "outcome": "resolved" if finding == "leak" else "nxdomain",
            "blocked": finding != "leak", "expected": "blocked", "finding": finding, "rcode": "NOERROR",
            "ede": [], "answers": ["93.184.216.34"], "cname": [], "sinkhole": None,
            "control": {"outcome": "resolved", "answers": ["93.184.216.34"]}, "latency_ms": 12.5,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "error": None,
            "wire": "AAGBgAABAAEAAAABAmlpB2V4YW1wbGUDb3JnAAABAAHADAABAAEAAAA8AARduNgiAAApBNAAAAAAAAA=",
            "expected_by": {"order": "bench-order"}}  # fmt: skip


def _rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


async def _send_all(url: str, tokens: dict[str, str], batches: int, senders: int) -> float:
    bodies = []
    for b in range(batches):
        probe = f"p{b % len(tokens)}"
        ms = [_measurement(b * 1000 + i, b % len(tokens), "enforced") for i in range(1000)]
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
                r = await client.post(f"{url}/api/v1/results", content=body, headers={
                    "authorization": f"Bearer {tokens[probe]}", "content-encoding": "gzip",
                    "content-type": "application/json"})  # fmt: skip
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(senders)))
        return time.perf_counter() - t0


def run(database: str, work: Path, batches: int, senders: int) -> dict[str, float]:
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
    proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
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
                    m = _measurement(n, p, "leak" if n == 0 else "enforced")
                    m["resolver"] = f"udp://198.51.100.{e}"
                    ms.append(m)
            store.ingest({"id": f"p{p}", "region": "r", "country": "IT"}, str(uuid.uuid4()), ms, time.time())
        store.close()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            text = httpx2.get(f"{url}/metrics", timeout=30).text
            times.append(time.perf_counter() - t0)
        leaks = sum(1 for line in text.splitlines() if line.startswith("blockprobe_leak{"))
        rss = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"results_per_s": batches * 1000 / elapsed, "metrics_ms": sorted(times)[2] * 1000, "leak_series": leaks,
            "peak_rss_mib": rss}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--senders", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blockprobe-collector-bench-"))
    rows = [
        (
            "sqlite",
            run(f"sqlite:///{work / 'sqlite' / 'c.sqlite3'}", work / "sqlite", args.batches, args.senders),
        )
    ]
    from tests.pg import TempPostgres, find_pg_bin

    if find_pg_bin() is not None:
        pg = TempPostgres()
        try:
            rows.append(
                ("postgresql", run(pg.fresh_database("bench"), work / "pg", args.batches, args.senders))
            )
        finally:
            pg.stop()
    print(f"| store | results/s ingested ({args.batches} batches of 1,000, {args.senders} senders) | "
          "/metrics median of 5 (ms) | leak series | collector peak RSS (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['results_per_s']:.0f} | {r['metrics_ms']:.0f} | {r['leak_series']:.0f} | {r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
