"""The engine's own CPU per measurement: this tree against another, back to back, several rounds.

    python -m bench.engine_cpu [--transport udp] [--measurements 20000] [--rounds 5]
                               [--canned] [--against /tmp/oldtree] [--profile]
    python -m bench.engine_cpu --same-output --against /tmp/base   # a tree with probe/ and tests/

Runs the Engine over --measurements queries (A, --names distinct names, concurrency
100, no rate limit, timeout 5 s, no UDP linger: the settings of `bench.transports`)
against a real unbound on 127.53.6.1, and reports process CPU milliseconds per 1,000
measurements. With --canned every exchange is answered at once from a table of
prebuilt responses (no sockets), which leaves the engine and its judgement alone.

Each run is a child process whose `probe` package comes from the tree given (this
one, and --against), so both engines meet the same unbound in the same minute; the
order alternates per round. The machine is shared: read the median of the per-round
ratios, not a single timing. --profile runs this tree once in process under cProfile
instead and prints where the time goes. All traffic stays on loopback.

--same-output checks that a change for speed changed nothing a reader sees: both trees
measure every scenario of tests/test_scenarios.py on all six transports (three query
types, a control, alternating expectations, a confirmation pass for the silences)
against the lab, and every measurement's JSON line must be the same, key order
included, once what differs by nature is masked (times, latencies, message IDs, ports).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HOST = "127.53.6.1"
ZONE = "bench-cpu.net"
HERE = Path(__file__).resolve().parent.parent  # the tree this file belongs to


def _child(args: dict[str, Any]) -> dict[str, Any]:
    """One timed run with whatever `probe` is on the path; imports are local for that reason."""
    import asyncio
    import time

    import dns.message
    import dns.rrset

    import probe
    import probe.engine
    from probe.engine import Engine, Plan
    from probe.specs import Resolver, parse_endpoint
    from probe.transports import Exchange, Options
    from probe.wire import build_query

    names = [f"n{i}.{ZONE}" for i in range(args["names"])]
    domains = (names * (args["measurements"] // len(names) + 1))[: args["measurements"]]
    endpoint, _ = parse_endpoint(args["spec"])
    resolver = Resolver("bench", "isp", None, (endpoint,))
    options = Options(timeout=5, ca_file=args.get("ca"), udp_linger=0.0)

    if args["canned"]:
        pad = args["transport"] not in ("udp", "tcp")
        table: dict[bytes, bytes] = {}
        for i, name in enumerate(names):
            query = build_query(name, "A", pad)
            response = dns.message.make_response(dns.message.from_wire(query))
            response.answer.append(
                dns.rrset.from_text(name + ".", 3600, "IN", "A", f"93.184.{i // 256 % 256}.{i % 256}")
            )
            table[query] = response.to_wire()

        class Canned:
            """An exchanger that never touches the network: the engine's cost alone."""

            def __init__(self, endpoint: Any, _options: Any) -> None:
                self.endpoint = endpoint
                self.witness: bytes | None = None
                self.witness_after = 0.25

            async def exchange(self, query: bytes) -> Any:
                return Exchange(table[query], None, 0.05)

            async def aclose(self) -> None:
                pass

        probe.engine.make_exchanger = Canned  # type: ignore[attr-defined,assignment]

    encode = None
    if args["encode"]:
        from probe.output import json_line

        encode = json_line

    async def go() -> dict[str, Any]:
        async with Engine(options, qps=None, concurrency=100) as engine:
            await engine.collect(Plan(names[:200], ["A"], [resolver]))  # warm: sockets, caches
            cpu0, t0 = time.process_time(), time.perf_counter()
            n = errors = 0
            async for m in engine.run(Plan(domains, ["A"], [resolver])):
                n += 1
                errors += m.outcome != "resolved"
                if encode is not None:
                    encode(m)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        return {"cpu_ms_per_1k": cpu * 1e6 / n, "qps": n / wall, "errors": errors, "probe": probe.__file__}

    return asyncio.run(go())


def _child_exchanger(args: dict[str, Any]) -> dict[str, Any]:
    """The UDP exchanger alone, its socket's send replaced by an instant in-process reply (the
    query with QR set, delivered on the next loop iteration): no kernel, no resolver, so the
    figure is the exchanger's own Python, and under callgrind its instruction count is exact."""
    import asyncio
    import inspect
    import time

    import probe
    from probe.specs import parse_endpoint
    from probe.transports import Options, make_exchanger, udp
    from probe.wire import build_query

    # Before issue 14, datagram_received also took the sender's address.
    with_addr = len(inspect.signature(udp._Socket.datagram_received).parameters) == 3

    def send(self: Any, data: bytes) -> None:
        reply = bytes([data[0], data[1], data[2] | 0x80]) + data[3:]
        if with_addr:
            self._loop.call_soon(self.datagram_received, reply, None)
        else:
            self._loop.call_soon(self.datagram_received, reply)

    udp._Socket.send = send  # type: ignore[method-assign]
    queries = [build_query(f"n{i}.{ZONE}", "A", False) for i in range(args["names"])]
    endpoint, _ = parse_endpoint("udp://127.0.0.1:9")  # never reached: send is replaced above

    async def go() -> dict[str, Any]:
        exchanger = make_exchanger(endpoint, Options(timeout=5, udp_linger=0.0))

        async def worker(k: int, n: int) -> int:
            bad = 0
            for j in range(k, n, 100):
                bad += (await exchanger.exchange(queries[j % len(queries)])).response is None
            return bad

        await asyncio.gather(*(worker(k, 2000) for k in range(100)))  # warm: sockets, caches
        n = args["measurements"]
        cpu0, t0 = time.process_time(), time.perf_counter()
        errors = sum(await asyncio.gather(*(worker(k, n) for k in range(100))))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await exchanger.aclose()
        return {"cpu_ms_per_1k": cpu * 1e6 / n, "qps": n / wall, "errors": errors, "probe": probe.__file__}

    return asyncio.run(go())


def _unid(b64: str) -> str:
    """The message with ID 0: IDs are random by design."""
    raw = base64.b64decode(b64)
    return base64.b64encode(b"\0\0" + raw[2:]).decode("ascii")


def _mask(line: str) -> str:
    """A JSON line with what differs by nature masked, keys and their order kept."""
    d = json.loads(line)
    d["time"] = "T"
    d["latency_ms"] = None if d["latency_ms"] is None else "L"
    if d["wire"] is not None:
        d["wire"] = _unid(d["wire"])
    if len(d["answers"]) > 1:  # the lab keeps an RRset in no fixed order
        d["answers"].sort()
        d["wire"] = "several answers"
    ev = d["evidence"]
    # Which query waited for a handshake, and the loss seen on an endpoint by the time a
    # silence is judged, depend on arrival order: their keys are compared, not their values.
    ev.pop("connect_ms", None)
    if "udp_truncated_ms" in ev:
        ev["udp_truncated_ms"] = "ms"
    if "loss" in ev:
        ev["loss"] = dict.fromkeys(ev["loss"], "n")
    if "silence" in ev:
        ev["silence"]["reason"] = re.sub(r"[\d.e+-]+", "n", ev["silence"]["reason"])
    if "ignored" in ev:
        ev["ignored"] = ev["ignored"][:1]
    for key in ("ignored", "late_answers"):
        for item in ev.get(key, ()):
            if "wire" in item:
                item["wire"] = _unid(item["wire"])
    return re.sub(r"(127\.53\.6\.\d+):\d+", r"\1:PORT", json.dumps(d, ensure_ascii=False))


def _scenarios() -> list[str]:
    """Every scenario on every transport, as masked JSON lines in a stable order."""
    import asyncio
    import tempfile

    from probe.engine import Engine, Plan
    from probe.lab import LabCA, LabServer, LabThread
    from probe.model import Expectation
    from probe.output import json_line
    from probe.transports import Options
    from tests.conftest import resolvers_of, truth_zone
    from tests.test_scenarios import SCENARIOS, TRANSPORTS, _lab_zone

    ca = LabCA(
        hosts=("127.53.6.2", "127.53.6.3"), directory=Path(tempfile.mkdtemp(prefix="blockprobe-same-"))
    )
    domains = list(dict.fromkeys(s.domain for s in SCENARIOS))
    order = {d: i for i, d in enumerate(domains)}

    def expect(domain: str, _resolver: object) -> tuple[Expectation | None, dict[str, Any] | None]:
        i = order.get(domain, 0)
        if i % 3 == 2:
            return None, None
        return (Expectation.BLOCKED, {"order": f"o{i}"}) if i % 3 == 0 else (Expectation.RESOLVES, None)

    with LabThread() as thread:
        lab = thread.start(LabServer(_lab_zone(), "127.53.6.2", ca))
        control = thread.start(LabServer(truth_zone(), "127.53.6.3", ca))
        targets = resolvers_of(lab, TRANSPORTS)
        controls = resolvers_of(control, ["udp"])
        qtypes = ["A", "AAAA", "HTTPS"]
        options = Options(timeout=1.5, ca_file=str(ca.ca_file), udp_linger=0.5, confirm_after=0.0)

        async def go() -> list[str]:
            async with Engine(options, qps=None, concurrency=16) as engine:
                plan = Plan(domains, qtypes, targets, controls, expect)
                return [json_line(m) async for m in engine.run(plan)]

        lines = asyncio.run(go())
    return sorted(_mask(line) for line in lines)


def _same_output(trees: list[Path]) -> int:
    outs = []
    for tree in trees:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child-scenarios"],
            env={**os.environ, "PYTHONPATH": str(tree)},
            cwd=str(tree),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"scenarios on {tree} failed:\n{out.stderr[-3000:]}")
        outs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    a, b = outs
    differ = [(x, y) for x, y in zip(a, b, strict=False) if x != y]
    print(f"{len(a)} and {len(b)} measurements; {len(differ)} lines differ")
    for x, y in differ[:8]:
        dx, dy = json.loads(x), json.loads(y)
        where = {k: (dx.get(k), dy.get(k)) for k in dx.keys() | dy.keys() if dx.get(k) != dy.get(k)}
        print(f"{dx['domain']} {dx['qtype']} {dx['endpoint']}: {where}")
    return 0 if len(a) == len(b) and not differ else 1


def _run_child(tree: Path, args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(args)],
        env=env,
        cwd=str(tree),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child on {tree} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["probe"].startswith(str(tree)):
        raise RuntimeError(f"child meant for {tree} imported {result['probe']}")
    return result


def _profile(args: dict[str, Any], top: int) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    result = _child(args)
    prof.disable()
    print(json.dumps(result), file=sys.stderr)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def _compare(trees: list[Path], args: dict[str, Any], rounds: int, canned: bool) -> None:
    """Each tree once per round, the order alternating; medians and the median ratio."""
    runs: dict[Path, list[float]] = {t: [] for t in trees}
    ratios: list[float] = []
    for r in range(rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        got = {t: _run_child(t, args) for t in order}
        for t in trees:
            runs[t].append(got[t]["cpu_ms_per_1k"])
        line = "  ".join(
            f"{t}: {got[t]['cpu_ms_per_1k']:.1f} ms/1k, {got[t]['qps']:.0f}/s, {got[t]['errors']} not resolved"
            for t in order
        )
        if len(trees) == 2:
            ratios.append(got[trees[0]]["cpu_ms_per_1k"] / got[trees[1]]["cpu_ms_per_1k"])
            line += f"  ratio {ratios[-1]:.3f}"
        print(f"round {r + 1}: {line}", flush=True)
    mode = "canned exchange" if canned else f"unbound over {args['transport']}"
    if args.get("exchanger"):
        mode = "the UDP exchanger alone"
    print(f"\n{mode}, {args['measurements']} measurements per run, median of {rounds} runs:")
    for t in trees:
        print(f"  {t}: {statistics.median(runs[t]):.1f} ms CPU per 1,000 measurements")
    if ratios:
        print(
            f"  this tree / {trees[1]}: median ratio {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="udp", choices=("udp", "tcp", "dot", "doh"))
    ap.add_argument("--names", type=int, default=3000)
    ap.add_argument("--measurements", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--canned", action="store_true", help="answer every exchange from a table: no network")
    ap.add_argument("--encode", action="store_true", help="also encode each measurement as a JSON line")
    ap.add_argument(
        "--udp-exchanger", action="store_true", help="the UDP exchanger alone, instant in-process replies"
    )
    ap.add_argument("--against", type=Path, help="another tree (holding probe/) to compare with")
    ap.add_argument("--profile", action="store_true", help="cProfile this tree once instead")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--same-output", action="store_true", help="compare the trees' measurements instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-scenarios", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child is not None:
        child = json.loads(ns.child)
        print(json.dumps(_child_exchanger(child) if child.get("exchanger") else _child(child)), flush=True)
        return
    if ns.child_scenarios:
        print(json.dumps(_scenarios()), flush=True)
        return
    if ns.same_output:
        if ns.against is None:
            ap.error("--same-output needs --against")
        sys.exit(_same_output([HERE, ns.against.resolve()]))

    # Imported here, not at the top: a child must take `probe` from the tree it was given.
    from probe.lab import LabCA
    from tests.real import start_unbound

    args: dict[str, Any] = {
        "transport": ns.transport,
        "names": ns.names,
        "measurements": ns.measurements,
        "canned": ns.canned,
        "encode": ns.encode,
        "exchanger": ns.udp_exchanger,
        "spec": f"{ns.transport}://{HOST}:53",
    }
    server = None
    if not ns.canned and not ns.udp_exchanger:
        work = Path(tempfile.mkdtemp(prefix="blockprobe-bench-cpu-"))
        ca = LabCA(hosts=(HOST,), directory=work)
        zone = "".join(f"n{i} 3600 IN A 93.184.{i // 256 % 256}.{i % 256}\n" for i in range(ns.names))
        server = start_unbound(
            work / "unbound", HOST, ca.cert_file, ca.key_file, zone_name=ZONE, zone_text=zone
        )
        server.wait_ready(f"n0.{ZONE}")
        args["spec"] = server.specs[ns.transport]
        args["ca"] = str(ca.ca_file)
    try:
        if ns.profile:
            _profile(args, ns.top)
            return
        _compare([HERE] + ([ns.against.resolve()] if ns.against else []), args, ns.rounds, ns.canned)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
