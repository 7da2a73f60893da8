"""A minimal local collector for the daemon tests: acknowledges, refuses or hangs on command.

It stores a batch id once (as the real collector must), and keeps every request it saw,
so tests can check that each result arrived exactly once. With `strict` it refuses what
the real collector refuses (the bounds of probe/limits.py: 422 naming the first bad
measurement, 500 for JSON nested deeper than the collector's parser takes); `refuse` is a
per-measurement predicate for refusals scripted by a test (say, results too old).

`HostileResolver` is the other side: a DNS server over TCP that sends whatever its script
says, up to 65,535 bytes (hundreds of answers, EDE texts of kilobytes, JSON nested
hundreds deep), where the lab politely fits its answers to the query's EDNS buffer.
"""

from __future__ import annotations

import gzip
import json
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dns.edns
import dns.message
import dns.rdatatype
import dns.rrset

from probe import limits
from probe.lab import Behaviour

__all__ = ["FakeCollector", "HostileResolver", "wait_for"]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a condition until it holds, failing after a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class FakeCollector:
    def __init__(self, token: str = "s3cret-token", host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.mode = "ack"  # ack | 500 | 503 | 401 | 413 | 429 | hang
        self.max_batch = 10**9  # with mode 413: refuse batches larger than this
        self.failures_left = 10**9  # how many requests get `mode` before it turns to ack
        self.retry_after: str | None = None  # sent with 429 and 503
        self.strict = False  # refuse what the real collector refuses
        # refuse(measurement) -> a reason or None; `_m`: the callback's signature is imposed.
        self.refuse: Callable[[dict[str, Any]], str | None] = lambda _m: None
        self.times: list[float] = []  # monotonic time of each request
        self.batches: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, int, int]] = []  # (batch_id, results, status)
        self.in_flight = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    doc = json.loads(body)
                except RecursionError:  # the real collector's 500 on JSON nested too deep
                    doc = None
                status, reply_doc = outer._status(self.headers.get("authorization", ""), doc)
                if status == 0:  # hang: hold the request open, answer nothing
                    outer.in_flight.set()
                    outer.release.wait(60)
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("content-type", "application/json")
                if status in (429, 503) and outer.retry_after is not None:
                    self.send_header("retry-after", outer.retry_after)
                reply = json.dumps(reply_doc).encode()
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _refusal(self, results: list[dict[str, Any]]) -> tuple[int, str] | None:
        for i, m in enumerate(results):
            why = self.refuse(m)
            if why is None and self.strict:
                why = _out_of_bounds(m)
            if why is not None:
                return (500, "Internal Server Error") if why == "depth" else (422, f"measurements[{i}].{why}")
        return None

    def _status(self, auth: str, doc: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if doc is None:
            with self._lock:
                self.requests.append(("?", 0, 500))
                self.times.append(time.monotonic())
            return 500, {"detail": "Internal Server Error"}
        batch_id, results = doc["batch_id"], doc["measurements"]
        with self._lock:
            status = 200
            reply: dict[str, Any] = {}
            if auth != f"Bearer {self.token}":
                status = 401
            elif self.failures_left > 0 and self.mode != "ack":
                if self.mode == "413" and len(results) <= self.max_batch:
                    status = 200
                else:
                    self.failures_left -= 1
                    status = {"500": 500, "503": 503, "401": 401, "413": 413, "429": 429, "hang": 0}[
                        self.mode
                    ]
            if status == 200:
                refusal = self._refusal(results)
                if refusal is not None:
                    status, reply = refusal[0], {"detail": refusal[1]}
            if status == 200:
                duplicate = batch_id in self.batches
                if not duplicate:
                    self.batches[batch_id] = results  # a batch id is stored once
                reply = {
                    "batch_id": batch_id,
                    "stored": 0 if duplicate else len(results),
                    "duplicate": duplicate,
                }
            self.requests.append((batch_id, len(results), status))
            self.times.append(time.monotonic())
            return status, reply or {"detail": f"status {status}"}

    def results(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m for ms in self.batches.values() for m in ms]

    def keys(self) -> list[tuple[str, str, str, str, str]]:
        return [
            (m["endpoint"], m["domain"], m["qtype"], m["time"], str(m.get("evidence", {}).get("canary")))
            for m in self.results()
        ]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _out_of_bounds(m: dict[str, Any]) -> str | None:
    """What the real collector refuses in one measurement (the bounds of probe/limits.py)."""
    # The body adds two levels (the body, its measurements list) above the measurement.
    if _depth(m) + 2 > limits.MAX_JSON_DEPTH:
        return "depth"
    if len(m.get("answers", [])) > limits.MAX_ANSWERS:
        return f"answers: more than {limits.MAX_ANSWERS} items"
    if any(len(a) > limits.MAX_ANSWER_CHARS for a in m.get("answers", [])):
        return "answers: an answer is too long"
    if len(m.get("ede", [])) > limits.MAX_EDE:
        return f"ede: more than {limits.MAX_EDE} items"
    if any(len(e.get("text", "")) > limits.MAX_EDE_TEXT for e in m.get("ede", [])):
        return "ede: a text is too long"
    if len(m.get("cname", [])) > limits.MAX_CNAME:
        return "cname: too long"
    if m.get("error") and len(m["error"]) > limits.MAX_ERROR_CHARS:
        return "error: too long"
    return None


class HostileResolver(socketserver.ThreadingTCPServer):
    """A resolver over TCP that answers the HOSTILE names as they are, up to 65,535 bytes.

    The lab sizes its answers to the query's EDNS buffer even over TCP, as a polite
    server does; a hostile one sends whatever it likes, so this one is written for it.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, names: dict[str, Behaviour], host: str = "127.0.0.1") -> None:
        self.names = names
        super().__init__((host, 0), _HostileHandler)
        self.spec = f"tcp://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _HostileHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn = self.request
        assert isinstance(self.server, HostileResolver)
        while True:
            head = conn.recv(2)
            if len(head) < 2:
                return
            size = int.from_bytes(head, "big")
            wire = b""
            while len(wire) < size:
                chunk = conn.recv(size - len(wire))
                if not chunk:
                    return
                wire += chunk
            query = dns.message.from_wire(wire)
            name = query.question[0].name.to_text(omit_final_dot=True)
            b = self.server.names.get(name, Behaviour(records={"A": ("93.184.216.34",)}))
            resp = dns.message.make_response(query)
            if query.question[0].rdtype == dns.rdatatype.A:
                resp.answer.append(dns.rrset.from_text_list(name + ".", 300, "IN", "A", list(b.records["A"])))
            options: list[dns.edns.Option] = [
                dns.edns.EDEOption(dns.edns.EDECode(c), t or None) for c, t in b.ede
            ]
            resp.use_edns(0, payload=1232, options=options)
            out = resp.to_wire(max_size=65535)
            conn.sendall(len(out).to_bytes(2, "big") + out)
