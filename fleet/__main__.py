"""`python -m fleet` (what `make demo` runs): the whole fleet on loopback until Ctrl-C."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fleet import run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--interval",
    type=click.FloatRange(min=1),
    default=15.0,
    show_default=True,
    help="Seconds between rounds.",
)
@click.option("--no-prometheus", is_flag=True, help="Do not start Prometheus even when it is installed.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="Keep the fleet's state here (default: a temporary folder, removed on exit).",
)
@click.option("--keep-state", is_flag=True, help="Keep the temporary state folder on exit (and say where).")
def main(interval: float, no_prometheus: bool, state_dir: str | None, keep_state: bool) -> None:
    """Lab resolvers, the collector, probes in IT (two) and FR, and Prometheus, on loopback until Ctrl-C."""
    work = Path(state_dir) if state_dir else None
    sys.exit(run(work, with_prometheus=not no_prometheus, interval=interval, keep_state=keep_state))


if __name__ == "__main__":
    main()
