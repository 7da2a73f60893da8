"""Pushing spooled batches to the collector (CONTRACTS.md section 6), never losing one.

Each batch is POSTed to /api/v1/results, gzip-compressed, with the probe's bearer
token and the batch id (also as Idempotency-Key). 2xx acknowledges it and only then
does it leave the spool. 413 splits it into smaller batches; anything else — 401,
403, 422, 429, 5xx, a refused connection, a hang — keeps it and retries later, with
exponential backoff and jitter counted per batch (so it resumes after a restart).
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2

from probe import __version__
from probe.daemon.config import Config
from probe.daemon.spool import Spool

__all__ = ["PushOutcome", "Pusher", "backoff"]

log = logging.getLogger(__name__)


def backoff(attempts: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff: uniform in [delay/2, delay], delay = min(cap, base·2^attempts)."""
    delay = min(cap, base * (2.0 ** min(attempts, 30)))
    return float(delay / 2 + rng() * delay / 2)


@dataclass
class PushOutcome:
    sent_batches: int = 0
    sent_results: int = 0
    failure: str | None = None


class Pusher:
    """Owns the HTTP client to the collector; call `push()` from the daemon's loop."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        *,
        base_delay: float = 2.0,
        max_delay: float = 300.0,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        assert config.collector is not None
        self.config = config
        self.collector = config.collector
        self.spool = spool
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.batch_size = self.collector.batch_size
        self.on_failure = on_failure or (lambda reason: None)
        verify: Any = True
        if self.collector.ca_file:
            verify = ssl.create_default_context(cafile=self.collector.ca_file)
        self.client = httpx2.AsyncClient(
            verify=verify,
            timeout=httpx2.Timeout(self.collector.timeout),
            headers={
                "Authorization": f"Bearer {self.collector.token}",
                "User-Agent": f"blockprobe/{__version__}",
            },
        )
        self.url = f"{self.collector.url}/api/v1/results"

    async def aclose(self) -> None:
        await self.client.aclose()

    def _body(self, batch_id: str, measurements: list[dict[str, Any]]) -> bytes:
        doc = {
            "probe": {"id": self.config.probe_id, "region": self.config.region, "country": self.config.country,
                      "version": __version__},
            "batch_id": batch_id,
            "sent_at": time.time(),
            "measurements": measurements,
        }  # fmt: skip
        return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=5)

    async def push(self, max_batches: int = 100) -> PushOutcome:
        """Send what is due, oldest first, until the spool is empty, a send fails, or max_batches."""
        out = PushOutcome()
        for _ in range(max_batches):
            batch = self.spool.next_batch(self.batch_size)
            if batch is None:
                break
            reason = await self._send(batch.batch_id, batch.measurements)
            if reason is None:
                self.spool.ack(batch.batch_id)
                out.sent_batches += 1
                out.sent_results += len(batch.measurements)
                continue
            out.failure = reason
            self.on_failure(reason.split(":")[0])
            if reason.startswith("http 413") and len(batch.measurements) > 1:
                self.batch_size = max(1, len(batch.measurements) // 2)
                self.spool.split(batch.batch_id)
                log.warning("collector refused batch %s as too large (%d results): resending in batches of %d",
                            batch.batch_id, len(batch.measurements), self.batch_size)  # fmt: skip
                continue
            delay = backoff(batch.attempts, self.base_delay, self.max_delay)
            self.spool.retry_later(batch.batch_id, delay, reason)
            log.warning("push of batch %s failed (%s); attempt %d, retrying in %.1fs",
                        batch.batch_id, reason, batch.attempts + 1, delay)  # fmt: skip
            break
        return out

    async def fetch_lists(self, etag: str | None) -> tuple[str | None, list[tuple[str, str]] | None]:
        """The collector's lists files: (etag, [(name, text)]), or (etag, None) when unchanged."""
        headers = {"If-None-Match": etag} if etag else {}
        resp = await self.client.get(f"{self.collector.url}/api/v1/lists", headers=headers)
        if resp.status_code == 304:
            return etag, None
        resp.raise_for_status()
        files = [(str(f["name"]), str(f["content"])) for f in resp.json()["files"]]
        return resp.headers.get("etag"), files

    async def _send(self, batch_id: str, measurements: list[dict[str, Any]]) -> str | None:
        """None when acknowledged; else a short reason (`http 500`, `timeout`, `connect: …`)."""
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Idempotency-Key": batch_id,
        }
        try:
            resp = await self.client.post(
                self.url, content=self._body(batch_id, measurements), headers=headers
            )
        except httpx2.TimeoutException:
            return "timeout: the collector did not answer in time"
        except httpx2.HTTPError as exc:
            return f"connect: {type(exc).__name__}: {exc}"[:300]
        if 200 <= resp.status_code < 300:
            return None
        detail = resp.text[:200].replace("\n", " ")
        return f"http {resp.status_code}: {detail}"
