"""Shared fixtures: a scripted lab resolver on every transport, and a control that tells the truth."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from probe.catalogue import resolve_spec
from probe.engine import Engine, ExpectFn, Plan
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.model import Measurement
from probe.specs import Resolver
from probe.transports import Options

from .ci_skips import pytest_runtest_logreport, pytest_sessionfinish  # noqa: F401  (hooks)

LAB_HOSTS = ("127.0.0.1", "localhost", *(f"127.53.1.{i}" for i in range(1, 16)))


@pytest.fixture(scope="session")
def lab_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA(hosts=LAB_HOSTS, directory=tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def lab_thread() -> Iterator[LabThread]:
    with LabThread() as thread:
        yield thread


def start_lab(thread: LabThread, zone: Zone, host: str, ca: LabCA, **kw: object) -> LabServer:
    return thread.start(LabServer(zone, host, ca, **kw))  # type: ignore[arg-type]  # kw: LabServer's own keyword options, passed through


def resolvers_of(server: LabServer, transports: Sequence[str] | None = None) -> list[Resolver]:
    specs = server.specs()
    return [resolve_spec(specs[t]) for t in (transports or specs)]


def measure(
    domains: Sequence[str],
    resolvers: Sequence[Resolver],
    *,
    ca: LabCA | Path | None,
    qtypes: Sequence[str] = ("A",),
    controls: Sequence[Resolver] = (),
    expect: ExpectFn | None = None,
    timeout: float = 1.0,
    linger: float = 0.1,
    qps: float | None = None,
    concurrency: int = 32,
    confirm_after: float = 0.0,
) -> list[Measurement]:
    ca_file = str(ca.ca_file) if isinstance(ca, LabCA) else (str(ca) if ca else None)
    options = Options(timeout=timeout, ca_file=ca_file, udp_linger=linger, confirm_after=confirm_after)
    plan = (
        Plan(domains, qtypes, resolvers, controls, expect)
        if expect
        else Plan(domains, qtypes, resolvers, controls)
    )

    async def go() -> list[Measurement]:
        async with Engine(options, qps=qps, concurrency=concurrency) as engine:
            return await engine.collect(plan)

    return asyncio.run(go())


def truth_zone() -> Zone:
    """What the control resolver says: the real answers."""
    zone = Zone(nsid="control")
    real = Behaviour(
        records={
            "A": ("93.184.216.34",),
            "AAAA": ("2606:2800:220:1::248",),
            "HTTPS": ('1 . alpn="h2" ipv4hint=93.184.216.34',),
        }
    )
    zone.set("*.blockprobe-lab.net", real)
    zone.set("dead.blockprobe-lab.net", Behaviour(rcode="NXDOMAIN"))
    zone.set("*.lab.test", real)
    return zone
