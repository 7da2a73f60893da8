"""Dashboard lint of our own: templated datasource, titles, units, queries, $__rate_interval."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent / "dashboards" / "grafana" / "dashboards"
FILES = sorted(ROOT.glob("*.json"))


def test_the_four_dashboards_are_there() -> None:
    assert [f.name for f in FILES] == [
        "blockprobe-fleet.json",
        "blockprobe-leaks.json",
        "blockprobe-overblocking.json",
        "blockprobe-overview.json",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_dashboard_lint(path: Path) -> None:
    d: dict[str, Any] = json.loads(path.read_text())
    assert d["schemaVersion"] >= 39
    assert d["uid"]
    assert d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("country", "region", "resolver", "transport", "order"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["includeAll"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        where = f"{path.stem}: panel {panel['id']} {panel.get('title')!r}"
        assert panel.get("title"), where
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert panel["targets"], f"{where}: no query"
        for t in panel["targets"]:
            expr = t["expr"]
            assert expr.strip(), where
            assert t["datasource"]["uid"] == "${datasource}", where
            for fn in re.findall(r"\b(rate|irate|increase)\(", expr):
                assert "[$__rate_interval]" in expr, f"{where}: {fn}() without $__rate_interval"
            assert expr.count("(") == expr.count(")"), where


def _lost(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Keys of ours that did not survive a round trip through the schema's models."""
    if isinstance(ours, dict):
        out = []
        for k, v in ours.items():
            if not isinstance(theirs, dict) or k not in theirs:
                out.append(f"{path}.{k}")
            else:
                out += _lost(v, theirs[k], f"{path}.{k}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        return [
            p for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) for p in _lost(a, b, f"{path}[{i}]")
        ]
    return []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_dashboard_fits_grafana_11_6_schema(path: Path) -> None:
    """Round trip through grafana-foundation-sdk's models of Grafana 11.6's dashboard schema:
    a field the schema does not know would be dropped, and a wrong type would not load."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    ours = json.loads(path.read_text())
    theirs = json.loads(json.dumps(Dashboard.from_json(ours), cls=JSONEncoder))
    assert _lost(ours, theirs) == []
    assert len(theirs["panels"]) == len(ours["panels"])
