"""The scheduler at Piracy Shield scale, on a fake clock: 24 h of 45,000 names × 3 qtypes × 6 endpoints.

    python -m bench.scheduler [--names 45000] [--hours 24] [--slice 10] [--seed 1] [--chase 24] [--restart-every 0]

No network: the daemon's loop is simulated (next_batch, measure, record, next slice or next
change), each endpoint's queue drained at its qps within the slice, so a target's measuring
time is its slice start plus its place in that endpoint's queue ÷ qps.

Two resolvers, three endpoints each, 20 qps each: an ISP that enforces every old name and
each new ticket 5 to 40 minutes after it takes effect, and a public resolver that enforces
nothing (the mass leak of the issue). One ticket of 1 to 30 names every 15 minutes: half
known ahead with a future effective instant, half published at their effective instant and
reaching the probe at its next poll of the collector's lists (update_lists), every 60 s as
the daemon polls (probe/daemon/run.py, the `fetch-lists` job). `--restart-every MINUTES`
restarts the probe that often (a new Scheduler on the same lists; nothing lost in flight).

Printed: coverage per full_pass (per name × endpoint, the longest gap between measurements),
the delay from a ticket's effective instant to its first measurement on each endpoint, how
often the fast lane measures leaking names (`--chase` sets how long an order's names go first),
the scheduler's CPU (its own calls, apart from the harness) and memory (RSS floor, after the
lists, after the scheduler; peak).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import resource
import statistics
import time
import tracemalloc
from array import array
from pathlib import Path
from typing import NamedTuple

from probe.expect import OrderIndex
from probe.lists import Lists, Order, Pattern
from probe.model import Finding, Transport
from probe.schedule import Scheduler, Settings, budget, check, format_span
from probe.specs import Endpoint, Resolver

T0 = dt.datetime(2026, 12, 1, 0, 0, tzinfo=dt.UTC)
QTYPES = ("A", "AAAA", "HTTPS")
QPS = 20.0
POLL = dt.timedelta(seconds=60)  # the daemon's `fetch-lists` job: IntervalTrigger(seconds=60)


class Ticket(NamedTuple):
    order: Order
    effective: dt.datetime
    late: bool  # published at its effective instant, not ahead
    enforced: dt.datetime  # when the ISP starts blocking it


class R(NamedTuple):
    domain: str
    qtype: str
    resolver: str
    endpoint: str
    finding: Finding | None


def rss_mib() -> tuple[float, float]:
    text = Path("/proc/self/status").read_text()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def order(oid: str, names: list[str], effective: dt.datetime) -> Order:
    return Order(
        oid,
        "AGCOM",
        frozenset({"IT"}),
        frozenset({"isp", "public", "system"}),
        effective,
        None,
        tuple(Pattern(n, False) for n in names),
        "bench",
        dt.timedelta(minutes=30),
    )


def main() -> None:  # noqa: C901 - a benchmark script read top to bottom: arguments, run, report
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=45000)
    ap.add_argument("--hours", type=float, default=24)
    ap.add_argument("--slice", type=float, default=10, help="seconds per batch")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--chase", type=float, default=24, help="hours an order's names go first in the fast lane"
    )
    ap.add_argument("--restart-every", type=float, default=0, help="minutes between restarts (0: none)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    floor = rss_mib()[0]

    # 45,000 old names in orders of 15, effective over the last two years: enforced by the ISP.
    base = [f"site{i:05d}.example" for i in range(args.names)]
    old = [
        order(f"old-{k}", base[k : k + 15], T0 - dt.timedelta(days=730 - k // 60))
        for k in range(0, len(base), 15)
    ]
    # One ticket every 15 minutes; odd ones are published when they take effect.
    end = T0 + dt.timedelta(hours=args.hours)
    tickets: list[Ticket] = []
    for k in range(int(args.hours * 4)):
        effective = T0 + dt.timedelta(minutes=15 * k, seconds=rng.randrange(1, 900))
        names = [f"t{k}-{j}.example" for j in range(rng.randint(1, 30))]
        lag = dt.timedelta(minutes=rng.uniform(5, 40))
        tickets.append(Ticket(order(f"ticket-{k}", names, effective), effective, k % 2 == 1, effective + lag))
    ahead = [tk.order for tk in tickets if not tk.late]
    lists = Lists(tuple(old + ahead), (), ("bench",))
    index = OrderIndex(lists)  # the daemon's own, for the engine's expectations: shared
    after_lists = rss_mib()[0]

    isp = Resolver(
        "isp",
        "isp",
        "tim",
        tuple(
            Endpoint(t, "127.0.0.1", p, qps=QPS)
            for t, p in ((Transport.UDP, 53), (Transport.TCP, 53), (Transport.DOT, 853))
        ),
    )
    public = Resolver(
        "public",
        "public",
        "cloudflare",
        tuple(
            Endpoint(t, "127.0.0.2", p, qps=QPS)
            for t, p in ((Transport.UDP, 53), (Transport.DOT, 853), (Transport.DOH, 443))
        ),
    )
    resolvers = (isp, public)
    settings = Settings(chase=args.chase * 3600)
    print(budget(len(lists.query_names()), QTYPES, resolvers, QPS, settings))
    assert check(len(lists.query_names()), QTYPES, resolvers, QPS, settings) == []

    def start(lists: Lists, index: OrderIndex, now: dt.datetime) -> Scheduler:
        return Scheduler(
            lists,
            country="IT",
            resolvers=resolvers,
            qtypes=QTYPES,
            now=now,
            qps=QPS,
            settings=settings,
            expectations=index,
        )

    tracemalloc.start()
    cpu0 = time.process_time()
    sched = start(lists, index, T0)
    build_cpu = time.process_time() - cpu0
    own_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    after_sched = rss_mib()[0]

    enforce_at = {p.name: tk.enforced for tk in tickets for p in tk.order.domains}
    effective_of = {p.name: (tk.effective, tk.order.id) for tk in tickets for p in tk.order.domains}
    lanes = [(r, ep) for r in resolvers for ep in r.endpoints]
    keys = {(r.name, str(ep)): k for k, (r, ep) in enumerate(lanes)}
    slots: dict[str, int] = {}
    cap = args.names + 30 * len(tickets)
    last = array("d", [T0.timestamp()]) * (cap * len(lanes))
    worst = array("d", [0.0]) * (cap * len(lanes))
    first: dict[tuple[str, int], float] = {}  # (ticket name, lane) -> delay from effective
    arrived: dict[str, float] = {}  # late ticket name -> when the probe's poll brought it
    from_arrival: list[float] = []
    fast_gaps: list[float] = []
    fast_prev: dict[tuple[str, int], float] = {}
    old_public = 0  # measurements of old names (all leaking) on the public resolver's endpoints
    calls, call_cpu, call_max, upd_cpu, index_cpu, queries = 0, 0.0, 0.0, 0.0, 0.0, 0
    late_pending = [tk for tk in tickets if tk.late]
    known = list(old + ahead)
    next_poll = T0 + POLL
    restart_every = dt.timedelta(minutes=args.restart_every) if args.restart_every > 0 else None
    next_restart = T0 + restart_every if restart_every else end
    restarts = 0
    now = T0
    while now < end:
        if now >= next_restart:
            assert restart_every is not None
            c = time.process_time()
            current = Lists(tuple(known), (), ("bench",))
            sched = start(current, OrderIndex(current), now)
            upd_cpu += time.process_time() - c
            restarts += 1
            next_restart += restart_every
        if now >= next_poll:  # the collector's lists, polled every 60 s
            fresh = [tk.order for tk in late_pending if tk.effective <= now]
            if fresh:
                late_pending = late_pending[len(fresh) :]
                arrived.update({p.name: now.timestamp() for o in fresh for p in o.domains})
                known += fresh
                new = Lists(tuple(known), (), ("bench",))
                c = time.process_time()
                index = OrderIndex(new)
                index_cpu += time.process_time() - c
                c = time.process_time()
                sched.update_lists(new, now, index)
                upd_cpu += time.process_time() - c
            next_poll += POLL
        stop = min(now + dt.timedelta(seconds=args.slice), next_poll, next_restart)
        change = sched.next_change(now)
        if change is not None and now < change < stop:
            stop = change
        span = (stop - now).total_seconds()
        c = time.process_time()
        batch = sched.next_batch(now, span)
        spent = time.process_time() - c
        t = now.timestamp()
        place = [0] * len(lanes)
        results = []
        for name, r, ep in batch:
            k = keys[(r.name, str(ep))]
            at = t + place[k] * len(QTYPES) / QPS  # drained at qps within the slice
            place[k] += 1
            s = slots.setdefault(name, len(slots))
            j = s * len(lanes) + k
            worst[j] = max(worst[j], at - last[j])
            last[j] = at
            if name in effective_of:
                eff, _ = effective_of[name]
                eff_t = eff.timestamp()
                if at >= eff_t and (name, k) not in first:
                    first[(name, k)] = at - eff_t
                    if name in arrived:
                        from_arrival.append(at - arrived[name])
                if r is public and at >= eff_t:
                    if (name, k) in fast_prev and at - eff_t < 12 * 3600:
                        fast_gaps.append(at - fast_prev[(name, k)])
                    fast_prev[(name, k)] = at
                enforced = r is isp and now >= enforce_at[name]
            else:
                enforced = r is isp
                old_public += r is public
            finding = Finding.ENFORCED if enforced else Finding.LEAK
            results += [R(name, q, r.name, str(ep), finding) for q in QTYPES]
        queries += len(results)
        c = time.process_time()
        sched.record(now, results)
        spent += time.process_time() - c
        calls += 1
        call_cpu += spent
        call_max = max(call_max, spent)
        now = stop

    horizon = end.timestamp()
    pairs = len(slots) * len(lanes)
    base_gaps = []
    for s in range(args.names):
        for k in range(len(lanes)):
            j = s * len(lanes) + k
            base_gaps.append(max(worst[j], horizon - last[j]))
    full = settings.full_pass
    covered = sum(1 for g in base_gaps if g <= full)
    delays = sorted(first.values())
    expected_pairs = sum(len(tk.order.domains) for tk in tickets if tk.effective < end) * len(lanes)
    ahead_delays = sorted(v for (n, _), v in first.items() if effective_of[n][1] in {o.id for o in ahead})
    late_delays = sorted(v for (n, _), v in first.items() if effective_of[n][1] not in {o.id for o in ahead})
    status = sched.status(end)
    _, peak = rss_mib()
    print(
        f"\nsimulated {args.hours:g} h in slices of {args.slice:g} s: {calls} calls, {queries} queries planned"
    )
    print(
        f"coverage: {covered}/{len(base_gaps)} old name × endpoint pairs measured within every {format_span(full)} "
        f"({covered / len(base_gaps):.2%}); longest gap {format_span(max(base_gaps))}, "
        f"median {format_span(statistics.median(base_gaps))}"
    )
    print(
        f"tickets: {len(tickets)}, {expected_pairs} name × endpoint pairs, {len(first)} measured after effective"
    )
    print(
        f"  known ahead: delay effective → first measurement: max {ahead_delays[-1]:.1f} s, "
        f"p99 {ahead_delays[int(len(ahead_delays) * 0.99)]:.1f} s, median {statistics.median(ahead_delays):.1f} s"
    )
    print(
        f"  published at effective (60 s poll): max {format_span(late_delays[-1])}, "
        f"median {format_span(statistics.median(late_delays))}; from the poll that brought them: "
        f"max {max(from_arrival):.1f} s"
    )
    print(f"  overall worst delay: {delays[-1]:.1f} s")
    print(
        f"fast lane on the public resolver (never enforces): gap between measurements of a leaking ticket "
        f"name in its first 12 h: median {statistics.median(fast_gaps):.0f} s, max {format_span(max(fast_gaps))}"
    )
    per_name = old_public / (args.names * len(public.endpoints))
    print(
        f"old names leaking on the public resolver: measured {per_name:.1f} times each per endpoint "
        f"(every {format_span(args.hours * 3600 / per_name)} on average; the rotation alone: "
        f"every {format_span(settings.pace * settings.full_pass)})"
    )
    if restarts:
        print(f"restarts: {restarts}, every {format_span(args.restart_every * 60)}")
    print(
        f"lanes at the end: behind {max(s.behind for s in status):.0f} s at most, passes {[s.passes for s in status]}, "
        f"urgent names {[s.urgent for s in status]}"
    )
    print(
        f"CPU: scheduler build {build_cpu:.2f} s; next_batch+record {call_cpu:.2f} s for the run "
        f"({call_cpu / (args.hours * 3600):.4%} of one core), {call_cpu / calls * 1000:.2f} ms a call on average, "
        f"worst {call_max * 1000:.1f} ms; update_lists {upd_cpu:.2f} s in total (the daemon's index rebuilds: {index_cpu:.2f} s)"
    )
    print(
        f"memory: interpreter floor {floor:.0f} MiB; +lists and their index {after_lists - floor:.0f} MiB; "
        f"+scheduler {after_sched - after_lists:.0f} MiB (tracemalloc: {own_bytes / 2**20:.1f} MiB); "
        f"peak RSS {peak:.0f} MiB (harness included: {pairs} pair records); "
        f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
