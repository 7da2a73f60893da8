"""Real unbound and BIND on loopback, with DoT, DoH and response-policy zones, started and stopped by pid.

Used by the interop tests and the benchmark. Each server gets its own loopback
address and free ports; configuration and zone files live in a temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query

__all__ = ["RealResolver", "free_port", "have", "start_named", "start_unbound"]

SOA = "@ 60 IN SOA ns.localhost. hostmaster.localhost. 1 3600 600 86400 60\n@ 60 IN NS localhost.\n"


def have(program: str) -> bool:
    return shutil.which(program) is not None or Path("/usr/sbin", program).exists()


def _exe(program: str) -> str:
    return shutil.which(program) or str(Path("/usr/sbin", program))


def free_port(host: str) -> int:
    """A port free on `host` for both UDP and TCP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            return port
    raise OSError(f"no free port on {host}")


@dataclass
class RealResolver:
    name: str
    host: str
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    workdir: Path
    log: Path
    specs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h = self.host
        self.specs = {
            "udp": f"udp://{h}:{self.ports['dns']}",
            "tcp": f"tcp://{h}:{self.ports['dns']}",
            "dot": f"tls://{h}:{self.ports['dot']}",
            "doh": f"https://{h}:{self.ports['doh']}/dns-query",
        }

    def wait_ready(self, probe_name: str, deadline_s: float = 30.0) -> None:
        """Wait (with a deadline) until the server answers a query over UDP."""
        deadline = time.monotonic() + deadline_s
        query = dns.message.make_query(probe_name, "A")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                dns.query.udp(query, self.host, port=self.ports["dns"], timeout=0.5)
                return
            except (OSError, dns.exception.Timeout):
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer within {deadline_s}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_unbound(
    workdir: Path,
    host: str,
    cert: Path,
    key: Path,
    *,
    zone_name: str,
    zone_text: str,
    rpz_text: str = "",
    local_zones: str = "",
    threads: int = 1,
) -> RealResolver:
    """unbound serving `zone_name` from an auth-zone, behind an optional RPZ, on UDP/TCP/DoT/DoH."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"dns": free_port(host), "dot": free_port(host), "doh": free_port(host)}
    (workdir / "zone.db").write_text(f"$ORIGIN {zone_name}.\n" + SOA + zone_text)
    rpz = ""
    if rpz_text:
        (workdir / "rpz.db").write_text("$ORIGIN rpz.local.\n" + SOA + rpz_text)
        rpz = f'rpz:\n  name: "rpz.local."\n  zonefile: "{workdir}/rpz.db"\n'
    conf = workdir / "unbound.conf"
    conf.write_text(
        f"""server:
  directory: "{workdir}"
  chroot: ""
  username: ""
  pidfile: "{workdir}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-daemonize: no
  num-threads: {threads}
  interface: {host}@{ports["dns"]}
  interface: {host}@{ports["dot"]}
  interface: {host}@{ports["doh"]}
  port: {ports["dns"]}
  tls-port: {ports["dot"]}
  https-port: {ports["doh"]}
  tls-service-key: "{key}"
  tls-service-pem: "{cert}"
  access-control: 127.0.0.0/8 allow
  do-ip6: no
  module-config: "respip iterator"
  incoming-num-tcp: 1000
  http-max-streams: 1000
  rrset-cache-size: 16m
  msg-cache-size: 8m
  qname-minimisation: no
{local_zones}
auth-zone:
  name: "{zone_name}."
  zonefile: "{workdir}/zone.db"
  for-downstream: no
  for-upstream: yes
  fallback-enabled: no
{rpz}"""
    )
    log = workdir / "unbound.log"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [_exe("unbound"), "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
        )
    return RealResolver("unbound", host, proc, ports, workdir, log)


def start_named(
    workdir: Path,
    host: str,
    cert: Path,
    key: Path,
    *,
    zone_name: str,
    zone_text: str,
    rpz_text: str = "",
    threads: int = 1,
) -> RealResolver:
    """BIND serving `zone_name` as primary, recursion on, behind an optional RPZ, on UDP/TCP/DoT/DoH."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"dns": free_port(host), "dot": free_port(host), "doh": free_port(host)}
    (workdir / "zone.db").write_text(f"$ORIGIN {zone_name}.\n" + SOA + zone_text)
    policy = ""
    rpz_zone = ""
    if rpz_text:
        (workdir / "rpz.db").write_text("$ORIGIN rpz.local.\n" + SOA + rpz_text)
        # qname-wait-recurse no: apply QNAME policies without first resolving the name.
        policy = 'response-policy { zone "rpz.local"; } qname-wait-recurse no;'
        rpz_zone = f'zone "rpz.local" {{ type primary; file "{workdir}/rpz.db"; allow-query {{ none; }}; }};'
    conf = workdir / "named.conf"
    conf.write_text(
        f"""options {{
  directory "{workdir}";
  pid-file "{workdir}/named.pid";
  session-keyfile "{workdir}/session.key";
  listen-on port {ports["dns"]} {{ {host}; }};
  listen-on port {ports["dot"]} tls local-tls {{ {host}; }};
  listen-on port {ports["doh"]} tls local-tls http local-http {{ {host}; }};
  listen-on-v6 {{ none; }};
  recursion yes;
  allow-recursion {{ 127.0.0.0/8; }};
  allow-query {{ any; }};
  dnssec-validation no;
  notify no;
  {policy}
}};
controls {{ }};
tls local-tls {{ key-file "{key}"; cert-file "{cert}"; }};
http local-http {{ endpoints {{ "/dns-query"; }}; listener-clients 1000; streams-per-connection 1000; }};
zone "{zone_name}" {{ type primary; file "{workdir}/zone.db"; }};
{rpz_zone}
"""
    )
    log = workdir / "named.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [_exe("named"), "-g", "-n", str(threads), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
        )
    return RealResolver("named", host, proc, ports, workdir, log)
