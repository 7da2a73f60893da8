"""The collector against outsiders (issue 11): each attack on a real `collector serve` process.

Every attack asserts the status it gets, that it is answered (or cut off) within a bound,
that the collector's memory stays bounded, and that a legitimate probe's push succeeds
within 2 s while the attack goes on. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from collector.auth import hash_token, new_token
from collector.config import CollectorConfigError, parse_collector_config
from collector.report import render_report
from collector.store import open_store

from .real import free_port
from .test_collector import batch, measurement

HOST = "127.0.0.1"
ATTACKER = "127.0.0.7"  # another loopback address: Linux routes all of 127.0.0.0/8 to lo
LIMITS = {
    "render_cache_seconds": 1,
    "max_series_per_probe": 3000,
    "max_groups_per_probe": 50,
    "max_domain_series": 100,
}
TIMEOUT = 2.0  # header and body deadlines of the collector under test
PUSH_BUDGET = 2.0  # a legitimate probe's push must succeed within this, whatever the attack


def _status(pid: int, key: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


class Collector:
    """`collector serve` as its own process, with tokens for a legitimate probe and an attacker."""

    def __init__(
        self,
        work: Path,
        extra: str = "",
        limits: dict[str, float] | None = None,
        verify: Any = True,
        server: dict[str, float] | None = None,
    ) -> None:
        self.work = work
        self.port = free_port(HOST)
        self.db = work / "c.sqlite3"
        read_token = "read-" + "x" * 24
        (work / "read-token").write_text(read_token + "\n")
        self.read_token = read_token
        self.read_auth = {"authorization": f"Bearer {read_token}"}
        self.config = work / "collector.yaml"
        deadlines = {"header_timeout": TIMEOUT, "body_timeout": TIMEOUT, "keep_alive_timeout": TIMEOUT}
        self.config.write_text(
            f"listen: {HOST}:{self.port}\nstate_dir: {work}\ndatabase: sqlite:///{self.db}\n"
            f"server: {json.dumps(deadlines | (server or {}))}\n"
            f"limits: {json.dumps(LIMITS if limits is None else limits)}\n" + extra
        )
        store = open_store(f"sqlite:///{self.db}")
        self.tokens = {}
        for probe in ("legit", "evil", "flood", "groups", "quota", "other"):
            self.tokens[probe] = new_token()
            store.set_token(probe, hash_token(self.tokens[probe]))
        store.close()
        self.log = (work / "collector.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        self.verify = verify
        self.url = f"{'https' if 'cert:' in extra else 'http'}://{HOST}:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                # With the read token, in case /healthz is protected (it is open on every other read).
                ready = httpx2.get(f"{self.url}/healthz", timeout=1, verify=verify, headers=self.read_auth)
                if ready.status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert self.proc.poll() is None, (work / "collector.log").read_text()
            assert time.monotonic() < deadline, "collector did not start"
            time.sleep(0.1)
        self.client = httpx2.Client(base_url=self.url, timeout=10, verify=verify)

    def rss_mib(self) -> float:
        return _status(self.proc.pid, "VmRSS")

    def peak_mib(self) -> float:
        return _status(self.proc.pid, "VmHWM")

    def push(self, probe: str, body: dict[str, Any], gz: bool = True) -> httpx2.Response:
        data = json.dumps(body).encode()
        headers = {"authorization": f"Bearer {self.tokens[probe]}", "content-type": "application/json"}
        if gz:
            data = gzip.compress(data)
            headers["content-encoding"] = "gzip"
        return self.client.post("/api/v1/results", content=data, headers=headers)

    def legit_push(self) -> float:
        """Push one batch as the legitimate probe on a fresh connection; its latency in seconds."""
        t0 = time.monotonic()
        with httpx2.Client(base_url=self.url, timeout=PUSH_BUDGET * 3, verify=self.verify) as c:
            r = c.post(
                "/api/v1/results",
                content=json.dumps(batch("legit", [measurement(domain=f"l{uuid.uuid4().hex[:8]}.example")])),
                headers={
                    "authorization": f"Bearer {self.tokens['legit']}",
                    "content-type": "application/json",
                },
            )
        assert r.status_code == 200, r.text
        return time.monotonic() - t0

    def connect(self, source: str = ATTACKER) -> socket.socket:
        """A raw socket from `source`: attacks come from their own address, as from outside, so
        that the per-source cap (server.max_connections_per_ip) falls on them, not on the probe."""
        return socket.create_connection((HOST, self.port), timeout=10, source_address=(source, 0))

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    c = Collector(tmp_path_factory.mktemp("attacks"), "reads: {open: true}\n")
    yield c
    c.stop()


def during(attack: Callable[[], None], c: Collector, pushes: int = 3) -> list[float]:
    """Run `attack` in a thread; meanwhile push as the legitimate probe. The pushes' latencies."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            attack()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread, which raises it
            errors.append(exc)

    rss_before = c.rss_mib()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.3)  # let the attack take hold first
    latencies = [c.legit_push() for _ in range(pushes)]
    t.join(60)
    assert not t.is_alive(), "the attack did not finish"
    if errors:
        raise errors[0]
    assert max(latencies) < PUSH_BUDGET, latencies
    # What the attack left allocated: bounded whatever it sent (a gzip bomb's transient peak
    # is asserted where it is sent).
    assert c.rss_mib() - rss_before < 100, (rss_before, c.rss_mib())
    return latencies


def _read_status(s: socket.socket, deadline: float) -> tuple[int | None, float]:
    """The HTTP status the server answers on `s` (None when it just closes), and when."""
    s.settimeout(max(0.1, deadline - time.monotonic()))
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return None, -1.0
    at = time.monotonic()
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return (int(m.group(1)) if m else None), at


def test_idle_bodies_without_a_token_are_refused_from_the_headers(collector: Collector) -> None:
    """Issue 11 §1: sockets that announce a megabyte and send one byte held every ingest slot."""
    results: list[tuple[int | None, float]] = []

    def attack() -> None:
        socks = []
        t0 = time.monotonic()
        for _ in range(8):
            s = collector.connect()
            s.sendall(
                b"POST /api/v1/results HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                b"Content-Type: application/json\r\n\r\n{"
            )
            socks.append(s)
        for s in socks:
            status, at = _read_status(s, t0 + 5)
            results.append((status, at - t0))
            s.close()

    during(attack, collector)
    assert [r[0] for r in results] == [401] * 8
    assert max(r[1] for r in results) < 1.5  # answered from the headers, not after the body


def test_idle_bodies_with_a_token_hold_only_that_probe_and_only_until_the_body_deadline(
    collector: Collector,
) -> None:
    """A probe's own token buys it two slots of its own, each cut at server.body_timeout."""
    results: list[tuple[int | None, float]] = []

    def attack() -> None:
        socks = []
        t0 = time.monotonic()
        for _ in range(4):
            s = collector.connect()
            s.sendall(
                f"POST /api/v1/results HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {collector.tokens['evil']}"
                "\r\nContent-Length: 1000000\r\nContent-Type: application/json\r\n\r\n{".encode()
            )
            socks.append(s)
        for s in socks:
            status, at = _read_status(s, t0 + 3 * TIMEOUT + 2)
            results.append((status, at - t0))
            s.close()

    during(attack, collector)
    statuses = sorted(r[0] or 0 for r in results)
    # Two slots time out (408); the two that waited for a slot get 408 or, if the slot was
    # not free within the body deadline, 429 with Retry-After.
    assert statuses.count(408) >= 2, statuses
    assert set(statuses) <= {408, 429}, statuses
    assert max(r[1] for r in results) < 2 * TIMEOUT + 1.5


def test_half_sent_headers_are_cut_off_at_the_header_deadline(collector: Collector) -> None:
    """Issue 11 §1: 200 connections that send half their headers stayed open indefinitely."""
    closed_after: list[float] = []

    def attack() -> None:
        socks = []
        t0 = time.monotonic()
        for i in range(200):
            s = collector.connect()
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow-" + str(i).encode())
            socks.append(s)
        for s in socks:
            s.settimeout(max(0.1, t0 + TIMEOUT + 5 - time.monotonic()))
            try:
                while s.recv(4096):
                    pass
                closed_after.append(time.monotonic() - t0)
            except ConnectionResetError:
                closed_after.append(time.monotonic() - t0)
            except TimeoutError:
                closed_after.append(float("inf"))  # still open: the deadline did not hold
            s.close()

    during(attack, collector)
    assert len(closed_after) == 200
    assert max(closed_after) < TIMEOUT + 3, max(closed_after)


def _bomb() -> bytes:
    """64 KB of gzip that inflates to 64 MB of `[[],[],…]` (issue 11 §2)."""
    unit = b"[]," * 1024
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as g:
        g.write(b"[")
        for _ in range((64 << 20) // len(unit) - 1):
            g.write(unit)
        g.write(b"[]]")
    return raw.getvalue()


def test_a_gzip_bomb_costs_nothing_without_a_token_and_little_with_one(collector: Collector) -> None:
    bomb = _bomb()
    assert len(bomb) < 300_000
    outcome: dict[str, Any] = {}
    peak_before = collector.peak_mib()

    def attack() -> None:
        with httpx2.Client(base_url=collector.url, timeout=30) as c:
            for name, headers in (
                ("anonymous", {}),
                ("token", {"authorization": f"Bearer {collector.tokens['evil']}"}),
            ):
                for _ in range(2):
                    t0 = time.monotonic()
                    r = c.post(
                        "/api/v1/results", content=bomb, headers={"content-encoding": "gzip", **headers}
                    )
                    outcome.setdefault(name, []).append((r.status_code, time.monotonic() - t0))

    during(attack, collector)
    assert [s for s, _ in outcome["anonymous"]] == [401, 401]
    assert max(t for _, t in outcome["anonymous"]) < 1
    # With a token: inflated within the bound, then refused by the structural scan before
    # Python builds millions of lists.
    assert [s for s, _ in outcome["token"]] == [422, 422]
    assert max(t for _, t in outcome["token"]) < 5
    assert collector.peak_mib() - peak_before < 250, (peak_before, collector.peak_mib())


HOLES = [
    ("lone surrogate", b'"\\ud800x"', "unpaired UTF-16 surrogate"),
    ("NaN", b"NaN", "NaN is not a JSON number"),
    ("Infinity", b"-Infinity", "-Infinity is not a JSON number"),
    ("overflow", b"1e999", "out of range"),
    ("deep", b"[" * 200 + b"]" * 200, "nested deeper than"),
]


@pytest.mark.parametrize(("value", "reason"), [pytest.param(*c[1:], id=c[0]) for c in HOLES])
def test_values_json_cannot_carry_are_refused_with_422(
    collector: Collector, value: bytes, reason: str
) -> None:
    body = json.dumps(batch("evil", [measurement(evidence="PLACEHOLDER")])).encode()
    body = body.replace(b'"PLACEHOLDER"', value)
    t0 = time.monotonic()
    r = collector.client.post(
        "/api/v1/results",
        content=body,
        headers={"authorization": f"Bearer {collector.tokens['evil']}", "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert reason in r.json()["detail"], r.text
    assert time.monotonic() - t0 < 2


def test_a_measurement_cannot_claim_another_probe_and_batch_ids_are_per_probe(collector: Collector) -> None:
    forged = measurement(
        domain="forged.example",
        id=10**9,  # never a real archive id here, so the assertion below holds in a fresh db too
        batch_id="someone-else",
        probe="legit",
        region="x",
        country="FR",
        received=0,
    )
    shared_id = str(uuid.uuid4())
    assert collector.push("other", batch("other", [forged], batch_id=shared_id)).status_code == 200
    theirs = collector.push("evil", batch("evil", [measurement(domain="theirs.example")], batch_id=shared_id))
    assert theirs.status_code == 200
    assert theirs.json() == {
        "batch_id": shared_id,
        "stored": 1,
        "duplicate": False,
    }
    (row,) = collector.client.get(
        "/evidence",
        params={
            "probe": "other",
            "resolver": "udp://192.0.2.53",
            "transport": "udp",
            "qtype": "A",
            "domain": "forged.example",
            "format": "json",
        },
    ).json()
    assert (row["probe"], row["batch_id"], row["region"], row["country"]) == (
        "other",
        shared_id,
        "it-milan",
        "IT",
    )
    assert row["received"] > 1.7e9
    assert isinstance(row["id"], int)
    assert row["id"] != 10**9


def test_one_token_cannot_flood_prometheus(collector: Collector) -> None:
    """Issue 11 §3: one probe's token made 130,139 series. Now: series and groups are quotas
    (429 with Retry-After), and per-domain series are capped per group (docs/metrics.md)."""
    statuses = []
    retry_after = None

    def attack() -> None:
        nonlocal retry_after
        for b in range(5):
            ms = [measurement(domain=f"n{b}-{i}.example") for i in range(1000)]
            r = collector.push("flood", batch("flood", ms))
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry_after = r.headers.get("retry-after")

    during(attack, collector)
    assert statuses == [200, 200, 200, 429, 429]  # max_series_per_probe: 3000
    assert retry_after is not None
    assert int(retry_after) > 0
    groups = [measurement(resolver=f"udp://192.0.2.{i}") for i in range(60)]  # max_groups_per_probe: 50
    r = collector.push("groups", batch("groups", groups))
    assert r.status_code == 429
    assert "groups" in r.json()["detail"]
    assert int(r.headers["retry-after"]) > 0
    deadline = time.monotonic() + 10  # the render cache may hold an older scrape for a few seconds
    while True:
        text = collector.client.get("/metrics").text
        if 'throttled_total{probe="flood",quota="series"} 2.0' in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    leaks = [
        line for line in text.splitlines() if line.startswith("blockprobe_leak{") and 'probe="flood"' in line
    ]
    assert len(leaks) == 100  # the cap, though 3,000 names leak
    domains = [
        line
        for line in text.splitlines()
        if line.startswith("blockprobe_domains{") and 'probe="flood"' in line
    ]
    assert [float(line.rsplit(" ", 1)[1]) for line in domains] == [3000.0]  # the true count
    assert 'blockprobe_domain_series_capped{country="IT",finding="leak",probe="flood"' in text
    assert 'blockprobe_collector_throttled_total{probe="flood",quota="series"} 2.0' in text
    assert len(text) < 500_000


def test_a_probe_over_its_results_per_minute_gets_429_with_retry_after(tmp_path: Path) -> None:
    c = Collector(tmp_path, limits={"results_per_minute": 1500})
    try:
        statuses = []
        for b in range(3):
            r = c.push(
                "quota", batch("quota", [measurement(domain=f"q{b}-{i}.example") for i in range(1000)])
            )
            statuses.append((r.status_code, r.headers.get("retry-after")))
        # A full bucket holds a minute's worth (1,500): the second batch needs 500 more, at 25 a second.
        assert statuses[0] == (200, None)
        assert statuses[1][0] == 429, statuses
        assert 15 <= int(statuses[1][1] or 0) <= 21, statuses
        assert statuses[2][0] == 429
        assert c.legit_push() < PUSH_BUDGET  # another probe's quota is its own
        text = c.client.get("/metrics").text
        assert 'blockprobe_collector_throttled_total{probe="quota",quota="results"} 2.0' in text
    finally:
        assert c.stop() == 0


def test_readers_hammering_pages_and_metrics_do_not_slow_ingest(collector: Collector) -> None:
    stop = threading.Event()
    metrics_times: list[float] = []

    def reader(path: str) -> None:
        with httpx2.Client(base_url=collector.url, timeout=10) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                assert c.get(path).status_code == 200
                if path == "/metrics":
                    metrics_times.append(time.monotonic() - t0)

    threads = [threading.Thread(target=reader, args=(p,), daemon=True) for p in ("/", "/metrics") * 2]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        latencies = [collector.legit_push() for _ in range(5)]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert max(latencies) < PUSH_BUDGET, latencies
    assert metrics_times
    assert sorted(metrics_times)[len(metrics_times) // 2] < 0.5


def test_responses_carry_security_headers(collector: Collector) -> None:
    for path in ("/", "/metrics", "/healthz", "/api/v1/lists"):
        h = collector.client.get(path).headers
        assert "default-src 'none'" in h["content-security-policy"], path
        assert (h["x-content-type-options"], h["x-frame-options"], h["referrer-policy"]) == (
            "nosniff",
            "DENY",
            "no-referrer",
        ), path


def test_reads_can_be_locked_with_a_token_or_basic_auth(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("a-long-enough-password\n")
    c = Collector(
        tmp_path, "reads: {token_file: read-token, basic_user: ops, basic_password_file: pw, open: false}\n"
    )
    try:
        for path in (
            "/",
            "/metrics",
            "/evidence?probe=a&resolver=b&transport=udp&qtype=A&domain=c",
            "/api/v1/findings?format=csv",
        ):
            assert c.client.get(path).status_code == 401, path
            assert (
                c.client.get(
                    path, headers={"authorization": "Bearer wrong-token-of-enough-length"}
                ).status_code
                == 401
            )
            assert (
                c.client.get(path, headers={"authorization": f"Bearer {c.read_token}"}).status_code == 200
            ), path
            basic = base64.b64encode(b"ops:a-long-enough-password").decode()
            assert c.client.get(path, headers={"authorization": f"Basic {basic}"}).status_code == 200, path
            wrong = base64.b64encode(b"ops:wrong").decode()
            assert c.client.get(path, headers={"authorization": f"Basic {wrong}"}).status_code == 401, path
        assert c.client.get("/healthz").status_code == 200  # open by default: load balancers probe it
        assert c.legit_push() < PUSH_BUDGET  # probes still push with their own tokens
    finally:
        assert c.stop() == 0


def test_a_public_listener_needs_tls_and_read_credentials_or_says_so() -> None:
    with pytest.raises(CollectorConfigError) as e:
        parse_collector_config("listen: 0.0.0.0:8478\n")
    text = str(e.value)
    assert "tls has no cert and key" in text
    assert "reads need reads.token_file" in text
    config = parse_collector_config("listen: 0.0.0.0:8478\ntls: {plain_http: true}\nreads: {open: true}\n")
    assert config.reads.open_pages
    assert config.reads.open_metrics
    loopback = parse_collector_config("listen: 127.0.0.1:8478\n")
    assert loopback.reads.open_pages
    assert loopback.tls_cert is None


def test_report_csv_cells_cannot_start_a_formula() -> None:
    row = {
        "finding": "leak",
        "rule": '=HYPERLINK("http://x")',
        "country": "IT",
        "resolver": "+cmd",
        "transport": "udp",
        "qtype": "A",
        "domain": "-x.example",
        "first_seen": "@now",
        "last_seen": "\tz",
        "measurements": 1,
        "probes": ["\rp"],
        "answers": ["1.2.3.4"],
        "rcode": "NOERROR",
        "ede": [],
        "wire": None,
    }
    (out,) = list(csv.DictReader(io.StringIO(render_report([row], "csv"), newline="")))
    assert out["rule"].startswith("'=")
    assert out["resolver"] == "'+cmd"
    assert out["domain"] == "'-x.example"
    assert out["first_seen"] == "'@now"
    assert out["last_seen"] == "'\tz"
    assert out["probes"] == "'\rp"
    assert out["answers"] == "1.2.3.4"
    assert out["measurements"] == "1"


def test_sigterm_stops_cleanly_with_the_database_closed(tmp_path: Path) -> None:
    c = Collector(tmp_path)
    assert c.legit_push() < PUSH_BUDGET
    assert c.stop() == 0
    # SQLite removes the write-ahead log when its last connection closes.
    assert not (tmp_path / "c.sqlite3-wal").exists()


def test_tls_init_makes_a_certificate_the_probes_verify(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from collector.cli import cli

    runner = CliRunner()
    args = ["tls-init", str(tmp_path / "tls"), "--name", HOST, "--name", "localhost"]
    assert runner.invoke(cli, args).output == "created\n"
    assert runner.invoke(cli, args).output == "unchanged\n"  # a second deployment run changes nothing
    assert (tmp_path / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    trust = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
    c = Collector(tmp_path, "tls: {cert: tls/cert.pem, key: tls/key.pem}\n", verify=trust)
    try:
        assert c.url.startswith("https://")
        assert c.legit_push() < PUSH_BUDGET
        with pytest.raises(httpx2.ConnectError):  # without the CA, a probe refuses the collector
            httpx2.get(f"{c.url}/healthz", timeout=5)
    finally:
        assert c.stop() == 0


def test_the_structure_scan_reads_strings_as_json_does() -> None:
    """Brackets, escaped quotes and backslashes inside strings are text, not structure."""
    from collector.ingest import Refusal, parse_body
    from collector.schema import MAX_BODY_DEPTH

    tricky = ["[[[[", "\\\\", '\\"[[[[', '\\\\"', '{"a": [', 'x\\\\\\"]]]]']
    doc = {"k": tricky, "deep": json.loads("[" * (MAX_BODY_DEPTH - 2) + "]" * (MAX_BODY_DEPTH - 2))}
    # The tricky strings are JSON-escaped once more by dumps: exactly what a probe sends.
    assert parse_body(json.dumps(doc).encode()) == doc
    too_deep = {"k": tricky, "deep": json.loads("[" * MAX_BODY_DEPTH + "]" * MAX_BODY_DEPTH)}
    with pytest.raises(Refusal, match="nested deeper"):
        parse_body(json.dumps(too_deep).encode())


def _closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `s`, reading whatever it sent; None if still open after `seconds`."""
    t0 = time.monotonic()
    s.settimeout(max(0.05, seconds))
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return None
    return time.monotonic() - t0


def _tls_init(work: Path) -> ssl.SSLContext:
    from click.testing import CliRunner

    from collector.cli import cli

    result = CliRunner().invoke(cli, ["tls-init", str(work / "tls"), "--name", HOST])
    assert result.exit_code == 0, result.output
    return ssl.create_default_context(cafile=str(work / "tls" / "ca.pem"))


def test_a_tls_handshake_must_finish_within_the_header_deadline_and_takes_a_place(tmp_path: Path) -> None:
    """A socket that never sends a ClientHello was held for asyncio's 60 s handshake timeout and
    counted nowhere: now the handshake is under server.header_timeout and the socket counts
    towards server.max_connections from accept."""
    trust = _tls_init(tmp_path)
    c = Collector(
        tmp_path,
        "tls: {cert: tls/cert.pem, key: tls/key.pem}\n",
        verify=trust,
        server={"max_connections": 8, "max_connections_per_ip": 100},
    )
    silent: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        silent = [c.connect() for _ in range(8)]  # TCP only, never a ClientHello
        ninth = c.connect()  # accepted after the eight (the accept queue is in order)
        at_once = _closed_within(ninth, 1.5)
        ninth.close()
        assert at_once is not None, "a ninth socket was given a place past max_connections"
        closed = [_closed_within(s, TIMEOUT + 4 - (time.monotonic() - t0)) for s in silent]
        assert None not in closed, "a socket in its TLS handshake outlived the header deadline"
        took = time.monotonic() - t0
        assert TIMEOUT - 0.5 < took < TIMEOUT + 4, took  # held until the deadline, then cut
        assert c.legit_push() < PUSH_BUDGET  # their places are free again
    finally:
        for s in silent:
            s.close()
        assert c.stop() == 0


def test_one_source_cannot_take_every_connection(tmp_path: Path) -> None:
    """8 half-sent requests from one address filled max_connections: 8 and /healthz got 503;
    now one source holds at most server.max_connections_per_ip and the others are served."""
    c = Collector(
        tmp_path,
        "reads: {open: true}\n",
        server={"max_connections": 8, "max_connections_per_ip": 4, "header_timeout": 30},
    )
    socks: list[socket.socket] = []
    try:
        for _ in range(8):
            s = c.connect()  # from ATTACKER
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow-")
            socks.append(s)
        beyond = [_closed_within(s, 1.5) for s in socks[4:]]
        assert None not in beyond, beyond  # past the source's cap: closed at once
        for s in socks[:4]:  # within it: held (until the header deadline, 30 s here)
            s.settimeout(0.05)
            with pytest.raises(TimeoutError):
                s.recv(1)
        r = httpx2.get(f"{c.url}/healthz", timeout=5)  # from 127.0.0.1: another source
        assert r.status_code == 200, r.text
        assert c.legit_push() < PUSH_BUDGET
    finally:
        for s in socks:
            s.close()
        assert c.stop() == 0


def test_one_token_cannot_push_metrics_past_its_bound_with_the_default_limits(tmp_path: Path) -> None:
    """Issue 11 §3 with the defaults: 2,000 groups × 100 names per token was 200,000 per-name series.
    Per-name lines of one probe are now bounded by limits.max_exported_series_per_probe; the
    true counts stay in blockprobe_domains and the rest is counted as capped."""
    defaults = parse_collector_config("")
    bound = defaults.max_exported_series_per_probe
    per_group = defaults.max_domain_series
    groups = 120  # 12,000 leaking series, each group at (not over) its own cap of 100
    assert groups * per_group > bound
    c = Collector(tmp_path, limits={})  # every limit at its default
    try:
        for b in range(groups // 10):
            ms = [
                measurement(domain=f"n{i}.example", resolver=f"udp://192.0.2.{b * 10 + r}")
                for r in range(10)
                for i in range(per_group)
            ]
            r = c.push("flood", batch("flood", ms))
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20  # the render cache may hold an older scrape for a moment
        while True:
            lines = [ln for ln in c.client.get("/metrics").text.splitlines() if 'probe="flood"' in ln]
            domains = sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("blockprobe_domains{"))
            if domains == groups * per_group or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert domains == groups * per_group  # the true count
        per_name = [
            ln
            for ln in lines
            if ln.split("{", 1)[0]
            in (
                "blockprobe_leak",
                "blockprobe_overblock",
                "blockprobe_finding_since_timestamp_seconds",
                "blockprobe_reach",
                "blockprobe_canary_failing",
            )
        ]
        assert len(per_name) == bound, len(per_name)
        capped = sum(
            float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("blockprobe_domain_series_capped{")
        )
        assert capped == groups * per_group - bound
        # Besides the per-name lines, a few aggregates per group (counts, reach counts, caps,
        # reachability, latency): bounded by the group quota, not by what the probe sends.
        assert len(lines) <= bound + 8 * groups, len(lines)
        assert c.legit_push() < PUSH_BUDGET
    finally:
        assert c.stop() == 0


NOT_TEXT_TOKENS = [
    ("int", "987654321987654321", "987654321987654321"),
    ("hex", "0x7fffffffffffffff1", str(0x7FFFFFFFFFFFFFFF1)),
    ("float", "98765.4321e+3", "98765432.1"),
    ("sexagesimal", "190:20:30", str(190 * 3600 + 20 * 60 + 30)),
    ("list", "[secret-token-in-a-list]", "secret-token-in-a-list"),
]


@pytest.mark.parametrize(("value", "parsed"), [pytest.param(*t[1:], id=t[0]) for t in NOT_TEXT_TOKENS])
def test_check_config_never_prints_a_token_that_is_not_a_yaml_string(
    tmp_path: Path, value: str, parsed: str
) -> None:
    """Issue 11: `probe check-config` echoed a token that YAML read as a number."""
    lists = Path(__file__).parent / "lists" / "lab-orders.yaml"
    config = tmp_path / "probe.yaml"
    config.write_text(
        "probe: {id: it-test-1, region: it-lab, country: IT}\n"
        f'collector: {{url: "http://127.0.0.1:9", token: {value}}}\n'
        'resolvers: ["udp://127.0.0.1:5353"]\ncontrols: ["udp://127.0.0.1:5354"]\n'
        f"lists: [{lists}]\nstate_dir: {tmp_path / 'state'}\nverify: {{mode: 'off'}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "probe.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "collector.token: must be a text" in result.stderr
    for out in (result.stdout, result.stderr):
        assert value not in out
        assert parsed not in out


def test_metrics_can_be_open_while_pages_are_protected_and_healthz_protected(tmp_path: Path) -> None:
    c = Collector(
        tmp_path, "reads: {token_file: read-token, open: false, metrics: open, healthz: protected}\n"
    )
    try:
        r = c.client.get("/metrics")
        assert r.status_code == 200
        assert "blockprobe_collector_batches_total" in r.text
        for path in (
            "/",
            "/healthz",
            "/api/v1/findings",
            "/api/v1/ip-blocks",
            "/evidence?probe=a&resolver=b&transport=udp&qtype=A&domain=c",
        ):
            r = c.client.get(path)
            assert r.status_code == 401, path
            assert "read token" in r.json()["detail"]
            assert c.client.get(path, headers=c.read_auth).status_code == 200, path
        counted = 'blockprobe_collector_rejected_total{reason="read_unauthorized"} 5.0'
        deadline = time.monotonic() + 10  # the scrape is cached for render_cache_seconds
        while counted not in c.client.get("/metrics").text:
            assert time.monotonic() < deadline, "the refused reads were not counted"
            time.sleep(0.2)
        assert c.legit_push() < PUSH_BUDGET
    finally:
        assert c.stop() == 0


class InProcess:
    """The collector app on uvicorn in a thread of this process, for tests that hold a store read
    on an event (so that what is busy is surely busy)."""

    def __init__(self, store: Any) -> None:
        from collector.app import create_app
        from collector.server import CollectorServer, server_config

        port = free_port(HOST)
        config = parse_collector_config(f"listen: {HOST}:{port}\n")
        self.app = create_app(config, store)
        self.server = CollectorServer(server_config(self.app, config, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "collector did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _held(real: Callable[..., Any], entered: threading.Semaphore, release: threading.Event) -> Any:
    def held(*args: Any, **kwargs: Any) -> Any:
        entered.release()
        release.wait(20)
        return real(*args, **kwargs)

    return held


def test_on_demand_reads_past_their_slots_get_503_with_retry_after(tmp_path: Path) -> None:
    """/evidence, /api/v1/ip-blocks and paged reads share two slots: a third reader is told to
    come back rather than take another of the worker threads the ingest needs. The store's
    evidence read is held on an event (in process) so that the two slots are surely taken."""
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    entered = threading.Semaphore(0)
    release = threading.Event()
    store.evidence = _held(store.evidence, entered, release)  # type: ignore[method-assign]
    c = InProcess(store)
    evidence = "/evidence?probe=a&resolver=b&transport=udp&qtype=A&domain=c"
    statuses: list[int] = []
    try:

        def slow_reader() -> None:
            statuses.append(httpx2.get(c.url + evidence, timeout=30).status_code)

        readers = [threading.Thread(target=slow_reader) for _ in range(2)]
        for t in readers:
            t.start()
        for _ in range(2):
            assert entered.acquire(timeout=10), "the two slow reads did not start"
        with httpx2.Client(base_url=c.url, timeout=5) as client:
            for path in (evidence, "/api/v1/ip-blocks", "/api/v1/findings"):
                r = client.get(path)
                assert r.status_code == 503, (path, r.status_code)
                assert r.headers["retry-after"] == "1", path
            assert client.get("/healthz").status_code == 200  # not a read of that kind
            release.set()
            for t in readers:
                t.join(20)
            assert statuses == [200, 200]
            assert client.get("/api/v1/ip-blocks").status_code == 200
            assert (
                'blockprobe_collector_rejected_total{reason="read_busy"} 3.0' in client.get("/metrics").text
            )
    finally:
        release.set()
        c.stop()
        store.close()


def test_health_checks_share_one_store_read_however_many_arrive(tmp_path: Path) -> None:
    """/healthz is open by default: eight at once take one worker thread between them, not eight."""
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    entered = threading.Semaphore(0)
    release = threading.Event()
    store.probes = _held(store.probes, entered, release)  # type: ignore[method-assign]
    c = InProcess(store)
    statuses: list[int] = []
    try:
        checks = [
            threading.Thread(
                target=lambda: statuses.append(httpx2.get(c.url + "/healthz", timeout=30).status_code)
            )
            for _ in range(8)
        ]
        for t in checks:
            t.start()
        deadline = time.monotonic() + 10
        while c.app.state.health_check.waiters < 8:
            assert time.monotonic() < deadline, c.app.state.health_check.waiters
            time.sleep(0.02)
        assert entered.acquire(timeout=1)
        assert not entered.acquire(timeout=0.2)  # one store read for the eight
        release.set()
        for t in checks:
            t.join(20)
        assert statuses == [200] * 8
    finally:
        release.set()
        c.stop()
        store.close()


def test_the_monitoring_roles_scrape_job_reaches_the_default_tls_protected_collector(tmp_path: Path) -> None:
    """ansible/roles/monitoring's scrape jobs, rendered as the role renders them, given to a real
    Prometheus: it scrapes a collector that serves TLS from its own CA with /metrics protected."""
    import shutil

    import jinja2
    import yaml

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (scripts/system-deps installs it)")
    role = Path(__file__).parent.parent / "ansible" / "roles" / "monitoring"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    trust = _tls_init(tmp_path)
    c = Collector(
        tmp_path,
        "tls: {cert: tls/cert.pem, key: tls/key.pem}\nreads: {token_file: read-token, open: false}\n",
        verify=trust,
    )
    sd = tmp_path / "file_sd"
    sd.mkdir()
    # What the role writes: the targets file, and the CA and token as copied from the controller.
    (sd / "blockprobe-collector.yml").write_text(
        yaml.safe_dump([{"targets": [f"{HOST}:{c.port}"], "labels": {"job": "blockprobe-collector"}}])
    )
    (sd / "blockprobe-probes.yml").write_text("[]\n")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["to_json"] = json.dumps
    scrape = env.from_string((role / "templates" / "blockprobe-scrape.yml.j2").read_text()).render(
        ansible_managed="test",
        monitoring_collector_scheme=defaults["monitoring_collector_scheme"],  # the role's default
        monitoring_collector_ca_local="ca.pem on the controller",
        monitoring_collector_read_token_local="read-token on the controller",
        monitoring_collector_ca_file=str(tmp_path / "tls" / "ca.pem"),
        monitoring_collector_read_token_file=str(tmp_path / "read-token"),
        monitoring_prometheus_file_sd_dir=str(sd),
    )
    jobs = yaml.safe_load(scrape)["scrape_configs"]
    for job in jobs:
        job["scrape_interval"] = "1s"
    (tmp_path / "prom.yml").write_text(yaml.safe_dump({"scrape_configs": jobs}))
    port = free_port(HOST)
    log = (tmp_path / "prom.log").open("wb")
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prom.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={HOST}:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 45
        up: list[Any] = []
        while time.monotonic() < deadline:
            assert prom.poll() is None, (tmp_path / "prom.log").read_text()[-3000:]
            try:
                r = httpx2.get(
                    f"http://{HOST}:{port}/api/v1/query", params={"query": 'up{job="blockprobe-collector"}'}
                )
                up = r.json()["data"]["result"]
            except (httpx2.HTTPError, ValueError, KeyError):
                up = []
            if up and up[0]["value"][1] == "1":
                break
            time.sleep(0.5)
        assert up, (tmp_path / "prom.log").read_text()[-3000:]
        assert up[0]["value"][1] == "1", (up, (tmp_path / "prom.log").read_text()[-3000:])
        assert up[0]["metric"]["instance"] == f"{HOST}:{c.port}"
    finally:
        prom.terminate()
        prom.wait(20)
        log.close()
        assert c.stop() == 0
