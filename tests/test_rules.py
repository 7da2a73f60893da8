"""The alert rules: promtool's checks and unit tests, and the generated files kept in step."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
RULES = ROOT / "dashboards" / "prometheus" / "blockprobe.rules.yml"
promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (make test installs it)"
)


@promtool
def test_rules_pass_promtool_lint() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", "--lint=all", "--lint-fatal", str(RULES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@promtool
def test_every_alert_has_a_passing_unit_test() -> None:
    tests = ROOT / "dashboards" / "prometheus" / "tests" / "alerts.test.yml"
    result = subprocess.run(
        ["promtool", "test", "rules", str(tests)], capture_output=True, text=True, cwd=tests.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", tests.read_text()))
    defined = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    assert defined <= tested, f"alerts without a unit test: {sorted(defined - tested)}"


@promtool
def test_alertmanager_example_is_valid() -> None:
    if shutil.which("amtool") is None:
        pytest.skip("amtool is not installed")
    result = subprocess.run(
        ["amtool", "check-config", str(ROOT / "dashboards" / "alertmanager" / "example.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dashboards.build", "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_every_alert_is_described_and_has_a_runbook_section() -> None:
    runbook = (ROOT / "dashboards" / "RUNBOOK.md").read_text()
    anchors = {h[3:].strip().lower() for h in runbook.splitlines() if h.startswith("## ")}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys()
            assert rule["annotations"]["runbook_url"].split("#")[1] in anchors, rule["alert"]


def test_grafana_alerting_matches_the_prometheus_rules() -> None:
    grafana = yaml.safe_load(
        (ROOT / "dashboards" / "grafana" / "provisioning" / "alerting" / "blockprobe.yaml").read_text()
    )
    prom = {
        r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    rules = grafana["groups"][0]["rules"]
    assert {r["title"] for r in rules} == set(prom)
    records = [
        r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r
    ]
    for r in rules:
        theirs = prom[r["title"]]
        assert r["for"] == theirs["for"]
        assert r["labels"]["severity"] == theirs["labels"]["severity"]
        assert "$" not in "".join(r["labels"].values())  # provisioning would expand it
        expr = r["data"][0]["model"]["expr"]
        assert not [name for name in records if name in expr], "Grafana must not rely on recorded series"
        if " query " in str(theirs["annotations"]):
            # Grafana's templates have no `query`: its own texts, the same runbook.
            assert " query " not in str(r["annotations"])
            assert r["annotations"]["runbook_url"] == theirs["annotations"]["runbook_url"]
        else:
            assert r["annotations"] == theirs["annotations"]


def test_leak_and_overblock_alerts_group_by_order_resolver_transport_country() -> None:
    """Never per name: a resolver that ignores a whole order must be one alert per transport."""
    from dashboards.alerts import ALERTS, RECORDING

    recorded = {r.record: r.expr for r in RECORDING}
    for a in ALERTS:
        if a.name.startswith(("BlockprobeLeak", "BlockprobeOverblock")) and not a.name.endswith("Name"):
            expr = recorded[a.expr.split()[0]]
            key = "order" if "Leak" in a.name else "list"
            assert expr.startswith(f"count by ({key}, country, resolver, transport) ("), a.name
            assert "domain" not in expr
            assert "qtype" not in expr


def test_per_name_alerts_exist_only_below_the_threshold() -> None:
    """One alert per name only while the group is small: the threshold bounds every per-name alert."""
    from dashboards.alerts import ALERTS, NAME_ALERTS_MAX, RECORDING

    assert 1 <= NAME_ALERTS_MAX <= 10
    recorded = {r.record: r.expr for r in RECORDING}
    per_name = {a.name: a for a in ALERTS if a.name.endswith("Name")}
    assert set(per_name) == {"BlockprobeLeakName", "BlockprobeOverblockName"}
    for a in per_name.values():
        key = "order" if "Leak" in a.name else "list"
        keys = f"{key}, country, resolver, transport"
        probes, names = (
            a.expr.split()[0],
            f"blockprobe:{'order_leak' if key == 'order' else 'list_overblock'}_names:count",
        )
        assert recorded[probes].startswith(f"count by ({keys}, domain) (")
        assert recorded[names].startswith(f"count by ({keys}) (")
        assert f"and on ({keys}) ({names} <= {NAME_ALERTS_MAX})" in a.expr
        assert f"unless on ({keys}) max by ({keys}) (label_replace(blockprobe_domain_series_capped" in a.expr
        # Distinct probes first: the per-name series are folded by probe before anything counts them.
        name_by_probe = recorded[probes].removeprefix(f"count by ({keys}, domain) (").removesuffix(")")
        assert recorded[name_by_probe].startswith(f"max by (probe, {keys}, domain) (")
        assert str(NAME_ALERTS_MAX) in a.description


def test_monitoring_files_point_only_at_files_the_project_has() -> None:
    """The runbook and the rules' sources cite the project's own docs, never a file outside it."""
    for path in (ROOT / "dashboards").rglob("*"):
        if path.is_file() and path.suffix in (".md", ".py", ".yml", ".yaml", ".json"):
            text = path.read_text()
            assert "CONTRACTS.md" not in text, path
            assert "../shared" not in text, path
    runbook = (ROOT / "dashboards" / "RUNBOOK.md").read_text()
    for ref in re.findall(r"\bdocs/[\w./-]+\.md", runbook):
        assert (ROOT / ref).exists(), ref
