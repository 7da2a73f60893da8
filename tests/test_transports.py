"""Connection reuse, pipelining, fallbacks, certificates, broken connections and rate limits."""

from __future__ import annotations

import asyncio

import pytest

from probe.catalogue import resolve_spec
from probe.engine import Engine, Plan
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.model import Outcome
from probe.specs import Resolver
from probe.transports import Options

from .conftest import measure, resolvers_of, start_lab

REAL = Behaviour(records={"A": ("93.184.216.34",)})
STREAMS = ("tcp", "dot", "doh", "doh3", "doq")


def _zone(**extra: Behaviour) -> Zone:
    zone = Zone()
    zone.set("*.reuse.test", REAL)
    for name, b in extra.items():
        zone.set(f"{name}.reuse.test", b)
    return zone


@pytest.fixture(scope="module")
def server(lab_thread: LabThread, lab_ca: LabCA) -> LabServer:
    zone = _zone(slow=Behaviour(records={"A": ("93.184.216.1",)}, delay=0.3), close=Behaviour(action="close"))
    return start_lab(lab_thread, zone, "127.53.1.2", lab_ca)


@pytest.mark.parametrize("transport", STREAMS)
def test_one_handshake_carries_many_queries(transport: str, lab_thread: LabThread, lab_ca: LabCA) -> None:
    lab = start_lab(lab_thread, _zone(), "127.0.0.1", lab_ca)
    names = [f"n{i}.reuse.test" for i in range(150)]
    endpoint = resolvers_of(lab, [transport])[0].endpoints[0]

    async def go() -> tuple[list[Outcome], int]:
        async with Engine(
            Options(timeout=2, ca_file=str(lab_ca.ca_file)), qps=None, concurrency=50
        ) as engine:
            out = await engine.collect(
                Plan(names, ["A", "AAAA"], [Resolver("lab", "isp", None, (endpoint,))])
            )
            return [m.outcome for m in out], engine.exchanger(endpoint).handshakes  # type: ignore[attr-defined]  # connection transports only

    outcomes, handshakes = asyncio.run(go())
    assert outcomes.count(Outcome.RESOLVED) == 150
    assert outcomes.count(Outcome.NODATA) == 150
    assert handshakes == 1
    if transport not in ("doq", "doh3"):  # QUIC has no TCP connection to count
        assert lab.connections == 1
    asyncio.run_coroutine_threadsafe(lab.stop(), lab_thread.loop).result()


@pytest.mark.parametrize("transport", STREAMS)
def test_replies_out_of_order_are_matched(transport: str, server: LabServer, lab_ca: LabCA) -> None:
    """A slow answer must not hold up a fast one sent after it on the same connection."""
    out = measure(
        ["slow.reuse.test", "fast.reuse.test"], resolvers_of(server, [transport]), ca=lab_ca, concurrency=2
    )
    by = {m.domain: m for m in out}
    assert by["slow.reuse.test"].answers == ("93.184.216.1",)
    assert by["fast.reuse.test"].answers == ("93.184.216.34",)
    assert by["fast.reuse.test"].latency_ms is not None
    assert by["slow.reuse.test"].latency_ms is not None
    assert by["fast.reuse.test"].latency_ms < by["slow.reuse.test"].latency_ms


@pytest.mark.parametrize("transport", STREAMS)
def test_broken_connection_is_reopened_and_retried_once(
    transport: str, server: LabServer, lab_ca: LabCA
) -> None:
    names = ["close.reuse.test"] + [f"ok{i}.reuse.test" for i in range(5)]
    out = measure(names, resolvers_of(server, [transport]), ca=lab_ca, concurrency=1, timeout=2)
    by = {m.domain: m for m in out}
    closed = by["close.reuse.test"]
    assert closed.outcome is Outcome.ERROR, closed
    assert "retried" in closed.evidence  # tried on a fresh connection once, then given up
    for i in range(5):
        assert by[f"ok{i}.reuse.test"].outcome is Outcome.RESOLVED, by[f"ok{i}.reuse.test"]


def test_doh_falls_back_to_http1_and_says_so(lab_thread: LabThread, lab_ca: LabCA) -> None:
    lab = start_lab(lab_thread, _zone(), "127.53.1.3", lab_ca, transports=("doh",), http1_only=True)
    out = measure(["a.reuse.test", "b.reuse.test"], resolvers_of(lab, ["doh"]), ca=lab_ca)
    for m in out:
        assert m.outcome is Outcome.RESOLVED, m
        assert (m.evidence["http_version"], m.evidence["http_status"]) == ("HTTP/1.1", 200)


def test_doh_http_error_status_is_an_error_with_the_status(lab_thread: LabThread, lab_ca: LabCA) -> None:
    zone = _zone(gone=Behaviour(http_status=451))
    lab = start_lab(lab_thread, zone, "127.0.0.1", lab_ca, transports=("doh",))
    (m,) = measure(["gone.reuse.test"], resolvers_of(lab, ["doh"]), ca=lab_ca)
    assert (m.outcome, m.error, m.blocked) == (Outcome.ERROR, "http: status 451", None)
    assert m.evidence["http_status"] == 451


@pytest.mark.parametrize("transport", ["dot", "doh", "doh3", "doq"])
def test_untrusted_certificate_is_an_error(transport: str, server: LabServer) -> None:
    (m,) = measure(["a.reuse.test"], resolvers_of(server, [transport]), ca=None)
    assert m.outcome is Outcome.ERROR
    assert m.error is not None
    assert "certificate verify failed" in m.error, m.error
    assert m.evidence["phase"] == "tls_handshake"


@pytest.mark.parametrize("transport", ["dot", "doh", "doh3", "doq"])
def test_certificate_for_another_host_is_an_error(
    transport: str, lab_thread: LabThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The host-name check is never skipped, IP literals included."""
    other = LabCA(hosts=("127.0.0.1",), directory=tmp_path_factory.mktemp("other"))
    lab = start_lab(lab_thread, _zone(), "127.53.1.4", other)
    (m,) = measure(["a.reuse.test"], resolvers_of(lab, [transport]), ca=other)
    assert m.outcome is Outcome.ERROR
    assert m.error is not None
    assert "127.53.1.4" in m.error or "IP address mismatch" in m.error, m.error


def test_per_endpoint_rate_limit_spaces_queries(lab_thread: LabThread, lab_ca: LabCA) -> None:
    lab = start_lab(lab_thread, _zone(), "127.53.1.5", lab_ca, transports=("udp",))
    out = measure([f"r{i}.reuse.test" for i in range(8)], resolvers_of(lab, ["udp"]), ca=lab_ca, qps=20)
    assert all(m.outcome is Outcome.RESOLVED for m in out)
    assert len(lab.arrivals) == 8
    # 20 qps: one every 50 ms. Scheduling can shift a single arrival, never the whole train.
    assert lab.arrivals[-1] - lab.arrivals[0] >= 7 * 0.05 * 0.9


def test_dead_endpoint_timeout_is_not_a_block(lab_thread: LabThread, lab_ca: LabCA) -> None:
    """An endpoint that answered nothing in the run may just be down: blocked stays null."""
    zone = Zone(default=Behaviour(action="drop"))
    lab = start_lab(lab_thread, zone, "127.53.1.6", lab_ca, transports=("udp", "tcp"))
    out = measure(["a.reuse.test", "b.reuse.test"], resolvers_of(lab), ca=lab_ca, timeout=0.3)
    assert {(m.outcome, m.blocked) for m in out} == {(Outcome.TIMEOUT, None)}


def test_closed_udp_port_is_an_error_not_a_block(lab_ca: LabCA) -> None:
    (m,) = measure(["a.reuse.test"], [resolve_spec("udp://127.53.1.7:9")], ca=lab_ca, timeout=0.5)
    assert (m.outcome, m.blocked) == (Outcome.ERROR, None)
    assert m.error == "dns_round_trip: connection refused"


def test_dues_fire_each_timer_at_its_own_time_under_any_loop() -> None:
    """One loop timer sweeps an exchanger's first steps (probe/transports/_wait.py, Dues): each
    timer must still fire at its own instant, an out-of-order one goes on the loop itself, a
    cancelled one never fires, and a Dues used again under a new event loop still fires (a
    sweep armed on a closed loop must not hold this loop's timers back)."""
    from probe.transports._wait import Dues, Timer

    dues = Dues()

    async def run() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        fired: list[tuple[str, float]] = []
        futures: dict[str, asyncio.Future[None]] = {}

        def arm(name: str, after: float) -> Timer:
            fut: asyncio.Future[None] = loop.create_future()
            fut.add_done_callback(lambda _f: fired.append((name, loop.time() - start)))
            futures[name] = fut
            return Timer(fut, start + after, (), dues)

        arm("a", 0.05)
        arm("b", 0.10)
        arm("early", 0.02)  # before the last queued: armed on the loop, still on time
        arm("cancelled", 0.12).cancel()
        arm("c", 0.15)
        await asyncio.wait([futures[n] for n in ("a", "b", "early", "c")], timeout=2)
        await asyncio.sleep(0.05)  # the cancelled one's instant has passed too
        for fut in futures.values():
            if fut.done():
                assert isinstance(fut.exception(), TimeoutError)
        return fired

    for _ in range(2):  # the second run is a new event loop, the same Dues
        fired = asyncio.run(run())
        assert [name for name, _ in fired] == ["early", "a", "b", "c"]
        for (name, at), due in zip(fired, (0.02, 0.05, 0.10, 0.15), strict=True):
            assert due <= at < due + 0.5, (name, at)
