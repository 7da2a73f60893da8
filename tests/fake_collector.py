"""A minimal local collector for the daemon tests: acknowledges, refuses or hangs on command.

It stores a batch id once (as the real collector must), and keeps every request it saw,
so tests can check that each result arrived exactly once.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeCollector", "wait_for"]


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
        self.mode = "ack"  # ack | 500 | 401 | 413 | hang
        self.max_batch = 10**9  # with mode 413: refuse batches larger than this
        self.failures_left = 10**9  # how many requests get `mode` before it turns to ack
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
                doc = json.loads(body)
                status = outer._status(self.headers.get("authorization", ""), doc)
                if status == 0:  # hang: hold the request open, answer nothing
                    outer.in_flight.set()
                    outer.release.wait(60)
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("content-type", "application/json")
                reply = json.dumps({"status": status}).encode()
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _status(self, auth: str, doc: dict[str, Any]) -> int:
        batch_id, results = doc["batch_id"], doc["measurements"]
        with self._lock:
            status = 200
            if auth != f"Bearer {self.token}":
                status = 401
            elif self.failures_left > 0 and self.mode != "ack":
                if self.mode == "413" and len(results) <= self.max_batch:
                    status = 200
                else:
                    self.failures_left -= 1
                    status = {"500": 500, "401": 401, "413": 413, "hang": 0}[self.mode]
            if status == 200 and batch_id not in self.batches:
                self.batches[batch_id] = results  # a batch id is stored once
            self.requests.append((batch_id, len(results), status))
            return status

    def results(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m for ms in self.batches.values() for m in ms]

    def keys(self) -> list[tuple[str, str, str, str, str]]:
        return [(m["endpoint"], m["domain"], m["qtype"], m["time"], str(m.get("evidence", {}).get("canary")))
                for m in self.results()]  # fmt: skip

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
