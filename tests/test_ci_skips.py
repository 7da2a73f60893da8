"""The CI rule, shown on a throwaway run: a test that skips (as when a tool is missing) fails CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, ci: str | None) -> int:
    test = tmp_path / "test_missing_tool.py"
    test.write_text(
        "import pytest\n\ndef test_needs_a_tool():\n    pytest.skip('frobnicator is not installed')\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's config: a bare run
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-q", "-c", str(tmp_path / "pytest.ini"), "-p", "tests.ci_skips"]
    cmd += ["-p", "no:cacheprovider", str(test)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False).returncode


def test_a_skip_fails_the_run_under_ci(tmp_path: Path) -> None:
    assert _run(tmp_path, "true") == 1


def test_a_skip_is_only_a_skip_locally(tmp_path: Path) -> None:
    assert _run(tmp_path, None) == 0


def _path_without(tool: str, tmp_path: Path) -> str:
    """PATH as it is, with `tool` taken out: each directory holding it is replaced by a shadow
    directory of links to everything else in it."""
    dirs = []
    for i, entry in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        d = Path(entry)
        if entry and (d / tool).exists():
            shadow = tmp_path / f"path{i}"
            shadow.mkdir()
            for item in d.iterdir():
                if item.name != tool:
                    (shadow / item.name).symlink_to(item)
            dirs.append(str(shadow))
        else:
            dirs.append(entry)
    return os.pathsep.join(dirs)


def _run_real(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    tmp_path.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = _path_without("promtool", tmp_path)
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    cmd += ["tests/test_rules.py::test_rules_pass_promtool_lint"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_real_test_whose_tool_is_missing_fails_ci(tmp_path: Path) -> None:
    """The rule on the project's own suite: promtool removed from PATH, its test skips, CI fails."""
    ci = _run_real(tmp_path / "ci", "true")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "CI=true: 1 skipped test(s) fail the run:" in ci.stdout
    assert "  tests/test_rules.py::test_rules_pass_promtool_lint" in ci.stdout.splitlines()
    local = _run_real(tmp_path / "local", None)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "promtool is not installed" in local.stdout  # -rs names why it skipped
