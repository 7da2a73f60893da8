"""The engine's own guarantees: a bounded output queue that loses nothing, a consumer that may stop
early, expectations fixed when each query leaves, and targets for a per-name scheduler."""

from __future__ import annotations

import asyncio

from probe.catalogue import resolve_spec
from probe.engine import Engine, Plan
from probe.lab import Behaviour, LabCA, LabThread, Zone
from probe.model import Expectation, Measurement
from probe.transports import Options

from .conftest import start_lab

D = "engine.lab.test"


def _lab(lab_thread: LabThread, lab_ca: LabCA) -> str:
    zone = Zone()
    zone.set(f"*.{D}", Behaviour(records={"A": ("10.0.0.1",)}))
    return start_lab(lab_thread, zone, "127.53.1.6", lab_ca, transports=("udp", "tcp")).specs()["udp"]


def test_a_small_queue_delivers_every_measurement_and_an_early_stop_is_clean(
    lab_thread: LabThread, lab_ca: LabCA
) -> None:
    resolver = resolve_spec(_lab(lab_thread, lab_ca))
    names = [f"n{i}.{D}" for i in range(300)]

    async def go() -> tuple[int, int]:
        async with Engine(Options(timeout=1, udp_linger=0), qps=None, queue_size=4) as engine:
            seen = 0
            async for _ in engine.run(Plan(names, ["A"], [resolver], check_identity=False)):
                seen += 1
                if seen == 10:
                    break  # the consumer walks away with the queue full
            everything = await engine.collect(Plan(names, ["A"], [resolver], check_identity=False))
            return seen, len({m.domain for m in everything})

    assert asyncio.run(asyncio.wait_for(go(), 30)) == (10, 300)


def test_targets_measure_only_the_pairs_given(lab_thread: LabThread, lab_ca: LabCA) -> None:
    resolver = resolve_spec(_lab(lab_thread, lab_ca))
    endpoint = resolver.endpoints[0]
    plan = Plan(
        [],
        ["A", "AAAA"],
        [resolver],
        targets=[(f"a.{D}", resolver, endpoint), (f"b.{D}", resolver, endpoint)],
    )

    async def go() -> list[tuple[str, str]]:
        async with Engine(Options(timeout=1, udp_linger=0), qps=None) as engine:
            return sorted((m.domain, m.qtype) for m in await engine.collect(plan))

    assert plan.size == 4
    assert asyncio.run(go()) == [(f"a.{D}", "A"), (f"a.{D}", "AAAA"), (f"b.{D}", "A"), (f"b.{D}", "AAAA")]


def test_expectations_are_asked_when_each_query_leaves(lab_thread: LabThread, lab_ca: LabCA) -> None:
    resolver = resolve_spec(_lab(lab_thread, lab_ca))
    asked: list[str] = []

    def expect(domain: str, _r: object) -> tuple[Expectation | None, dict[str, str] | None]:
        asked.append(domain)
        return Expectation.RESOLVES, {"list": "x"}

    async def go() -> list[str]:
        async with Engine(Options(timeout=1, udp_linger=0), qps=None) as engine:
            return [
                m.domain
                for m in await engine.collect(
                    Plan(
                        [f"e{i}.{D}" for i in range(5)],
                        ["A"],
                        [resolver],
                        expect=expect,
                        check_identity=False,
                    )
                )
            ]

    got = asyncio.run(go())
    assert sorted(asked) == sorted(got)  # once per measurement, at send time


def test_answers_waiting_out_a_udp_linger_are_bounded_by_the_queue(
    lab_thread: LabThread, lab_ca: LabCA
) -> None:
    """With udp_linger > 0 every answer waits for racing answers after its worker moved on; a
    stalled consumer must stop the run, not leave every answer of the plan judged and waiting."""
    resolver = resolve_spec(_lab(lab_thread, lab_ca))
    names = [f"l{i}.{D}" for i in range(120)]
    queue_size, concurrency = 4, 8
    # The queue, the answers waiting out their linger, one per worker judged at once, and the
    # one the consumer holds: before the bound, all 120 were judged within a linger or two.
    bound = queue_size + queue_size + concurrency + 1

    async def go() -> tuple[int, int]:
        async with Engine(
            Options(timeout=2, udp_linger=0.1), qps=None, queue_size=queue_size, concurrency=concurrency
        ) as engine:
            stream = engine.run(Plan(names, ["A"], [resolver], check_identity=False))
            seen = 1 if await anext(stream) else 0
            for _ in range(1000):  # up to 10 s for the producer to fill the queue
                if engine.stats.done >= queue_size:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the producer never filled the queue")
            # The consumer stalls for ten lingers: the producer may not get further than the bound.
            most = engine.stats.done
            for _ in range(50):
                await asyncio.sleep(0.02)
                most = max(most, engine.stats.done)
            async for _ in stream:
                seen += 1
            return most, seen

    most, seen = asyncio.run(asyncio.wait_for(go(), 60))
    assert most <= bound, f"{most} measurements judged while the consumer stalled (bound {bound})"
    assert seen == len(names)  # and nothing was lost


def test_the_confirmation_pass_names_its_fresh_connection_apart(lab_thread: LabThread, lab_ca: LabCA) -> None:
    zone = Zone()
    zone.set(f"*.{D}", Behaviour(records={"A": ("10.0.0.1",)}))
    zone.set(f"silent.{D}", Behaviour(action="drop"))
    server = start_lab(lab_thread, zone, "127.53.1.6", lab_ca, transports=("tcp",))
    resolver = resolve_spec(server.specs()["tcp"])

    async def go() -> list[Measurement]:
        async with Engine(Options(timeout=0.5, udp_linger=0, confirm_after=0), qps=None) as engine:
            plan = Plan([f"silent.{D}", f"a.{D}", f"b.{D}"], ["A"], [resolver], check_identity=False)
            return await engine.collect(plan)

    silent = next(m for m in asyncio.run(asyncio.wait_for(go(), 30)) if m.domain == f"silent.{D}")
    channels = [(a["pass"], a["channel"]) for a in silent.evidence["attempts"]]
    endpoint = server.specs()["tcp"]
    assert channels == [(1, f"{endpoint}#1"), (2, f"{endpoint}#c1")]
