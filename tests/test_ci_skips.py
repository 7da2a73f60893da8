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
