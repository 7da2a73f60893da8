"""A Debian 12 tree for the Ansible tests, and the wheel the roles install into it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["build_wheel", "debian_tree"]

ROOT = Path(__file__).parent.parent
PACKAGES = (
    "python3",
    "python3-venv",
    "python3-packaging",
    "python3-apt",
    "systemd",
    "systemd-sysv",
    "dbus",
    "ca-certificates",
)


def debian_tree(tree: Path) -> Path:
    """debootstrap a minimal bookworm with what the roles and a systemd boot need."""
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            "bookworm",
            str(tree),
            "http://deb.debian.org/debian",
        ],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    # pip inside the tree reaches PyPI the way this machine does: same resolver, same trusted CAs
    # (the network here may present its own CA, which the fresh tree would not know).
    shutil.copy("/etc/resolv.conf", tree / "etc" / "resolv.conf")
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", tree / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    return tree


def build_wheel(dist: Path) -> Path:
    """The project's wheel, built from a copy: setuptools builds in the source tree's `build/`,
    which two builds at once (or a developer's own) would share."""
    src = dist.parent / "wheel-src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "test-artifacts"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        check=True,
        timeout=600,
    )
    return next(dist.glob("blockprobe-*.whl"))
