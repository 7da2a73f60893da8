"""The roles really run: converge probe, collector and monitoring into a debootstrapped Debian 12
tree through a chroot connection, check what they installed, converge again (nothing may
change), and have systemd-analyze verify the units.

Needs root, debootstrap and network access to Debian's and PyPI's package archives (both
allowed here); it takes a few minutes, mostly debootstrap and pip inside the tree.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .debian import build_wheel, debian_tree

ROOT = Path(__file__).parent.parent
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
TOKEN = "test-token-0123456789abcdef"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("debootstrap") is None or not (BIN / "ansible-playbook").exists(),
    reason="needs root, debootstrap and ansible (make test installs them)",
)


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
    }


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    work = tmp_path_factory.mktemp("converge")
    tree = debian_tree(work / "root")
    wheel = build_wheel(work / "dist")
    # Extra vars: they win over the example group_vars/all.yml that ships beside site.yml.
    extra = {
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(tree),
        "ansible_python_interpreter": "/usr/bin/python3",
        "blockprobe_wheel": str(wheel),
        "blockprobe_collector_url": "http://127.0.0.1:8478",
        "blockprobe_probe_token": TOKEN,
        "probe_manage_service_state": False,
        "collector_manage_service_state": False,
        "probe_isp_resolvers": [{"spec": "udp://127.53.0.1", "kind": "isp", "operator": "isp-a"}],
        "probe_public_resolvers": [],
        "probe_controls": ["udp://127.53.0.9"],
        "probe_canaries_resolve": [],
        "probe_region": "it-milan",
        "probe_country": "IT",
        "probe_id": "it-milan-1",
    }
    (work / "vars.yml").write_text(yaml.safe_dump(extra))
    inventory = {
        "all": {
            "children": {
                "collector": {"hosts": {"lab-target": None}},
                "monitoring": {"hosts": {"lab-target": None}},
                "probes": {"children": {"it_milan": {"hosts": {"lab-target": None}}}},
            },
        }
    }
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
    yield {"work": work, "tree": tree, "inventory": work / "inventory.yml", "vars": work / "vars.yml"}
    subprocess.run(["umount", "-R", str(tree / "proc")], capture_output=True)


def _converge(t: dict[str, Path], *extra: str) -> str:
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(t["inventory"]), "-e", f"@{t['vars']}", "site.yml", *extra],
        cwd=ANSIBLE,
        capture_output=True,
        text=True,
        env=_env(t["work"]),
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result.stdout


def _recap(out: str) -> dict[str, int]:
    m = re.search(r"lab-target\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
    assert m, out[-2000:]
    return {"ok": int(m.group(1)), "changed": int(m.group(2)), "failed": int(m.group(4))}


def test_converge_installs_a_hardened_probe_and_collector_and_a_second_run_changes_nothing(
    target: dict[str, Path],
) -> None:
    tree = target["tree"]
    first = _recap(_converge(target))
    assert first["changed"] > 0
    assert first["failed"] == 0

    # What the roles installed.
    version = subprocess.run(
        ["chroot", str(tree), "/opt/blockprobe/venv/bin/probe", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.startswith("probe, version")
    token = tree / "etc/blockprobe/token"
    st = token.stat()
    assert stat.S_IMODE(st.st_mode) == 0o400
    assert token.read_text().strip() == TOKEN
    owner = subprocess.run(
        ["chroot", str(tree), "stat", "-c", "%U", "/etc/blockprobe/token"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert owner == "blockprobe"
    config = yaml.safe_load((tree / "etc/blockprobe/probe.yaml").read_text())
    assert config["probe"] == {"id": "it-milan-1", "region": "it-milan", "country": "IT"}
    unit = (tree / "etc/systemd/system/blockprobe-probe.service").read_text()
    for hardening in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=blockprobe",
        "Restart=on-failure",
        "User=blockprobe",
    ):
        assert hardening in unit
    assert (tree / "etc/systemd/system/multi-user.target.wants/blockprobe-probe.service").is_symlink()
    assert (tree / "etc/systemd/system/multi-user.target.wants/blockprobe-collector.service").is_symlink()
    tokens = subprocess.run(
        [
            "chroot",
            str(tree),
            "runuser",
            "-u",
            "blockprobe-collector",
            "--",
            "/opt/blockprobe-collector/venv/bin/collector",
            "token",
            "list",
            "--config",
            "/etc/blockprobe-collector/collector.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert tokens.stdout.startswith("it-milan-1\t")
    assert "active" in tokens.stdout
    assert (tree / "etc/prometheus/rules.d/blockprobe.rules.yml").exists()
    assert (tree / "var/lib/grafana/dashboards/blockprobe/blockprobe-leaks.json").exists()

    # Idempotent: a second converge changes nothing; --check --diff runs too.
    second = _recap(_converge(target))
    assert second["changed"] == 0, second
    assert _recap(_converge(target, "--check", "--diff"))["changed"] == 0

    # systemd accepts the units.
    if shutil.which("systemd-analyze"):
        for name in ("blockprobe-probe.service", "blockprobe-collector.service"):
            verify = subprocess.run(
                ["systemd-analyze", "verify", f"--root={tree}", f"/etc/systemd/system/{name}"],
                capture_output=True,
                text=True,
            )
            assert verify.returncode == 0, verify.stdout + verify.stderr
