"""docs/ against the code: every option, measurement key, lists key, metric and label it names exists,
and every one the code has is documented. README points into docs/; no document (README, docs/,
the runbook, the shipped data files) points outside the repository."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import click
import pytest

from collector.cli import cli as collector_cli
from collector.metrics import FAMILIES
from fleet.__main__ import main as fleet_main
from probe.cli import cli as probe_cli
from probe.daemon.config import parse_config
from probe.daemon.run import Daemon
from probe.lists import _CONTROL_KEYS, _ORDER_KEYS
from probe.model import Measurement, Outcome, Transport

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def _commands(cmd: click.Command, path: str) -> list[tuple[str, click.Command]]:
    if isinstance(cmd, click.Group):
        return [c for name, sub in sorted(cmd.commands.items()) for c in _commands(sub, f"{path} {name}")]
    return [(path, cmd)]


COMMANDS = (
    _commands(probe_cli, "probe") + _commands(collector_cli, "collector") + [("python -m fleet", fleet_main)]
)


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^## `{re.escape(heading)}`\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"docs/cli.md has no section ## `{heading}`"
    return m.group(1)


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_option_is_documented_in_its_section(name: str, command: click.Command) -> None:
    section = _section((DOCS / "cli.md").read_text(), name)
    for param in command.params:
        if isinstance(param, click.Option):
            long = next(o for o in param.opts if o.startswith("--"))
            assert f"`{long}" in section or f", {long}" in section, f"{name}: {long} is not documented"
    documented = set(re.findall(r"^\| `(?:-\w, )?(--[a-z-]+)", section, re.M))
    real = {o for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")}
    assert documented <= real, f"{name}: documented but not an option: {sorted(documented - real)}"


def test_every_measurement_key_is_documented() -> None:
    m = Measurement(
        "a.example",
        "A",
        "udp://127.0.0.1",
        Transport.UDP,
        Outcome.RESOLVED,
        False,
        None,
        None,
        "NOERROR",
        (),
        (),
        (),
        None,
        None,
        1.0,
        "2026-12-01T00:00:00.000Z",
        None,
        None,
    )
    text = (DOCS / "measurement.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert set(m.to_json()) <= documented, sorted(set(m.to_json()) - documented)
    for outcome in Outcome:
        assert f"`{outcome}`" in text


def test_every_lists_key_is_documented() -> None:
    text = (DOCS / "lists.md").read_text()
    for key in sorted(_ORDER_KEYS | _CONTROL_KEYS):
        assert re.search(rf"^\s+(- )?{key}:", text, re.M), f"lists key {key!r} is not in docs/lists.md"


def _metrics_table() -> dict[str, set[str]]:
    rows = re.findall(r"^\| `(blockprobe_\w+)` \|([^|]*)\|", (DOCS / "metrics.md").read_text(), re.M)
    return {name: set(re.findall(r"`(\w+)`", labels)) for name, labels in rows}


def _code_metrics() -> dict[str, set[str]]:
    """prometheus_client metrics as constructed in the code: Counter("name", "help", [labels])."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / "collector" / "metrics.py", ROOT / "probe" / "daemon" / "run.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in ("Counter", "Gauge", "Histogram") or not node.args:
                continue
            name = ast.literal_eval(node.args[0])
            labels = ast.literal_eval(node.args[2]) if len(node.args) > 2 else []
            out[name + ("_total" if node.func.id == "Counter" else "")] = set(labels)
    return out


def _daemon_families(tmp: Path) -> dict[str, set[str] | None]:
    """The probe daemon's metrics as its registry really exposes them (custom collectors
    included); labels None where a family has no sample yet to show them."""
    doc = {
        "probe": {"id": "docs", "region": "r", "country": "IT"},
        "resolvers": ["udp://127.0.0.1"],
        "state_dir": str(tmp / "state"),
        "verify": {"mode": "off"},
    }
    daemon = Daemon(parse_config(json.dumps(doc), "probe.yaml", tmp))
    out: dict[str, set[str] | None] = {}
    for family in daemon.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = {k for s in family.samples for k in s.labels} if family.samples else None
    return out


def test_every_metric_and_label_in_the_docs_exists_and_every_findings_metric_is_documented(
    tmp_path: Path,
) -> None:
    documented = _metrics_table()
    ast_found = _code_metrics()
    code: dict[str, set[str] | None] = {
        name: set(labels) for name, (_kind, _help, labels) in FAMILIES.items()
    }
    code |= {name: labels for name, labels in _daemon_families(tmp_path).items() if name not in ast_found}
    code |= dict(ast_found)
    for name, labels in documented.items():
        assert name in code, f"docs/metrics.md names {name}, which the code does not have"
        if code[name] is not None:
            assert labels == code[name], (
                f"{name}: documented labels {sorted(labels)}, code {sorted(code[name] or ())}"
            )
    assert set(code) <= set(documented), sorted(set(code) - set(documented))


# Everything a user reads from the repository: it must stand on its own (the project's
# design notes live outside it, and a pointer there leads nowhere for a user).
READ = sorted(
    [
        ROOT / "README.md",
        ROOT / "dashboards" / "RUNBOOK.md",
        *DOCS.rglob("*.md"),
        *(ROOT / "probe" / "data").glob("*.yaml"),
    ]
)


@pytest.mark.parametrize("path", READ, ids=[str(p.relative_to(ROOT)) for p in READ])
def test_docs_never_point_outside_the_repository(path: Path) -> None:
    text = path.read_text()
    for outside in ("CONTRACTS.md", "DESIGN.md", "STYLE.md", "block-signals.md", "../shared"):
        lines = [i + 1 for i, line in enumerate(text.splitlines()) if outside in line]
        assert not lines, f"{path.relative_to(ROOT)}:{lines[0] if lines else 0} points to {outside}"
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in link or link.startswith("mailto:"):
            continue
        assert (path.parent / link).exists(), (
            f"{path.relative_to(ROOT)} links to {link}, which does not exist"
        )


def test_readme_points_into_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\((docs/[\w./#-]+)\)", readme)
    assert links
    for link in links:
        assert (ROOT / link.split("#")[0]).exists(), link
