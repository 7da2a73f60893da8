"""`collector demo`: the whole fleet on one machine, offline, until Ctrl-C.

The lab resolvers of `probe demo` (on 127.53.0.x), the collector on its embedded SQLite
default, two probe daemons — one in Italy, one in France — measuring the lab against the
demo lists, and, when Debian's prometheus is installed, a Prometheus scraping all of them
with the alert rules loaded. Within a minute the status page shows leaks and overblocks.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import click
import uvicorn
import yaml

from collector.app import create_app
from collector.auth import hash_token, new_token
from collector.config import parse_collector_config
from collector.store import open_store

__all__ = ["run_fleet"]


def _free_port(host: str, preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


@dataclass
class _ProbeThread:
    daemon: Any
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.stop_event.set)
        self.thread.join(30)


def _start_probe(config_path: Path) -> _ProbeThread:
    from probe.daemon.config import load_config
    from probe.daemon.run import Daemon

    daemon = Daemon(load_config(config_path))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(daemon.run(grace=3),), daemon=True)
    thread.start()
    return _ProbeThread(daemon, loop, thread)


def run_fleet(work: Path | None = None, with_prometheus: bool = True, interval: float = 15.0) -> None:
    """Start everything, print where to look, and stop everything cleanly on Ctrl-C or SIGTERM."""
    from probe.demo import DemoLab
    from probe.lab import LabThread

    work = work or Path(tempfile.mkdtemp(prefix="blockprobe-fleet-"))
    # A plain flag: a signal handler that takes a lock the main thread may hold (Event.set
    # while Event.wait) deadlocks.
    stopping = [False]

    def stop(*_: object) -> None:
        stopping[0] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)

    lab = DemoLab.build()
    lab_thread = LabThread()
    for lab_server in lab.servers.values():
        lab_thread.start(lab_server)

    port = _free_port("127.0.0.1", 8478)
    config = parse_collector_config(f"listen: 127.0.0.1:{port}\nstale_after: {int(interval * 4)}\n"
                                    f"state_dir: {work / 'collector'}\n", base=work)  # fmt: skip
    store = open_store(config.database)
    server = uvicorn.Server(uvicorn.Config(create_app(config, store), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))  # fmt: skip
    # In a thread uvicorn installs no signal handlers: ours decide when everything stops.
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    while not server.started:
        time.sleep(0.05)
    collector_url = f"http://127.0.0.1:{port}"

    lists = resources.files("probe").joinpath("data/demo-lists.yaml")
    probes: list[_ProbeThread] = []
    metrics_ports = []
    for probe_id, country in (("it-demo-1", "IT"), ("fr-demo-1", "FR")):
        token = new_token()
        store.set_token(probe_id, hash_token(token))
        home = work / probe_id
        home.mkdir(parents=True, exist_ok=True)
        (home / "token").write_text(token)
        mport = _free_port("127.0.0.1", 9478 + len(probes))
        metrics_ports.append(mport)
        resolvers = [{"spec": spec, "kind": lab.kinds[name][0], "operator": lab.kinds[name][1]}
                     for name in ("isp-nxdomain", "isp-blockpage", "public-leaky", "public-censor")
                     for spec in (lab.servers[name].specs()["udp"], lab.servers[name].specs()["doh"])]  # fmt: skip
        cfg = {
            "probe": {"id": probe_id, "region": f"{country.lower()}-demo", "country": country},
            "collector": {"url": collector_url, "token_file": str(home / "token"), "timeout": 5},
            "resolvers": resolvers, "lists": [str(lists)], "controls": [lab.servers["control"].specs()["udp"]],
            "schedule": {"interval": interval, "jitter": 1, "push_interval": 2}, "qtypes": ["A", "AAAA", "HTTPS"],
            "timeout": 2, "udp_linger": 0.05, "qps": 0, "ca_file": str(lab.ca.ca_file),
            "state_dir": str(home / "state"), "metrics": {"listen": f"127.0.0.1:{mport}"}, "log": {"level": "warning"},
        }  # fmt: skip
        (home / "probe.yaml").write_text(json.dumps(cfg))
        probes.append(_start_probe(home / "probe.yaml"))

    prometheus = None
    prom_url = None
    rules = Path(__file__).resolve().parent.parent / "dashboards" / "prometheus" / "blockprobe.rules.yml"
    if with_prometheus and shutil.which("prometheus"):
        pport = _free_port("127.0.0.1", 9090)
        prom_cfg = {
            "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
            "rule_files": [str(rules)] if rules.exists() else [],
            "scrape_configs": [
                {"job_name": "blockprobe-collector", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
                {"job_name": "blockprobe-probes",
                 "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in metrics_ports]}]},
            ],
        }  # fmt: skip
        (work / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
        with (work / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{pport}"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        prom_url = f"http://127.0.0.1:{pport}"

    click.echo("blockprobe fleet demo: everything on loopback, offline")
    click.echo("  lab resolvers     127.53.0.1-4 (control 127.53.0.9), every transport; see `probe demo`")
    click.echo(f"  collector         {collector_url}/        status page: leaks and overblocks")
    click.echo(f"                    {collector_url}/metrics  what Prometheus scrapes")
    click.echo(f"  probes            it-demo-1 (IT), fr-demo-1 (FR): a round every {interval:g}s; "
               f"their own metrics on :{metrics_ports[0]} and :{metrics_ports[1]}")  # fmt: skip
    if prom_url:
        click.echo(f"  prometheus        {prom_url}/alerts    the rules of dashboards/prometheus/ "
                   "(they fire after their `for:`, 10-15 minutes)")  # fmt: skip
    else:
        click.echo("  prometheus        not started (install Debian's prometheus to have one)")
    click.echo(
        "What to look at: within a minute the status page lists leaks (the public resolver, and AAAA on the"
    )
    click.echo(
        "block-page ISP) and overblocks (a control name on that ISP; and from France, every Italian block)."
    )
    click.echo(f"State in {work}. Ctrl-C stops everything.")
    try:
        while not stopping[0]:
            time.sleep(0.2)
    finally:
        click.echo("stopping…")
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(20)
        for p in probes:
            p.stop()
        server.should_exit = True
        server_thread.join(10)
        lab_thread.stop()
        store.close()
        click.echo("stopped")
