"""The collector with its real clients: the probe daemon, schemathesis, Chromium, and its own CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli import cli as collector_cli
from collector.store import open_store
from probe.lab import LabServer

from .fake_collector import wait_for
from .test_collector import Server, batch, measurement, post
from .test_daemon import PER_ROUND, _Running, _write_config, control, isp  # noqa: F401 - fixtures

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Server]:
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    s = Server(store)
    yield s
    s.stop()
    store.close()


def test_real_probe_daemon_reports_to_the_real_collector(
    tmp_path: Path,
    live: Server,
    isp: LabServer,  # noqa: F811
    control: LabServer,  # noqa: F811
) -> None:
    token = live.token("it-test-1")
    config = _write_config(tmp_path, isp, control, live.url)
    (tmp_path / "token").write_text(token)
    run = _Running(config)
    try:
        wait_for(
            lambda: run.daemon.rounds_done >= 2 and run.daemon.spool.depth() == 0, 30, "two rounds pushed"
        )
    finally:
        run.stop()
    with live.store.tx() as cur:
        cur.execute("SELECT count(*), count(DISTINCT batch_id) FROM archive")
        rows, batches = cur.fetchone()
    assert rows == run.daemon.rounds_done * PER_ROUND
    assert batches >= 2
    scrape = live.scrape()
    enforced = [k for k in scrape if k.startswith("blockprobe_domains{") and 'finding="enforced"' in k]
    assert enforced
    assert all('probe="it-test-1"' in k and 'list="agcom-lab-1"' in k for k in enforced)


def test_fuzzing_the_api_from_its_openapi_finds_no_server_error(live: Server) -> None:
    if shutil.which("schemathesis") is None and not Path(sys.executable).with_name("schemathesis").exists():
        pytest.skip("schemathesis is not installed (make test installs it)")
    token = live.token("it-1")
    exe = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    result = subprocess.run(
        [
            exe,
            "run",
            f"{live.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-n",
            "40",
            "--seed",
            "1",
            "-H",
            f"Authorization: Bearer {token}",
            "--generation-deterministic",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_status_page_in_chromium_shows_the_leak(live: Server, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs it)")
    token = live.token("it-1")
    assert (
        post(live, token, batch(measurements=[measurement(domain="calcio-pirata.example")])).status_code
        == 200
    )
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", live.url + "/"], capture_output=True, text=True, timeout=120
    )
    assert "calcio-pirata.example" in dom.stdout
    assert "1 leak" in dom.stdout
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1280,800", live.url + "/"],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists()
    assert shot.stat().st_size > 5000


def test_report_and_token_commands(tmp_path: Path) -> None:
    cfg = tmp_path / "collector.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    runner = CliRunner()
    added = runner.invoke(collector_cli, ["token", "add", "it-1", "--config", str(cfg)])
    assert added.exit_code == 0
    assert added.stdout.startswith("bp_")
    listed = runner.invoke(collector_cli, ["token", "list", "--config", str(cfg)])
    assert listed.stdout.startswith("it-1\tcreated ")
    assert "active" in listed.stdout
    assert added.stdout.strip() not in listed.stdout
    store = open_store(f"sqlite:///{tmp_path / 'state' / 'collector.sqlite3'}")
    s = Server(store)
    try:
        token = added.stdout.strip()
        post(
            s,
            token,
            batch(
                measurements=[
                    measurement(),
                    measurement(
                        domain="drive.example",
                        finding="overblock",
                        expected="resolves",
                        blocked=True,
                        outcome="nxdomain",
                        expected_by={"list": "controls"},
                    ),
                ]
            ),
        )
    finally:
        s.stop()
        store.close()
    csv_out = runner.invoke(
        collector_cli, ["report", "--config", str(cfg), "--format", "csv"]
    ).stdout.splitlines()
    assert csv_out[0].startswith("finding,rule,country,resolver,transport,qtype,domain,first_seen,last_seen")
    assert any(line.startswith("leak,agcom-1,IT,udp://192.0.2.53,udp,A,pirate.example,") for line in csv_out)
    rows = json.loads(
        runner.invoke(
            collector_cli, ["report", "--config", str(cfg), "--format", "json", "--order", "controls"]
        ).stdout
    )
    assert [(r["finding"], r["domain"], r["probes"]) for r in rows] == [
        ("overblock", "drive.example", ["it-1 (it-milan)"])
    ]
    assert (
        "<table>" in runner.invoke(collector_cli, ["report", "--config", str(cfg), "--format", "html"]).stdout
    )
    revoked = runner.invoke(collector_cli, ["token", "revoke", "it-1", "--config", str(cfg)])
    assert revoked.exit_code == 0
    again = runner.invoke(collector_cli, ["token", "revoke", "it-1", "--config", str(cfg)])
    assert again.exit_code == 2
    assert again.stderr == "collector: probe 'it-1' has no active token\n"


def test_probe_fetches_its_lists_from_the_collector(
    tmp_path: Path,
    isp: LabServer,  # noqa: F811
    control: LabServer,  # noqa: F811
) -> None:
    lists = Path(__file__).parent / "lists" / "lab-orders.yaml"
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    live = Server(store, f"lists: [{lists}]\n")
    try:
        token = live.token("it-test-1")
        config = _write_config(tmp_path, isp, control, live.url, lists=[])
        doc = json.loads(config.read_text())
        doc["collector"]["fetch_lists"] = True
        config.write_text(json.dumps(doc))
        (tmp_path / "token").write_text(token)
        run = _Running(config)
        try:
            wait_for(
                lambda: run.daemon.rounds_done >= 1 and run.daemon.spool.depth() == 0, 30, "a round pushed"
            )
        finally:
            run.stop()
        assert [p.name for p in run.daemon.fetched_lists] == ["lab-orders.yaml"]
        rows = store.evidence(("it-test-1", isp.specs()["udp"], "udp", "A", "pirate.blockprobe-lab.net"))
        assert rows
        assert rows[0]["finding"] == "enforced"
        assert rows[0]["expected_by"]["order"] == "agcom-lab-1"

        # A file the collector no longer publishes goes at the next fetch; what it still
        # publishes stays in force across a restart while the collector is down.
        folder = tmp_path / "state" / "collector-lists"
        assert run.daemon.fetched_lists[0].parent == folder
        withdrawn = folder / "withdrawn.yaml"
        withdrawn.write_text(
            "orders:\n  - id: withdrawn-1\n    authority: A\n    jurisdictions: [IT]\n"
            "    domains: [withdrawn.blockprobe-lab.net]\n"
        )
        again = _Running(config)
        try:
            wait_for(lambda: again.daemon.rounds_done >= 1, 30, "a round after a restart")
        finally:
            again.stop()
        assert sorted(p.name for p in folder.iterdir()) == ["lab-orders.yaml"]
    finally:
        live.stop()
        store.close()
    down = _Running(config)  # the collector is gone now
    try:
        wait_for(lambda: down.daemon.rounds_done >= 1, 30, "a round with the collector down")
        assert down.daemon.lists is not None
        assert [o.id for o in down.daemon.lists.orders] == ["agcom-lab-1"]
    finally:
        down.stop()
