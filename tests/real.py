"""Real unbound and BIND on loopback, with DoT, DoH and response-policy zones, started and stopped by pid.

Used by the interop tests and the benchmark. Each server gets its own loopback
address and free ports; configuration and zone files live in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query

__all__ = [
    "RealResolver",
    "free_port",
    "have",
    "start_dnsdist",
    "start_dnsmasq",
    "start_kresd",
    "start_named",
    "start_pdns_recursor",
    "start_unbound",
]

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
            port: int = t.getsockname()[1]
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
        # Only the transports the server listens on: dnsmasq and the PowerDNS Recursor speak no TLS.
        h, p = self.host, self.ports
        self.specs = {"udp": f"udp://{h}:{p['dns']}", "tcp": f"tcp://{h}:{p['dns']}"}
        if "dot" in p:
            self.specs["dot"] = f"tls://{h}:{p['dot']}"
        if "doh" in p:
            self.specs["doh"] = f"https://{h}:{p['doh']}/dns-query"
        for name, port in p.items():
            if name.startswith("dot-"):  # extra DoT listeners (dnsdist: in-order and out-of-order)
                self.specs[name] = f"tls://{h}:{port}"

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
    wrap: Sequence[str] = (),
) -> RealResolver:
    """unbound serving `zone_name` from an auth-zone, behind an optional RPZ, on UDP/TCP/DoT/DoH.
    `wrap` prefixes the command (e.g. `ip netns exec NAME`, to run it inside a namespace)."""
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
            [*wrap, _exe("unbound"), "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
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


def _spawn(name: str, host: str, argv: list[str], ports: dict[str, int], workdir: Path) -> RealResolver:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    return RealResolver(name, host, proc, ports, workdir, log)


def start_pdns_recursor(
    workdir: Path,
    host: str,
    *,
    forwards: dict[str, str],
    rpz_text: str = "",
    rpz_ede_text: str = "",
    ede: tuple[int, str] = (15, "blocked by court order"),
    extra: str = "",
) -> RealResolver:
    """PowerDNS Recursor on UDP/TCP forwarding every zone in `forwards` (zone → "ip:port").

    `rpz_text` is an RPZ loaded as is; `rpz_ede_text` a second one whose hits carry the EDE
    `ede` (rpzFile's extendedErrorCode and extendedErrorExtra); `extra` is more recursor.conf.
    Forward "." to loopback, or the recursor primes the real root: the hint file names a
    loopback root for the same reason.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"dns": free_port(host)}
    lua = []
    for label, text in (("plain", rpz_text), ("ede", rpz_ede_text)):
        if not text:
            continue
        (workdir / f"rpz-{label}.db").write_text(f"$ORIGIN rpz-{label}.local.\n" + SOA + text)
        opts = f", extendedErrorCode={ede[0]}, extendedErrorExtra={ede[1]!r}" if label == "ede" else ""
        lua.append(f'rpzFile("{workdir}/rpz-{label}.db", {{policyName="rpz-{label}"{opts}}})')
    (workdir / "recursor.lua").write_text("\n".join(lua) + "\n")
    (workdir / "root.hints").write_text(
        ". 3600000 NS a.root.invalid.\na.root.invalid. 3600000 A 127.53.255.254\n"
    )
    fwd = ",".join(f"{zone}={addr}" for zone, addr in forwards.items())
    (workdir / "recursor.conf").write_text(
        f"""local-address={host}
local-port={ports["dns"]}
allow-from=127.0.0.0/8
socket-dir={workdir}
daemon=no
write-pid=no
threads=1
pdns-distributes-queries=no
dnssec=off
disable-syslog=yes
loglevel=4
security-poll-suffix=
hint-file={workdir}/root.hints
lua-config-file={workdir}/recursor.lua
forward-zones-recurse={fwd}
max-negative-ttl=1
packetcache-ttl=1
{extra}
"""
    )
    return _spawn("pdns_recursor", host, [_exe("pdns_recursor"), f"--config-dir={workdir}"], ports, workdir)


def start_kresd(
    workdir: Path,
    host: str,
    cert: Path,
    key: Path,
    *,
    forwards: dict[str, str],
    policies: str = "",
) -> RealResolver:
    """Knot Resolver on UDP/TCP/DoT/DoH, forwarding (STUB, no validation) each zone in `forwards`.

    `policies` is Lua run before the forwards, e.g. `policy.add(policy.suffix(policy.DENY, ...))`.
    Every name not forwarded elsewhere goes to the "." forward, so nothing leaves loopback.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"dns": free_port(host), "dot": free_port(host), "doh": free_port(host)}
    stubs = []
    for zone, addr in sorted(forwards.items(), key=lambda kv: -len(kv[0])):
        ip, port = addr.rsplit(":", 1)
        target = f"policy.STUB('{ip}@{port}')"
        if zone == ".":
            stubs.append(f"policy.add(policy.all({target}))")
        else:
            stubs.append(f"policy.add(policy.suffix({target}, {{todname('{zone}')}}))")
    stub_lua = "\n".join(stubs)
    (workdir / "kresd.conf").write_text(
        f"""-- no root trust anchor: nothing to validate against, and no RFC 5011 refresh towards the root
trust_anchors.remove('.')
modules.unload('priming')
modules.unload('detect_time_skew')
modules.unload('detect_time_jump')
cache.open(10 * MB, 'lmdb://{workdir}/cache')
net.ipv6 = false
net.listen('{host}', {ports["dns"]}, {{ kind = 'dns' }})
net.listen('{host}', {ports["dot"]}, {{ kind = 'tls' }})
net.listen('{host}', {ports["doh"]}, {{ kind = 'doh2' }})
net.tls('{cert}', '{key}')
{policies}
{stub_lua}
"""
    )
    argv = [_exe("kresd"), "-n", "-q", "-c", str(workdir / "kresd.conf"), str(workdir)]
    return _spawn("kresd", host, argv, ports, workdir)


def start_dnsmasq(
    workdir: Path, host: str, *, forwards: dict[str, str], addresses: dict[str, str]
) -> RealResolver:
    """dnsmasq on UDP/TCP forwarding each zone in `forwards` (zone → "ip:port", "." for the rest);
    `addresses` maps a name to its `address=/name/VALUE` (an address, "#" for 0.0.0.0 and ::,
    or "" for NXDOMAIN). No cache, so every query reaches the upstream."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"dns": free_port(host)}
    servers = []
    for zone, addr in forwards.items():
        ip, port = addr.rsplit(":", 1)
        servers.append(f"--server={ip}#{port}" if zone == "." else f"--server=/{zone}/{ip}#{port}")
    argv = [
        _exe("dnsmasq"),
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--listen-address={host}",
        "--bind-interfaces",
        f"--port={ports['dns']}",
        f"--pid-file={workdir}/dnsmasq.pid",
        # As root dnsmasq would switch to an unprivileged user that cannot write the workdir.
        *(["--user=root"] if os.geteuid() == 0 else []),
        "--cache-size=0",
        "--log-facility=-",
        *servers,
        *(f"--address=/{name}/{value}" for name, value in addresses.items()),
    ]
    return _spawn("dnsmasq", host, argv, ports, workdir)


def start_dnsdist(
    workdir: Path, host: str, cert: Path, key: Path, *, backend: str, rules: str = ""
) -> RealResolver:
    """dnsdist in front of `backend` ("ip:port"): plain DNS, DoH, and DoT twice, `dot` answering
    each connection's queries in order (one at a time) and `dot-ooo` out of order (maxInFlight).

    `rules` is Lua run after the listeners, e.g. `addAction(QNameRule('x.'), DropAction())`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {
        "dns": free_port(host),
        "dot": free_port(host),
        "dot-ooo": free_port(host),
        "doh": free_port(host),
    }
    (workdir / "dnsdist.conf").write_text(
        f"""setSecurityPollSuffix('')
setLocal('{host}:{ports["dns"]}')
addTLSLocal('{host}:{ports["dot"]}', '{cert}', '{key}', {{ provider = 'openssl' }})
addTLSLocal('{host}:{ports["dot-ooo"]}', '{cert}', '{key}', {{ provider = 'openssl', maxInFlight = 100 }})
addDOHLocal('{host}:{ports["doh"]}', '{cert}', '{key}', '/dns-query')
setACL('127.0.0.0/8')
-- forced up: no health-check traffic decides whether the lab backend is used
newServer({{ address = '{backend}', maxInFlight = 100 }}):setUp()
{rules}
"""
    )
    argv = [_exe("dnsdist"), "--supervised", "--disable-syslog", "-C", str(workdir / "dnsdist.conf")]
    return _spawn("dnsdist", host, argv, ports, workdir)
