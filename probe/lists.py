"""Lists files (docs/lists.md): court orders and control lists, loaded strictly.

A file is rejected whole on any mistake, and every mistake is reported at once, each
with the file, the entry and the key: `it.yaml: orders[3].jurisdictions[0]: 'ITA' is
not an ISO 3166-1 alpha-2 code`. Names are normalised like everywhere else (IDNA
A-label, lower case, no trailing dot).

An order binds from `effective` until `expires`, each a date (00:00 UTC) or an RFC 3339
instant with any offset, kept here as aware UTC datetimes. `deadline` (`30m`, `24h`, s/m/h/d)
is the time allowed to enforce, counted from `effective`: Piracy Shield gives 30 minutes.

YAML aliases are refused: a lists file is data typed or exported by people, never needs
them, and a few hundred bytes of nested aliases expand to gigabytes (a "billion laughs").
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycountry
import yaml

from probe.errors import BlockprobeError, InputError
from probe.wire import normalize_name

__all__ = [
    "ControlList",
    "Lists",
    "ListsError",
    "Order",
    "Pattern",
    "format_duration",
    "format_instant",
    "import_plain",
    "load_lists",
    "parse_duration",
    "parse_instant",
    "parse_lists",
]

KINDS = ("isp", "public", "system")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ISO_ALPHA2 = frozenset(c.alpha_2 for c in pycountry.countries)
_ALPHA2 = ISO_ALPHA2
_ORDER_KEYS = frozenset(
    {
        "id",
        "authority",
        "jurisdictions",
        "applies_to",
        "effective",
        "expires",
        "deadline",
        "domains",
        "note",
        "url",
    }
)
_CONTROL_KEYS = frozenset({"id", "domains", "note"})
_TOP_KEYS = frozenset({"orders", "controls"})


class ListsError(BlockprobeError):
    """A lists file is wrong; `errors` holds every mistake, each naming where it is."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True, slots=True)
class Pattern:
    """`name` matches the name itself; `*.name` (wildcard) every name strictly below it."""

    name: str
    wildcard: bool

    def __str__(self) -> str:
        return f"*.{self.name}" if self.wildcard else self.name


@dataclass(frozen=True, slots=True)
class Order:
    """One order. `effective` and `expires` are aware UTC instants (a date in the file is
    00:00 UTC); `deadline` is the time allowed to enforce, counted from `effective`."""

    id: str
    authority: str
    jurisdictions: frozenset[str]
    applies_to: frozenset[str]
    effective: dt.datetime | None
    expires: dt.datetime | None
    domains: tuple[Pattern, ...]
    source: str = ""
    deadline: dt.timedelta | None = None

    @property
    def due(self) -> dt.datetime | None:
        """The instant by which enforcement is due, when the order sets a deadline."""
        if self.effective is None or self.deadline is None:
            return None
        return self.effective + self.deadline

    def binds_at(self, when: dt.datetime) -> bool:
        """From the instant `effective` (inclusive) until the instant `expires` (exclusive).
        A naive `when` is refused: read as local time it would move every order by hours."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("binds_at needs an aware datetime")
        if self.effective is not None and when < self.effective:
            return False
        return not (self.expires is not None and when >= self.expires)

    def addresses(self, kind: str, operator: str | None) -> bool:
        return kind in self.applies_to or (operator is not None and operator in self.applies_to)


@dataclass(frozen=True, slots=True)
class ControlList:
    id: str
    domains: tuple[Pattern, ...]
    source: str = ""


@dataclass(frozen=True)
class Lists:
    """Every order and control list in force, from one or more files."""

    orders: tuple[Order, ...] = ()
    controls: tuple[ControlList, ...] = ()
    sources: tuple[str, ...] = field(default=())

    def query_names(self) -> list[str]:
        """What to ask to test these lists: every exact name, and `www.` below each base that
        only a wildcard covers (`*.x` is about names strictly below x, not x itself)."""
        exact = [p.name for o in self.orders for p in o.domains if not p.wildcard]
        exact += [p.name for c in self.controls for p in c.domains if not p.wildcard]
        known = set(exact)
        below = [
            f"www.{p.name}" for o in self.orders for p in o.domains if p.wildcard and p.name not in known
        ]
        return list(dict.fromkeys(exact + below))

    def names_of(self, order: Order) -> list[str]:
        """The names of `query_names()` that test `order`: what a scheduler measures first
        when the order has just become binding or is due soon."""
        exact = {p.name for p in order.domains if not p.wildcard}
        bases = {p.name for p in order.domains if p.wildcard}
        out = []
        for name in self.query_names():
            labels = name.split(".")
            if name in exact or any(".".join(labels[i:]) in bases for i in range(1, len(labels))):
                out.append(name)
        return out

    def next_change(self, after: dt.datetime) -> dt.datetime | None:
        """The first instant strictly after `after` at which an order starts or stops binding (or
        falls due): when expectations change, so a scheduler knows when to look again."""
        instants = [
            t for o in self.orders for t in (o.effective, o.expires, o.due) if t is not None and t > after
        ]
        return min(instants, default=None)

    def summary(self) -> dict[str, Any]:
        juris = sorted({j for o in self.orders for j in o.jurisdictions})
        return {
            "files": list(self.sources),
            "orders": len(self.orders),
            "controls": len(self.controls),
            "patterns": sum(len(o.domains) for o in self.orders) + sum(len(c.domains) for c in self.controls),
            "names_to_query": len(self.query_names()),
            "jurisdictions": juris,
            "authorities": sorted({o.authority for o in self.orders}),
        }


def format_instant(when: dt.datetime) -> str:
    """An instant as people wrote it: a bare date for 00:00 UTC, else RFC 3339 in UTC."""
    when = when.astimezone(dt.UTC)
    if when.time() == dt.time(0):
        return when.date().isoformat()
    text = when.isoformat(timespec="microseconds" if when.microsecond else "seconds")
    return text.removesuffix("+00:00") + "Z"


def format_duration(span: dt.timedelta) -> str:
    """A deadline in the largest unit that states it exactly (`30m`, `24h` → `1d`)."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # C loader when built with libyaml
    """SafeLoader without implicit dates: we parse them ourselves, so that `2026-13-45`
    is reported with its path instead of escaping as PyYAML's bare ValueError."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # libyaml's C parser when PyYAML has it: a 50,000-name file parses in a fraction of the time


_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
# RFC 3339 section 5.6 date-time: seconds required, any fraction, `Z` or a numeric offset.
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))?"
)
_DURATION_RE = re.compile(r"([0-9]{1,7})([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TIME_HINT = "a date (YYYY-MM-DD) or an RFC 3339 time (2026-12-01T14:05:00+01:00)"


def _show(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short: a message must never echo a huge entry."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


def parse_instant(value: Any) -> dt.datetime:
    """A date (00:00 UTC) or an RFC 3339 time with an offset, as an aware UTC datetime;
    ValueError with the reason otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"is not {_TIME_HINT}")
    if _DATE_RE.fullmatch(value):
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError("is not a date (YYYY-MM-DD)") from None
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    m = _RFC3339_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"is not {_TIME_HINT}")
    year, month, day_, hour, minute, second = (int(g) for g in m.groups()[:6])
    if m[8] is None and m[9] is None:
        raise ValueError("has no UTC offset (Z or ±HH:MM): a local time is ambiguous")
    offset = dt.timedelta()
    if m[9] is not None:
        oh, om = int(m[10]), int(m[11])
        if oh > 23 or om > 59:
            raise ValueError("is not an RFC 3339 time: the offset is out of range")
        offset = (1 if m[9] == "+" else -1) * dt.timedelta(hours=oh, minutes=om)
    micro = int((m[7] or "0")[:6].ljust(6, "0"))
    try:
        local = dt.datetime(year, month, day_, hour, minute, second, micro, tzinfo=dt.timezone(offset))
        return local.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise ValueError("is not an RFC 3339 time: a field is out of range") from None


def parse_duration(value: Any) -> dt.timedelta:
    """`30m`, `24h`, `2d`, `90s`: a positive whole number and one unit; ValueError otherwise."""
    m = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError("is not a duration (a whole number and s, m, h or d: 30m, 24h)")
    if int(m[1]) == 0:
        raise ValueError("is no time to enforce: a deadline must be longer than zero")
    return dt.timedelta(seconds=int(m[1]) * _UNIT[m[2]])


def _instant(value: Any, where: str, errors: list[str]) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        errors.append(f"{where}: {_show(value)} {exc}")
        return None


def _patterns(value: Any, where: str, errors: list[str]) -> tuple[Pattern, ...]:
    if not isinstance(value, list) or not value:
        errors.append(f"{where}: must be a non-empty list of names")
        return ()
    out: list[Pattern] = []
    seen: set[Pattern] = set()
    for i, item in enumerate(value):
        if not isinstance(item, str):
            errors.append(f"{where}[{i}]: {_show(item)} is not a name")
            continue
        text = item.strip()
        wildcard = text.startswith("*.")
        try:
            name = normalize_name(text[2:] if wildcard else text)
        except InputError:
            errors.append(f"{where}[{i}]: {_show(item)} is not a domain name or *.name pattern")
            continue
        if "*" in name:
            errors.append(f"{where}[{i}]: {_show(item)}: a wildcard may only be a leading '*.'")
            continue
        p = Pattern(name, wildcard)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return tuple(out)


def _id(value: Any, where: str, errors: list[str]) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        errors.append(
            f"{where}: {_show(value)} is not an id (letters, digits, '.', '_', ':', '-'; up to 128)"
        )
        return ""
    return value


def _unknown(entry: dict[str, Any], allowed: frozenset[str], where: str, errors: list[str]) -> None:
    for key in entry:
        if key not in allowed:
            name = key if isinstance(key, str) and len(key) <= 60 else _show(key)
            errors.append(f"{where}.{name}: unknown key (one of {', '.join(sorted(allowed))})")


def _order(entry: Any, where: str, errors: list[str], source: str) -> Order | None:
    if not isinstance(entry, dict):
        errors.append(f"{where}: must be a mapping")
        return None
    _unknown(entry, _ORDER_KEYS, where, errors)
    oid = _id(entry.get("id"), f"{where}.id", errors)
    authority = entry.get("authority")
    if not isinstance(authority, str) or not authority.strip():
        errors.append(f"{where}.authority: must be a non-empty text")
    juris = entry.get("jurisdictions")
    codes: set[str] = set()
    if not isinstance(juris, list) or not juris:
        errors.append(f"{where}.jurisdictions: must be a non-empty list of ISO 3166-1 alpha-2 codes")
    else:
        for i, code in enumerate(juris):
            if not isinstance(code, str) or code.upper() not in _ALPHA2 or len(code) != 2:
                errors.append(f"{where}.jurisdictions[{i}]: {_show(code)} is not an ISO 3166-1 alpha-2 code")
            else:
                codes.add(code.upper())
    applies = entry.get("applies_to", list(KINDS))
    targets: set[str] = set()
    if not isinstance(applies, list) or not applies:
        errors.append(
            f"{where}.applies_to: must be a non-empty list of kinds (isp, public, system) or operators"
        )
    else:
        for i, item in enumerate(applies):
            if not isinstance(item, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", item):
                errors.append(
                    f"{where}.applies_to[{i}]: {_show(item)} is not a resolver kind or operator name"
                )
            else:
                targets.add(item)
    effective = _instant(entry.get("effective"), f"{where}.effective", errors)
    expires = _instant(entry.get("expires"), f"{where}.expires", errors)
    if effective and expires and expires <= effective:
        errors.append(
            f"{where}.expires: {format_instant(expires)} is not after effective {format_instant(effective)}"
        )
    deadline = _deadline(entry, effective, expires, where, errors)
    domains = _patterns(entry.get("domains"), f"{where}.domains", errors)
    if not oid:
        return None
    return Order(
        oid,
        str(authority or ""),
        frozenset(codes),
        frozenset(targets),
        effective,
        expires,
        domains,
        source,
        deadline,
    )


def _deadline(
    entry: dict[str, Any],
    effective: dt.datetime | None,
    expires: dt.datetime | None,
    where: str,
    errors: list[str],
) -> dt.timedelta | None:
    if entry.get("deadline") is None:
        return None
    where = f"{where}.deadline"
    try:
        deadline = parse_duration(entry["deadline"])
    except ValueError as exc:
        errors.append(f"{where}: {_show(entry['deadline'])} {exc}")
        return None
    if "effective" not in entry:
        # Counted from nothing, a deadline could only be guessed; a guess could report a miss that is none.
        errors.append(f"{where}: needs effective, the instant the time to enforce counts from")
        return None
    if effective is None:
        return None  # effective is wrong, and already reported
    try:
        due = effective + deadline
    except OverflowError:
        errors.append(f"{where}: {entry['deadline']} after effective is beyond the year 9999")
        return None
    if expires is not None and due > expires:
        errors.append(
            f"{where}: {entry['deadline']} after effective is {format_instant(due)}, "
            f"after the order expires ({format_instant(expires)})"
        )
        return None
    return deadline


def _control(entry: Any, where: str, errors: list[str], source: str) -> ControlList | None:
    if not isinstance(entry, dict):
        errors.append(f"{where}: must be a mapping")
        return None
    _unknown(entry, _CONTROL_KEYS, where, errors)
    cid = _id(entry.get("id"), f"{where}.id", errors)
    domains = _patterns(entry.get("domains"), f"{where}.domains", errors)
    return ControlList(cid, domains, source) if cid else None


def parse_lists(text: str, source: str = "<lists>") -> Lists:
    """Parse one lists file; ListsError with every mistake, each prefixed by `source`."""
    try:
        doc = _load_without_aliases(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        raise ListsError([f"{source}: {where}: {getattr(exc, 'problem', None) or exc}"]) from None
    except RecursionError:
        raise ListsError([f"{source}: YAML: nested too deeply"]) from None
    errors: list[str] = []
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ListsError([f"{source}: the top level must be a mapping with orders and/or controls"])
    _unknown(doc, _TOP_KEYS, "", errors)
    orders: list[Order] = []
    controls: list[ControlList] = []
    for key, build, sink in (("orders", _order, orders), ("controls", _control, controls)):
        entries = doc.get(key, [])
        if entries is None:
            continue
        if not isinstance(entries, list):
            errors.append(f"{key}: must be a list")
            continue
        for i, entry in enumerate(entries):
            item = build(entry, f"{key}[{i}]", errors, source)
            if item is not None:
                sink.append(item)  # type: ignore[arg-type]  # the loop pairs each builder with its own list
    errors = [e.lstrip(".") for e in errors]
    _duplicates(orders, controls, errors)
    if errors:
        raise ListsError([f"{source}: {e}" for e in errors])
    return Lists(tuple(orders), tuple(controls), (source,))


def _load_without_aliases(text: str, source: str) -> Any:
    """Compose the node graph (aliases stay shared nodes there, so a bomb is still small), refuse
    it if any node is reached twice, and only then build Python objects from it."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        seen: set[int] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                where = _alias_line(text)
                raise ListsError([f"{source}: {where}: YAML aliases are not allowed in lists files"])
            seen.add(id(n))
            if isinstance(n, yaml.SequenceNode):
                stack.extend(n.value)
            elif isinstance(n, yaml.MappingNode):
                stack.extend(x for pair in n.value for x in pair)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _alias_line(text: str) -> str:
    """Where the first alias is: the node graph no longer knows, so the events say (stopping there)."""
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent) and event.start_mark is not None:
            return f"line {event.start_mark.line + 1}"
    return "YAML"


def _duplicates(orders: Iterable[Order], controls: Iterable[ControlList], errors: list[str]) -> None:
    seen: dict[str, str] = {}
    ids = [("orders", i, o.id) for i, o in enumerate(orders)] + [
        ("controls", i, c.id) for i, c in enumerate(controls)
    ]
    for kind, i, item_id in ids:
        if item_id in seen:
            errors.append(f"{kind}[{i}].id: {item_id!r} is already the id of {seen[item_id]}")
        else:
            seen[item_id] = f"{kind}[{i}]"


def load_lists(paths: Sequence[str | Path]) -> Lists:
    """Load and merge several files (one per authority, say); ids must be unique across them."""
    orders: list[Order] = []
    controls: list[ControlList] = []
    errors: list[str] = []
    owner: dict[str, str] = {}
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
            continue
        try:
            one = parse_lists(text, str(path))
        except ListsError as exc:
            errors.extend(exc.errors)
            continue
        for item_id in [o.id for o in one.orders] + [c.id for c in one.controls]:
            if item_id in owner:
                errors.append(f"{path}: id {item_id!r} is also defined in {owner[item_id]}")
            owner[item_id] = str(path)
        orders.extend(one.orders)
        controls.extend(one.controls)
    if errors:
        raise ListsError(errors)
    return Lists(tuple(orders), tuple(controls), tuple(str(p) for p in paths))


def import_plain(text: str, source: str = "<import>") -> list[str]:
    """Names from a plain list (one per line, `#` comments) or a CSV with a `domain` column."""
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    errors: list[str] = []
    names: list[str] = []
    if "," in first and "domain" in [c.strip().lower() for c in first.split(",")]:
        reader = csv.DictReader(io.StringIO("\n".join(ln for ln in lines if not ln.lstrip().startswith("#"))))
        column = next(c for c in (reader.fieldnames or []) if c.strip().lower() == "domain")
        raw = [(reader.line_num, row.get(column) or "") for row in reader]
    else:
        raw = [(i + 1, ln.split("#", 1)[0].strip()) for i, ln in enumerate(lines)]
    for line, value in raw:
        value = value.strip()
        if not value:
            continue
        wildcard = value.startswith("*.")
        try:
            name = normalize_name(value[2:] if wildcard else value)
        except InputError:
            errors.append(f"{source}: line {line}: {value!r} is not a domain name")
            continue
        names.append(f"*.{name}" if wildcard else name)
    if errors:
        raise ListsError(errors)
    return list(dict.fromkeys(names))
