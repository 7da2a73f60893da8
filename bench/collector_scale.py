"""The collector at scale: a mass leak of one order on one resolver, from a fleet of probes.

    python -m bench.collector_scale                                  # 20 probes × 45,000 names (8.1 M)
    python -m bench.collector_scale --names 2000 --probes 4          # a quick check (72,000)
    python -m bench.collector_scale --names 100 --probes 2 --prometheus-for 5s --scrape-interval 5 --tries 1  # a minute
    python -m bench.collector_scale --stores sqlite,postgresql --prometheus-for 1m

Issue 12, benchmark (b). Each probe reports every name of one order (`--names`, all
ordered blocked in IT) leaking on one public resolver over udp, dot and doh, for A, AAAA
and HTTPS: probes × names × 9 measurements. The bodies are the probe's own: a real
`Engine` measures one template name on an in-process lab resolver (every name resolves,
so every ordered name leaks) with a truthful lab control, judged against an order
index built from the lists file (`probe.expect.OrderIndex`, as the daemon does); each
name's measurement is that template with its own name (and wire, the qname patched in
place), its own `expected_by`, serialised as the daemon spools it (`clamp`, `encode`)
and batched as its pusher sends it (`Pusher._body`, gzip 5, the default
`collector.batch_size` of 500). Batches are written to disk first, so that what is timed
is the collector, not the bench building JSON.

Then, per store: a real `collector serve` process; one sender per probe, each sending
its batches one at a time as a probe's pusher does (all probes at once, interleaved as a
fleet would be), 429 honoured. Reported: results/s over HTTP against the store's own
rate in this process on an empty store (the same batches, no HTTP: the reference), the
rate in the first and last tenth of the ingest, the collector's peak RSS, the database
size; `/metrics` (gzip and plain size, time cold and warm-up-free: each request after
the render cache has expired) and `/` (time); then a real Prometheus scrapes it with the
project's rules (`for:` shortened, see below) and the firing alerts are counted per
alert name. With `--profile`, the findings render is also profiled in this process
against the same database.

Every `for:` of the rules is replaced by `--prometheus-for` (default 1m) with
`dashboards.build.prometheus_rules(for_override=...)`, the same as the end-to-end test:
an alert's expression is evaluated exactly as in production, only the time it must hold
before it fires is shorter. Alerts still pending when the wait ends are reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import gzip
import io
import json
import pstats
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx2
import yaml

from collector.auth import hash_token, new_token
from collector.metrics import render_findings
from collector.store import open_store
from dashboards.build import prometheus_rules
from probe.daemon.push import Pusher
from probe.daemon.spool import encode
from probe.engine import Engine, Plan
from probe.expect import OrderIndex
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.limits import clamp
from probe.lists import parse_lists
from probe.model import Measurement
from probe.specs import Resolver
from probe.transports import Options
from tests.real import free_port
from tests.test_monitoring_e2e import _query, _start

HOST = "127.0.0.1"
ORDER = "agcom-scale-2026-1"
COUNTRY = "IT"
RESOLVER = "leakydns"
TRANSPORTS = ("udp", "dot", "doh")
QTYPES = ("A", "AAAA", "HTTPS")
BATCH = 500  # probe/daemon/config.py: the default collector.batch_size
SUFFIX = "pirate-shield.example"
# Each name has the template's label lengths, so its wire is the template's with the qname patched.
NAME_WIDTH = 6


def name_of(i: int) -> str:
    return f"s{i:0{NAME_WIDTH}d}.{SUFFIX}"


def _qname(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def lists_text(names: int) -> str:
    """One order binding in IT on public resolvers, every name listed (Piracy Shield lists FQDNs)."""
    doc = {
        "orders": [
            {
                "id": ORDER,
                "authority": "AGCOM",
                "jurisdictions": [COUNTRY],
                "applies_to": ["isp", "public"],
                "effective": "2026-01-01",
                "domains": [name_of(i) for i in range(names)],
            }
        ]
    }
    return yaml.safe_dump(doc)


def templates(work: Path) -> dict[tuple[str, str], Measurement]:
    """Real leak measurements of one name by the probe's engine: (qtype, transport) → measurement."""
    (work / "ca").mkdir(exist_ok=True)
    ca = LabCA(hosts=(HOST, "127.0.0.2", "localhost"), directory=work / "ca")
    leaky, truth = Zone(nsid="leaky"), Zone(nsid="control")
    records = Behaviour(
        records={
            "A": ("93.184.216.34",),
            "AAAA": ("2606:2800:220:1::248",),
            "HTTPS": ('1 . alpn="h2" ipv4hint=93.184.216.34',),
        }
    )
    leaky.set(f"*.{SUFFIX}", records)
    truth.set(f"*.{SUFFIX}", records)
    index = OrderIndex(parse_lists(lists_text(1), "bench"))
    with LabThread() as thread:
        server = thread.start(LabServer(leaky, HOST, ca, transports=("udp", "dot", "doh")))
        control = thread.start(LabServer(truth, "127.0.0.2", ca, transports=("udp",)))
        specs = server.specs()
        from probe.catalogue import resolve_spec

        endpoints = tuple(e for t in TRANSPORTS for e in resolve_spec(specs[t]).endpoints)
        resolver = Resolver(RESOLVER, "public", RESOLVER, endpoints)
        plan = Plan(
            [name_of(0)],
            QTYPES,
            [resolver],
            [resolve_spec(control.specs()["udp"])],
            lambda domain, r: index.expect(COUNTRY, r.kind, r.operator, domain, dt.datetime.now(dt.UTC)),
        )

        async def go() -> list[Measurement]:
            options = Options(timeout=2.0, ca_file=str(ca.ca_file), udp_linger=0.0)
            async with Engine(options, concurrency=16) as engine:
                return await engine.collect(plan)

        ms = asyncio.run(go())
    out = {(m.qtype, str(m.transport)): m for m in ms}
    bad = [m for m in ms if m.finding != "leak"]
    if len(out) != len(QTYPES) * len(TRANSPORTS) or bad:
        raise SystemExit(f"the lab did not give 9 leaks: {[(m.qtype, m.transport, m.finding) for m in ms]}")
    return out


def probe_id(p: int) -> str:
    return f"it-scale-{p:02d}"


def _generate(args: tuple[int, int, dict[tuple[str, str], Measurement], Path]) -> tuple[int, int, int]:
    """One probe's batches as its pusher sends them, to a file: (batch id, gzipped body) records."""
    p, names, tmpl, path = args
    index = OrderIndex(parse_lists(lists_text(names), "bench"))
    pid = probe_id(p)
    extra = {"probe": pid, "region": f"it-region-{p % 5}", "country": COUNTRY}
    config = SimpleNamespace(probe_id=pid, region=extra["region"], country=COUNTRY)
    pusher = cast(Any, SimpleNamespace(config=config))
    old = _qname(name_of(0))
    buffer: list[str] = []
    batches = raw = 0
    t0 = time.monotonic()
    with path.open("wb") as out:

        def flush() -> None:
            nonlocal batches, raw
            batch_id = str(uuid.uuid4())
            body = Pusher._body(pusher, batch_id, buffer)
            out.write(batch_id.encode() + struct.pack(">I", len(body)) + body)
            batches += 1
            raw += sum(len(b) for b in buffer)
            buffer.clear()

        for i in range(names):
            name = name_of(i)
            new = _qname(name)
            now = dt.datetime.now(dt.UTC)
            when = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            for qtype in QTYPES:
                for transport in TRANSPORTS:
                    m = tmpl[(qtype, transport)]
                    _exp, why = index.expect(COUNTRY, "public", RESOLVER, name, now)
                    m = m.replace(
                        domain=name,
                        time=when,
                        wire=None if m.wire is None else m.wire.replace(old, new),
                        evidence={**m.evidence, "expected_by": why},
                    )
                    buffer.append(encode(clamp({**m.to_json(), **extra}))[1])
                    if len(buffer) == BATCH:
                        flush()
        if buffer:
            flush()
    print(f"  probe {pid}: {batches} batches in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return batches, raw, path.stat().st_size


def read_batches(path: Path) -> Iterator[tuple[str, bytes]]:
    with path.open("rb") as f:
        while head := f.read(40):
            (n,) = struct.unpack(">I", head[36:])
            yield head[:36].decode(), f.read(n)


def _rss_mib(pid: int, key: str = "VmHWM") -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def direct_rate(files: list[Path], work: Path, batches: int = 40) -> float:
    """The reference: the first batches of each probe straight into a fresh SQLite store, no HTTP."""
    docs = []
    for i in range(batches):
        path = files[i % len(files)]
        for j, (_bid, body) in enumerate(read_batches(path)):
            if j == i // len(files):
                docs.append(json.loads(gzip.decompress(body)))
                break
    store = open_store(f"sqlite:///{work / 'direct.sqlite3'}")
    t0 = time.perf_counter()
    n = 0
    for doc in docs:
        store.ingest(doc["probe"], doc["batch_id"], doc["measurements"], time.time())
        n += len(doc["measurements"])
    elapsed = time.perf_counter() - t0
    store.close()
    return n / elapsed


async def send_all(url: str, tokens: dict[str, str], files: dict[str, Path]) -> dict[str, Any]:
    """One sender per probe, each one batch at a time (as a probe's pusher); all probes at once."""
    done: list[tuple[float, int]] = []  # (time, results) per acknowledged batch
    throttled = Counter[str]()
    t0 = time.perf_counter()

    async def sender(client: httpx2.AsyncClient, pid: str) -> None:
        for batch_id, body in read_batches(files[pid]):
            while True:
                r = await client.post(
                    f"{url}/api/v1/results",
                    content=body,
                    headers={
                        "Authorization": f"Bearer {tokens[pid]}",
                        "Content-Type": "application/json",
                        "Content-Encoding": "gzip",
                        "Idempotency-Key": batch_id,
                    },
                )
                if r.status_code in (429, 503):
                    throttled[str(r.status_code)] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after") or 1))
                    continue
                if r.status_code != 200:
                    raise SystemExit(f"{pid}: batch {batch_id} refused: {r.status_code} {r.text[:300]}")
                done.append((time.perf_counter() - t0, int(r.json()["stored"])))
                break

    per_minute: list[float] = []

    async def progress() -> None:
        last = 0
        while True:
            await asyncio.sleep(60)
            total = sum(n for _t, n in done)
            per_minute.append((total - last) / 60)
            print(
                f"  {time.perf_counter() - t0:5.0f} s: {total:,} stored, {(total - last) / 60:,.0f}/s in the last minute",
                file=sys.stderr,
                flush=True,
            )
            last = total

    async with httpx2.AsyncClient(timeout=600, limits=httpx2.Limits(max_connections=len(files))) as client:
        ticker = asyncio.create_task(progress())
        await asyncio.gather(*(sender(client, pid) for pid in files))
        ticker.cancel()
    elapsed = time.perf_counter() - t0
    total = sum(n for _t, n in done)

    return {
        "results": total,
        "seconds": elapsed,
        "rate": total / elapsed,
        "throttled": dict(throttled),
        "per_minute": [round(r) for r in per_minute],
    }


def time_get(url: str, path: str, ttl: float, tries: int) -> dict[str, Any]:
    """GET `path` `tries` times, each after the render cache expired (a fresh render every time)."""
    times, size_gz, size = [], 0, 0
    for _ in range(tries):
        time.sleep(3 * ttl + 0.5)  # past three cache lifetimes: no stale copy served, a render awaited
        t0 = time.perf_counter()
        r = httpx2.get(url + path, timeout=600, headers={"Accept-Encoding": "gzip"})
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
        size_gz = int(r.headers.get("content-length") or 0)
        size = len(r.content)
    families = Counter[str]()
    if path == "/metrics":
        for line in r.text.splitlines(keepends=True):
            families[
                re.split(r"[{ ]", line.removeprefix("# HELP ").removeprefix("# TYPE "), maxsplit=1)[0]
            ] += len(line.encode())
    return {
        "first_s": times[0],
        "median_s": statistics.median(times),
        "bytes": size,
        "gzip_bytes": size_gz,
        "families": dict(families.most_common(6)),
    }


def db_size(database: str, work: Path) -> int:
    if database.startswith("postgresql"):
        import psycopg

        with psycopg.connect(database) as conn:
            return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]
    return sum(p.stat().st_size for p in (work / "state").glob("*") if p.is_file()) + sum(
        p.stat().st_size for p in work.glob("c.sqlite3*")
    )


def prometheus(url_port: int, work: Path, for_override: str, interval: int, wait_s: float) -> dict[str, Any]:
    """A real Prometheus scraping the collector with the project's rules; alerts per name and state."""
    port = free_port(HOST)
    (work / "rules.yml").write_text(yaml.safe_dump(prometheus_rules(for_override=for_override)))
    (work / "prom.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": f"{interval}s", "evaluation_interval": "5s"},
                "rule_files": [str(work / "rules.yml")],
                "scrape_configs": [
                    {
                        "job_name": "collector",
                        "scrape_timeout": f"{interval}s",
                        "static_configs": [{"targets": [f"{HOST}:{url_port}"]}],
                    }
                ],
            }
        )
    )
    proc = _start(
        [
            "prometheus",
            f"--config.file={work / 'prom.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address={HOST}:{port}",
        ],
        work / "prom.log",
    )
    prom = f"http://{HOST}:{port}"
    try:
        # The first scrape comes at some offset within the interval and takes as long as a render.
        deadline = time.monotonic() + 5 * interval + 60
        while True:
            try:
                if _query(prom, 'up{job="collector"}'):
                    break
            except (httpx2.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("prometheus never scraped: " + (work / "prom.log").read_text()[-2000:])
            time.sleep(1)
        # Then until the alerts have had time to fire: `for`, two more scrapes, a few evaluations.
        time.sleep(wait_s)
        alerts = Counter[tuple[str, str]]()
        for a in _query(prom, "ALERTS"):
            alerts[(a["metric"]["alertname"], a["metric"]["alertstate"])] += 1
        up = _query(prom, 'up{job="collector"}')
        scrape = _query(prom, 'scrape_duration_seconds{job="collector"}')
        samples = _query(prom, 'scrape_samples_scraped{job="collector"}')
        leak_series = _query(prom, "count(blockprobe_leak)")
        firing = _query(prom, 'ALERTS{alertstate="firing",alertname=~"BlockprobeLeak.*"}')
        return {
            "alerts": {f"{name} {state}": n for (name, state), n in sorted(alerts.items())},
            "up": [float(r["value"][1]) for r in up],
            "scrape_s": [float(r["value"][1]) for r in scrape],
            "samples": [float(r["value"][1]) for r in samples],
            "leak_series": float(leak_series[0]["value"][1]) if leak_series else 0.0,
            "leak_alert_labels": sorted(
                tuple(sorted((k, v) for k, v in a["metric"].items() if k not in ("__name__",)))
                for a in firing
            ),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def sql_timings(database: str, stale_after: float) -> dict[str, float]:
    """The store's reads behind a scrape, the status page and the findings API, each alone (best
    of 3: the first may read from disk): what the database costs per render."""
    store = open_store(database)
    since = time.time() - stale_after
    out: dict[str, float] = {}

    def timed(name: str, call: Any) -> Any:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            value = call()
            runs.append(time.perf_counter() - t0)
        out[f"{name}_s"] = min(runs)
        return value

    try:
        counts = timed("counts", lambda: store.counts_and_reach(since)[0])
        out["counts_rows"] = sum(c[7] for c in counts)
        with store.tx() as cur:
            out["quota_rows"] = timed("quota", lambda: store._series_count(cur, probe_id(0), since))
        groups = [c[:7] for c in counts if c[6] in ("leak", "overblock") and c[5] != "canary"]
        out["capped_rows"] = len(timed("capped", lambda: store.capped_problems(since, groups, 100)))
        names = timed("page_names", lambda: store.problem_names(since, "leak", None, 51))
        out["page_rows"] = len(timed("page_rows", lambda: store.problems_of(since, "leak", names[:50])))
        out["names_counted"] = timed("count_names", lambda: store.count_names(since, "leak", 1001))
        first = store.problem_series(since, "leak", None, 1)[0]
        middle = [first["country"], name_of(len(names) // 2 or 1), "A", first["resolver"], "udp", probe_id(0)]
        out["api_rows"] = len(timed("api_page", lambda: store.problem_series(since, "leak", middle, 1000)))
        timed("resolvers", store.resolvers)
    finally:
        store.close()
    return out


def profile_render(database: str, stale_after: float) -> dict[str, Any]:
    """Where a findings render and a status page render spend their time, in this process
    against the same database."""
    from collector.pages import Pages

    store = open_store(database)
    try:
        out: dict[str, Any] = {}
        calls: tuple[tuple[str, Callable[[], str]], ...] = (
            ("render", lambda: render_findings(store, stale_after)),
            ("status", lambda: Pages(store, stale_after).status()),
        )
        for name, call in calls:
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            call()
            prof.disable()
            out[f"{name}_s"] = time.perf_counter() - t0
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(14)
            out[f"{name}_profile"] = text.getvalue()
        return out
    finally:
        store.close()


class Watchdog:
    """Five sessions share this machine: a collector that would take all its memory is killed
    (and that is reported) before the kernel picks a victim among the others."""

    def __init__(self, proc: subprocess.Popen[bytes], limit_gib: float) -> None:
        self.proc = proc
        self.limit_mib = limit_gib * 1024
        self.killed_at: float | None = None
        self.stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            try:
                rss = _rss_mib(self.proc.pid, "VmRSS")
            except (OSError, AttributeError):
                return
            if rss > self.limit_mib:
                self.killed_at = rss
                self.proc.kill()
                return


def start_collector(
    database: str, work: Path, probes: list[str], ttl: float
) -> tuple[subprocess.Popen[bytes], int, dict[str, str]]:
    """`collector serve` as a real process, with a token per probe; returns once it answers."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port(HOST)
    # stale_after: the ingest of the full load takes tens of minutes and nothing it stored may go
    # stale before the scrape; a day also covers the slices scheduler's full_pass (6 h).
    (work / "collector.yaml").write_text(
        f"listen: {HOST}:{port}\nstate_dir: {work / 'state'}\ndatabase: {database}\nstale_after: 86400\n"
        f"limits: {{render_cache_seconds: {ttl}}}\n"
    )
    store = open_store(database)
    tokens = {}
    for pid in probes:
        tokens[pid] = new_token()
        store.set_token(pid, hash_token(tokens[pid]))
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "serve", "--config", str(work / "collector.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=(work / "collector.log").open("wb"),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx2.get(f"http://{HOST}:{port}/healthz", timeout=2).raise_for_status()
            return proc, port, tokens
        except httpx2.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                log = (work / "collector.log").read_text()[-2000:]
                raise SystemExit(f"collector did not start: {log}") from None
            time.sleep(0.3)


def _say(what: str, value: Any) -> None:
    print(f"  {what}: {value}", file=sys.stderr, flush=True)


def prefill(database: str, files: dict[str, Path]) -> dict[str, Any]:
    """Every batch straight into the store through `Store.ingest` (the collector's own write path,
    in this process, no HTTP), probes interleaved batch by batch as a fleet's pushes arrive: the
    issue's full 8.1 M fits in the time a session has, so the reads can be timed at that size."""
    store = open_store(database)
    readers = [read_batches(f) for f in files.values()]
    t0 = time.perf_counter()
    n = 0
    per_minute: list[int] = []
    minute_start, minute_n = t0, 0
    try:
        while readers:
            for r in list(readers):
                item = next(r, None)
                if item is None:
                    readers.remove(r)
                    continue
                doc = json.loads(gzip.decompress(item[1]))
                store.ingest(doc["probe"], doc["batch_id"], doc["measurements"], time.time(), (10**9, 0.0))
                n += len(doc["measurements"])
                minute_n += len(doc["measurements"])
                if time.perf_counter() - minute_start >= 60:
                    per_minute.append(minute_n)
                    _say("prefilled", f"{n:,} ({minute_n:,} in the last minute)")
                    minute_start, minute_n = time.perf_counter(), 0
    finally:
        store.close()
    elapsed = time.perf_counter() - t0
    return {"rate": n / elapsed, "results": n, "seconds": elapsed, "per_minute": per_minute, "throttled": {}}


def compliance_pass(database: str, stale_after: float) -> dict[str, Any]:
    """One compliance pass (collector/compliance.py), as the collector runs one every 30 s."""
    from collector.compliance import run_pass

    store = open_store(database)
    try:
        t0 = time.perf_counter()
        keys = run_pass(store, stale_after)
        return {"seconds": time.perf_counter() - t0, "keys": keys}
    finally:
        store.close()


def run(database: str, work: Path, files: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    ttl = 2.0
    out: dict[str, Any] = {}
    if args.prefill:
        out["ingest"] = prefill(database, files)
        _say("prefill", out["ingest"])
    proc, port, tokens = start_collector(database, work, list(files), ttl)
    url = f"http://{HOST}:{port}"
    dog = Watchdog(proc, args.max_rss_gib)
    try:
        if not args.prefill:
            out["ingest"] = asyncio.run(send_all(url, tokens, files))
        out["rss_after_ingest_mib"] = _rss_mib(proc.pid)
        out["db_bytes"] = db_size(database, work)
        _say("ingest", out["ingest"])
        out["metrics"] = time_get(url, "/metrics", ttl, args.tries)
        _say("/metrics", out["metrics"])
        out["status"] = time_get(url, "/", ttl, args.tries)
        _say("/", out["status"])
        if args.prometheus and shutil.which("prometheus"):
            interval = args.scrape_interval
            wait = 2 * interval + _seconds(args.prometheus_for) + 15
            try:
                out["prometheus"] = prometheus(port, work, args.prometheus_for, interval, wait)
                _say("prometheus", out["prometheus"])
            except SystemExit as exc:  # reported, and the rest of the run goes on
                if dog.killed_at is not None:
                    raise
                out["prometheus_error"] = str(exc)[:300]
                _say("prometheus failed", out["prometheus_error"])
    except (httpx2.HTTPError, SystemExit) as exc:
        if dog.killed_at is None:
            raise
        out["killed"] = (
            f"RSS reached {dog.killed_at / 1024:.1f} GiB: killed ({type(exc).__name__} in the bench)"
        )
        _say("watchdog", out["killed"])
    finally:
        dog.stop.set()
        if proc.poll() is None:
            out["rss_peak_mib"] = _rss_mib(proc.pid)
            _say("peak RSS (MiB)", out["rss_peak_mib"])
            _say("database bytes", out.get("db_bytes"))
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # a render still running in a worker thread holds the exit
            out["exit"] = "still running 60 s after SIGTERM: killed"
            _say("exit", out["exit"])
            proc.kill()
            proc.wait(30)
    out["sql"] = sql_timings(database, 86400)
    _say("queries", out["sql"])
    out["compliance"] = compliance_pass(database, 86400)
    _say("compliance pass", out["compliance"])
    if args.profile:
        out["profile"] = profile_render(database, 86400)
    return out


def _seconds(duration: str) -> float:
    unit = {"s": 1, "m": 60, "h": 3600}[duration[-1]]
    return float(duration[:-1]) * unit


def report(
    rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, direct: float, total: int
) -> None:
    load = Path("/proc/loadavg").read_text().split()[0]
    print(
        f"\n{args.probes} probes × {args.names:,} names × {len(QTYPES)} qtypes × {len(TRANSPORTS)} transports "
        f"= {total:,} measurements, all leaks of one order on one resolver; batches of {BATCH}; "
        f"reference: {direct:,.0f} results/s straight into an empty SQLite store in this process; "
        f"load average {load} at the end\n"
    )
    how = "straight through Store.ingest (--prefill)" if args.prefill else "over HTTP"
    print(
        f"| store | results/s {how} | ÷ reference | results/s minute by minute | 429s | peak RSS (MiB) | DB size (GiB) "
        f"| /metrics size (MB; gzip KB) | /metrics time cold / median of {args.tries} (s) | / time cold / median of {args.tries} (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        if "killed" in r:
            print(f"| {name} | {r['killed']} |")
        if "status" not in r:
            continue
        i, m, s = r["ingest"], r["metrics"], r["status"]
        print(
            f"| {name} | {i['rate']:,.0f} | {i['rate'] / direct:.2f} | {', '.join(f'{r:,}' for r in i['per_minute']) or 'under a minute'} "
            f"| {sum(i['throttled'].values())} | {r['rss_peak_mib']:,.0f} | "
            f"{r['db_bytes'] / 2**30:.2f} | {m['bytes'] / 1e6:.2f}; {m['gzip_bytes'] / 1e3:.0f} | "
            f"{m['first_s']:.2f} / {m['median_s']:.2f} | {s['first_s']:.2f} / {s['median_s']:.2f} |"
        )
    for name, r in rows:
        p = r.get("prometheus")
        if p:
            print(
                f"\n{name}: Prometheus (for: {args.prometheus_for}, scrape every {args.scrape_interval} s): up {p['up']}, "
                f"scrape {p['scrape_s']} s, {p['samples']} samples, {p['leak_series']:.0f} blockprobe_leak series"
            )
            print("| alert | state | count |\n|---|---|---|")
            for key, n in p["alerts"].items():
                alert, state = key.split()
                print(f"| {alert} | {state} | {n} |")
            for labels in p["leak_alert_labels"]:
                print("  ", dict(labels))
        q = r["sql"]
        print(
            f"\n{name}: the store's reads alone (best of 3): kept counts {q['counts_s'] * 1000:.0f} ms "
            f"({q['counts_rows']:,.0f} series); series quota {q['quota_s'] * 1000:.1f} ms ({q['quota_rows']:,} series "
            f"of one probe); capped rows {q['capped_s'] * 1000:.0f} ms ({q['capped_rows']:,}); status page: "
            f"names {q['page_names_s'] * 1000:.1f} ms, their rows {q['page_rows_s'] * 1000:.1f} ms ({q['page_rows']:,}), "
            f"names counted {q['count_names_s'] * 1000:.0f} ms ({q['names_counted']:,}); /api/v1/findings page of "
            f"1,000 from the middle {q['api_page_s'] * 1000:.1f} ms ({q['api_rows']:,}); resolver names "
            f"{q['resolvers_s'] * 1000:.2f} ms"
        )
        c = r.get("compliance")
        if c:
            print(f"{name}: one compliance pass {c['seconds']:.2f} s ({c['keys']} keys)")
        if "profile" in r:
            pr = r["profile"]
            print(f"\n{name}: render_findings {pr['render_s']:.2f} s\n{pr['render_profile']}")
            print(f"\n{name}: status page {pr['status_s']:.2f} s\n{pr['status_profile']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=45_000)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--stores", default="sqlite,postgresql", help="Which stores to run, comma-separated.")
    ap.add_argument("--prometheus-for", default="1m", help="Every alert's `for:` (production: 10m to 15m).")
    ap.add_argument("--scrape-interval", type=int, default=30, help="Seconds; the scrape timeout too.")
    ap.add_argument("--no-prometheus", dest="prometheus", action="store_false")
    ap.add_argument(
        "--max-rss-gib", type=float, default=6.0, help="Kill the collector (and say so) above this RSS."
    )
    ap.add_argument("--tries", type=int, default=3, help="Fresh renders timed per page.")
    ap.add_argument("--profile", action="store_true", help="Profile a findings render in this process.")
    ap.add_argument("--work", type=Path, help="Working directory (default: a new temporary one).")
    ap.add_argument("--json", action="store_true", help="Also print the results as one JSON object.")
    ap.add_argument(
        "--prefill",
        action="store_true",
        help="Store the batches straight through Store.ingest (no HTTP), then time the reads.",
    )
    args = ap.parse_args()
    if args.names > 10**NAME_WIDTH:
        ap.error(f"--names: at most {10**NAME_WIDTH}")
    work = args.work or Path(tempfile.mkdtemp(prefix="blockprobe-collector-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", file=sys.stderr)
    t0 = time.monotonic()
    tmpl = templates(work)
    pids = [probe_id(p) for p in range(args.probes)]
    files = {pid: work / f"{pid}.batches" for pid in pids}
    with ProcessPoolExecutor(max_workers=2) as pool:
        made = list(pool.map(_generate, [(p, args.names, tmpl, files[pid]) for p, pid in enumerate(pids)]))
    batches = sum(b for b, _r, _s in made)
    raw = sum(r for _b, r, _s in made)
    gz = sum(s for _b, _r, s in made)
    total = args.probes * args.names * len(QTYPES) * len(TRANSPORTS)
    print(
        f"generated {total:,} measurements in {batches:,} batches in {time.monotonic() - t0:.0f} s: "
        f"{raw / total:.0f} bytes of JSON each, {gz / batches / 1024:.0f} KiB per gzipped batch",
        file=sys.stderr,
    )
    direct = direct_rate(list(files.values()), work)
    rows = []
    stores = args.stores.split(",")
    if "sqlite" in stores:
        rows.append(
            ("sqlite", run(f"sqlite:///{work / 'sqlite' / 'c.sqlite3'}", work / "sqlite", files, args))
        )
    from tests.pg import TempPostgres, find_pg_bin

    if "postgresql" in stores and find_pg_bin() is not None:
        pg = TempPostgres()
        try:
            rows.append(("postgresql", run(pg.fresh_database("scale"), work / "pg", files, args)))
        finally:
            pg.stop()
    for f in files.values():
        f.unlink()
    report(rows, args, direct, total)
    if args.json:
        print(json.dumps({"rows": rows, "direct": direct, "total": total}, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
