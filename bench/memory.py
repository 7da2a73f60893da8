"""Peak memory of `probe once --json` over 10,000 names × 3 qtypes on one resolver and transport.

    python -m bench.memory [--names 10000] [--transport udp]

Starts unbound on 127.53.5.3 with the names in a local zone, runs the real CLI as a
subprocess against it, and reports the child's peak RSS and wall time, next to the
peak RSS of a bare interpreter that imports the probe (the floor).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from probe.lab import LabCA
from tests.real import start_unbound

HOST = "127.53.5.3"
ZONE = "mem-lab.net"


def _peak_rss_mib(cmd: list[str]) -> tuple[float, float, int]:
    """Run cmd alone in a fresh child, return (peak RSS MiB, wall seconds, exit code)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    kib, code = out.stdout.split()
    return int(kib) / 1024, wall, int(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=10000)
    ap.add_argument("--transport", default="udp", choices=["udp", "tcp", "dot", "doh"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blockprobe-mem-"))
    ca = LabCA(hosts=(HOST,), directory=work)
    names = [f"n{i}.{ZONE}" for i in range(args.names)]
    zone = "".join(
        f"n{i} 3600 IN A 93.184.{i // 256 % 256}.{i % 256}\nn{i} 3600 IN AAAA 2606:2800::{i:x}\n"
        for i in range(args.names)
    )
    server = start_unbound(work / "unbound", HOST, ca.cert_file, ca.key_file, zone_name=ZONE, zone_text=zone)
    try:
        server.wait_ready(names[0])
        floor, _, _ = _peak_rss_mib(
            [sys.executable, "-c", "import probe.cli, probe.engine, probe.transports"]
        )
        cmd = [
            sys.executable,
            "-m",
            "probe.cli",
            "once",
            "--json",
            "--no-control",
            "--qps",
            "0",
            "--concurrency",
            "100",
            "--udp-linger",
            "0",
            "--ca-file",
            str(ca.ca_file),
            "-r",
            server.specs[args.transport],
            *names,
        ]
        peak, wall, code = _peak_rss_mib(cmd)
    finally:
        server.stop()
    n = args.names * 3
    print(f"probe once --json, {args.names} names x 3 qtypes ({n} measurements) over {args.transport}:")
    print(
        f"  peak RSS {peak:.0f} MiB (interpreter with the probe imported: {floor:.0f} MiB), "
        f"wall {wall:.1f} s ({n / wall:.0f} measurements/s), exit {code}"
    )


if __name__ == "__main__":
    main()
