"""Lists files: one invalid file per kind of mistake, compared with the exact message."""

from __future__ import annotations

import datetime as dt
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from probe.cli import cli
from probe.lists import (
    ListsError,
    Pattern,
    import_plain,
    load_lists,
    parse_duration,
    parse_instant,
    parse_lists,
)

HERE = Path(__file__).parent / "lists"

INVALID = {
    "invalid-jurisdiction.yaml": ["orders[0].jurisdictions[0]: 'ITA' is not an ISO 3166-1 alpha-2 code"],
    "invalid-date.yaml": ["orders[0].effective: '2026-13-45' is not a date (YYYY-MM-DD)"],
    "invalid-expiry-before-effective.yaml": [
        "orders[0].expires: 2026-04-01 is not after effective 2026-05-01"
    ],
    "invalid-duplicate-id.yaml": ["orders[1].id: 'x' is already the id of orders[0]"],
    "invalid-unknown-key.yaml": [
        "orders[0].jurisdiction: unknown key (one of applies_to, authority, deadline, domains, effective, expires, id, jurisdictions, note, url)"
    ],
    "invalid-name.yaml": [
        "orders[0].domains[0]: 'bad name.example' is not a domain name or *.name pattern",
        "orders[0].domains[2]: 'a.*.example': a wildcard may only be a leading '*.'",
    ],
    "invalid-empty-domains.yaml": ["orders[0].domains: must be a non-empty list of names"],
    "invalid-applies-to.yaml": ["orders[0].applies_to[0]: 'ISP' is not a resolver kind or operator name"],
    "invalid-yaml.yaml": ["line 5: did not find expected ',' or ']'"],  # libyaml's wording
    "invalid-many.yaml": [
        "extra: unknown key (one of controls, orders)",
        "orders[0].id: 'a b' is not an id (letters, digits, '.', '_', ':', '-'; up to 128)",
        "orders[0].authority: must be a non-empty text",
        "orders[0].jurisdictions[0]: 'XX' is not an ISO 3166-1 alpha-2 code",
        "controls[0].id: None is not an id (letters, digits, '.', '_', ':', '-'; up to 128)",
    ],
    "invalid-times.yaml": [
        "orders[0].effective: '2026-12-01T14:05:00' has no UTC offset (Z or ±HH:MM): a local time is ambiguous",
        "orders[1].effective: '2026-12-01T25:00:00Z' is not an RFC 3339 time: a field is out of range",
        "orders[1].expires: '2026-12-01T10:00:00+24:00' is not an RFC 3339 time: the offset is out of range",
        "orders[2].effective: '1 December 2026' is not a date (YYYY-MM-DD) or an RFC 3339 time (2026-12-01T14:05:00+01:00)",
        "orders[2].expires: 20261201 is not a date (YYYY-MM-DD) or an RFC 3339 time (2026-12-01T14:05:00+01:00)",
        "orders[3].expires: 2026-12-01T13:00:00Z is not after effective 2026-12-01T13:00:00Z",
    ],
    "invalid-deadline.yaml": [
        "orders[0].deadline: 30 is not a duration (a whole number and s, m, h or d: 30m, 24h)",
        "orders[1].deadline: '1h30m' is not a duration (a whole number and s, m, h or d: 30m, 24h)",
        "orders[2].deadline: '0m' is no time to enforce: a deadline must be longer than zero",
        "orders[3].deadline: needs effective, the instant the time to enforce counts from",
        "orders[4].deadline: 2d after effective is 2026-12-03T12:00:00Z, after the order expires (2026-12-02)",
    ],
    "invalid-alias-bomb.yaml": ["line 3: YAML aliases are not allowed in lists files"],
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_each_mistake_is_named_exactly(name: str) -> None:
    path = HERE / name
    with pytest.raises(ListsError) as info:
        load_lists([path])
    assert info.value.errors == [f"{path}: {e}" for e in INVALID[name]]


def test_good_files_load_and_normalise() -> None:
    lists = load_lists([HERE / "good-it.yaml", HERE / "good-fr.yaml"])
    assert [o.id for o in lists.orders] == ["agcom-2026-0042", "piracy-shield-77", "arcom-sport-12"]
    agcom = lists.orders[0]
    assert agcom.domains == (
        Pattern("pirate.example", False),
        Pattern("pirate.example", True),
        Pattern("xn--bcher-pirat-thb.example", False),
    )
    assert agcom.jurisdictions == {"IT"}
    assert agcom.applies_to == {"isp", "cloudflare"}
    assert lists.orders[2].applies_to == {"isp", "google", "cloudflare", "opendns"}


def test_duplicate_ids_across_files_are_rejected(tmp_path: Path) -> None:
    other = tmp_path / "again.yaml"
    other.write_text((HERE / "good-fr.yaml").read_text())
    with pytest.raises(ListsError) as info:
        load_lists([HERE / "good-fr.yaml", other])
    assert info.value.errors == [f"{other}: id 'arcom-sport-12' is also defined in {HERE / 'good-fr.yaml'}"]


def test_plain_and_csv_imports() -> None:
    assert import_plain("# Piracy Shield batch\nPirate.Example.\n*.calcio.example # all of it\n\n") == [
        "pirate.example",
        "*.calcio.example",
    ]
    assert import_plain("ticket,domain,ip\n1,a.example,192.0.2.1\n2,B.example,\n") == [
        "a.example",
        "b.example",
    ]
    with pytest.raises(ListsError) as info:
        import_plain("good.example\nbad name\n", "batch.txt")
    assert info.value.errors == ["batch.txt: line 2: 'bad name' is not a domain name"]


def test_fifty_thousand_names_load_whole() -> None:
    """Correctness only: how fast they load is measured in bench/, not asserted here."""
    text = "orders:\n  - id: big\n    authority: A\n    jurisdictions: [IT]\n    domains:\n"
    text += "".join(f"      - n{i}.pirate-{i % 97}.example\n" for i in range(50_000))
    lists = parse_lists(text)
    assert len(lists.orders[0].domains) == 50_000
    names = [p.name for p in lists.orders[0].domains]
    assert (names[0], names[-1]) == ("n0.pirate-0.example", "n49999.pirate-44.example")
    assert len(set(names)) == 50_000


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, us, tzinfo=dt.UTC)


def test_dates_are_midnight_utc_and_old_files_stay_valid() -> None:
    agcom = load_lists([HERE / "good-it.yaml"]).orders[0]
    assert (agcom.effective, agcom.expires, agcom.deadline, agcom.due) == (
        utc(2026, 1, 15),
        utc(2027, 1, 15),
        None,
        None,
    )


def test_timestamps_with_any_offset_and_deadlines() -> None:
    ps118, ps119, agcom = load_lists([HERE / "good-times.yaml"]).orders
    assert ps118.effective == utc(2026, 12, 1, 13, 5)
    assert ps118.effective.tzinfo is dt.UTC
    assert ps118.deadline == dt.timedelta(minutes=30)
    assert ps118.due == utc(2026, 12, 1, 13, 35)
    assert ps119.effective == utc(2026, 12, 1, 13, 10, 0, 250_000)
    assert ps119.expires == utc(2026, 12, 3, 7)
    assert ps119.due == utc(2026, 12, 2, 13, 10, 0, 250_000)
    assert agcom.effective == utc(2026, 12, 1)
    assert agcom.due == utc(2026, 12, 3)
    assert agcom.expires == utc(2026, 12, 31, 23)


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2026-12-01", utc(2026, 12, 1)),
        ("2026-12-01T14:05:00+01:00", utc(2026, 12, 1, 13, 5)),
        ("2026-12-01T00:30:00-05:30", utc(2026, 12, 1, 6)),
        ("2026-12-01T13:05:00-00:00", utc(2026, 12, 1, 13, 5)),  # RFC 3339: UTC, local offset unknown
        ("2026-12-01T13:05:00.1234567Z", utc(2026, 12, 1, 13, 5, 0, 123_456)),
        ("2026-12-31T23:30:00-01:00", utc(2027, 1, 1, 0, 30)),
    ],
)
def test_instants(text: str, instant: dt.datetime) -> None:
    assert parse_instant(text) == instant


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("90s", dt.timedelta(seconds=90)),
        ("30m", dt.timedelta(minutes=30)),
        ("24h", dt.timedelta(days=1)),
        ("7d", dt.timedelta(days=7)),
    ],
)
def test_durations(text: str, span: dt.timedelta) -> None:
    assert parse_duration(text) == span


def test_a_deadline_counts_from_the_instant_not_the_day() -> None:
    text = (
        "orders: [{id: a, authority: A, jurisdictions: [IT], effective: '2026-12-01T23:50:00+02:00', "
        "expires: '2026-12-01T22:20:00Z', deadline: 30m, domains: [a.example]}]"
    )
    order = parse_lists(text).orders[0]
    assert order.due == utc(2026, 12, 1, 22, 20) == order.expires  # due exactly at expiry is allowed


def test_an_alias_bomb_is_refused_in_bounded_memory_without_echoing_it() -> None:
    """728 bytes that expand to 9^9 names: refused from the node graph, before any expansion."""
    path = HERE / "invalid-alias-bomb.yaml"
    assert path.stat().st_size == 728
    tracemalloc.start()
    try:
        with pytest.raises(ListsError) as info:
            load_lists([path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak  # following the aliases would need gigabytes
    assert info.value.errors == [f"{path}: line 3: YAML aliases are not allowed in lists files"]
    result = CliRunner().invoke(cli, ["lists", "check", str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"probe: {path}: line 3: YAML aliases are not allowed in lists files\n"


def test_one_alias_is_refused_too_and_anchors_alone_are_fine() -> None:
    head = "orders: [{id: a, authority: A, jurisdictions: &j [IT], domains: [a.example]}"
    with pytest.raises(ListsError) as info:
        parse_lists(head + ", {id: b, authority: B, jurisdictions: *j, domains: [b.example]}]", "x.yaml")
    assert info.value.errors == ["x.yaml: line 1: YAML aliases are not allowed in lists files"]
    assert parse_lists(head + "]").orders[0].jurisdictions == {"IT"}


def test_messages_never_echo_a_huge_value() -> None:
    huge = "[" + ", ".join(f"n{i}.example" for i in range(10_000)) + "]"
    with pytest.raises(ListsError) as info:
        parse_lists(f"orders: [{{id: a, authority: A, jurisdictions: [IT], domains: [{huge}]}}]", "x.yaml")
    (message,) = info.value.errors
    assert message.startswith("x.yaml: orders[0].domains[0]: ['n0.example', ")
    assert message.endswith(" is not a name")
    assert len(message) < 120


def test_import_sets_times_and_deadlines(tmp_path: Path) -> None:
    names = tmp_path / "ticket.txt"
    names.write_text("live-calcio.example\n")
    args = ["lists", "import", "--id", "ps-1", "--authority", "PS", "--jurisdiction", "IT", str(names)]
    ok = CliRunner().invoke(cli, [*args, "--effective", "2026-12-01T14:05:00+01:00", "--deadline", "30m"])
    assert ok.exit_code == 0, ok.stderr
    order = parse_lists(ok.stdout).orders[0]
    assert order.due == utc(2026, 12, 1, 13, 35)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    now = CliRunner().invoke(cli, [*args, "--effective", "now", "--deadline", "24h"])
    effective = parse_lists(now.stdout).orders[0].effective
    assert effective is not None
    assert before <= effective <= dt.datetime.now(dt.UTC)
    bad = CliRunner().invoke(cli, [*args, "--effective", "2026-12-01T14:05", "--deadline", "30"])
    assert bad.exit_code == 2
    assert bad.stderr.splitlines() == [
        "probe: --effective: '2026-12-01T14:05' is not a date (YYYY-MM-DD) or an RFC 3339 time (2026-12-01T14:05:00+01:00)",
        "probe: --deadline: '30' is not a duration (a whole number and s, m, h or d: 30m, 24h)",
    ]
    alone = CliRunner().invoke(cli, [*args, "--deadline", "30m"])
    assert (alone.exit_code, alone.stderr) == (
        2,
        "probe: --deadline needs --effective: the time to enforce counts from it\n",
    )


def test_lists_check_shows_instants_and_deadlines() -> None:
    result = CliRunner().invoke(cli, ["lists", "check", str(HERE / "good-times.yaml")])
    assert result.exit_code == 0
    assert (
        "  ps-2026-118: Piracy Shield, IT, applies to isp, public, 2026-12-01T13:05:00Z to …, enforce within 30m, 1 patterns"
        in result.stdout.splitlines()
    )


def test_names_of_one_order_and_the_next_change() -> None:
    """What a scheduler needs: an order's own names, and when expectations next change."""
    lists = load_lists([HERE / "good-it.yaml", HERE / "good-times.yaml"])
    by_id = {o.id: o for o in lists.orders}
    assert lists.names_of(by_id["ps-2026-118"]) == ["live-calcio.example"]
    # Its exact names, and the control name that its wildcard covers.
    assert lists.names_of(by_id["agcom-2026-0042"]) == [
        "pirate.example",
        "xn--bcher-pirat-thb.example",
        "ok.pirate.example",
    ]
    assert lists.names_of(by_id["agcom-2026-0099"]) == ["www.old-calcio.example"]
    assert lists.next_change(utc(2026, 12, 1, 13, 0)) == utc(2026, 12, 1, 13, 5)  # ps-2026-118 binds
    assert lists.next_change(utc(2026, 12, 1, 13, 5)) == utc(2026, 12, 1, 13, 10, 0, 250_000)
    assert lists.next_change(utc(2026, 12, 1, 13, 10, 1)) == utc(2026, 12, 1, 13, 35)  # ps-2026-118 falls due
    assert lists.next_change(utc(2027, 1, 15)) is None
