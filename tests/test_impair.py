"""The impairment proxy itself, against the lab: every effect observable from a client.

Loopback only. Statistical checks use a fixed seed and bounds of several standard
deviations, so they cannot flake; timing checks assert lower bounds the proxy imposes
(a stall, a drip), never upper bounds a loaded machine could miss.
"""

from __future__ import annotations

import functools
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from probe.catalogue import resolve_spec
from probe.impair import Counters, Impairment, ImpairProxy, PathImpairment, StreamImpairment
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone

from .conftest import measure
from .real import have, start_unbound

LAB = "127.54.1.1"
REAL_HOST = "127.54.3.1"
PROXIES = tuple(f"127.54.0.{i}" for i in range(1, 60))
REAL = Behaviour(records={"A": ("192.0.2.1",)})
_next_proxy = iter(PROXIES)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA(hosts=(LAB, REAL_HOST, *PROXIES), directory=tmp_path_factory.mktemp("impair-ca"))


def _zone() -> Zone:
    zone = Zone()
    zone.set("*.impair.test", REAL)
    zone.set("slow.impair.test", Behaviour(records={"A": ("192.0.2.2",)}, delay=0.3))
    zone.set("drop.impair.test", Behaviour(action="drop"))
    return zone


@pytest.fixture(scope="module")
def lab(lab_thread: LabThread, ca: LabCA) -> LabServer:
    return lab_thread.start(LabServer(_zone(), LAB, ca, transports=("udp", "tcp", "dot", "doh", "doq")))


@pytest.fixture
def proxy_of(lab_thread: LabThread, lab: LabServer) -> Iterator[Callable[..., ImpairProxy]]:
    started: list[ImpairProxy] = []

    def make(impairment: Impairment, vanish_when: Callable[[], bool] | None = None) -> ImpairProxy:
        proxy = lab_thread.start(ImpairProxy.of(lab, impairment, next(_next_proxy), vanish_when))
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        lab_thread.stop_server(proxy)


def _wait_for(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def _has_connections(proxy: ImpairProxy, count: int) -> bool:
    return proxy.counters.connections == count


def _query(name: str, qid: int = 0) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    q.id = qid
    return q


def _udp_burst(proxy: ImpairProxy, count: int, quiet: float = 0.15) -> list[int]:
    """Send `count` queries from one socket in batches; the IDs of the replies, in arrival order.

    A batch is over when nothing has come for `quiet` seconds (longer than any delay the
    proxy adds); batches stay small enough for the sockets' buffers, so that only the
    proxy loses datagrams.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((proxy.host, proxy.ports["udp"]))
    sock.settimeout(quiet)
    got: list[int] = []
    try:
        for start in range(0, count, 100):
            for qid in range(start, min(count, start + 100)):
                sock.send(_query("a.impair.test", qid).to_wire())
            while True:
                try:
                    got.append(struct.unpack("!H", sock.recv(4096)[:2])[0])
                except TimeoutError:
                    break
    finally:
        sock.close()
    return got


def _exactly(message: str) -> str:
    """A `match` pattern for this message and nothing more."""
    return rf"\A{re.escape(message)}\Z"


def test_settings_that_make_no_sense_name_the_field_and_value() -> None:
    with pytest.raises(ValueError, match=_exactly("PathImpairment.loss: 1.5 is not a probability in [0, 1]")):
        PathImpairment(loss=1.5)
    with pytest.raises(
        ValueError, match=_exactly("StreamImpairment.stall_at: 'later' is not one of accept, reply")
    ):
        StreamImpairment(stall_at="later")
    with pytest.raises(
        ValueError, match=_exactly("Impairment.vanish_after_queries: -1 must not be negative")
    ):
        Impairment(vanish_after_queries=-1)


def test_udp_loss_rate_is_what_was_asked_and_repeats_with_the_seed(
    proxy_of: Callable[..., ImpairProxy], lab: LabServer
) -> None:
    n, p = 600, 0.2
    path = PathImpairment(loss=p)
    proxies = [proxy_of(Impairment(to_server=path, seed=7)), proxy_of(Impairment(to_server=path, seed=7))]
    before = lab.queries
    replies = [_udp_burst(proxy, n) for proxy in proxies]
    a, b = (proxy.counters for proxy in proxies)
    sd = (n * p * (1 - p)) ** 0.5
    assert a.datagrams_c2s == n
    assert abs(a.lost_c2s - n * p) < 5 * sd, a.lost_c2s
    # The same seed and the same arrival order make the same choices.
    assert b.lost_c2s == a.lost_c2s
    assert sorted(replies[0]) == sorted(replies[1])
    # What was not lost reached the resolver and came back.
    _wait_for(lambda: lab.queries - before == 2 * (n - a.lost_c2s))
    assert len(replies[0]) == n - a.lost_c2s


def test_udp_loss_towards_the_client_is_counted_on_its_own(proxy_of: Callable[..., ImpairProxy]) -> None:
    n, p = 600, 0.5
    proxy = proxy_of(Impairment(to_client=PathImpairment(loss=p), seed=3))
    got = _udp_burst(proxy, n)
    c = proxy.counters
    sd = (n * p * (1 - p)) ** 0.5
    assert c.lost_c2s == 0
    assert c.datagrams_s2c == n
    assert abs(c.lost_s2c - n * p) < 5 * sd
    assert len(got) == n - c.lost_s2c


def test_jitter_reorders_and_duplicates_arrive_twice(proxy_of: Callable[..., ImpairProxy]) -> None:
    n = 200
    path = PathImpairment(jitter=0.1, duplicate=0.5)
    proxy = proxy_of(Impairment(to_client=path, seed=11))
    got = _udp_burst(proxy, n, quiet=0.4)
    c = proxy.counters
    sd = (n * 0.25) ** 0.5
    assert abs(c.duplicated_s2c - n * 0.5) < 5 * sd
    assert len(got) == n + c.duplicated_s2c
    assert sorted(set(got)) == list(range(n))
    assert got != sorted(got)
    assert c.reordered_s2c > 0


def test_delay_applies_to_every_datagram(proxy_of: Callable[..., ImpairProxy]) -> None:
    proxy = proxy_of(Impairment(to_server=PathImpairment(delay=0.25)))
    start = time.monotonic()
    reply = dns.query.udp(_query("a.impair.test"), proxy.host, port=proxy.ports["udp"], timeout=3)
    assert time.monotonic() - start >= 0.25
    assert reply.rcode() == dns.rcode.NOERROR


def test_a_stalled_handshake_times_out_then_carries_on(
    proxy_of: Callable[..., ImpairProxy], ca: LabCA
) -> None:
    proxy = proxy_of(Impairment(stream=StreamImpairment(stall_one_in=1, stall_for=0.8)))
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    ctx.set_alpn_protocols(["dot"])
    with pytest.raises(dns.exception.Timeout):
        dns.query.tls(
            _query("a.impair.test"),
            proxy.host,
            port=proxy.ports["dot"],
            timeout=0.3,
            ssl_context=ctx,
            server_hostname=proxy.host,
        )
    start = time.monotonic()
    reply = dns.query.tls(
        _query("a.impair.test"),
        proxy.host,
        port=proxy.ports["dot"],
        timeout=5,
        ssl_context=ctx,
        server_hostname=proxy.host,
    )
    assert time.monotonic() - start >= 0.7
    assert reply.answer[0][0].to_text() == "192.0.2.1"
    assert proxy.counters.stalled == 2
    assert proxy.counters.connections == 2


def test_a_stalled_first_reply_lets_the_connection_open(proxy_of: Callable[..., ImpairProxy]) -> None:
    proxy = proxy_of(Impairment(stream=StreamImpairment(stall_one_in=1, stall_for=0.6, stall_at="reply")))
    with socket.create_connection((proxy.host, proxy.ports["tcp"]), timeout=0.3) as sock:
        wire = _query("a.impair.test").to_wire()
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        with pytest.raises(TimeoutError):
            sock.recv(2)
        sock.settimeout(3)
        assert len(sock.recv(2)) >= 1  # the reply, once the stall is over


def test_a_reset_after_n_bytes_cuts_the_answer(proxy_of: Callable[..., ImpairProxy]) -> None:
    proxy = proxy_of(Impairment(stream=StreamImpairment(reset_one_in=1, reset_after=10)))
    received: list[bytes] = []
    with socket.create_connection((proxy.host, proxy.ports["tcp"]), timeout=3) as sock:
        wire = _query("a.impair.test").to_wire()
        sock.sendall(struct.pack("!H", len(wire)) + wire)

        def read_to_the_end() -> None:
            while chunk := sock.recv(4096):
                received.append(chunk)

        with pytest.raises(ConnectionResetError):
            read_to_the_end()
    assert len(b"".join(received)) == 10
    assert proxy.counters.resets == 1


def test_dripped_bytes_come_one_at_a_time(proxy_of: Callable[..., ImpairProxy]) -> None:
    interval = 0.01
    proxy = proxy_of(Impairment(stream=StreamImpairment(drip_one_in=1, drip_interval=interval)))
    start = time.monotonic()
    reply = dns.query.tcp(_query("a.impair.test"), proxy.host, port=proxy.ports["tcp"], timeout=10)
    size = len(reply.to_wire()) + 2
    assert time.monotonic() - start >= (size - 1) * interval
    assert proxy.counters.dripping == 1


def test_a_vanished_resolver_answers_nothing_on_any_transport(proxy_of: Callable[..., ImpairProxy]) -> None:
    proxy = proxy_of(Impairment(vanish_after_queries=3))
    for _ in range(3):
        dns.query.udp(_query("a.impair.test"), proxy.host, port=proxy.ports["udp"], timeout=3)
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(_query("a.impair.test"), proxy.host, port=proxy.ports["udp"], timeout=0.3)
    # Streams are accepted and then hear nothing: a blackhole, not a refusal.
    with socket.create_connection((proxy.host, proxy.ports["tcp"]), timeout=0.3) as sock:
        wire = _query("a.impair.test").to_wire()
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        with pytest.raises(TimeoutError):
            sock.recv(2)
    c = proxy.counters
    assert c.vanished_at is not None
    assert c.vanished_datagrams == 1
    _wait_for(lambda: proxy.counters.blackholed == 1)


def test_vanish_when_sees_inside_tls(proxy_of: Callable[..., ImpairProxy], lab: LabServer, ca: LabCA) -> None:
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    ctx.set_alpn_protocols(["dot"])
    cut = lab.queries + 2
    proxy = proxy_of(Impairment(), vanish_when=lambda: lab.queries >= cut)
    q = _query("a.impair.test")
    sock = socket.create_connection((proxy.host, proxy.ports["dot"]), timeout=3)
    with ctx.wrap_socket(sock, server_hostname=proxy.host) as tls:
        for _ in range(2):
            dns.query.send_tcp(tls, q)
            dns.query.receive_tcp(tls, expiration=time.time() + 3)
        dns.query.send_tcp(tls, q)
        tls.settimeout(0.3)
        with pytest.raises(TimeoutError):
            tls.recv(2)
    assert proxy.counters.vanished_at is not None


def _pipelined(server: LabServer, names: list[str], wait: float) -> list[str]:
    """Names of the replies that arrive within `wait` on one TCP connection, in arrival order."""
    got: list[str] = []
    with socket.create_connection((server.host, server.ports["tcp"]), timeout=wait) as sock:
        for i, name in enumerate(names):
            wire = _query(name, i).to_wire()
            sock.sendall(struct.pack("!H", len(wire)) + wire)
        end = time.time() + wait
        while len(got) < len(names):
            try:
                reply = dns.query.receive_tcp(sock, expiration=end)[0]
            except (dns.exception.Timeout, TimeoutError):
                break
            got.append(reply.question[0].name.to_text(omit_final_dot=True))
    return got


def test_an_in_order_lab_holds_replies_behind_a_slow_or_dropped_name(
    lab_thread: LabThread, ca: LabCA
) -> None:
    ordered = lab_thread.start(LabServer(_zone(), LAB, ca, transports=("udp", "tcp"), in_order=True))
    names = ["slow.impair.test", "a.impair.test"]
    assert _pipelined(ordered, names, 3) == names
    assert _pipelined(ordered, ["drop.impair.test", "a.impair.test"], 0.5) == []
    # The default answers each query as soon as it can.
    plain = lab_thread.start(LabServer(_zone(), LAB, ca, transports=("udp", "tcp")))
    assert _pipelined(plain, names, 3) == ["a.impair.test", "slow.impair.test"]
    assert _pipelined(plain, ["drop.impair.test", "a.impair.test"], 0.5) == ["a.impair.test"]
    lab_thread.stop_server(ordered)
    lab_thread.stop_server(plain)


def test_the_engine_measures_every_transport_through_a_clean_proxy(
    proxy_of: Callable[..., ImpairProxy], ca: LabCA
) -> None:
    proxy = proxy_of(Impairment())
    resolvers = [resolve_spec(spec) for spec in proxy.specs().values()]
    ms = measure(["a.impair.test", "b.impair.test"], resolvers, ca=ca, timeout=3)
    assert {(m.transport.value, m.outcome.value) for m in ms} == {
        (t, "resolved") for t in ("udp", "tcp", "dot", "doh", "doq")
    }
    assert proxy.counters.connections >= 2  # tcp, dot, doh each open one
    assert isinstance(proxy.counters, Counters)


def test_one_in_n_connections_is_a_rate_and_repeats_with_the_seed(
    proxy_of: Callable[..., ImpairProxy],
) -> None:
    n, one_in = 120, 4
    cfg = StreamImpairment(stall_one_in=one_in, stall_for=0.0)
    proxies = [proxy_of(Impairment(stream=cfg, seed=5)), proxy_of(Impairment(stream=cfg, seed=5))]
    for proxy in proxies:
        for k in range(1, n + 1):
            # One at a time, so that the connections meet the generator in the same order.
            socket.create_connection((proxy.host, proxy.ports["tcp"]), timeout=3).close()
            _wait_for(functools.partial(_has_connections, proxy, k))
    a, b = (proxy.counters for proxy in proxies)
    sd = (n * (1 / one_in) * (1 - 1 / one_in)) ** 0.5
    assert abs(a.stalled - n / one_in) < 5 * sd, a.stalled
    assert a.stalled == b.stalled


def test_a_resolver_vanishes_at_a_moment_and_after_k_connections(
    proxy_of: Callable[..., ImpairProxy],
) -> None:
    timed = proxy_of(Impairment(vanish_after=0.3))
    dns.query.udp(_query("a.impair.test"), timed.host, port=timed.ports["udp"], timeout=3)
    _wait_for(lambda: timed.counters.vanished_at is not None)
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(_query("a.impair.test"), timed.host, port=timed.ports["udp"], timeout=0.3)
    counted = proxy_of(Impairment(vanish_after_connections=1))
    reply = dns.query.tcp(_query("a.impair.test"), counted.host, port=counted.ports["tcp"], timeout=3)
    assert reply.rcode() == dns.rcode.NOERROR
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(_query("a.impair.test"), counted.host, port=counted.ports["tcp"], timeout=0.3)
    assert counted.gone()
    assert counted.counters.blackholed == 1


def test_duplicates_towards_the_server_reach_it_twice(
    proxy_of: Callable[..., ImpairProxy], lab: LabServer
) -> None:
    proxy = proxy_of(Impairment(to_server=PathImpairment(duplicate=1.0)))
    before = lab.queries
    dns.query.udp(_query("a.impair.test"), proxy.host, port=proxy.ports["udp"], timeout=3)
    _wait_for(lambda: lab.queries - before == 2)
    assert proxy.counters.duplicated_c2s == 1


@pytest.mark.skipif(not have("unbound"), reason="Debian's unbound is not installed")
def test_a_real_unbound_behind_the_proxy(
    proxy_of_real: Callable[[Impairment], ImpairProxy], ca: LabCA
) -> None:
    # TLS passes through untouched: the client verifies unbound's own certificate.
    clean = proxy_of_real(Impairment())
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    reply = dns.query.tls(
        _query("www.real-lab.net"),
        clean.host,
        port=clean.ports["dot"],
        timeout=5,
        ssl_context=ctx,
        server_hostname=clean.host,
    )
    assert reply.answer[0][0].to_text() == "93.184.216.34"
    gone = proxy_of_real(Impairment(vanish_after_queries=0))
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(_query("www.real-lab.net"), gone.host, port=gone.ports["udp"], timeout=0.3)
    assert gone.counters.vanished_datagrams == 1


@pytest.fixture
def proxy_of_real(
    lab_thread: LabThread, ca: LabCA, tmp_path: Path
) -> Iterator[Callable[[Impairment], ImpairProxy]]:
    unbound = start_unbound(
        tmp_path / "unbound",
        REAL_HOST,
        ca.cert_file,
        ca.key_file,
        zone_name="real-lab.net",
        zone_text="www IN A 93.184.216.34\n",
    )
    started: list[ImpairProxy] = []
    try:
        unbound.wait_ready("www.real-lab.net")

        def make(impairment: Impairment) -> ImpairProxy:
            proxy = lab_thread.start(ImpairProxy.of(unbound, impairment, next(_next_proxy)))
            started.append(proxy)
            return proxy

        yield make
    finally:
        for proxy in started:
            lab_thread.stop_server(proxy)
        unbound.stop()


def test_what_the_resolver_sent_before_it_vanished_still_arrives(
    proxy_of: Callable[..., ImpairProxy],
) -> None:
    proxy = proxy_of(Impairment())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((proxy.host, proxy.ports["udp"]))
        sock.settimeout(3)
        sock.send(_query("slow.impair.test", 1).to_wire())  # the lab answers it 0.3 s later
        _wait_for(lambda: proxy.counters.datagrams_c2s == 1)
        proxy.vanish()
        sock.send(_query("a.impair.test", 2).to_wire())
        assert struct.unpack("!H", sock.recv(4096)[:2])[0] == 1
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    assert proxy.counters.vanished_datagrams == 1


def test_the_proxy_refuses_to_leave_loopback() -> None:
    with pytest.raises(
        ValueError, match=_exactly("ImpairProxy upstream: '192.0.2.53' is not a loopback address")
    ):
        ImpairProxy("192.0.2.53", {"udp": 53})
    with pytest.raises(ValueError, match=_exactly("ImpairProxy host: '0.0.0.0' is not a loopback address")):
        ImpairProxy("127.0.0.1", {"udp": 53}, host="0.0.0.0")
    with pytest.raises(
        ValueError, match=_exactly("ImpairProxy ports: ['dns'] are not transports this proxy relays")
    ):
        ImpairProxy("127.0.0.1", {"dns": 53})
