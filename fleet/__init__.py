"""The whole-fleet demo (`make demo`): every part of blockprobe on one machine, offline, until Ctrl-C.

It lives outside `probe` and `collector` because it depends on both and neither may
depend on it: the lab resolvers of `probe demo` run in this process (on 127.53.0.x);
the collector and three probe daemons run as processes started through their own
commands (`collector serve`, `probe run`), exactly as deployed; and, when Debian's
prometheus is installed, a Prometheus scrapes them with demo-only rules generated
from the same alert definitions (dashboards/alerts.py) but with short `for:`
durations, so that a newcomer sees alerts fire within the minute. Two probes stand in
Italy, so that the "confirmed" (two-probe) alerts fire too; one stands in France, from
where every Italian block is over-reach.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Protocol

import httpx2
import yaml

__all__ = ["DEMO_FOR", "FIRES", "PROBES", "QUIET", "Fleet", "alert_deadline", "demo_rules", "silent_after"]

# (probe id, country): two in Italy confirm each other's findings; France sees over-reach.
PROBES = (("it-demo-1", "IT"), ("it-demo-2", "IT"), ("fr-demo-1", "FR"))
DEMO_FOR = "30s"  # every alert's `for:` in the demo (production: 10-15 minutes)
_SCRAPE = 5.0  # Prometheus scrape and evaluation interval in the demo, seconds
_PUSH = 2.0  # probes push every _PUSH seconds
WIDTH = 80  # the banner fits an 80-column terminal

# The alerts the demo fires within alert_deadline(), and why each of the others does not.
FIRES = (
    "BlockprobeLeak",
    "BlockprobeOverblock",
    "BlockprobeLeakName",
    "BlockprobeOverblockName",
    "BlockprobeLeakConfirmed",
    "BlockprobeOverblockConfirmed",
)
SILENT = "BlockprobeProbeSilent"  # fires only if a probe stops: the banner says after how long
QUIET = {
    "BlockprobeResolverUnreachable": "every lab resolver answers on every transport",
    "BlockprobeCanaryFailing": "the demo probes ask no canaries",
    "BlockprobeControlFailing": "the lab control answers every name",
    "BlockprobeOrderDeadlineMissed": "the demo order has no deadline",
}


def demo_rules() -> dict[str, object]:
    """The production alert and recording rules with every `for:` shortened to DEMO_FOR."""
    from dashboards.build import prometheus_rules

    return prometheus_rules(for_override=DEMO_FOR)


def _seconds(duration: str) -> int:
    """A Prometheus duration as the rules write them (30s, 15m, 1h30m) in seconds."""
    parts = re.findall(r"(\d+)([smhd])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"{duration!r} is not a duration of s, m, h or d")
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)


def _rule(name: str) -> dict[str, str]:
    groups = demo_rules()["groups"]
    for group in groups if isinstance(groups, list) else []:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return dict(rule)
    raise KeyError(f"no alert {name} in the demo rules")


def silent_after() -> int:
    """Seconds a probe must stay silent before BlockprobeProbeSilent fires under the demo rules:
    the silence its expression waits for (`… > N`) and then its `for:`."""
    rule = _rule(SILENT)
    m = re.search(r">\s*(\d+)\s*$", rule["expr"])
    if m is None:
        raise ValueError(f"{SILENT}: no `> seconds` threshold in {rule['expr']!r}")
    return int(m.group(1)) + _seconds(rule["for"])


def alert_deadline(interval: float) -> float:
    """Seconds from start by which the leak and overblock alerts fire, warning and confirmed.

    A round (at start, then every `interval`; the first can take a round's timeout), a
    push, a scrape and an evaluation to go pending, DEMO_FOR pending, and an evaluation
    to fire; plus the time to start the processes, with slack for a loaded machine.
    """
    return 15 + interval + _PUSH + 2 * _SCRAPE + _seconds(DEMO_FOR) + _SCRAPE + 20


def _duration_words(seconds: int) -> str:
    """930 → "15 min 30 s"; 900 → "15 min"."""
    minutes, s = divmod(seconds, 60)
    return " ".join(f"{n} {unit}" for n, unit in ((minutes, "min"), (s, "s")) if n) or "0 s"


def _alert_lines(interval: float) -> list[str]:
    """When each kind of alert fires in the demo, from the demo's own rules, wrapped to WIDTH."""
    from dashboards.alerts import ALERTS

    production = {a.name: a.for_ for a in ALERTS}
    unexplained = set(production) - set(FIRES) - set(QUIET) - {SILENT}
    if unexplained:
        raise RuntimeError(f"the banner says nothing of {sorted(unexplained)}")
    para = [
        f"Demo rules: every `for:` is {DEMO_FOR} (production: {production['BlockprobeLeak']} for one probe, "
        f"{production['BlockprobeLeakConfirmed']} for two).",
        f"Within {alert_deadline(interval):.0f} s of start: BlockprobeLeak and BlockprobeOverblock (warning, one "
        "probe), BlockprobeLeakName and BlockprobeOverblockName (one per name: the demo's groups are small), "
        "BlockprobeLeakConfirmed and BlockprobeOverblockConfirmed (critical, both Italian probes).",
        f"{SILENT} fires only if a probe stops reporting for {_duration_words(silent_after())}.",
        "Never in the demo: "
        + "; ".join(f"{name} ({why})" for name, why in QUIET.items() if name in production)
        + ".",
    ]
    indent = " " * 17
    return [
        line
        for sentence in para
        for line in textwrap.wrap(
            sentence,
            WIDTH,
            initial_indent=indent,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    ]


def _free_port(host: str, preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port on loopback")


class _Stoppable(Protocol):
    def stop(self) -> None: ...


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Fleet:
    """The running fleet: its processes, its URLs, and where its state lives."""

    work: Path
    keep_state: bool
    interval: float
    collector_url: str = ""
    prometheus_url: str | None = None
    metrics_ports: list[int] = field(default_factory=list)
    children: list[_Child] = field(default_factory=list)
    _lab: _Stoppable | None = None  # the lab's thread (probe.lab is imported only when started)

    # starting ---------------------------------------------------------------------------
    def start(self, with_prometheus: bool = True) -> None:
        """Start the lab, the collector, the probes and Prometheus; return once the collector answers."""
        from probe.demo import DemoLab
        from probe.lab import LabThread

        lab = DemoLab.build()
        thread = LabThread()
        for server in lab.servers.values():
            thread.start(server)
        self._lab = thread
        port = _free_port("127.0.0.1", 8478)
        self.collector_url = f"http://127.0.0.1:{port}"
        prom_port = _free_port("127.0.0.1", 9090) if with_prometheus and shutil.which("prometheus") else None
        if prom_port:
            self.prometheus_url = f"http://127.0.0.1:{prom_port}"
        home = self.work / "collector"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "collector.yaml"
        doc: dict[str, object] = {
            "listen": f"127.0.0.1:{port}",
            "stale_after": int(self.interval * 4) + 10,
            "state_dir": str(home),
        }
        if self.prometheus_url:
            doc["prometheus"] = self.prometheus_url
        config.write_text(yaml.safe_dump(doc))
        tokens = {probe_id: f"demo-token-{probe_id}-{os.urandom(8).hex()}" for probe_id, _ in PROBES}
        for probe_id, token in tokens.items():
            # Through the collector's own command, as the Ansible role provisions tokens.
            subprocess.run(
                [*_command("collector"), "token", "set", probe_id, "--config", str(config)],
                input=token.encode(),
                check=True,
                capture_output=True,
                timeout=60,
            )
        self._spawn("collector", [*_command("collector"), "serve", "--config", str(config)])
        lists = resources.files("probe").joinpath("data/demo-lists.yaml")
        resolvers = [
            {"spec": lab.servers[name].specs()[t], "kind": lab.kinds[name][0], "operator": lab.kinds[name][1]}
            for name in ("isp-nxdomain", "isp-blockpage", "public-leaky", "public-censor")
            for t in ("udp", "doh")
        ]
        for i, (probe_id, country) in enumerate(PROBES):
            pdir = self.work / probe_id
            pdir.mkdir(parents=True, exist_ok=True)
            (pdir / "token").write_text(tokens[probe_id])
            mport = _free_port("127.0.0.1", 9478 + i)
            self.metrics_ports.append(mport)
            cfg = {
                "probe": {"id": probe_id, "region": f"{country.lower()}-demo", "country": country},
                "collector": {"url": self.collector_url, "token_file": str(pdir / "token"), "timeout": 5},
                "resolvers": resolvers,
                "lists": [str(lists)],
                "controls": [lab.servers["control"].specs()["udp"]],
                "schedule": {"interval": self.interval, "jitter": 1, "push_interval": _PUSH},
                "qtypes": ["A", "AAAA", "HTTPS"],
                "timeout": 2,
                "udp_linger": 0.05,
                "qps": 0,
                "ca_file": str(lab.ca.ca_file),
                "state_dir": str(pdir / "state"),
                "verify": {"mode": "off"},  # the demo stays on loopback: no answer checks
                "metrics": {"listen": f"127.0.0.1:{mport}"},
                "log": {"level": "warning"},
            }
            (pdir / "probe.yaml").write_text(json.dumps(cfg, indent=1))
            self._spawn(probe_id, [*_command("probe"), "run", "--config", str(pdir / "probe.yaml")])
        if prom_port:
            self._start_prometheus(port, prom_port)
        self._wait(lambda: _get(self.collector_url + "/healthz") == 200, 60, "the collector to answer")

    def _start_prometheus(self, collector_port: int, prom_port: int) -> None:
        rules = self.work / "demo.rules.yml"
        rules.write_text(
            "# The demo's rules: dashboards/alerts.py with every `for:` set to "
            + DEMO_FOR
            + "\n"
            + yaml.safe_dump(demo_rules(), sort_keys=False)
        )
        cfg = {
            "global": {"scrape_interval": f"{_SCRAPE:g}s", "evaluation_interval": f"{_SCRAPE:g}s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "blockprobe-collector",
                    "static_configs": [{"targets": [f"127.0.0.1:{collector_port}"]}],
                },
                {
                    "job_name": "blockprobe-probes",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in self.metrics_ports]}],
                },
            ],
        }
        (self.work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self._spawn(
            "prometheus",
            [
                "prometheus",
                f"--config.file={self.work / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            # A session of its own: Ctrl-C reaches only this process, which stops the
            # children in order (probes push what they have before the collector goes).
            # And a parent-death signal: if this process is killed outright, they stop too.
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        self.children.append(_Child(name, proc, log))

    def _wait(self, check: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            dead = [c for c in self.children if c.proc.poll() is not None]
            if dead:
                c = dead[0]
                tail = c.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{c.name} exited with status {c.proc.returncode}:\n{tail}")
            if check():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {seconds:g}s waiting for {what}")

    # stopping ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process (probes first, so their last push lands), the lab, and remove the state."""
        order = sorted(self.children, key=lambda c: (c.name == "collector", c.name == "prometheus"))
        for c in order:
            if c.proc.poll() is None and c.name != "collector":
                c.proc.terminate()
        for c in order:
            if c.name == "collector" and c.proc.poll() is None:
                for other in self.children:
                    if other.name != "collector":
                        _wait_exit(other.proc, 15)
                c.proc.terminate()
        for c in order:
            _wait_exit(c.proc, 15)
        if self._lab is not None:
            self._lab.stop()
            self._lab = None
        if not self.keep_state:
            shutil.rmtree(self.work, ignore_errors=True)

    def banner(self, out: IO[str]) -> None:
        """What runs where, what to look at, and when each kind of alert fires."""
        ids = ", ".join(f"{p} ({c})" for p, c in PROBES)
        ports = ", ".join(f":{p}" for p in self.metrics_ports)
        lines = [
            "blockprobe fleet demo: all on loopback (127.0.0.0/8); nothing leaves this host",
            "  lab resolvers  127.53.0.1-4, control 127.53.0.9: those of `probe demo`",
            f"  collector      {self.collector_url}/   status page: the answer first",
            f"                 {self.collector_url}/metrics   what Prometheus scrapes",
            f"  probes         {ids}",
            f"                 a round every {self.interval:g}s; their own metrics on {ports}",
        ]
        if self.prometheus_url:
            lines += [f"  prometheus     {self.prometheus_url}/alerts", *_alert_lines(self.interval)]
        else:
            lines.append("  prometheus     not started (install Debian's prometheus to see alerts fire)")
        lines += textwrap.wrap(
            "What to look at: within seconds the status page lists leaks (the public resolver, and "
            "AAAA on the block-page ISP) and overblocks (a control name on that ISP; from France, "
            "every Italian block).",
            WIDTH,
        )
        lines += [
            f"State in {self.work}",
            ("Kept on exit." if self.keep_state else "Removed on exit (--keep-state keeps it).")
            + " Ctrl-C stops everything.",
        ]
        for line in lines:
            out.write(line + "\n")
        out.flush()


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook: SIGTERM to the child when this process dies (Linux prctl PR_SET_PDEATHSIG).

    libc is looked up here, in the parent: the hook runs between fork and exec while the lab's
    thread may hold locks (the import lock among them), so it only calls the C function.
    """
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    term = int(signal.SIGTERM)

    def hook() -> None:
        prctl(1, term)

    return hook


def _command(name: str) -> list[str]:
    """A console script of this installation, run by this interpreter (no PATH lookup)."""
    module = {"probe": "probe.cli", "collector": "collector.cli"}[name]
    return [sys.executable, "-m", module]


def _get(url: str) -> int:
    try:
        return httpx2.get(url, timeout=2).status_code
    except httpx2.HTTPError:
        return 0


def _wait_exit(proc: subprocess.Popen[bytes], seconds: float) -> None:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(
    work: Path | None = None,
    *,
    with_prometheus: bool = True,
    interval: float = 15.0,
    keep_state: bool = False,
    out: IO[str] = sys.stdout,
) -> int:
    """Run the fleet until SIGINT or SIGTERM; 0 after a clean stop, 1 when a part failed to start."""
    keep = keep_state or work is not None
    work = work or Path(tempfile.mkdtemp(prefix="blockprobe-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    # A plain flag: a signal handler that takes a lock the main thread may hold deadlocks.
    stopping = [False]

    def stop(*_: object) -> None:
        stopping[0] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    fleet = Fleet(work, keep, interval)
    try:
        try:
            fleet.start(with_prometheus)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            out.write(f"demo: could not start: {exc}\n")
            return 1
        fleet.banner(out)
        while not stopping[0]:
            dead = [c for c in fleet.children if c.proc.poll() is not None]
            if dead:
                c = dead[0]
                out.write(f"demo: {c.name} exited ({c.proc.returncode}); its log:\n")
                out.write(c.log.read_text(errors="replace")[-2000:] + "\n")
                return 1
            time.sleep(0.2)
        return 0
    finally:
        out.write("stopping…\n")
        out.flush()
        fleet.stop()
        if not keep:
            out.write(f"removed {work}\n")
        out.write("stopped\n")
        out.flush()
