"""Silences, lost datagrams, stalls and non-responses (docs/measurement.md): each cause of a false
finding the findings issue reported, against small hostile servers scripted here on loopback.

The truth: every name these servers are asked about resolves (the control says so, and the server
answers it when it answers at all). So any `blocked: true` below is a false finding.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from probe.catalogue import resolve_spec
from probe.judge import LOSS_BOUND, Attempt, silence_proven
from probe.lab import Behaviour, LabCA, LabThread, Zone
from probe.model import Expectation, Measurement, Outcome, Transport
from probe.specs import Resolver
from probe.transports import Failure, FailureKind, Loss, Phase

from .conftest import measure, resolvers_of, start_lab, truth_zone

D = "blockprobe-lab.net"
REAL = "93.184.216.34"


def _answer(wire: bytes) -> bytes:
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", REAL))
    return r.to_wire()


class Script:
    """A loopback UDP and TCP server whose replies a test decides, on a thread of its own."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.udp: Callable[[bytes, int], list[bytes]] = lambda w, _n: [_answer(w)]
        self.tcp_mode = "answer"  # answer | stall | echo | in-order
        self.dropped: set[str] = set()
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> Script:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(5)
        return self

    async def _serve(self) -> None:
        script = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # A datagram endpoint's, although Python 3.11's selector transport does not
                # subclass DatagramTransport (so no isinstance check).
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                script.count += 1
                for out in script.udp(data, script.count):
                    self.transport.sendto(out, addr)

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        sock.close()
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port))
        self._server = await asyncio.start_server(self._tcp, self.host, self.port)
        self._writers: set[asyncio.StreamWriter] = set()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.tcp_mode == "stall":
            await reader.read()  # read nothing back, answer nothing: a handshake that never ends
            return
        queue: list[bytes] = []
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = await reader.readexactly(size)
                name = str(dns.message.from_wire(wire).question[0].name).rstrip(".")
                if self.tcp_mode == "echo":
                    out = wire
                elif self.tcp_mode == "in-order":
                    # dnsdist 1.7 on DoT: replies in query order, so one dropped name holds the rest.
                    queue.append(wire)
                    if any(
                        str(dns.message.from_wire(q).question[0].name).rstrip(".") in self.dropped
                        for q in queue
                    ):
                        continue
                    for q in queue:
                        writer.write(len(_answer(q)).to_bytes(2, "big") + _answer(q))
                    queue.clear()
                    continue
                elif name in self.dropped:
                    continue
                else:
                    out = _answer(wire)
                writer.write(len(out).to_bytes(2, "big") + out)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def spec(self, transport: str) -> str:
        return f"{transport}://{self.host}:{self.port}"

    async def _close(self) -> None:
        self._udp.close()
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await asyncio.sleep(0.05)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def script(request: pytest.FixtureRequest) -> Iterator[Script]:
    s = Script(request.param if hasattr(request, "param") else "127.53.3.1").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def control(lab_thread: LabThread, lab_ca: LabCA) -> Resolver:
    return resolvers_of(start_lab(lab_thread, truth_zone(), "127.53.3.9", lab_ca, transports=("udp",)))[0]


def _run(
    spec: str,
    names: list[str],
    control: Resolver,
    timeout: float = 1.0,
    concurrency: int = 32,
    confirm_after: float = 0.0,
) -> list[Measurement]:
    expect = lambda _d, _r: (Expectation.BLOCKED, {"order": "test"})  # noqa: E731
    return measure(
        names,
        [resolve_spec(spec)],
        ca=None,
        controls=[control],
        expect=expect,
        timeout=timeout,
        linger=0,
        concurrency=concurrency,
        confirm_after=confirm_after,
    )


def _no_false_blocks(ms: list[Measurement]) -> None:
    wrong = [(m.domain, m.outcome, m.evidence.get("silence")) for m in ms if m.blocked]
    assert not wrong, wrong


def test_one_lost_datagram_is_sent_again_not_a_block(script: Script, control: Resolver) -> None:
    seen: set[bytes] = set()

    def lose_first(wire: bytes, _n: int) -> list[bytes]:
        if wire[:2] not in seen:
            seen.add(wire[:2])
            return []  # the first send of every query is lost
        return [_answer(wire)]

    script.udp = lose_first
    ms = _run(script.spec("udp"), [f"n{i}.{D}" for i in range(5)], control)
    assert [m.outcome for m in ms] == [Outcome.RESOLVED] * 5
    assert all(m.evidence["attempts"][0]["sends"] == 2 for m in ms)


def test_a_resolver_that_vanishes_proves_nothing(script: Script, control: Resolver) -> None:
    script.udp = lambda w, n: [_answer(w)] if n <= 6 else []
    script.tcp_mode = "stall"
    ms = _run(script.spec("udp"), [f"v{i}.{D}" for i in range(12)], control, concurrency=1)
    silent = [m for m in ms if m.outcome is Outcome.TIMEOUT]
    assert len(silent) >= 5
    _no_false_blocks(ms)
    assert all(m.finding == "inconclusive" for m in silent)
    assert all(m.evidence["silence"]["proven"] is False for m in silent)


def test_a_reply_that_echoes_the_query_is_not_a_response(script: Script, control: Resolver) -> None:
    script.udp = lambda w, _n: [w]  # QR=0: the query reflected back
    script.tcp_mode = "echo"
    ms = _run(script.spec("udp"), [f"e.{D}"], control)
    assert (ms[0].outcome, ms[0].blocked) == (Outcome.TIMEOUT, None)
    assert ms[0].evidence["ignored"][0]["reason"] == "not a response (QR=0)"
    ms = _run(script.spec("tcp"), [f"e.{D}"], control)
    assert (ms[0].outcome, ms[0].blocked, ms[0].error) == (
        Outcome.ERROR,
        None,
        "not the response: not a response (QR=0)",
    )


def test_a_stalled_handshake_is_an_error_of_its_phase_never_a_block(
    script: Script, control: Resolver
) -> None:
    script.tcp_mode = "stall"  # TCP accepts; TLS never gets a ServerHello
    started = time.monotonic()
    ms = _run(script.spec("tls"), [f"s{i}.{D}" for i in range(4)], control, timeout=1.0)
    assert {(m.outcome, m.blocked, m.error) for m in ms} == {
        (Outcome.ERROR, None, "tls_handshake: timed out")
    }
    assert {a["phase"] for m in ms for a in m.evidence["attempts"]} == {"tls_handshake"}
    assert [len(m.evidence["attempts"]) for m in ms] == [2] * 4  # asked again in the confirmation pass
    assert time.monotonic() - started < 2 * 1.0 + 1.5  # one deadline per attempt, two attempts


def test_queued_behind_a_dropped_name_on_an_in_order_server_is_not_blocked(
    script: Script, control: Resolver
) -> None:
    script.tcp_mode = "in-order"
    script.dropped = {f"dropped.{D}"}
    names = [f"dropped.{D}", *(f"q{i}.{D}" for i in range(6))]
    ms = _run(script.spec("tcp"), names, control)
    _no_false_blocks(ms)
    by = {m.domain: m for m in ms}
    assert by[f"dropped.{D}"].blocked is None  # an in-order server never overtakes: not proven
    # Asked again in reverse order, the names that were stuck behind it now resolve.
    assert sum(by[f"q{i}.{D}"].outcome is Outcome.RESOLVED for i in range(6)) >= 5


def test_a_dropped_name_on_a_live_out_of_order_server_is_a_proven_block(
    script: Script, control: Resolver
) -> None:
    script.dropped = {f"dropped.{D}"}
    ms = _run(script.spec("tcp"), [f"dropped.{D}", f"a.{D}", f"b.{D}"], control)
    m = next(m for m in ms if m.domain == f"dropped.{D}")
    assert (m.outcome, m.blocked, m.finding) == (Outcome.TIMEOUT, True, "enforced")
    assert [a["overtaken"] for a in m.evidence["attempts"]] == [True, True]


def test_more_dropped_names_than_http2_streams_are_each_proven(
    lab_thread: LabThread, lab_ca: LabCA, control: Resolver
) -> None:
    """The confirmation pass asks only silent names: over DoH they and the streams kept for
    their late answers fill the server's 100 streams, and a witness must still get one (it
    was skipped, and 68 of 167 dropped names stayed unproven at the benchmark's size)."""
    zone = Zone()
    zone.set(f"*.{D}", Behaviour(records={"A": ("93.184.216.34",)}))
    dropped = [f"drop{i}.{D}" for i in range(150)]
    for name in dropped:
        zone.set(name, Behaviour(action="drop"))
    lab = start_lab(lab_thread, zone, "127.53.1.13", lab_ca, transports=("doh",))
    try:
        # A name the endpoint answered goes first: the witness that later silences need.
        names = [f"ok0.{D}", *dropped, *(f"ok{i}.{D}" for i in range(1, 20))]
        ms = measure(
            names,
            resolvers_of(lab, ["doh"]),
            ca=lab_ca,
            controls=[control],
            expect=lambda _d, _r: (Expectation.BLOCKED, {"order": "test"}),
            timeout=1.0,
            linger=0,
            concurrency=32,
            confirm_after=0.0,
        )
    finally:
        lab_thread.stop_server(lab)
    silent = [m for m in ms if m.domain.startswith("drop")]
    assert len(silent) == 150
    unproven = [(m.domain, m.evidence.get("silence")) for m in silent if m.blocked is not True]
    assert not unproven, unproven


def test_heavy_loss_explains_a_silence(script: Script, control: Resolver) -> None:
    import random

    rng = random.Random(7)
    dropped = f"dropped.{D}"

    def lossy(wire: bytes, _n: int) -> list[bytes]:
        if dns.message.from_wire(wire).question[0].name.to_text().rstrip(".") == dropped:
            return []
        return [] if rng.random() < 0.4 else [_answer(wire)]

    script.udp = lossy
    ms = _run(script.spec("udp"), [dropped, *(f"l{i}.{D}" for i in range(20))], control)
    m = next(m for m in ms if m.domain == dropped)
    _no_false_blocks(ms)
    assert m.evidence["silence"]["proven"] is False


def test_lone_surrogate_in_ede_text_is_written_as_json(lab_thread: LabThread, lab_ca: LabCA) -> None:
    zone = Zone()
    zone.set(f"s.{D}", Behaviour(rcode="NXDOMAIN", ede=((17, '{"j": "\\ud800 blocked", "o": "x"}'),)))
    lab = start_lab(lab_thread, zone, "127.53.3.5", lab_ca, transports=("udp",))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe.cli",
            "once",
            "--json",
            "-t",
            "A",
            "-r",
            lab.specs()["udp"],
            "--control",
            lab.specs()["udp"],
            "--timeout",
            "1",
            "--udp-linger",
            "0",
            "--expect",
            "blocked",
            f"s.{D}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.splitlines()[0])
    assert m["outcome"] == "ede_blocked"
    assert m["ede"][0]["json"]["j"] == "\ufffd blocked"


def test_a_silence_on_a_name_the_control_cannot_resolve_proves_nothing(
    script: Script, control: Resolver
) -> None:
    # The truth zone answers NXDOMAIN for dead.*: a name whose own servers are down is silent
    # through every recursor, and must not read as a block however live the resolver is.
    script.dropped = {f"dead.{D}", f"dropped.{D}"}
    ms = _run(script.spec("tcp"), [f"dead.{D}", f"dropped.{D}", f"a.{D}", f"b.{D}"], control)
    by = {m.domain: m for m in ms}
    assert by[f"dead.{D}"].evidence["silence"]["proven"] is True
    assert (by[f"dead.{D}"].outcome, by[f"dead.{D}"].blocked) == (Outcome.TIMEOUT, None)
    assert by[f"dropped.{D}"].blocked is True


def test_the_confirmation_waits_past_a_recursors_own_upstream_timeout(
    script: Script, control: Resolver
) -> None:
    # Like Knot Resolver with an unreachable upstream: silent for a while, then SERVFAIL.
    started: dict[bytes, float] = {}

    def slow_then_servfail(wire: bytes, _n: int) -> list[bytes]:
        q = dns.message.from_wire(wire)
        name = q.question[0].name.to_text()
        if not name.startswith("slow."):
            return [_answer(wire)]
        first = started.setdefault(b"slow", time.monotonic())
        if time.monotonic() - first < 2.5:
            return []
        r = dns.message.make_response(q)
        r.set_rcode(dns.rcode.SERVFAIL)
        return [r.to_wire()]

    script.udp = slow_then_servfail
    ms = _run(script.spec("udp"), [f"slow.{D}", f"a.{D}", f"b.{D}"], control, confirm_after=3.0)
    m = next(m for m in ms if m.domain == f"slow.{D}")
    assert (m.outcome, m.blocked) == (Outcome.SERVFAIL, None)
    assert m.evidence["pass"] == 2


def _silent_twice(sends: tuple[int, int]) -> tuple[Attempt, ...]:
    timed_out = Failure(FailureKind.TIMEOUT, Phase.DNS_ROUND_TRIP, "dns_round_trip: timed out")
    return tuple(
        Attempt(number, n, "udp://127.0.0.1:53", False, timed_out, overtaken=True)
        for number, n in zip((1, 2), sends, strict=True)
    )


@pytest.mark.parametrize(
    ("loss", "sends", "proven"),
    [
        # rate = (lost + 1) / (sends + 2); n = every send of both passes; proven iff rate^n < 1e-4.
        (Loss(sends=96, lost=20), (3, 3), True),  # (21/98)^6 = 9.7e-5: just below the bound
        (Loss(sends=96, lost=21), (3, 3), False),  # (22/98)^6 = 1.27e-4: just above it
        (Loss(sends=8, lost=0), (2, 3), True),  # 0.1^5 = 1e-5
        (Loss(sends=8, lost=0), (2, 2), False),  # 0.1^4 = 1e-4 (a hair above in floating point): not below
        (Loss(sends=10_000, lost=0), (1, 1), True),  # a clean endpoint: (1/10002)^2 = 1e-8
        (None, (3, 3), False),  # no loss seen at all on the endpoint: rate 1, never proven
    ],
)
def test_a_udp_silence_counts_only_below_the_loss_bound(
    loss: Loss | None, sends: tuple[int, int], proven: bool
) -> None:
    ok, reason, facts = silence_proven(Transport.UDP, _silent_twice(sends), loss)
    assert ok is proven, (reason, facts)
    assert facts["n"] == sum(sends)
    assert (facts["chance"] < LOSS_BOUND) is proven
    assert reason.startswith("silent to" if proven else "loss explains it")
