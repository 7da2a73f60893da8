"""Lists files: one invalid file per kind of mistake, compared with the exact message."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from probe.lists import ListsError, Pattern, import_plain, load_lists, parse_lists

HERE = Path(__file__).parent / "lists"

INVALID = {
    "invalid-jurisdiction.yaml": ["orders[0].jurisdictions[0]: 'ITA' is not an ISO 3166-1 alpha-2 code"],
    "invalid-date.yaml": ["orders[0].effective: '2026-13-45' is not a date (YYYY-MM-DD)"],
    "invalid-expiry-before-effective.yaml": [
        "orders[0].expires: 2026-04-01 is not after effective 2026-05-01"
    ],
    "invalid-duplicate-id.yaml": ["orders[1].id: 'x' is already the id of orders[0]"],
    "invalid-unknown-key.yaml": [
        "orders[0].jurisdiction: unknown key (one of applies_to, authority, domains, effective, expires, id, jurisdictions, note, url)"
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
        Pattern("pirate.example", False), Pattern("pirate.example", True), Pattern("xn--bcher-pirat-thb.example", False)
    )  # fmt: skip
    assert agcom.jurisdictions == {"IT"} and agcom.applies_to == {"isp", "cloudflare"}
    assert lists.orders[2].applies_to == {"isp", "google", "cloudflare", "opendns"}


def test_duplicate_ids_across_files_are_rejected(tmp_path: Path) -> None:
    other = tmp_path / "again.yaml"
    other.write_text((HERE / "good-fr.yaml").read_text())
    with pytest.raises(ListsError) as info:
        load_lists([HERE / "good-fr.yaml", other])
    assert info.value.errors == [f"{other}: id 'arcom-sport-12' is also defined in {HERE / 'good-fr.yaml'}"]


def test_plain_and_csv_imports() -> None:
    assert import_plain("# Piracy Shield batch\nPirate.Example.\n*.calcio.example # all of it\n\n") == [
        "pirate.example", "*.calcio.example"]  # fmt: skip
    assert import_plain("ticket,domain,ip\n1,a.example,192.0.2.1\n2,B.example,\n") == [
        "a.example",
        "b.example",
    ]
    with pytest.raises(ListsError) as info:
        import_plain("good.example\nbad name\n", "batch.txt")
    assert info.value.errors == ["batch.txt: line 2: 'bad name' is not a domain name"]


def test_fifty_thousand_names_load_quickly() -> None:
    """Recorded for bench/README.md; asserts correctness only (speed is a benchmark matter)."""
    text = "orders:\n  - id: big\n    authority: A\n    jurisdictions: [IT]\n    domains:\n"
    text += "".join(f"      - n{i}.pirate-{i % 97}.example\n" for i in range(50_000))
    t0 = time.perf_counter()
    lists = parse_lists(text)
    _elapsed = time.perf_counter() - t0
    assert len(lists.orders[0].domains) == 50_000
