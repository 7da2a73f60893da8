"""The collector's config file, parsed strictly with every error at once.

Secrets (the read token, the basic-auth password) are read from files named in the
config and kept only as SHA-256 digests: nothing here can print them back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from probe.errors import BlockprobeError

__all__ = [
    "CollectorConfig",
    "CollectorConfigError",
    "ReadAccess",
    "load_collector_config",
    "parse_collector_config",
]


class CollectorConfigError(BlockprobeError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class ReadAccess:
    """Who may read `/`, `/evidence`, `/api/…` reads, `/metrics` and `/healthz`.

    `open_*` True: anyone. Otherwise a request needs the read token (Bearer) or the basic
    user and password; both are held as SHA-256 digests only.
    """

    open_pages: bool = True
    open_metrics: bool = True
    open_healthz: bool = True
    token_sha256: str | None = None
    basic_user: str | None = None
    basic_password_sha256: str | None = None


@dataclass(frozen=True)
class CollectorConfig:
    host: str
    port: int
    database: str
    state_dir: Path
    stale_after: float
    retention_days: float
    tls_cert: str | None
    tls_key: str | None
    max_body: int
    max_decompressed: int
    max_future_skew: float
    max_age_days: float
    lists: tuple[Path, ...]
    max_concurrent_ingest: int = 4
    prometheus_url: str | None = None  # the status page shows the alerts it reports as firing
    # Per probe: results accepted per minute, current series, and resolver × transport × rule groups.
    results_per_minute: int = 300_000
    max_series_per_probe: int = 1_000_000
    max_groups_per_probe: int = 2_000
    # Per-domain series (leak, overblock) per probe × resolver × transport × order/list (docs/metrics.md).
    max_domain_series: int = 100
    # Per probe: per-name lines on /metrics (leak, overblock, since, reach, canary) in all; past it
    # the rest are counted in the *_capped families and stay in blockprobe_domains.
    max_exported_series_per_probe: int = 10_000
    render_cache_seconds: float = 2.0
    # What uvicorn enforces before any of our code runs.
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 64
    reads: ReadAccess = ReadAccess()
    # Seconds between compliance passes (collector/compliance.py): how late a first enforcement
    # or a leak after a deadline can be noticed, at the cost of one grouping query over `latest`.
    compliance_interval: float = 30.0
    # Answer checks from probes inside and outside an ordering country must fall within this many
    # seconds (the last ones) for an IP-level block to be inferred (collector/reach.py).
    ip_block_window: float = 3600.0


_KEYS = {
    "listen",
    "database",
    "state_dir",
    "stale_after",
    "retention_days",
    "tls",
    "limits",
    "lists",
    "prometheus",
    "server",
    "reads",
    "compliance_interval",
    "ip_block_window",
}
_LIMITS = {
    "max_body",
    "max_decompressed",
    "max_future_skew",
    "max_age_days",
    "max_concurrent_ingest",
    "results_per_minute",
    "max_series_per_probe",
    "max_groups_per_probe",
    "max_domain_series",
    "max_exported_series_per_probe",
    "render_cache_seconds",
}
_SERVER = {
    "header_timeout",
    "keep_alive_timeout",
    "body_timeout",
    "max_connections",
    "max_connections_per_ip",
}
_READS = {"open", "token_file", "basic_user", "basic_password_file", "metrics", "healthz"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_collector_config(  # noqa: C901 - one flat check per key, so every mistake is listed
    text: str, source: str = "<config>", base: Path | None = None
) -> CollectorConfig:
    base = base or Path(".")
    errors: list[str] = []
    try:
        doc = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError) as exc:
        raise CollectorConfigError([f"{source}: not YAML: {exc}"]) from None
    if not isinstance(doc, dict):
        raise CollectorConfigError([f"{source}: the top level must be a mapping"])
    for key in doc:
        if key not in _KEYS:
            errors.append(f"{key}: unknown key (one of {', '.join(sorted(_KEYS))})")

    def number(value: Any, path: str, default: float, low: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < float("inf"):
            errors.append(f"{path}: {value!r} must be a number of at least {low:g}")
            return default
        return float(value)

    def path(value: Any) -> Path:
        p = Path(str(value))
        return p if p.is_absolute() else base / p

    def section(name: str, keys: set[str]) -> dict[str, Any]:
        value = doc.get(name) or {}
        if not isinstance(value, dict):
            errors.append(f"{name}: must be a mapping")
            return {}
        for key in value:
            if key not in keys:
                errors.append(f"{name}.{key}: unknown key (one of {', '.join(sorted(keys))})")
        return value

    def secret(value: Any, key: str) -> str | None:
        """The SHA-256 of a secret file's stripped content; errors name the file, never the content."""
        if value is None:
            return None
        p = path(value)
        try:
            content = p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{key}: {str(p)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}")
            return None
        if len(content) < 16 or not re.fullmatch(r"[\x21-\x7e]+", content):
            errors.append(f"{key}: {str(p)!r} must hold at least 16 printable characters, no spaces")
            return None
        return hashlib.sha256(content.encode()).hexdigest()

    listen = str(doc.get("listen", "127.0.0.1:8478"))
    m = re.fullmatch(r"\[?([0-9a-fA-F:.]+|localhost)\]?:(\d{1,5})", listen)
    host, port = ("127.0.0.1", 8478)
    if not m or not 0 < int(m.group(2)) < 65536:
        errors.append(f"listen: {listen!r} is not HOST:PORT")
    else:
        host, port = m.group(1), int(m.group(2))
    loopback = is_loopback(host)
    state_dir = path(doc.get("state_dir", "collector-state"))
    database = str(doc.get("database") or f"sqlite:///{state_dir / 'collector.sqlite3'}")
    if not re.match(r"^(sqlite:///|postgresql://|postgres://)", database):
        errors.append(f"database: {database.split('@')[-1]!r} is not sqlite:///PATH or postgresql://…")
    tls = doc.get("tls") or {}
    if (
        not isinstance(tls, dict)
        or set(tls) - {"cert", "key", "plain_http"}
        or bool(tls.get("cert")) != bool(tls.get("key"))
    ):
        errors.append(
            "tls: give both cert and key (file paths), or neither; plain_http: true to serve without"
        )
        tls = {}
    if not loopback and not tls.get("cert") and tls.get("plain_http") is not True:
        # Probe tokens would cross the network in cleartext.
        errors.append(
            f"listen: {listen!r} is not loopback and tls has no cert and key (set tls.plain_http: true "
            "only behind a TLS-terminating proxy)"
        )
    limits = section("limits", _LIMITS)
    server = section("server", _SERVER)
    reads = section("reads", _READS)
    lists = doc.get("lists") or []
    if not isinstance(lists, list):
        errors.append("lists: must be a list of file paths")
        lists = []
    prometheus = doc.get("prometheus")
    if prometheus is not None and not re.match(r"^https?://[^/\s]+", str(prometheus)):
        errors.append(f"prometheus: {prometheus!r} is not an http:// or https:// URL")
        prometheus = None

    token_sha = secret(reads.get("token_file"), "reads.token_file")
    basic_user = reads.get("basic_user")
    basic_sha = secret(reads.get("basic_password_file"), "reads.basic_password_file")
    if basic_user is not None and (
        not isinstance(basic_user, str) or not re.fullmatch(r"[\x21-\x39\x3b-\x7e]{1,64}", basic_user)
    ):
        errors.append(f"reads.basic_user: {basic_user!r} must be 1-64 printable characters, no ':' or spaces")
        basic_user = None
    if (basic_user is None) != (reads.get("basic_password_file") is None):
        errors.append("reads: give basic_user and basic_password_file together")
    has_credentials = token_sha is not None or (basic_user is not None and basic_sha is not None)
    open_pages = reads.get("open", loopback)
    if not isinstance(open_pages, bool):
        errors.append(f"reads.open: {open_pages!r} must be true or false")
        open_pages = False
    reads_broken = any(e.startswith("reads") for e in errors)
    if not open_pages and not has_credentials and not reads_broken:
        errors.append(
            f"reads: {listen!r} is not loopback, so reads need reads.token_file or reads.basic_user "
            "with reads.basic_password_file (or reads.open: true to publish them)"
        )

    def policy(key: str, default: bool) -> bool:
        value = reads.get(key)
        if value is None:
            return default
        if value not in ("open", "protected"):
            errors.append(f"reads.{key}: {value!r} must be open or protected")
            return default
        if value == "protected" and not has_credentials:
            errors.append(f"reads.{key}: protected needs reads.token_file or reads.basic_user")
        return bool(value == "open")

    access = ReadAccess(
        open_pages=open_pages,
        open_metrics=policy("metrics", open_pages),
        open_healthz=policy("healthz", True),
        token_sha256=token_sha,
        basic_user=basic_user,
        basic_password_sha256=basic_sha,
    )
    config = CollectorConfig(
        host=host,
        port=port,
        database=database,
        state_dir=state_dir,
        stale_after=number(doc.get("stale_after"), "stale_after", 900, 1),
        retention_days=number(doc.get("retention_days"), "retention_days", 365, 0.001),
        tls_cert=str(path(tls["cert"])) if tls.get("cert") else None,
        tls_key=str(path(tls["key"])) if tls.get("key") else None,
        max_body=int(number(limits.get("max_body"), "limits.max_body", 16 << 20, 1024)),
        max_decompressed=int(
            number(limits.get("max_decompressed"), "limits.max_decompressed", 64 << 20, 1024)
        ),
        max_future_skew=number(limits.get("max_future_skew"), "limits.max_future_skew", 300, 0),
        max_age_days=number(limits.get("max_age_days"), "limits.max_age_days", 90, 0.001),
        lists=tuple(path(p) for p in lists),
        max_concurrent_ingest=int(
            number(limits.get("max_concurrent_ingest"), "limits.max_concurrent_ingest", 4, 1)
        ),
        prometheus_url=str(prometheus) if prometheus else None,
        results_per_minute=int(
            number(limits.get("results_per_minute"), "limits.results_per_minute", 300_000, 1)
        ),
        max_series_per_probe=int(
            number(limits.get("max_series_per_probe"), "limits.max_series_per_probe", 1_000_000, 1)
        ),
        max_groups_per_probe=int(
            number(limits.get("max_groups_per_probe"), "limits.max_groups_per_probe", 2_000, 1)
        ),
        max_domain_series=int(number(limits.get("max_domain_series"), "limits.max_domain_series", 100, 1)),
        max_exported_series_per_probe=int(
            number(
                limits.get("max_exported_series_per_probe"), "limits.max_exported_series_per_probe", 10_000, 1
            )
        ),
        render_cache_seconds=number(limits.get("render_cache_seconds"), "limits.render_cache_seconds", 2, 0),
        header_timeout=number(server.get("header_timeout"), "server.header_timeout", 10, 0.1),
        keep_alive_timeout=number(server.get("keep_alive_timeout"), "server.keep_alive_timeout", 5, 0.1),
        body_timeout=number(server.get("body_timeout"), "server.body_timeout", 30, 0.1),
        max_connections=int(number(server.get("max_connections"), "server.max_connections", 1000, 4)),
        max_connections_per_ip=int(
            number(server.get("max_connections_per_ip"), "server.max_connections_per_ip", 64, 1)
        ),
        reads=access,
        compliance_interval=number(doc.get("compliance_interval"), "compliance_interval", 30, 1),
        ip_block_window=_window(doc.get("ip_block_window"), errors),
    )
    if errors:
        raise CollectorConfigError([f"{source}: {e}" for e in errors])
    return config


def _window(value: Any, errors: list[str]) -> float:
    """`ip_block_window`: seconds; longer than a week would call checks far apart "the same period"."""
    if value is None:
        return 3600.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 60 <= value <= 604_800:
        errors.append(f"ip_block_window: {value!r} must be a number of seconds from 60 to 604800 (a week)")
        return 3600.0
    return float(value)


def load_collector_config(file: str | Path) -> CollectorConfig:
    p = Path(file)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CollectorConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    return parse_collector_config(text, str(p), p.parent.resolve())
