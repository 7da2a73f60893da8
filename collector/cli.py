"""The `collector` command (the service itself arrives with the collector issue)."""

from __future__ import annotations

import sys

import click

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Receive probe results, keep the evidence, expose metrics."""


@cli.command()
def serve() -> None:
    """Not built yet: this release ships the probe only."""
    click.echo("collector: serve is not built yet (see the collector issue)", err=True)
    sys.exit(2)


def main() -> None:
    cli()
