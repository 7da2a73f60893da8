"""The scheduler's guarantees, on a fake clock: new orders fast, every name per full_pass, qps kept."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from probe.lists import Lists, parse_lists
from probe.model import Finding, Transport
from probe.schedule import Scheduler, Settings, budget, check, format_span, parse_settings
from probe.specs import Endpoint, Resolver

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
QTYPES = ("A", "AAAA", "HTTPS")
ISP = Resolver(
    "isp",
    "isp",
    "tim",
    (Endpoint(Transport.UDP, "127.0.0.1", 53, qps=10), Endpoint(Transport.TCP, "127.0.0.1", 53, qps=10)),
)
PUBLIC = Resolver("public", "public", "cloudflare", (Endpoint(Transport.DOT, "127.0.0.2", 853, qps=10),))


@dataclass(frozen=True)
class Result:
    """A result as record() reads it: the fields of probe.model.Measurement it needs."""

    domain: str
    qtype: str
    resolver: str
    endpoint: str
    finding: Finding | None


def lists_of(orders: list[dict[str, object]]) -> Lists:
    return parse_lists(json.dumps({"orders": orders}), "test.yaml")


def base_order(n: int) -> dict[str, object]:
    return {
        "id": "old",
        "authority": "A",
        "jurisdictions": ["IT"],
        "effective": "2026-01-01",
        "domains": [f"n{i:05d}.example" for i in range(n)],
    }


def new_order(oid: str, effective: dt.datetime, names: list[str], **extra: object) -> dict[str, object]:
    when = effective.isoformat().replace("+00:00", "Z")
    return {
        "id": oid,
        "authority": "A",
        "jurisdictions": ["IT"],
        "effective": when,
        "domains": names,
        **extra,
    }


Finder = Callable[[str, Resolver, Endpoint, dt.datetime], Finding | None]


def leaks(_name: str, _r: Resolver, _ep: Endpoint, _when: dt.datetime) -> Finding | None:  # a Finder
    return Finding.LEAK


@dataclass
class Run:
    times: dict[tuple[str, str], list[dt.datetime]]
    batches: list[tuple[dt.datetime, float, list[tuple[str, Resolver, Endpoint]]]]


def simulate(
    sched: Scheduler, hours: float, finder: Finder = leaks, slice_s: float = 10.0, start: dt.datetime = T0
) -> Run:
    """The daemon's loop on a fake clock: each batch measured at once, results fed back, and the
    next call at the end of the slice or at the next change, whichever comes first."""
    run = Run(defaultdict(list), [])
    now, end = start, start + dt.timedelta(hours=hours)
    while now < end:
        change = sched.next_change(now)
        stop = now + dt.timedelta(seconds=slice_s)
        if change is not None and now < change < stop:
            stop = change
        span = (stop - now).total_seconds()
        batch = sched.next_batch(now, span)
        run.batches.append((now, span, batch))
        results = []
        for name, r, ep in batch:
            run.times[(name, f"{r.name} {ep}")].append(now)
            finding = finder(name, r, ep, now)
            results += [Result(name, q, r.name, str(ep), finding) for q in QTYPES]
        sched.record(now, results)
        now = stop
    return run


def make(
    lists: Lists, settings: Settings | None = None, resolvers: tuple[Resolver, ...] = (ISP, PUBLIC)
) -> Scheduler:
    return Scheduler(
        lists, country="IT", resolvers=resolvers, qtypes=QTYPES, now=T0, qps=20, settings=settings
    )


def lanes(resolvers: tuple[Resolver, ...] = (ISP, PUBLIC)) -> list[str]:
    return [f"{r.name} {ep}" for r in resolvers for ep in r.endpoints]


def test_a_new_order_is_measured_from_its_effective_instant_and_then_every_fast_interval() -> None:
    effective = T0 + dt.timedelta(minutes=47, seconds=13)  # mid-slice: the scheduler must say when
    fresh = ["ticket-1.example", "ticket-2.example"]
    sched = make(lists_of([base_order(2000), new_order("t1", effective, fresh)]))
    run = simulate(sched, 2)
    for name in fresh:
        for lane in lanes():
            after = [t for t in run.times[(name, lane)] if t >= effective]
            assert after[0] == effective, (name, lane)
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(after)]
            assert gaps, (name, lane)
            assert max(gaps) <= 120, (name, lane, max(gaps))  # leaking: never leaves the fast lane
            assert len(after) >= 2 * 3600 / 120 * 0.5


def test_enforced_names_leave_the_fast_lane_and_leaks_stay() -> None:
    effective = T0 + dt.timedelta(minutes=5)
    enforced_at = effective + dt.timedelta(minutes=10)
    sched = make(lists_of([base_order(2000), new_order("t1", effective, ["ticket.example"])]))

    def finder(name: str, r: Resolver, _ep: Endpoint, when: dt.datetime) -> Finding:
        if name == "ticket.example" and r is ISP and when >= enforced_at:
            return Finding.ENFORCED
        return Finding.LEAK if when >= effective else Finding.OK

    run = simulate(sched, 3, finder)
    for lane in lanes((ISP,)):
        late = [t for t in run.times[("ticket.example", lane)] if t > enforced_at + dt.timedelta(minutes=2)]
        # back in the rotation: once per pass of 0.9 × 6 h, not every 2 minutes
        assert len(late) <= 1, (lane, late)
    public = [t for t in run.times[("ticket.example", lanes((PUBLIC,))[0])] if t >= effective]
    assert len(public) >= (3 * 60 - 5) / 2 - 2


def test_every_name_is_measured_within_full_pass_on_every_endpoint() -> None:
    settings = Settings(fast_interval=120, full_pass=3600)
    n = 3000  # 3,000 × 3 ÷ 10 qps = 15 min a pass: a quarter of the budget
    flood = [f"flood{i}.example" for i in range(300)]  # leaks everywhere, chased the whole run
    sched = make(
        lists_of([base_order(n), new_order("flood", T0 + dt.timedelta(minutes=30), flood)]), settings
    )
    run = simulate(sched, 4)
    end = T0 + dt.timedelta(hours=4)
    names = sched.lists.query_names()
    assert len(names) == n + len(flood)
    for name in names:
        for lane in lanes():
            times = [T0, *run.times[(name, lane)], end]
            worst = max((b - a).total_seconds() for a, b in itertools.pairwise(times))
            assert worst <= 3600, (name, lane, worst)


def test_no_endpoint_ever_exceeds_its_qps_even_with_a_flood_of_new_names() -> None:
    flood = [f"flood{i}.example" for i in range(3000)]  # more than the fast lane can chase
    sched = make(lists_of([base_order(5000), new_order("flood", T0 + dt.timedelta(minutes=3), flood)]))
    run = simulate(sched, 1, slice_s=7)
    busiest = 0.0
    for now, span, batch in run.batches:
        per: dict[Endpoint, int] = defaultdict(int)
        for _, _, ep in batch:
            per[ep] += len(QTYPES)
        for ep, queries in per.items():
            assert ep.qps is not None
            assert queries <= ep.qps * span + 1e-9, (now, ep, queries, span)
            busiest = max(busiest, queries / (ep.qps * span))
    assert busiest > 0.95  # the flood really did fill the budget (less one name of rounding)
    # and the rotation's share was kept: the old names kept their pace under the flood
    status = sched.status(T0 + dt.timedelta(hours=1))
    assert all(s.behind < 60 for s in status), status
    assert all(s.urgent > 0 for s in status)


def test_calling_again_early_never_doubles_the_rate() -> None:
    sched = make(lists_of([base_order(100), new_order("t", T0, [f"x{i}.example" for i in range(500)])]))
    first = sched.next_batch(T0, 10)
    again = sched.next_batch(T0, 10)  # a confused caller: the same slice asked twice
    per: dict[Endpoint, int] = defaultdict(int)
    for _, _, ep in first + again:
        per[ep] += 3
    assert max(per.values()) <= 10 * 10
    assert max(per.values()) >= 10 * 10 - 3


def test_an_endpoint_named_by_two_resolvers_shares_one_rate() -> None:
    shared = Endpoint(Transport.UDP, "127.0.0.1", 53, qps=10)
    a, b = Resolver("a", "isp", "x", (shared,)), Resolver("b", "system", None, (shared,))
    sched = make(lists_of([new_order("t", T0, [f"x{i}.example" for i in range(500)])]), resolvers=(a, b))
    batch = sched.next_batch(T0, 10)
    assert len(batch) * 3 <= 100
    assert {r.name for _, r, _ in batch} == {"a", "b"}


def test_a_ticket_published_late_is_chased_from_when_it_arrives() -> None:
    sched = make(lists_of([base_order(2000)]))
    simulate(sched, 0.5)
    arrived = T0 + dt.timedelta(minutes=30)
    old_effective = T0 - dt.timedelta(days=3)  # filed late: effective long before the chase window
    sched.update_lists(
        lists_of([base_order(2000), new_order("late", old_effective, ["late.example"])]), arrived
    )
    run = simulate(sched, 0.5, start=arrived)
    for lane in lanes():
        assert run.times[("late.example", lane)][0] == arrived
        assert len(run.times[("late.example", lane)]) >= 14


def test_update_lists_keeps_the_rotation_in_place() -> None:
    sched = make(lists_of([base_order(2000)]))
    start = [s.progress for s in sched.status(T0)]
    simulate(sched, 1)
    before = [s.progress for s in sched.status(T0 + dt.timedelta(hours=1))]
    sched.update_lists(
        lists_of([base_order(2000), new_order("t", T0, ["zzz.example"])]), T0 + dt.timedelta(hours=1)
    )
    after = [s.progress for s in sched.status(T0 + dt.timedelta(hours=1))]
    assert after == pytest.approx(before, abs=0.001)
    moved = (before[0] - start[0]) % 1
    assert 0.15 < moved < 0.25  # an hour of a 5.4-hour pass


def test_names_of_agrees_with_lists() -> None:
    lists = lists_of(
        [
            new_order("w", T0, ["*.example", "a.test", "b.example"]),
            new_order("x", T0, ["www.example", "c.test"]),
        ]
    )
    sched = make(lists)
    for order in lists.orders:
        assert sorted(sched.names_of(order)) == sorted(lists.names_of(order))


def test_an_expired_order_leaves_the_fast_lane() -> None:
    effective = T0 + dt.timedelta(minutes=1)
    expires = T0 + dt.timedelta(minutes=20)
    order = new_order("t", effective, ["gone.example"], expires="2026-12-01T09:20:00Z")
    sched = make(lists_of([base_order(2000), order]))

    def finder(name: str, _r: Resolver, _ep: Endpoint, when: dt.datetime) -> Finding:
        # Once the order expires nothing is expected of the name: its answer is no leak.
        return Finding.LEAK if name == "gone.example" and effective <= when < expires else Finding.OK

    run = simulate(sched, 2, finder)
    late = [t for t in run.times[("gone.example", lanes()[0])] if t >= expires]
    # Its last result was a leak: measured once more, found no longer one, let go; the rotation.
    assert len(late) <= 2, late
    assert late[0] <= expires + dt.timedelta(seconds=130)
    assert late[1:] == [] or late[1] - late[0] > dt.timedelta(hours=0.5)


def test_an_order_elsewhere_or_for_other_resolvers_is_not_chased() -> None:
    effective = T0 + dt.timedelta(minutes=1)
    fr = new_order("fr", effective, ["fr.example"]) | {"jurisdictions": ["FR"]}
    isp_only = new_order("isp", effective, ["isp.example"], applies_to=["isp"])
    run = simulate(make(lists_of([base_order(2000), fr, isp_only])), 1)
    assert len(run.times[("fr.example", lanes()[0])]) <= 1
    assert len(run.times[("isp.example", lanes((PUBLIC,))[0])]) <= 1
    assert len(run.times[("isp.example", lanes((ISP,))[0])]) >= 25


def test_naive_time_is_refused() -> None:
    sched = make(lists_of([base_order(10)]))
    with pytest.raises(ValueError, match="aware"):
        sched.next_batch(dt.datetime(2026, 12, 1, 9, 0), 10)  # noqa: DTZ001 - naive on purpose: refused


def test_check_rejects_a_config_that_cannot_meet_full_pass() -> None:
    slow = Resolver("slow", "isp", None, (Endpoint(Transport.UDP, "127.0.0.1", 53, qps=5),))
    errors = check(45000, QTYPES, [slow], 20, Settings())
    assert errors == [
        "schedule.full_pass: 6h cannot be met on slow udp://127.0.0.1:53: 45000 names × 3 qtypes ÷ 5 qps = "
        "7h30m per pass, more than the 5h24m a pass is planned in (90% of full_pass); raise its qps to at "
        "least 6.95, measure fewer names or qtypes, or set schedule.full_pass to at least 8h20m"
    ]
    assert check(45000, QTYPES, [ISP, PUBLIC], 20, Settings()) == []


def test_budget_states_the_numbers() -> None:
    text = budget(
        45000,
        QTYPES,
        [Resolver("r", "isp", None, (Endpoint(Transport.UDP, "127.0.0.1", 53),))],
        20,
        Settings(),
    )
    assert text.splitlines() == [
        "schedule: 45000 names × 3 qtypes; fast lane every 2m, every name at least once per 6h (a pass planned in 5h24m)",
        "  r udp://127.0.0.1:53 at 20 qps: 45000 × 3 ÷ 20 = 1h52m30s per pass (35% of the pass); "
        "fast lane: up to 522 names every 2m",
        "  total: 135000 queries per pass",
    ]


@pytest.mark.parametrize(
    ("section", "fast", "full"),
    [
        ({}, 120, 21600),
        ({"fast_interval": 90, "full_pass": "6h"}, 90, 21600),
        ({"fast_interval": "30s", "full_pass": "30m"}, 30, 1800),
        ({"full_pass": "1d"}, 120, 86400),
    ],
)
def test_settings_parse(section: dict[str, object], fast: float, full: float) -> None:
    settings, errors = parse_settings(section)
    assert errors == []
    assert (settings.fast_interval, settings.full_pass) == (fast, full)
    assert settings.chase == 86400


def test_chase_is_a_setting() -> None:
    assert parse_settings({"chase": "2h"}) == (Settings(chase=7200), [])
    assert parse_settings({"chase": "30d", "fast_interval": 60}) == (
        Settings(fast_interval=60, chase=30 * 86400),
        [],
    )


@pytest.mark.parametrize(
    ("section", "error"),
    [
        (
            {"fast_interval": "2x"},
            "schedule.fast_interval: '2x' is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)",
        ),
        (
            {"full_pass": True},
            "schedule.full_pass: True is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)",
        ),
        ({"full_pass": 0}, "schedule.full_pass: 0 must be longer than zero"),
        (
            {"full_pass": float("inf")},
            "schedule.full_pass: inf is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)",
        ),
        (
            {"full_pass": 10**400},
            "schedule.full_pass: 1000000000000000000000000000000000000000000000000000000… is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)",
        ),
        ({"fast_interval": 0.5}, "schedule.fast_interval: 0.5 must be at least 1s"),
        (
            {"fast_interval": "1h", "full_pass": "30m"},
            "schedule.full_pass: '30m' must be longer than schedule.fast_interval (1h)",
        ),
        (
            {"fast_interval": "7h"},
            "schedule.fast_interval: '7h' must be shorter than schedule.full_pass (6h)",
        ),
        (
            {"chase": "1m"},
            "schedule.chase: '1m' must be at least schedule.fast_interval (2m): the fast lane would never measure a new order",
        ),
        (
            {"chase": "soon"},
            "schedule.chase: 'soon' is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)",
        ),
    ],
)
def test_settings_errors_name_key_and_value(section: dict[str, object], error: str) -> None:
    settings, errors = parse_settings(section)
    assert errors == [error]
    assert settings == Settings()


def test_format_span() -> None:
    assert [format_span(s) for s in (0, 0.5, 90, 3600, 6750, 86400 + 60)] == [
        "0s",
        "0.5s",
        "1m30s",
        "1h",
        "1h52m30s",
        "1d1m",
    ]


def test_a_name_leaves_the_fast_lane_only_when_every_qtype_is_enforced_together() -> None:
    sched = make(lists_of([base_order(50), new_order("t", T0, ["ticket.example"])]), resolvers=(PUBLIC,))
    ep = PUBLIC.endpoints[0]

    def chased(at: dt.datetime) -> bool:
        return any(name == "ticket.example" for name, _, _ in sched.next_batch(at, 10))

    def feed(at: dt.datetime, findings: list[Finding]) -> None:
        for q, f in zip(QTYPES, findings, strict=True):  # one result at a time, as the engine streams them
            sched.record(at, [Result("ticket.example", q, "public", str(ep), f)])

    assert chased(T0)
    feed(T0, [Finding.ENFORCED, Finding.LEAK, Finding.ENFORCED])
    at = T0 + dt.timedelta(seconds=120)
    assert chased(at)
    feed(at, [Finding.ENFORCED, Finding.ENFORCED, Finding.INCONCLUSIVE])
    at += dt.timedelta(seconds=120)
    assert chased(at)
    feed(at, [Finding.ENFORCED] * 3)
    assert not any(chased(at + dt.timedelta(seconds=s)) for s in range(120, 1200, 10))
    late = at + dt.timedelta(seconds=1200)
    sched.record(
        late, [Result("ticket.example", "A", "public", str(ep), Finding.LEAK)]
    )  # recent: chased again
    assert chased(late + dt.timedelta(seconds=10))


def test_a_clock_stepping_back_neither_stalls_nor_bursts() -> None:
    sched = make(lists_of([base_order(2000)]))
    simulate(sched, 1)
    back = T0 + dt.timedelta(minutes=50)  # the wall clock steps back ten minutes
    run = simulate(sched, 0.5, start=back)
    for now, span, batch in run.batches:
        per: dict[Endpoint, int] = defaultdict(int)
        for _, _, ep in batch:
            per[ep] += len(QTYPES)
        assert all(q <= 10 * span for q in per.values()), now
    assert all(s.behind < 30 for s in sched.status(back + dt.timedelta(minutes=30)))
    assert sum(len(b) for _, _, b in run.batches) >= 2000 * 3 * 0.5 / 5.4 * 0.9


def test_without_a_rate_limit_the_rotation_keeps_its_pace() -> None:
    free = Resolver("free", "isp", None, (Endpoint(Transport.UDP, "127.0.0.1", 53),))
    sched = Scheduler(
        lists_of([base_order(5400)]), country="IT", resolvers=[free], qtypes=QTYPES, now=T0, qps=None
    )
    # The first call also measures again the `resume` seconds of rotation before the wall
    # clock's place (what a restart may have lost); then the pace: a pass in 5.4 h.
    first = sched.next_batch(T0, 60)
    assert len(first) == 5400 * 60 // (0.9 * 6 * 3600) + math.ceil(5400 * 120 / (0.9 * 6 * 3600))
    batch = sched.next_batch(T0 + dt.timedelta(seconds=60), 60)
    assert abs(len(batch) - 5400 * 60 / (0.9 * 6 * 3600)) < 1  # not everything at once


def test_restarts_every_30_minutes_still_cover_every_name_within_full_pass() -> None:
    """A probe restarted more often than once per pass (a crash loop, frequent deploys) resumes
    its rotation where the wall clock says it is, `resume` (2 min) before, so it still reaches
    the end of the list. Each restart here loses the slice in flight and 60 s of downtime: the
    bound is full_pass as long as those fit within `resume`."""
    settings = Settings(fast_interval=120, full_pass=7200)
    lists = lists_of([base_order(3000)])  # 3,000 × 3 ÷ 10 qps = 15 min a pass of 1.8 h: spare qps
    times: dict[tuple[str, str], list[dt.datetime]] = defaultdict(list)
    now, end = T0, T0 + dt.timedelta(hours=7)
    while now < end:
        sched = Scheduler(
            lists, country="IT", resolvers=(ISP, PUBLIC), qtypes=QTYPES, now=now, qps=20, settings=settings
        )
        stop = min(now + dt.timedelta(minutes=30), end)
        run = simulate(sched, (stop - now).total_seconds() / 3600, start=now)
        lost = run.batches[-1][0]  # killed while measuring its last slice: never measured
        for key, seen in run.times.items():
            times[key] += [t for t in seen if t != lost]
        now = stop + dt.timedelta(seconds=60)  # down for a minute, then started again
    worst = 0.0
    for name in lists.query_names():
        for lane in lanes():
            seen = [T0, *sorted(times[(name, lane)]), end]
            worst = max(worst, *((b - a).total_seconds() for a, b in itertools.pairwise(seen)))
    assert worst <= 7200, format_span(worst)


def test_a_restart_resumes_the_rotation_near_where_it_was() -> None:
    lists = lists_of([base_order(2000)])
    sched = make(lists)
    simulate(sched, 1)
    later = T0 + dt.timedelta(hours=1)
    again = Scheduler(lists, country="IT", resolvers=(ISP, PUBLIC), qtypes=QTYPES, now=later, qps=20)
    was, now = sched.status(later), again.status(later)
    for a, b in zip(was, now, strict=True):
        # Back by `resume` (2 min of a 5.4 h pass: 0.6 %) at most, never ahead, never at the start.
        assert 0 <= a.progress - b.progress <= 120 / (0.9 * 6 * 3600) + 0.002, (a, b)


def test_a_leak_of_an_old_order_is_chased_until_enforced() -> None:
    """An old order's name that starts leaking (a regression) is found by the rotation, then
    measured every fast_interval until every qtype is enforced again, then only by the rotation."""
    sched = make(lists_of([base_order(2000)]))
    fixed = T0 + dt.timedelta(hours=3)
    # A name the rotation reaches within the first hour, wherever the wall clock put the cursor.
    name = f"n{(math.ceil(sched.status(T0)[0].progress * 2000) + 200) % 2000:05d}.example"

    def finder(domain: str, r: Resolver, _ep: Endpoint, when: dt.datetime) -> Finding:
        return Finding.LEAK if domain == name and r is PUBLIC and when < fixed else Finding.ENFORCED

    run = simulate(sched, 5, finder)
    for lane in lanes((PUBLIC,)):
        seen = run.times[(name, lane)]
        chased = [t for t in seen if t <= fixed + dt.timedelta(seconds=120)]
        assert len(chased) >= 10, (lane, seen)  # found, then chased
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(chased)]
        assert max(gaps) <= 120, (lane, gaps)
        assert len([t for t in seen if t > fixed + dt.timedelta(seconds=120)]) <= 1  # enforced: left
    for lane in lanes((ISP,)):
        assert len(run.times[(name, lane)]) <= 1  # enforced there: rotation only


def test_under_a_mass_leak_new_orders_keep_their_cadence_and_old_leaks_share_the_rest() -> None:
    """Every old name leaks on the public resolver (the issue's mass leak): they are all chased
    with what the rotation and the new order leave, never above the qps; the new order's names
    are measured every fast_interval all the same."""
    effective = T0 + dt.timedelta(minutes=40)
    fresh = [f"ticket-{k}.example" for k in range(10)]
    sched = make(lists_of([base_order(3000), new_order("t", effective, fresh)]))

    def finder(_name: str, r: Resolver, _ep: Endpoint, _when: dt.datetime) -> Finding:
        return Finding.LEAK if r is PUBLIC else Finding.ENFORCED

    run = simulate(sched, 2, finder)
    public = lanes((PUBLIC,))[0]
    for name in fresh:
        after = [t for t in run.times[(name, public)] if t >= effective]
        assert after[0] == effective
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(after)]
        assert max(gaps) <= 120, (name, max(gaps))
    for now, span, batch in run.batches:
        queries = sum(len(QTYPES) for _, r, _ in batch if r is PUBLIC)
        assert queries <= 10 * span + 1e-9, now
    # Old leaks are chased beyond the rotation: more measurements than a pass alone gives.
    old = sum(len(run.times[(f"n{i:05d}.example", public)]) for i in range(3000))
    rotation_only = 3000 * 2 / 5.4
    assert old > 3 * rotation_only
    status = sched.status(T0 + dt.timedelta(hours=2))
    assert all(s.behind < 60 for s in status), status


def test_after_a_restart_a_new_order_goes_before_the_orders_already_chased() -> None:
    """A restart puts every recent order's names back in the fast lane; an order taking effect
    a minute later must still be measured at its effective instant, not behind them."""
    backlog = new_order("recent", T0 - dt.timedelta(hours=3), [f"r{i:04d}.example" for i in range(1500)])
    effective = T0 + dt.timedelta(minutes=1)
    fresh = ["zz-fresh-1.example", "zz-fresh-2.example"]  # after the backlog in name order
    sched = make(lists_of([base_order(2000), backlog, new_order("t", effective, fresh)]))
    run = simulate(sched, 0.5)
    for name in fresh:
        for lane in lanes():
            assert run.times[(name, lane)][0] == effective, (name, lane)
    # The backlog is measured all the same, from the start, as fast as the qps allows.
    assert run.times[("r0000.example", lanes()[0])][0] == T0
    assert all(run.times[(f"r{i:04d}.example", lanes()[2])] for i in range(1500))
