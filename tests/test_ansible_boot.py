"""Boot the converged Debian 12 tree with systemd-nspawn: the services start under systemd and the
probe's results reach the collector, both inside the container, over loopback.

Slower than the rest (debootstrap, pip, a boot: about 3 minutes), so not part of `make
test`; `make test-boot` runs it, and so does CI after `make test` (see .ci/run).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import yaml

from probe.demo import DemoLab
from probe.lab import LabThread

from .debian import build_wheel, debian_tree
from .fake_collector import wait_for
from .real import free_port

ROOT = Path(__file__).parent.parent
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
TOKEN = "boot-token-0123456789abcdef"

pytestmark = [
    pytest.mark.boot,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("debootstrap") is None or shutil.which("systemd-nspawn") is None,
        reason="needs root, debootstrap and systemd-nspawn",
    ),
]


def test_services_start_under_systemd_and_results_reach_the_collector(tmp_path: Path) -> None:
    tree = debian_tree(tmp_path / "root")
    wheel = build_wheel(tmp_path / "dist")
    lab = DemoLab.build()
    thread = LabThread()
    for server in lab.servers.values():
        thread.start(server)
    port = free_port("127.0.0.1")
    # The container shares this machine's network namespace: its loopback is ours, so the
    # probe inside reaches the lab resolvers, and the collector inside is reachable from here.
    extra = {
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(tree),
        "ansible_python_interpreter": "/usr/bin/python3",
        "blockprobe_wheel": str(wheel),
        "blockprobe_collector_url": f"http://127.0.0.1:{port}",
        "blockprobe_probe_token": TOKEN,
        "collector_listen": f"127.0.0.1:{port}",
        "probe_manage_service_state": False,
        "collector_manage_service_state": False,
        "probe_id": "it-boot-1",
        "probe_region": "it-boot",
        "probe_country": "IT",
        "probe_public_resolvers": [],
        "probe_canaries_resolve": [],
        "probe_schedule_mode": "rounds",  # a round every 5 s: the test waits for the first push
        "probe_interval": 5,
        "probe_jitter": 0,
        "probe_push_interval": 1,
        "probe_metrics_listen": f"127.0.0.1:{free_port('127.0.0.1')}",
        "probe_isp_resolvers": [
            {"spec": lab.servers["isp-nxdomain"].specs()["udp"], "kind": "isp", "operator": "isp-a"}
        ],
        "probe_controls": [lab.servers["control"].specs()["udp"]],
        "probe_verify": "off",  # the lab answers public addresses: no answer checks off loopback
        # The collector serves the demo lists; the probe fetches them from it (fetch_lists).
        "blockprobe_lists_files": [str(ROOT / "probe" / "data" / "demo-lists.yaml")],
    }
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(extra))
    inventory = {
        "all": {
            "children": {
                "collector": {"hosts": {"boot-target": None}},
                "probes": {"children": {"it_boot": {"hosts": {"boot-target": None}}}},
            }
        }
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah"), "ANSIBLE_NOCOLOR": "1"}
    converge = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(tmp_path / "inventory.yml"),
            "-e",
            f"@{tmp_path / 'vars.yml'}",
            "site.yml",
        ],
        cwd=ANSIBLE,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert converge.returncode == 0, converge.stdout[-5000:]
    boot = subprocess.Popen(
        ["systemd-nspawn", "-b", "--register=no", "--keep-unit", "-q", "-D", str(tree)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:

        def reported() -> bool:
            try:
                text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx2.HTTPError:
                return False
            return 'blockprobe_probe_last_report_timestamp_seconds{country="IT",probe="it-boot-1"' in text

        wait_for(reported, 240, "the containerised probe's results at the containerised collector")
    finally:
        boot.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
        try:
            boot.wait(60)
        except subprocess.TimeoutExpired:
            boot.kill()
        thread.stop()
