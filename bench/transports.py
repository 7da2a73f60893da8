"""Probe engine against dnsperf, per transport, on the same local unbound and the same query set.

    python -m bench.transports [--names 3000] [--queries 20000] [--seconds 10]

Starts unbound on 127.53.5.1 with a zone of --names names (DoT and DoH on), runs
Debian's dnsperf and then the probe engine on the same queries, and prints queries
per second and client CPU milliseconds per 1000 queries for both, with their ratio.
DoQ and DoH over HTTP/3 (which neither unbound nor dnsperf speaks) run against the
lab's aioquic server in a separate process and are compared with dnsperf's DoT and
DoH figures. All traffic stays on
loopback. Figures move from run to run on shared machines: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from probe.engine import Engine, Plan
from probe.lab import LabCA
from probe.specs import Resolver, parse_endpoint
from probe.transports import Options
from tests.real import RealResolver, start_unbound

HOST = "127.53.5.1"
ZONE = "bench-lab.net"


def _group(pattern: str, text: str) -> str:
    """The first group of `pattern` in dnsperf's report; a report without it is an error worth its text."""
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"{pattern!r} not in dnsperf's output:\n{text}")
    return m.group(1)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def dnsperf(server: RealResolver, mode: str, datafile: Path, seconds: int) -> tuple[float, float]:
    """(queries per second, client CPU ms per 1000 queries) of one dnsperf run."""
    port = {"udp": "dns", "tcp": "dns", "dot": "dot", "doh": "doh"}[mode]
    cmd = [
        "dnsperf",
        "-s",
        HOST,
        "-p",
        str(server.ports[port]),
        "-m",
        mode,
        "-d",
        str(datafile),
        "-l",
        str(seconds),
        "-c",
        "10",
        "-q",
        "100",
        "-T",
        "1",
    ]
    if mode == "doh":
        cmd += ["-O", f"doh-uri=https://{HOST}:{server.ports['doh']}/dns-query"]
    before = _children_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    cpu = _children_cpu() - before
    completed = int(_group(r"Queries completed:\s+(\d+)", out))
    qps = float(_group(r"Queries per second:\s+([\d.]+)", out))
    return qps, cpu * 1000 / max(completed, 1) * 1000


def engine_run(spec: str, names: list[str], queries: int, ca_file: str) -> tuple[float, float, int]:
    """(queries per second, process CPU ms per 1000 queries, errors) for the probe engine."""
    endpoint, _ = parse_endpoint(spec)
    resolver = Resolver("bench", "isp", None, (endpoint,))
    reps = max(1, queries // len(names))
    domains = (names * reps)[:queries]
    # UDP linger 0: the window only delays classification; it costs no CPU per query beyond a timer.
    options = Options(timeout=5, ca_file=ca_file, udp_linger=0.0)

    async def go() -> tuple[float, float, int]:
        async with Engine(options, qps=None, concurrency=100) as engine:
            await engine.collect(Plan(domains[:200], ["A"], [resolver]))  # warm: handshake, caches
            cpu0, t0 = time.process_time(), time.perf_counter()
            errors = 0
            n = 0
            async for m in engine.run(Plan(domains, ["A"], [resolver])):
                n += 1
                errors += m.outcome not in ("resolved",)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        return n / wall, cpu * 1000 / n * 1000, errors

    return asyncio.run(go())


def _quic_server(ca_dir: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    code = (
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "from probe.lab import Behaviour, LabCA, LabServer, Zone\n"
        "async def main():\n"
        "    ca = LabCA(hosts=('127.53.5.2',), directory=Path(sys.argv[1]))\n"
        "    z = Zone(default=Behaviour(records={'A': ('93.184.216.34',)}))\n"
        "    s = await LabServer(z, '127.53.5.2', ca, transports=('doq', 'doh3')).start()\n"
        "    print(json.dumps({**s.specs(), 'ca': str(ca.ca_file)}), flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(ca_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blockprobe-bench-"))
    ca = LabCA(hosts=(HOST, "127.53.5.2"), directory=work)
    names = [f"n{i}.{ZONE}" for i in range(args.names)]
    zone_text = "".join(f"n{i} 3600 IN A 93.184.{i // 256 % 256}.{i % 256}\n" for i in range(args.names))
    datafile = work / "queries.txt"
    datafile.write_text("".join(f"{n} A\n" for n in names))
    server = start_unbound(
        work / "unbound", HOST, ca.cert_file, ca.key_file, zone_name=ZONE, zone_text=zone_text
    )
    rows = []
    try:
        server.wait_ready(names[0])
        for mode in ("udp", "tcp", "dot", "doh"):
            ref_qps, ref_cpu = dnsperf(server, mode, datafile, args.seconds)
            qps, cpu, errors = engine_run(server.specs[mode], names, args.queries, str(ca.ca_file))
            rows.append((mode, ref_qps, ref_cpu, qps, cpu, errors))
            print(
                f"{mode}: dnsperf {ref_qps:.0f} q/s {ref_cpu:.1f} ms/1k; probe {qps:.0f} q/s {cpu:.1f} ms/1k",
                flush=True,
            )
        dot_ref = next(r[2] for r in rows if r[0] == "dot")
        doh_ref = next(r[2] for r in rows if r[0] == "doh")
        (work / "quic").mkdir()
        proc, info = _quic_server(work / "quic")
        try:
            for mode, ref in (("doq", dot_ref), ("doh3", doh_ref)):
                qps, cpu, errors = engine_run(info[mode], names, args.queries, info["ca"])
                against = "dnsperf dot" if mode == "doq" else "dnsperf doh"
                rows.append((f"{mode} (lab server, vs {against})", float("nan"), ref, qps, cpu, errors))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    finally:
        server.stop()
    print()
    print(
        "| transport | dnsperf q/s | dnsperf CPU ms/1k q | probe q/s | probe CPU ms/1k q | CPU ratio | probe errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, ref_qps, ref_cpu, qps, cpu, errors in rows:
        ref_text = "-" if ref_qps != ref_qps else f"{ref_qps:.0f}"
        print(
            f"| {mode} | {ref_text} | {ref_cpu:.1f} | {qps:.0f} | {cpu:.1f} | {cpu / ref_cpu:.1f}x | {errors} |"
        )
    print(f"\n(cpus: {os.cpu_count()}, names: {args.names}, probe queries per transport: {args.queries})")


if __name__ == "__main__":
    main()
