"""The daemon's config file: parsed once, strictly, every error at once (STYLE.md 6).

Each error names the path and the value: `resolvers[2].spec: 'tls//x' is not a resolver
spec: …`. Unknown keys are errors. The collector token comes from a file or an
environment variable (or, discouraged, inline) and is never printed or logged.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from probe.catalogue import load_catalogue, resolve_spec
from probe.errors import BlockprobeError, SpecError
from probe.identity import Canary
from probe.limits import MAX_AGE_DAYS, MAX_BATCH_MEASUREMENTS, MAX_LABEL_CHARS
from probe.lists import ISO_ALPHA2, load_lists
from probe.model import Expectation
from probe.schedule import Settings, budget, check, format_span, parse_settings
from probe.specs import KINDS, Resolver
from probe.wire import QTYPES, normalize_name

__all__ = [
    "COLLECTOR_LISTS",
    "CollectorConfig",
    "Config",
    "ConfigError",
    "check_budget",
    "collector_lists",
    "load_config",
    "parse_config",
    "schedule_budget",
]

# Under state_dir: the lists last fetched from the collector (`collector.fetch_lists`).
COLLECTOR_LISTS = "collector-lists"


class ConfigError(BlockprobeError):
    """The config file is wrong; `errors` holds every mistake."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """Answer checks at the answered addresses: `mode` off, tls or http; connections paced to
    `rate` per second, at most `concurrency` at once, results kept for `ttl` seconds."""

    mode: str
    rate: float
    concurrency: int
    ttl: float


@dataclass(frozen=True)
class CollectorConfig:
    url: str
    token: str = field(repr=False)  # never in a repr, a log line or check-config's output
    token_source: str
    ca_file: str | None
    timeout: float
    batch_size: int
    fetch_lists: bool
    retry_base: float = 1.0  # seconds: the first backoff after a failed push
    # seconds: the longest; also how late a recovery can be noticed (issue 10: a backlog must
    # drain within seconds of a recovery). A failing push costs one request per probe.
    retry_max: float = 5.0
    rate: float = 20.0  # requests per second while a backlog drains (0: unlimited)
    max_age_days: float = MAX_AGE_DAYS  # older results go to quarantine, not to the collector


@dataclass(frozen=True)
class Config:
    probe_id: str
    region: str
    country: str
    collector: CollectorConfig | None
    resolvers: tuple[Resolver, ...]
    lists: tuple[Path, ...]
    controls: tuple[Resolver, ...]
    canaries: tuple[Canary, ...]
    interval: float
    jitter: float
    # "rounds": every listed name on every endpoint each `interval`; "slices": the per-name
    # scheduler (probe/schedule.py), a slice every `slice` seconds within the qps budget.
    mode: str
    slice: float
    settings: Settings
    push_interval: float
    round_deadline: float
    qtypes: tuple[str, ...]
    timeout: float
    concurrency: int
    qps: float | None
    udp_linger: float
    confirm_after: float
    verify: VerifyConfig
    ca_file: str | None
    state_dir: Path
    spool_max_rows: int
    metrics_listen: tuple[str, int] | None
    log_format: str
    log_level: str
    source: str = ""

    def summary(self) -> list[str]:
        """What will run, for `probe check-config`: no secrets."""
        eps = sum(len(r.endpoints) for r in self.resolvers)
        if self.mode == "slices":
            cadence = (
                f"slices of {self.slice:g}s (deadline {self.round_deadline:g}s), new orders every "
                f"{format_span(self.settings.fast_interval)} for {format_span(self.settings.chase)} "
                "or until enforced, every name once per "
                f"{format_span(self.settings.full_pass)}: "
            )
        else:
            cadence = (
                f"every {self.interval:g}s (jitter {self.jitter:g}s, deadline {self.round_deadline:g}s): "
            )
        lines = [
            f"probe {self.probe_id} in region {self.region}, country {self.country}",
            cadence + f"{len(self.resolvers)} resolvers, "
            f"{eps} endpoints, qtypes {', '.join(self.qtypes)}, timeout {self.timeout:g}s, "
            f"concurrency {self.concurrency}, {self.qps or 'unlimited'} q/s per endpoint, "
            f"silences asked again after {self.confirm_after:g}s",
            "answer checks: off"
            if self.verify.mode == "off"
            else f"answer checks: {self.verify.mode} on port 443, {self.verify.rate:g} connections/s, "
            f"at most {self.verify.concurrency} at once, kept {self.verify.ttl:g}s",
        ]
        for r in self.resolvers:
            lines.append(
                f"  {r.name}: kind {r.kind}, operator {r.operator or '-'}, "
                + ", ".join(str(e.transport) for e in r.endpoints)
            )
        lines.append("lists: " + (", ".join(str(p) for p in self.lists) or "none"))
        lines.append("controls: " + (", ".join(r.name for r in self.controls) or "none"))
        if self.canaries:
            lines.append("canaries: " + ", ".join(f"{c.expect}={c.name}" for c in self.canaries))
        if self.collector:
            c = self.collector
            lines.append(
                f"collector: {c.url} (token from {c.token_source}), push every {self.push_interval:g}s, "
                f"batches of {c.batch_size}, retry {c.retry_base:g}s to {c.retry_max:g}s, "
                f"{c.rate or 'unlimited'} requests/s while catching up, results older than {c.max_age_days:g} days quarantined"
            )
        else:
            lines.append("collector: none (results stay in the spool)")
        lines.append(f"state: {self.state_dir} (spool bound {self.spool_max_rows} results)")
        if self.metrics_listen:
            lines.append(f"metrics: http://{self.metrics_listen[0]}:{self.metrics_listen[1]}/metrics")
        return lines


_TOP = {
    "probe",
    "collector",
    "resolvers",
    "lists",
    "controls",
    "canaries",
    "schedule",
    "qtypes",
    "timeout",
    "concurrency",
    "qps",
    "udp_linger",
    "confirm_after",
    "verify",
    "ca_file",
    "state_dir",
    "spool",
    "metrics",
    "log",
}
_SECTIONS = {
    "probe": {"id", "region", "country"},
    "collector": {
        "url",
        "token",
        "token_file",
        "token_env",
        "ca_file",
        "timeout",
        "batch_size",
        "fetch_lists",
        "retry",
        "rate",
        "max_age_days",
        "allow_plain_http",
    },
    "canaries": {"resolves", "blocked"},
    "schedule": {
        "mode",
        "interval",
        "jitter",
        "slice",
        "fast_interval",
        "full_pass",
        "chase",
        "push_interval",
        "round_deadline",
    },
    "spool": {"max_rows"},
    "verify": {"mode", "rate", "concurrency", "ttl"},
    "metrics": {"listen"},
    "log": {"format", "level"},
}
_RESOLVER_KEYS = {"spec", "kind", "operator", "qps"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Checker:
    def __init__(self, base: Path) -> None:
        self.errors: list[str] = []
        self.base = base

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def section(self, doc: dict[str, Any], name: str) -> dict[str, Any]:
        value = doc.get(name, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(name, f"must be a mapping, not {value!r}")
            return {}
        for key in value:
            if key not in _SECTIONS[name]:
                self.err(f"{name}.{key}", f"unknown key (one of {', '.join(sorted(_SECTIONS[name]))})")
        return value

    def number(self, value: Any, path: str, default: float, low: float, high: float | None = None) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.err(path, f"{value!r} is not a number")
            return default
        if value < low or (high is not None and value > high):
            bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            self.err(path, f"{value!r} must be {bound}")
            return default
        return float(value)

    def text(self, value: Any, path: str, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value.strip():
            self.err(path, f"{value!r} must be a non-empty text")
            return ""
        return value.strip()

    def path(self, value: Any, key: str) -> Path:
        p = Path(self.text(value, key) or ".")
        return p if p.is_absolute() else self.base / p


def _fragment(c: _Checker, item: dict[str, Any], path: str) -> list[str]:
    """The spec's #fragment from the mapping's kind, operator and qps (errors said to `c`)."""
    fragment = []
    if "kind" in item:
        if item["kind"] not in KINDS:
            c.err(f"{path}.kind", f"{item['kind']!r} is not one of isp, public, system")
        else:
            fragment.append(f"kind={item['kind']}")
    if "operator" in item:
        if not isinstance(item["operator"], str) or not re.fullmatch(
            r"[a-z0-9][a-z0-9._-]*", item["operator"]
        ):
            c.err(f"{path}.operator", f"{item['operator']!r} is not an operator name (lower case)")
        else:
            fragment.append(f"operator={item['operator']}")
    if "qps" in item:
        qps = c.number(item["qps"], f"{path}.qps", 0, 0.001)
        if qps:
            fragment.append(f"qps={qps:g}")
    return fragment


def _resolver(c: _Checker, item: Any, path: str) -> Resolver | None:
    cat = load_catalogue()
    if isinstance(item, str):
        item = {"spec": item}
    if not isinstance(item, dict):
        c.err(path, f"{item!r} is not a resolver spec or a mapping with spec")
        return None
    for key in item:
        if key not in _RESOLVER_KEYS:
            c.err(f"{path}.{key}", f"unknown key (one of {', '.join(sorted(_RESOLVER_KEYS))})")
    spec = item.get("spec")
    if not isinstance(spec, str):
        c.err(f"{path}.spec", f"{spec!r} is not a resolver spec")
        return None
    fragment = _fragment(c, item, path)
    full = spec + (
        "#" + ",".join(fragment) if fragment and "#" not in spec and spec not in cat.entries else ""
    )
    try:
        resolver = resolve_spec(full, cat)
    except SpecError as exc:
        c.err(f"{path}.spec", str(exc))
        return None
    return Resolver(spec, resolver.kind, resolver.operator, resolver.endpoints)


def _token(c: _Checker, col: dict[str, Any]) -> tuple[str, str]:
    given = [k for k in ("token", "token_file", "token_env") if col.get(k) is not None]
    if len(given) != 1:
        c.err("collector", "give exactly one of token_file, token_env, token")
        return "", ""
    key = given[0]
    if key == "token_file":
        p = c.path(col["token_file"], "collector.token_file")
        try:
            token = p.read_text().strip()
        except OSError as exc:
            c.err("collector.token_file", f"{str(p)!r} cannot be read: {exc.strerror}")
            return "", ""
        source = f"file {p}"
    elif key == "token_env":
        name = c.text(col["token_env"], "collector.token_env")
        token = os.environ.get(name, "").strip()
        if name and not token:
            c.err("collector.token_env", f"environment variable {name!r} is not set or empty")
        source = f"environment variable {name}"
    else:
        # Never echo the value: whatever YAML made of it, it is a secret.
        raw = col["token"]
        token = raw.strip() if isinstance(raw, str) else ""
        if not isinstance(raw, str):
            c.err("collector.token", f"must be a text, not a YAML {type(raw).__name__} (quote it)")
            return "", ""
        if not token:
            c.err("collector.token", "must be a non-empty text")
        source = "the config file (prefer token_file)"
    if token and not re.fullmatch(r"[\x21-\x7e]+", token):
        c.err(f"collector.{key}", "the token holds spaces or non-printable characters")
    return token, source


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's message without its snippet of the file: the line quoted may hold the token."""
    if isinstance(exc, yaml.MarkedYAMLError):
        where = exc.problem_mark or exc.context_mark
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        return f"{exc.problem or exc.context or 'syntax error'}{at}"
    if isinstance(exc, yaml.YAMLError):
        return type(exc).__name__
    return "a value YAML cannot read (an impossible date?)"


def parse_config(  # noqa: C901 - one flat check per key, so every mistake is listed
    text: str, source: str = "<config>", base: Path | None = None
) -> Config:
    """Parse and validate; ConfigError lists every mistake."""
    c = _Checker(base or Path("."))
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: PyYAML on impossible dates
        raise ConfigError([f"{source}: not YAML: {_yaml_problem(exc)}"]) from None
    if not isinstance(doc, dict):
        raise ConfigError([f"{source}: the top level must be a mapping"])
    for key in doc:
        if key not in _TOP:
            c.err(str(key), f"unknown key (one of {', '.join(sorted(_TOP))})")
    probe = c.section(doc, "probe")
    probe_id = c.text(probe.get("id"), "probe.id")
    if probe_id and not _ID.match(probe_id):
        c.err("probe.id", f"{probe_id!r} is not an id (letters, digits, '.', '_', '-'; up to 64)")
    region = c.text(probe.get("region"), "probe.region")
    if len(region) > MAX_LABEL_CHARS:
        c.err("probe.region", f"{region[:40]!r}... is longer than {MAX_LABEL_CHARS} characters")
    country = c.text(probe.get("country"), "probe.country").upper()
    if country and country not in ISO_ALPHA2:
        c.err("probe.country", f"{probe.get('country')!r} is not an ISO 3166-1 alpha-2 code")

    collector = None
    col = c.section(doc, "collector")
    if col:
        url = c.text(col.get("url"), "collector.url")
        if url and not re.match(r"^https?://[^/\s]+", url):
            c.err("collector.url", f"{url!r} is not an http(s) URL")
        elif url and url.startswith("http://") and not _loopback_url(url):
            # The token and every result would cross the network in clear text.
            plain = col.get("allow_plain_http", False)
            if plain is not True:
                c.err(
                    "collector.url",
                    f"{url!r} sends the token in clear text off this machine: use https:// "
                    "(or collector.allow_plain_http: true behind a trusted tunnel)",
                )
        token, token_source = _token(c, col)
        ca = str(c.path(col["ca_file"], "collector.ca_file")) if col.get("ca_file") else None
        retry = col.get("retry") or {}
        if not isinstance(retry, dict):
            c.err("collector.retry", f"{retry!r} must be a mapping with base and max")
            retry = {}
        for key in retry:
            if key not in ("base", "max"):
                c.err(f"collector.retry.{key}", "unknown key (one of base, max)")
        retry_base = c.number(
            retry.get("base"), "collector.retry.base", CollectorConfig.retry_base, 0.01, 3600
        )
        retry_max = c.number(retry.get("max"), "collector.retry.max", CollectorConfig.retry_max, 0.01, 86400)
        if retry_max < retry_base:
            c.err("collector.retry.max", f"{retry_max:g} must be at least retry.base ({retry_base:g})")
        collector = CollectorConfig(
            url.rstrip("/"),
            token,
            token_source,
            ca,
            c.number(col.get("timeout"), "collector.timeout", 10, 0.1, 300),
            int(c.number(col.get("batch_size"), "collector.batch_size", 500, 1, MAX_BATCH_MEASUREMENTS)),
            bool(col.get("fetch_lists", False)),
            retry_base,
            retry_max,
            c.number(col.get("rate"), "collector.rate", 20, 0),
            c.number(col.get("max_age_days"), "collector.max_age_days", MAX_AGE_DAYS, 0.001),
        )

    resolvers: list[Resolver] = []
    raw = doc.get("resolvers")
    if not isinstance(raw, list) or not raw:
        c.err("resolvers", "must be a non-empty list of resolver specs")
    else:
        for i, item in enumerate(raw):
            r = _resolver(c, item, f"resolvers[{i}]")
            if r is not None:
                resolvers.append(r)

    lists: list[Path] = []
    raw_lists = doc.get("lists", []) or []
    if not isinstance(raw_lists, list):
        c.err("lists", "must be a list of file paths")
    else:
        lists = [c.path(p, f"lists[{i}]") for i, p in enumerate(raw_lists)]

    cat = load_catalogue()
    controls: list[Resolver] = []
    raw_controls = doc.get("controls", [cat.control])
    if not isinstance(raw_controls, list):
        c.err("controls", "must be a list of resolver specs")
    else:
        for i, item in enumerate(raw_controls):
            ctl = _resolver(c, item, f"controls[{i}]")
            if ctl is not None:
                controls.append(ctl)

    canaries: list[Canary] = []
    can = c.section(doc, "canaries")
    for kind in ("resolves", "blocked"):
        names = can.get(kind, []) or []
        if not isinstance(names, list):
            c.err(f"canaries.{kind}", "must be a list of names")
            continue
        for i, name in enumerate(names):
            try:
                canaries.append(Canary(normalize_name(str(name)), Expectation(kind)))
            except BlockprobeError:
                c.err(f"canaries.{kind}[{i}]", f"{name!r} is not a domain name")

    sched = c.section(doc, "schedule")
    # Slices are the default: rounds cannot cover a real list politely (issue 12). A config
    # written before slices existed (interval or jitter, no mode) keeps the rounds it asked for.
    legacy = sched.get("interval") is not None or sched.get("jitter") is not None
    sched_mode = sched.get("mode", "rounds" if legacy else "slices")
    if sched_mode not in ("rounds", "slices"):
        c.err("schedule.mode", f"{sched_mode!r} is not one of rounds, slices")
        sched_mode = "rounds"
    # Each mode has its own keys: a key the mode ignores would silently change nothing.
    for key in (
        ("interval", "jitter") if sched_mode == "slices" else ("slice", "fast_interval", "full_pass", "chase")
    ):
        if sched.get(key) is not None:
            other = "rounds" if sched_mode == "slices" else "slices"
            c.err(
                f"schedule.{key}",
                f"{sched[key]!r} is for schedule.mode {other} (this config runs {sched_mode})",
            )
    interval = c.number(
        sched.get("interval") if sched_mode == "rounds" else None, "schedule.interval", 300, 1
    )
    jitter = c.number(
        sched.get("jitter") if sched_mode == "rounds" else None,
        "schedule.jitter",
        min(30.0, interval / 10) if sched_mode == "rounds" else 0.0,
        0,
    )
    if jitter >= interval:
        c.err("schedule.jitter", f"{jitter:g} must be less than the interval ({interval:g})")
    settings, problems = parse_settings(sched if sched_mode == "slices" else None)
    c.errors.extend(problems)
    slice_s = c.number(
        sched.get("slice") if sched_mode == "slices" else None,
        "schedule.slice",
        min(15.0, settings.fast_interval),
        0.1,
        3600,
    )
    if sched_mode == "slices" and slice_s > settings.fast_interval:
        c.err(
            "schedule.slice",
            f"{slice_s:g} must not be longer than schedule.fast_interval ({format_span(settings.fast_interval)})",
        )
    push = c.number(sched.get("push_interval"), "schedule.push_interval", 15, 0.1)
    # A round may take long under a rate limit (30,000 queries at 20 q/s: 25 minutes);
    # the deadline is for a round that is stuck, not for a slow one. A slice is sized to its
    # length, so its deadline only has to cover timeouts and confirmations on top.
    default_deadline = max(3600.0, 3 * interval) if sched_mode == "rounds" else max(600.0, 10 * slice_s)
    deadline = c.number(sched.get("round_deadline"), "schedule.round_deadline", default_deadline, 1)

    qtypes = doc.get("qtypes", list(QTYPES))
    if not isinstance(qtypes, list) or not qtypes or any(q not in QTYPES for q in qtypes):
        c.err("qtypes", f"{qtypes!r} must be a non-empty list of {', '.join(QTYPES)}")
        qtypes = list(QTYPES)

    spool = c.section(doc, "spool")
    metrics = c.section(doc, "metrics")
    listen = None
    if metrics.get("listen") is not None:
        m = re.fullmatch(r"\[?([0-9a-fA-F:.]+|localhost)\]?:(\d{1,5})", str(metrics["listen"]))
        if not m or not 0 < int(m.group(2)) < 65536:
            c.err("metrics.listen", f"{metrics['listen']!r} is not HOST:PORT")
        else:
            listen = (m.group(1), int(m.group(2)))
    log = c.section(doc, "log")
    log_format = log.get("format", "auto")
    if log_format not in ("auto", "json", "text"):
        c.err("log.format", f"{log_format!r} is not one of auto, json, text")
    log_level = str(log.get("level", "info")).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        c.err("log.level", f"{log_level!r} is not one of debug, info, warning, error")

    qps_value = c.number(doc.get("qps"), "qps", 20, 0)
    verify = c.section(doc, "verify")
    mode = str(verify.get("mode", "tls"))
    if mode not in ("off", "tls", "http"):
        c.err("verify.mode", f"{verify.get('mode')!r} is not one of off, tls, http")
    verify_config = VerifyConfig(
        mode=mode,
        rate=c.number(verify.get("rate"), "verify.rate", 5, 0.01, 1000),
        concurrency=int(c.number(verify.get("concurrency"), "verify.concurrency", 32, 1, 1000)),
        ttl=c.number(verify.get("ttl"), "verify.ttl", 21600, 0),
    )
    config = Config(
        probe_id=probe_id,
        region=region,
        country=country,
        collector=collector,
        resolvers=tuple(resolvers),
        lists=tuple(lists),
        controls=tuple(controls),
        canaries=tuple(canaries),
        interval=interval,
        jitter=jitter,
        mode=str(sched_mode),
        slice=slice_s,
        settings=settings,
        push_interval=push,
        round_deadline=deadline,
        qtypes=tuple(qtypes),
        timeout=c.number(doc.get("timeout"), "timeout", 5, 0.05, 60),
        concurrency=int(c.number(doc.get("concurrency"), "concurrency", 64, 1, 10000)),
        qps=qps_value or None,
        udp_linger=c.number(doc.get("udp_linger"), "udp_linger", 0.2, 0, 5),
        confirm_after=c.number(doc.get("confirm_after"), "confirm_after", 10, 0, 300),
        verify=verify_config,
        ca_file=str(c.path(doc["ca_file"], "ca_file")) if doc.get("ca_file") else None,
        state_dir=c.path(doc.get("state_dir", "state"), "state_dir"),
        spool_max_rows=int(c.number(spool.get("max_rows"), "spool.max_rows", 500_000, 10)),
        metrics_listen=listen,
        log_format=str(log_format),
        log_level=log_level,
        source=source,
    )
    if c.errors:
        raise ConfigError([f"{source}: {e}" for e in c.errors])
    return config


def schedule_budget(config: Config, names: int) -> tuple[list[str], list[str]]:
    """For `probe check-config` and the daemon's start, in mode slices: the budget's lines and
    the errors of a config that cannot measure `names` names within `full_pass`."""
    if config.mode != "slices":
        return [], []
    args = (names, config.qtypes, config.resolvers, config.qps, config.settings)
    return budget(*args).splitlines(), check(*args)


def collector_lists(config: Config) -> tuple[Path, ...]:
    """The lists files last fetched from the collector (kept in the state directory), or ()."""
    if config.collector is None or not config.collector.fetch_lists:
        return ()
    try:
        return tuple(
            sorted(
                p
                for p in (config.state_dir / COLLECTOR_LISTS).iterdir()
                if p.is_file() and not p.name.endswith(".tmp")
            )
        )
    except OSError:  # not fetched yet (or not readable by whoever runs check-config)
        return ()


def check_budget(config: Config) -> tuple[list[str], list[str]]:
    """For `probe check-config`: the budget's lines and errors over the local lists and, with
    `collector.fetch_lists`, the collector's as last fetched into the state directory. Lists
    not fetched yet are said to be so, not counted as 0 names. Raises ListsError."""
    if config.mode != "slices":
        return [], []
    fetching = config.collector is not None and config.collector.fetch_lists
    fetched = collector_lists(config)
    lines = []
    if fetching and fetched:
        lines.append(
            f"lists from the collector: {len(fetched)} files as last fetched into "
            f"{config.state_dir / COLLECTOR_LISTS}, counted in the budget"
        )
    elif fetching:
        lines.append("lists from the collector: none fetched yet; budget checked when fetched")
        if not config.lists:
            return lines, []
    files = config.lists + fetched
    names = len(load_lists(files).query_names()) if files else 0
    budget_lines, errors = schedule_budget(config, names)
    if fetched:
        errors = [f"with the lists from the collector as last fetched: {e}" for e in errors]
    return lines + budget_lines, errors


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    return parse_config(text, str(p), p.parent.resolve())


def _loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
