"""The collector's config file, parsed strictly with every error at once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from probe.errors import BlockprobeError

__all__ = ["CollectorConfig", "CollectorConfigError", "load_collector_config", "parse_collector_config"]


class CollectorConfigError(BlockprobeError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


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
}
_LIMITS = {"max_body", "max_decompressed", "max_future_skew", "max_age_days", "max_concurrent_ingest"}


def parse_collector_config(text: str, source: str = "<config>", base: Path | None = None) -> CollectorConfig:
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
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            errors.append(f"{path}: {value!r} must be a number of at least {low:g}")
            return default
        return float(value)

    def path(value: Any) -> Path:
        p = Path(str(value))
        return p if p.is_absolute() else base / p

    listen = str(doc.get("listen", "127.0.0.1:8478"))
    m = re.fullmatch(r"\[?([0-9a-fA-F:.]+|localhost)\]?:(\d{1,5})", listen)
    host, port = ("127.0.0.1", 8478)
    if not m or not 0 < int(m.group(2)) < 65536:
        errors.append(f"listen: {listen!r} is not HOST:PORT")
    else:
        host, port = m.group(1), int(m.group(2))
    state_dir = path(doc.get("state_dir", "collector-state"))
    database = str(doc.get("database") or f"sqlite:///{state_dir / 'collector.sqlite3'}")
    if not re.match(r"^(sqlite:///|postgresql://|postgres://)", database):
        errors.append(f"database: {database!r} is not sqlite:///PATH or postgresql://…")
    tls = doc.get("tls") or {}
    if (
        not isinstance(tls, dict)
        or set(tls) - {"cert", "key"}
        or bool(tls.get("cert")) != bool(tls.get("key"))
    ):
        errors.append("tls: give both cert and key (file paths), or neither")
        tls = {}
    limits = doc.get("limits") or {}
    if not isinstance(limits, dict):
        errors.append("limits: must be a mapping")
        limits = {}
    for key in limits:
        if key not in _LIMITS:
            errors.append(f"limits.{key}: unknown key (one of {', '.join(sorted(_LIMITS))})")
    lists = doc.get("lists") or []
    if not isinstance(lists, list):
        errors.append("lists: must be a list of file paths")
        lists = []
    prometheus = doc.get("prometheus")
    if prometheus is not None and not re.match(r"^https?://[^/\s]+", str(prometheus)):
        errors.append(f"prometheus: {prometheus!r} is not an http:// or https:// URL")
        prometheus = None
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
    )
    if errors:
        raise CollectorConfigError([f"{source}: {e}" for e in errors])
    return config


def load_collector_config(file: str | Path) -> CollectorConfig:
    p = Path(file)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CollectorConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    return parse_collector_config(text, str(p), p.parent.resolve())
