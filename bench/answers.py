"""The cost of answer checks, and how many names' answers a probe can check per full pass.

    python -m bench.answers [--checks 300] [--per-name 200] [--budget 5] [--pass-hours 6] [--names 45000]

Runs inside the sealed network namespace of tests/netlab.py (root; nothing leaves it): the
probe's `AnswerChecker` against real TLS servers, one kind of check at a time, the cache off so
every check is a new connection. Reports per check the client thread's CPU time, the
connections opened and the wall time, next to a reference measured in the same run: a bare TCP
connect and close to the same server (the least any check of an address can cost).

Then the cost per name, measured through the engine: listed names whose A and AAAA answers
point at the genuine site (two addresses per name), measured by a lab resolver with a control,
once without checks and once with `verify: tls` in the same run; the difference is what the
checks cost per name (client CPU, wall time at 16 checks at once, connections).

Loopback wall times say nothing about the internet, where a check costs round trips (connect,
TLS 1.3 handshake, HEAD: three) and the connection budget, not CPU, is the bound. So the pass
capacity is computed from the budget and the measured connections per check; the CPU figure
says what that budget costs the probe's machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import time
import tracemalloc
from dataclasses import dataclass

from probe.answers import AddressCheck, AnswerChecker, CheckStatus
from probe.catalogue import resolve_spec
from probe.engine import Engine, Plan
from probe.lab import Behaviour, LabCA, LabServer, Zone
from probe.model import Expectation, Measurement
from probe.transports import Options
from tests import netlab
from tests.netlab import BLOCKPAGE_UNKNOWN, CDN, SITE, SITE_V6, NetLab


@dataclass
class Row:
    kind: str
    status: str
    cpu_ms: float  # client thread CPU per check
    wall_ms: float  # per check, one at a time
    connections: float  # per check
    per_s: float  # checks per second with concurrency 16 and no pacing (loopback ceiling)


async def _tcp_reference(address: str, n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    cpu0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(n):
        with socket.socket() as s:
            s.setblocking(False)
            await loop.sock_connect(s, (address, 443))
    return (time.thread_time() - cpu0) / n * 1000, (time.perf_counter() - t0) / n * 1000


async def _measure(lab: NetLab, kind: str, mode: str, name: str, address: str, n: int) -> Row:
    sequential = AnswerChecker(mode, ca_file=lab.ca_file, ttl=0, rate=None, concurrency=1)
    cpu0, t0 = time.thread_time(), time.perf_counter()
    results: list[AddressCheck] = [await sequential.check(name, address) for _ in range(n)]
    cpu = (time.thread_time() - cpu0) / n * 1000
    wall = (time.perf_counter() - t0) / n * 1000
    statuses = {str(r.status) for r in results}
    parallel = AnswerChecker(mode, ca_file=lab.ca_file, ttl=0, rate=None, concurrency=16)
    t1 = time.perf_counter()
    # Below the cache and the sharing of in-flight checks (equal keys would share one check),
    # through the same slots and pacer as check().
    await asyncio.gather(*(parallel._guarded(name, address) for _ in range(n)))
    per_s = n / (time.perf_counter() - t1)
    return Row(kind, "/".join(sorted(statuses)), cpu, wall, sequential.connections / n, per_s)


@dataclass
class PerName:
    cpu_ms: float  # client thread CPU per name (engine, lab resolver and control, checks)
    wall_ms: float  # per name, the whole run
    connections: float  # answer-check connections per name
    checked: float  # share of names whose every measurement carries its checks


async def _per_name(lab: NetLab, n: int) -> tuple[PerName, PerName]:
    """One engine run over `n` listed names without checks, one with: the checks' cost per name.
    The lab resolver and the control run on this thread in both runs, so they cancel out of
    the difference; the TLS servers run on the lab's own thread."""
    zone = Zone()
    zone.set("*.leaky.example", Behaviour(records={"A": (SITE,), "AAAA": (SITE_V6,)}))
    ca = LabCA()
    isp = await LabServer(zone, "127.0.0.2", ca, transports=("udp",)).start()
    truth = await LabServer(zone, "127.0.0.3", ca, transports=("udp",)).start()
    out: list[PerName] = []
    try:
        for run, mode in enumerate(("off", "tls")):
            checker = AnswerChecker(mode, ca_file=lab.ca_file, rate=None, concurrency=16)
            plan = Plan(
                [f"r{run}-{i}.leaky.example" for i in range(n)],  # fresh names: no cache between runs
                ["A", "AAAA"],
                [resolve_spec(isp.specs()["udp"])],
                [resolve_spec(truth.specs()["udp"])],
                expect=lambda _d, _r: (Expectation.BLOCKED, {"order": "bench"}),
                check_identity=False,
            )
            options = Options(timeout=2.0, udp_linger=0, confirm_after=0)
            gc.collect()
            cpu0, t0 = time.thread_time(), time.perf_counter()
            async with Engine(options, qps=None, checker=checker) as engine:
                got: list[Measurement] = await engine.collect(plan)
            cpu, wall = time.thread_time() - cpu0, time.perf_counter() - t0
            checked = {m.domain for m in got if "answer_checks" in m.evidence}
            out.append(PerName(cpu / n * 1000, wall / n * 1000, checker.connections / n, len(checked) / n))
    finally:
        await isp.stop()
        await truth.stop()
    return out[0], out[1]


async def _cached_hit_cpu(lab: NetLab, n: int) -> float:
    checker = AnswerChecker(ca_file=lab.ca_file, rate=None)
    await checker.check("leaky.example", SITE)
    cpu0 = time.thread_time()
    for _ in range(n):
        await checker.check("leaky.example", SITE)
    return (time.thread_time() - cpu0) / n * 1000


async def _cache_bytes(lab: NetLab, n: int) -> float:
    """Memory a cached result holds, from `n` real checks of distinct names: what is still
    allocated afterwards by code in probe/answers.py (the lab's servers share this process and
    their allocations are left out). tracemalloc is slow, so this runs after the timed part."""
    checker = AnswerChecker(ca_file=lab.ca_file, rate=None, concurrency=16)
    await checker.check("leaky.example", SITE)  # one-off allocations (contexts, imports) first
    names = [f"m{i}.leaky.example" for i in range(n)]  # the engine's strings, kept by the cache
    gc.collect()
    tracemalloc.start(64)
    before = tracemalloc.take_snapshot()
    results = await asyncio.gather(*(checker.check(name, SITE) for name in names))
    del results
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(checker._cache) == n + 1
    ours = [tracemalloc.Filter(True, "*/probe/answers.py", all_frames=True)]
    grown = sum(
        d.size_diff for d in after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
    )
    return grown / n


async def _bench(lab: NetLab, n: int) -> tuple[tuple[float, float], list[Row], float]:
    reference = await _tcp_reference(SITE, n)
    rows = [
        await _measure(lab, "tls, genuine site", "tls", "leaky.example", SITE, n),
        await _measure(lab, "http, genuine site (HEAD 200)", "http", "leaky.example", SITE, n),
        await _measure(lab, "http, CDN answering 451", "http", "blocked-at-cdn.example", CDN, n),
        await _measure(
            lab, "tls, certificate for another name", "tls", "leaky.example", BLOCKPAGE_UNKNOWN, n
        ),
    ]
    return reference, rows, await _cached_hit_cpu(lab, n * 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=300, help="checks per kind")
    parser.add_argument("--per-name", type=int, default=200, help="names in the per-name engine runs")
    parser.add_argument("--budget", type=float, default=5.0, help="new connections per second")
    parser.add_argument("--pass-hours", type=float, default=6.0, help="full_pass period")
    parser.add_argument("--names", type=int, default=45_000, help="names in the lists")
    args = parser.parse_args()
    reason = netlab.unavailable()
    if reason:
        raise SystemExit(f"bench.answers: {reason}")
    # The lab's servers share this process: a short GIL switch interval keeps the client from
    # waiting out the default 5 ms behind them, which would otherwise dominate loopback wall times.
    sys.setswitchinterval(0.0005)
    with NetLab() as lab:
        (ref_cpu, ref_wall), rows, hit_cpu = lab.run(lambda: _bench(lab, args.checks), timeout=600)
        entry = lab.run(lambda: _cache_bytes(lab, args.checks * 2), timeout=600)
        dns_only, checked = lab.run(lambda: _per_name(lab, args.per_name), timeout=600)

    print(
        "| check | status | client CPU ms/check | × TCP connect | wall ms/check | connections/check | checks/s, 16 at once (loopback, servers in this process) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| reference: TCP connect + close | - | {ref_cpu:.3f} | 1.0x | {ref_wall:.3f} | 1 | - |")
    for r in rows:
        print(
            f"| {r.kind} | {r.status} | {r.cpu_ms:.3f} | {r.cpu_ms / ref_cpu:.1f}x | {r.wall_ms:.3f} "
            f"| {r.connections:.0f} | {r.per_s:.0f} |"
        )
    print(f"| cache hit | - | {hit_cpu:.4f} | {hit_cpu / ref_cpu:.2f}x | - | 0 | - |")

    print(
        f"\nPer name, through the engine ({args.per_name} listed names, A + AAAA: 2 addresses each, "
        "a lab resolver and a control, 16 checks at once, no pacing):\n"
    )
    print("| run | client CPU ms/name | wall ms/name | check connections/name | names checked |")
    print("|---|---|---|---|---|")
    for label, p in (("DNS only (verify: off)", dns_only), ("with checks (verify: tls)", checked)):
        print(f"| {label} | {p.cpu_ms:.2f} | {p.wall_ms:.2f} | {p.connections:.2f} | {p.checked:.0%} |")
    print(
        f"| the checks' share | {checked.cpu_ms - dns_only.cpu_ms:.2f} "
        f"({checked.cpu_ms / dns_only.cpu_ms:.1f}x) | {checked.wall_ms - dns_only.wall_ms:.2f} "
        f"({checked.wall_ms / dns_only.wall_ms:.1f}x) | - | - |"
    )

    connections = args.budget * args.pass_hours * 3600
    print(
        f"\nA cached result holds {entry:.0f} bytes (one parsed certificate shared by the addresses that "
        f"present it). The cache holds at most budget × ttl entries: {connections:,.0f} at "
        f"{args.budget:g}/s with a {args.pass_hours:g} h ttl, {connections * entry / 2**20:.0f} MiB."
    )
    tls_cpu = rows[0].cpu_ms
    invalid_extra = rows[3].connections - 1
    print(
        f"\nBudget {args.budget:g} new connections/s over a {args.pass_hours:g} h pass: "
        f"{connections:,.0f} connections; client CPU at that rate about "
        f"{args.budget * tls_cpu / 10:.2f} % of one core (tls checks)."
    )
    print(
        "\n| distinct addresses per name (all resolvers, cache shared) | share of addresses with an invalid "
        f"certificate (+{invalid_extra:.0f} connection each) | names checked per pass | of {args.names:,} |"
    )
    print("|---|---|---|---|")
    for per_name in (2, 4, 8):
        for invalid in (0.0, 0.1):
            cost = per_name * (1 + invalid * invalid_extra)
            names = connections / cost
            print(f"| {per_name} | {invalid:.0%} | {names:,.0f} | {min(names / args.names, 1):.0%} |")
    need = args.names * 4 * 1.1 / (args.pass_hours * 3600)
    print(
        f"\nAll {args.names:,} names at 4 addresses each and 10 % invalid need {need:.1f} connections/s. "
        "Concurrency must cover budget × timeout (silent addresses hold a slot for the whole deadline): "
        f"{args.budget:g}/s × 5 s = {args.budget * 5:.0f} slots."
    )
    ok = {str(s) for s in CheckStatus}
    assert all(set(r.status.split("/")) <= ok for r in rows)


if __name__ == "__main__":
    main()
