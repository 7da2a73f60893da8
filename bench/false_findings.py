"""False findings on an impaired network: measurements whose truth is known, per network case.

    python -m bench.false_findings [--measurements N] [--case NAME ...] [--timeout S] [--json]

Each case starts, per transport, a lab resolver whose zone is the truth (most names
resolve; others are dropped, NXDOMAIN, or REFUSED with EDE 16: blocks) behind an
`ImpairProxy` (probe/impair.py) that damages the path as the case says, and a truthful
control lab that is not behind it. The probe engine measures every name through the
proxy with an expectation per name (half expected blocked, half expected to resolve,
independent of the truth, so every finding can occur), exactly as tests/conftest.py
drives it, so whatever engine is on the branch is what gets measured. Labs and proxies
run in a child process, apart from the engine's interpreter.

A false finding contradicts the truth: `enforced` or `overblock` for a name the lab
resolves, `leak` or `ok` for a name the lab blocks. `inconclusive` is never false, but
its share is reported: a probe that is always inconclusive is useless. Run time is the
engine's wall clock for the case. N is measurements per case (default 600, short; the
issue's figure is --measurements 10000). Loopback only (127.54.0.0/16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from probe.catalogue import resolve_spec
from probe.engine import Engine, Plan
from probe.impair import Impairment, ImpairProxy, PathImpairment, StreamImpairment
from probe.lab import LAB_TRANSPORTS, Behaviour, LabCA, LabServer, LabThread, Zone
from probe.model import Expectation, Finding, Measurement
from probe.specs import Resolver
from probe.transports import Options

ZONE = "fb-lab.net"
CONTROL_HOST = "127.54.2.1"
LAB_HOSTS = tuple(f"127.54.1.{i}" for i in range(1, 41))
PROXY_HOSTS = tuple(f"127.54.0.{i}" for i in range(1, 41))
QUIC_QPS = 40
RESOLVES = Behaviour(records={"A": ("93.184.216.34",)})
TRUTH_BLOCKS = {
    0: Behaviour(action="drop"),
    1: Behaviour(rcode="NXDOMAIN"),
    2: Behaviour(rcode="REFUSED", ede=((16, "blocked by order"),)),
}


@dataclass(frozen=True)
class Case:
    """One network: the transports measured over it and what the path does to each."""

    name: str
    transports: tuple[str, ...]
    # The callbacks' (transport, timeout) signature is imposed; each uses what it needs.
    impairment: Callable[[str, float], Impairment] = lambda _transport, _timeout: Impairment()
    in_order: bool = False  # the lab answers TCP and DoT in query order
    one_drop: bool = False  # the zone drops exactly one name (early, so many queue behind it)
    vanish_halfway: bool = False  # the resolver vanishes after half its queries


def _loss(p: float) -> Callable[[str, float], Impairment]:
    return lambda _transport, _timeout: Impairment.both_ways(PathImpairment(loss=p))


def _jitter(_transport: str, _timeout: float) -> Impairment:
    path = PathImpairment(delay=0.1, jitter=0.3, duplicate=0.1, reorder=0.1, reorder_gap=0.2)
    return Impairment.both_ways(path)


def _stall(_transport: str, timeout: float) -> Impairment:
    return Impairment(stream=StreamImpairment(stall_one_in=5, stall_for=2.5 * timeout))


def _reset(transport: str, _timeout: float) -> Impairment:
    # Past the TLS handshake (about 2 KB from the lab's server) for dot and doh, so that
    # the cut lands among the answers; a few answers in for plain TCP.
    after = 333 if transport == "tcp" else 3333
    return Impairment(stream=StreamImpairment(reset_one_in=2, reset_after=after))


CASES = (
    Case("clean", ("udp", "tcp", "dot", "doh", "doq", "doh3")),
    Case("udp 5% loss each way", ("udp",), _loss(0.05)),
    Case("udp 20% loss each way", ("udp",), _loss(0.20)),
    Case("quic 5% datagram loss each way", ("doq", "doh3"), _loss(0.05)),
    Case("udp 100-400 ms jitter, reordering, 10% duplicates", ("udp",), _jitter),
    Case("1 in 5 stream connections stalled past the timeout", ("tcp", "dot", "doh"), _stall),
    Case("streams reset mid-answer (1 in 2 connections)", ("tcp", "dot", "doh"), _reset),
    Case("resolver vanishes halfway", ("udp", "tcp", "dot", "doh", "doq", "doh3"), vanish_halfway=True),
    Case("in-order DoT front end, one dropped name", ("dot",), in_order=True, one_drop=True),
)


@dataclass
class Result:
    case: str
    transports: tuple[str, ...]
    measurements: int = 0
    false_findings: int = 0
    false_by: dict[str, int] = field(default_factory=dict)  # "transport finding" -> count
    inconclusive: int = 0
    inconclusive_by: dict[str, int] = field(default_factory=dict)  # "transport outcome" -> count
    seconds: float = 0.0
    network: dict[str, int] = field(default_factory=dict)  # the proxies' non-zero counters, summed

    @property
    def inconclusive_share(self) -> float:
        return self.inconclusive / self.measurements if self.measurements else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "transports": list(self.transports),
            "measurements": self.measurements,
            "false_findings": self.false_findings,
            "false_by": self.false_by,
            "inconclusive": self.inconclusive,
            "inconclusive_share": round(self.inconclusive_share, 4),
            "inconclusive_by": self.inconclusive_by,
            "seconds": round(self.seconds, 1),
            "network": self.network,
        }


def truth_zone(names: list[str], one_drop: bool) -> tuple[Zone, dict[str, bool]]:
    """The lab's zone and, per name, whether the lab blocks it (the truth)."""
    zone = Zone()
    truth: dict[str, bool] = {}
    for i, name in enumerate(names):
        if one_drop:
            behaviour = TRUTH_BLOCKS[0] if i == 3 else (TRUTH_BLOCKS[1] if i % 10 == 1 else RESOLVES)
        else:
            behaviour = TRUTH_BLOCKS.get(i % 10, RESOLVES)
        zone.set(name, behaviour)
        truth[name] = behaviour is not RESOLVES
    return zone, truth


def _expect(domain: str, _resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
    # Independent of the truth (which cycles every 10 names): blocks of 10 alternate.
    index = int(domain.split(".", 1)[0][1:])
    expected = Expectation.BLOCKED if (index // 10) % 2 else Expectation.RESOLVES
    return expected, {"bench": "false_findings"}


def is_false(m: Measurement, blocked_in_truth: bool) -> bool:
    """Whether the finding contradicts what the lab did with the name."""
    if m.finding in (Finding.ENFORCED, Finding.OVERBLOCK):
        return not blocked_in_truth
    if m.finding in (Finding.LEAK, Finding.OK):
        return blocked_in_truth
    return False


class Network:
    """The labs and proxies of the cases, in a process of their own.

    The network and the resolvers are not the probe: run in the probe's process they
    would share its interpreter lock, and a busy lab would look like a slow network.
    Commands go over a pipe: start a case (answered with a spec per transport), finish
    it (answered with what the proxies did), quit.
    """

    def __init__(self, timeout: float) -> None:
        ctx = multiprocessing.get_context("fork")  # before the parent runs any thread or loop
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_network_main, args=(child, timeout), daemon=True)
        self.proc.start()
        child.close()
        hello = self.conn.recv()
        self.ca_file: str = hello["ca_file"]
        self.control: str = hello["control"]

    def start(self, case_index: int, per_transport: int) -> dict[str, str]:
        self.conn.send(("start", case_index, per_transport))
        specs: dict[str, str] = self.conn.recv()
        return specs

    def finish(self) -> dict[str, int]:
        self.conn.send(("finish",))
        network: dict[str, int] = self.conn.recv()
        return network

    def close(self) -> None:
        self.conn.send(("quit",))
        self.proc.join(timeout=60)


def _network_main(conn: Connection, timeout: float) -> None:
    hosts = list(zip(LAB_HOSTS, PROXY_HOSTS, strict=True))
    with tempfile.TemporaryDirectory(prefix="blockprobe-bench-") as tmp, LabThread() as thread:
        ca = LabCA(hosts=(CONTROL_HOST, *LAB_HOSTS, *PROXY_HOSTS), directory=Path(tmp))
        control_zone = Zone()
        control_zone.set(f"*.{ZONE}", RESOLVES)
        control_lab = thread.start(LabServer(control_zone, CONTROL_HOST, ca, transports=("udp", "tcp")))
        conn.send({"ca_file": str(ca.ca_file), "control": control_lab.specs()["udp"]})
        started: list[Any] = []
        proxies: list[ImpairProxy] = []
        while True:
            command = conn.recv()
            if command[0] == "start":
                case, per_transport = CASES[command[1]], command[2]
                specs = {}
                for transport in case.transports:
                    lab, proxy = _start_pair(thread, ca, case, transport, per_transport, timeout, hosts.pop())
                    started += [lab, proxy]
                    proxies.append(proxy)
                    specs[transport] = proxy.specs()[transport]
                conn.send(specs)
            elif command[0] == "finish":
                network: Counter[str] = Counter()
                for proxy in proxies:
                    for key, value in proxy.counters.to_json().items():
                        if isinstance(value, int) and value and key not in _ROUTINE:
                            network[key] += value
                for server in started:
                    thread.stop_server(server)
                started.clear()
                proxies.clear()
                conn.send(dict(network))
            else:
                return


_ROUTINE = frozenset({"datagrams_c2s", "datagrams_s2c", "queries"})  # what every case does


def _start_pair(
    thread: LabThread,
    ca: LabCA,
    case: Case,
    transport: str,
    per_transport: int,
    timeout: float,
    hosts: tuple[str, str],
) -> tuple[LabServer, ImpairProxy]:
    """One lab serving the truth, and the case's proxy in front of its `transport` port."""
    lab_host, proxy_host = hosts
    zone, _ = truth_zone(_names(per_transport), case.one_drop)
    lab = thread.start(LabServer(zone, lab_host, ca, transports=LAB_TRANSPORTS, in_order=case.in_order))
    vanish_when = None
    if case.vanish_halfway:
        half = per_transport // 2

        def vanish_when() -> bool:
            return lab.queries >= half

    # Plain UDP's truncated answers are retried over TCP on the same port.
    ports = {"udp": lab.ports["udp"], "tcp": lab.ports["tcp"]} if transport == "udp" else {}
    ports[transport] = lab.ports[transport]
    impairment = case.impairment(transport, timeout)
    return lab, thread.start(ImpairProxy(lab_host, ports, impairment, proxy_host, vanish_when))


def _names(count: int) -> list[str]:
    return [f"n{i}.{ZONE}" for i in range(count)]


def run_case(case: Case, measurements: int, timeout: float, concurrency: int, network: Network) -> Result:
    """Measure one case through its impaired network; count what contradicts the truth."""
    per_transport = max(10, -(-measurements // len(case.transports)))
    names = _names(per_transport)
    _, truth = truth_zone(names, case.one_drop)
    result = Result(case.name, case.transports)
    specs = network.start(CASES.index(case), per_transport)
    # The lab's QUIC servers are aioquic in pure Python: about 100 queries/s each on this
    # kind of machine. Faster, and the lab itself leaves queries unanswered for seconds,
    # a silence that would be charged to the network.
    resolvers = [
        resolve_spec(specs[t] + (f"#qps={QUIC_QPS}" if t in ("doq", "doh3") else "")) for t in case.transports
    ]
    options = Options(timeout=timeout, ca_file=network.ca_file, udp_linger=0.1)
    plan = Plan(names, ["A"], resolvers, [resolve_spec(network.control)], _expect)

    async def go() -> list[Measurement]:
        async with Engine(options, qps=None, concurrency=concurrency) as engine:
            return await engine.collect(plan)

    t0 = time.perf_counter()
    try:
        ms = asyncio.run(go())
    finally:
        result.seconds = time.perf_counter() - t0
        result.network = network.finish()
    false_by: Counter[str] = Counter()
    unproven: Counter[str] = Counter()
    for m in ms:
        result.measurements += 1
        if m.finding is Finding.INCONCLUSIVE:
            result.inconclusive += 1
            unproven[f"{m.transport} {m.outcome}"] += 1
        if is_false(m, truth[m.domain]):
            result.false_findings += 1
            false_by[f"{m.transport} {m.finding}"] += 1
    result.false_by = dict(sorted(false_by.items()))
    result.inconclusive_by = dict(sorted(unproven.items()))
    return result


def table(results: list[Result]) -> str:
    lines = [
        "| network | transports | measurements | false findings | inconclusive | run time | false by transport and finding |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        by = ", ".join(f"{k}: {v}" for k, v in r.false_by.items()) or "-"
        lines.append(
            f"| {r.case} | {' '.join(r.transports)} | {r.measurements} | {r.false_findings} | "
            f"{100 * r.inconclusive_share:.1f} % | {r.seconds:.1f} s | {by} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.false_findings", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--measurements", type=int, default=600, help="per case (default 600; the issue's is 10000)"
    )
    ap.add_argument(
        "--case", action="append", default=[], help="only cases whose name contains this (repeatable)"
    )
    ap.add_argument("--timeout", type=float, default=2.0, help="the engine's per-query timeout (default 2)")
    # Deep queues make the labs, not the network, leave queries unanswered past the timeout.
    ap.add_argument("--concurrency", type=int, default=32, help="the engine's queries in flight (default 32)")
    ap.add_argument("--json", action="store_true", help="one JSON object per case instead of the table")
    args = ap.parse_args(argv)
    if args.measurements < 1:
        ap.error(f"--measurements: {args.measurements} must be at least 1")
    cases = [c for c in CASES if not args.case or any(s.lower() in c.name.lower() for s in args.case)]
    if not cases:
        ap.error(f"--case: {args.case!r} matches none of: " + "; ".join(c.name for c in CASES))
    results: list[Result] = []
    network = Network(args.timeout)
    try:
        for case in cases:
            result = run_case(case, args.measurements, args.timeout, args.concurrency, network)
            results.append(result)
            if args.json:
                print(json.dumps(result.to_json()), flush=True)
            else:
                print(
                    f"{case.name}: {result.false_findings} false of {result.measurements}, "
                    f"{result.seconds:.1f} s, network {result.network}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        network.close()
    if not args.json:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
