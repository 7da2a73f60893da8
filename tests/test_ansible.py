"""The Ansible roles: ansible-lint's production profile and a syntax check of the playbook."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return found


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "HOME": str(tmp_path),
        "ANSIBLE_NOCOLOR": "1",
        # Loopback only: no version check, no schema refresh, no collection installs from Galaxy.
        "ANSIBLE_LINT_SKIP_SCHEMA_UPDATE": "1",
        "ANSIBLE_LINT_NODEPS": "1",
        "ANSIBLE_LINT_OFFLINE": "1",
    }


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    result = subprocess.run(
        [_tool("ansible-lint"), "--offline", "--profile", "production", "--nocolor", "."],
        cwd=ANSIBLE,
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_playbook_syntax(tmp_path: Path) -> None:
    result = subprocess.run(
        [_tool("ansible-playbook"), "--syntax-check", "-i", "inventory/example.yml", "site.yml"],
        cwd=ANSIBLE,
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Invalid characters were found in group names" not in result.stderr
