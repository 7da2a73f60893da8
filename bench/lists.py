"""Loading a Piracy-Shield-sized lists file: parse and validate, index, look every name up.

    python -m bench.lists [--names 50000] [--rounds 5]

The reference, in the same run: PyYAML's C loader (`yaml.load` with `CSafeLoader`) on the
same text, which reads the YAML and validates nothing. Reported as medians of the rounds,
and as ratios to that reference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable

import yaml

from probe.expect import OrderIndex
from probe.lists import parse_lists


def lists_text(names: int) -> str:
    """One order of `names` names, the shape `probe lists import` writes."""
    head = "orders:\n  - id: big\n    authority: A\n    jurisdictions: [IT]\n    domains:\n"
    return head + "".join(f"      - n{i}.pirate-{i % 97}.example\n" for i in range(names))


def _median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    text = lists_text(args.names)
    lists = parse_lists(text)
    index = OrderIndex(lists)
    names = [p.name for p in lists.orders[0].domains]
    when = dt.datetime.now(dt.UTC)

    def lookups() -> None:
        for name in names:
            index.expect("IT", "isp", None, name, when)

    reference = _median_seconds(lambda: yaml.load(text, Loader=yaml.CSafeLoader), args.rounds)
    rows = [
        ("reference: PyYAML's C loader, no validation", reference),
        ("parse and validate (parse_lists)", _median_seconds(lambda: parse_lists(text), args.rounds)),
        ("index (OrderIndex)", _median_seconds(lambda: OrderIndex(lists), args.rounds)),
        (f"{len(names):,} expectation lookups", _median_seconds(lookups, args.rounds)),
    ]
    print(f"{args.names:,} names, median of {args.rounds} rounds")
    print("| step | seconds | ÷ reference |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {seconds / reference:.2f}x |")


if __name__ == "__main__":
    main()
