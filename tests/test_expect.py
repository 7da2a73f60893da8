"""The expectation engine, as a table of data (docs/lists.md)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from probe.expect import OrderIndex
from probe.lists import load_lists
from probe.model import Expectation

HERE = Path(__file__).parent / "lists"
B, R, N = Expectation.BLOCKED, Expectation.RESOLVES, None
MID_2026 = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def engine() -> OrderIndex:
    return OrderIndex(load_lists([HERE / "good-it.yaml", HERE / "good-fr.yaml"]))


# country, kind, operator, name, when, expected, the reason's key facts
TABLE = [
    ("in jurisdiction, isp", "IT", "isp", None, "pirate.example", MID_2026, B, {"order": "agcom-2026-0042"}),
    ("out of jurisdiction", "FR", "isp", None, "pirate.example", MID_2026, R, {"order": "agcom-2026-0042"}),
    (
        "applies_to operator",
        "IT",
        "public",
        "cloudflare",
        "pirate.example",
        MID_2026,
        B,
        {"order": "agcom-2026-0042"},
    ),
    (
        "not addressed",
        "IT",
        "public",
        "google",
        "pirate.example",
        MID_2026,
        R,
        {"reason": "the order does not address google resolvers"},
    ),
    (
        "system not addressed",
        "IT",
        "system",
        None,
        "pirate.example",
        MID_2026,
        R,
        {"order": "agcom-2026-0042"},
    ),
    (
        "before effective",
        "IT",
        "isp",
        None,
        "pirate.example",
        dt.datetime(2026, 1, 14, 23, 59, tzinfo=dt.UTC),
        R,
        {"reason": "the order is not in force at this time"},
    ),
    (
        "from 00:00 UTC on effective",
        "IT",
        "isp",
        None,
        "pirate.example",
        dt.datetime(2026, 1, 15, tzinfo=dt.UTC),
        B,
        {},
    ),
    (
        "until 00:00 UTC on expires",
        "IT",
        "isp",
        None,
        "pirate.example",
        dt.datetime(2027, 1, 14, 23, 59, 59, tzinfo=dt.UTC),
        B,
        {},
    ),
    ("at expiry", "IT", "isp", None, "pirate.example", dt.datetime(2027, 1, 15, tzinfo=dt.UTC), R, {}),
    ("wildcard below", "IT", "isp", None, "www.pirate.example", MID_2026, B, {"pattern": "*.pirate.example"}),
    ("wildcard is strictly below", "IT", "isp", None, "calcio.example", MID_2026, N, {}),
    (
        "exact wins as the reason",
        "IT",
        "isp",
        None,
        "stream.calcio.example",
        MID_2026,
        B,
        {"pattern": "stream.calcio.example", "orders": ["piracy-shield-77"]},
    ),
    (
        "two authorities, one binds here",
        "FR",
        "public",
        "google",
        "live.calcio.example",
        MID_2026,
        B,
        {"order": "arcom-sport-12"},
    ),
    (
        "two authorities, both listed",
        "SM",
        "isp",
        None,
        "live.calcio.example",
        MID_2026,
        B,
        {"orders": ["piracy-shield-77"]},
    ),
    (
        "FR order not yet in force",
        "FR",
        "isp",
        None,
        "live.calcio.example",
        dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
        R,
        {},
    ),
    ("IDN name", "IT", "isp", None, "xn--bcher-pirat-thb.example", MID_2026, B, {}),
    ("control name", "IT", "isp", None, "wikipedia.org", MID_2026, R, {"list": "controls"}),
    (
        "control name inside an order's wildcard: the order binds",
        "IT",
        "isp",
        None,
        "ok.pirate.example",
        MID_2026,
        B,
        {"order": "agcom-2026-0042"},
    ),
    (
        "control name inside an order's wildcard, elsewhere",
        "DE",
        "isp",
        None,
        "ok.pirate.example",
        MID_2026,
        R,
        {"list": "controls"},
    ),
    ("unlisted name", "IT", "isp", None, "example.org", MID_2026, N, {}),
    ("lower-case country", "it", "isp", None, "pirate.example", MID_2026, B, {}),
]


@pytest.mark.parametrize(
    ("country", "kind", "operator", "name", "when", "expected", "why"),
    [pytest.param(*t[1:], id=t[0]) for t in TABLE],
)
def test_expectation_table(
    engine: OrderIndex,
    country: str,
    kind: str,
    operator: str | None,
    name: str,
    when: dt.datetime,
    expected: Expectation | None,
    why: dict[str, object],
) -> None:
    got, reason = engine.expect(country, kind, operator, name, when)
    assert got is expected, reason
    for key, value in why.items():
        assert reason is not None, key
        assert reason[key] == value, reason


@pytest.fixture(scope="module")
def timed() -> OrderIndex:
    return OrderIndex(load_lists([HERE / "good-times.yaml"]))


ROME = dt.timezone(dt.timedelta(hours=1))
# name, when, expected, the reason's key facts: orders that bind from an instant (good-times.yaml)
TIMED = [
    (
        "a second before the instant",
        "live-calcio.example",
        dt.datetime(2026, 12, 1, 13, 4, 59, tzinfo=dt.UTC),
        R,
        {"reason": "the order is not in force at this time"},
    ),
    (
        "from the instant",
        "live-calcio.example",
        dt.datetime(2026, 12, 1, 13, 5, tzinfo=dt.UTC),
        B,
        {"order": "ps-2026-118", "effective": "2026-12-01T13:05:00Z", "due": "2026-12-01T13:35:00Z"},
    ),
    (
        "the same instant in Rome's offset",
        "live-calcio.example",
        dt.datetime(2026, 12, 1, 14, 5, tzinfo=ROME),
        B,
        {},
    ),
    (
        "a second before, in Rome's offset",
        "live-calcio.example",
        dt.datetime(2026, 12, 1, 14, 4, 59, tzinfo=ROME),
        R,
        {},
    ),
    (
        "a fraction of a second matters",
        "replay-calcio.example",
        dt.datetime(2026, 12, 1, 13, 10, 0, 249_999, tzinfo=dt.UTC),
        R,
        {},
    ),
    (
        "from the fractional instant",
        "replay-calcio.example",
        dt.datetime(2026, 12, 1, 13, 10, 0, 250_000, tzinfo=dt.UTC),
        B,
        {"effective": "2026-12-01T13:10:00.250000Z", "due": "2026-12-02T13:10:00.250000Z"},
    ),
    (
        "just before a timestamped expiry",
        "replay-calcio.example",
        dt.datetime(2026, 12, 3, 6, 59, 59, 999_999, tzinfo=dt.UTC),
        B,
        {},
    ),
    (
        "at a timestamped expiry (-05:00 in the file)",
        "replay-calcio.example",
        dt.datetime(2026, 12, 3, 7, tzinfo=dt.UTC),
        R,
        {},
    ),
    (
        "a date binds from 00:00 UTC, whatever the caller's offset",
        "www.old-calcio.example",
        dt.datetime(2026, 12, 1, 0, 30, tzinfo=ROME),
        R,
        {},
    ),
    (
        "a date, then a deadline in days",
        "www.old-calcio.example",
        dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        B,
        {"order": "agcom-2026-0099", "effective": "2026-12-01", "due": "2026-12-03"},
    ),
]


@pytest.mark.parametrize(("name", "when", "expected", "why"), [pytest.param(*t[1:], id=t[0]) for t in TIMED])
def test_orders_bind_from_instants(
    timed: OrderIndex,
    name: str,
    when: dt.datetime,
    expected: Expectation | None,
    why: dict[str, object],
) -> None:
    got, reason = timed.expect("IT", "isp", None, name, when)
    assert got is expected, reason
    for key, value in why.items():
        assert reason is not None, key
        assert reason[key] == value, reason


def test_no_due_without_a_deadline(engine: OrderIndex) -> None:
    _, reason = engine.expect("IT", "isp", None, "pirate.example", MID_2026)
    assert reason is not None
    assert "due" not in reason
    assert reason["effective"] == "2026-01-15"  # the compliance report counts time to enforce from it


def test_no_effective_without_one(engine: OrderIndex) -> None:
    _, reason = engine.expect("IT", "isp", None, "stream.calcio.example", MID_2026)
    assert reason is not None
    assert reason["order"] == "piracy-shield-77"
    assert "effective" not in reason


def test_a_naive_time_is_refused(timed: OrderIndex) -> None:
    """Read as the host's local time it would move every order by the host's offset."""
    with pytest.raises(ValueError, match="aware"):
        timed.expect("IT", "isp", None, "live-calcio.example", dt.datetime(2026, 12, 1, 13, 5))  # noqa: DTZ001 - naive on purpose
