"""The `collector` command: serve, token add|list|revoke, report, recount, tls-init, openapi."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import NoReturn

import click

from collector.config import (
    CollectorConfig,
    CollectorConfigError,
    load_collector_config,
    parse_collector_config,
)
from collector.store import Store, open_store

__all__ = ["main"]


def _fail(message: str) -> NoReturn:
    click.echo(f"collector: {message}", err=True)
    sys.exit(2)


def _load(config_file: str | None, database: str | None) -> tuple[CollectorConfig, Store]:
    try:
        # Every key has a default, so no file means the defaults.
        config = load_collector_config(config_file) if config_file else parse_collector_config("")
    except CollectorConfigError as exc:
        for line in exc.errors:
            click.echo(f"collector: {line}", err=True)
        sys.exit(2)
    if database:
        from dataclasses import replace

        config = replace(config, database=database)
    try:
        return config, open_store(config.database)
    # The database is the one thing we cannot start without; whatever the driver raises
    # (bad URL, refused connection, unreadable file) ends as one clear line, not a traceback.
    except Exception as exc:  # noqa: BLE001 - any driver's error, reported by _fail
        _fail(f"database {config.database.split('@')[-1]}: {exc}")


CONFIG = click.option(
    "--config", "config_file", required=True, type=click.Path(dir_okay=False), help="Collector config."
)
DATABASE = click.option("--database", help="sqlite:///PATH or postgresql://… (overrides the config).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Receive probe results, keep the evidence, expose metrics."""


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Collector config (default: every default).",
)
@DATABASE
def serve(config_file: str | None, database: str | None) -> None:
    """Serve the API, metrics and status page (HTTPS when the config names a certificate).

    SIGTERM or SIGINT stop it gracefully: requests in flight finish, the database is closed,
    and the exit status is 0.
    """
    import socket

    from collector.app import create_app
    from collector.server import CollectorServer, server_config

    config, store = _load(config_file, database)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family) as probe_socket:
        try:  # a busy port is one clear line, not uvicorn's traceback-like log
            probe_socket.bind((config.host, config.port))
        except OSError as exc:
            store.close()
            _fail(f"listen: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")
    try:
        app = create_app(config, store)
        server = CollectorServer(server_config(app, config))
        server.run()
    finally:
        store.close()
    if not server.started:
        _fail(f"could not serve on {config.host}:{config.port} (see the log above)")


@cli.group()
def token() -> None:
    """Probe tokens: each bound to one probe id, stored hashed."""


@token.command("add")
@click.argument("probe_id")
@CONFIG
@DATABASE
def token_add(probe_id: str, config_file: str, database: str | None) -> None:
    """Create (or replace) PROBE_ID's token and print it once."""
    import re

    from collector.auth import hash_token, new_token

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", probe_id):
        _fail(f"{probe_id!r} is not a probe id (letters, digits, '.', '_', '-'; up to 64)")
    _, store = _load(config_file, database)
    secret = new_token()
    store.set_token(probe_id, hash_token(secret))
    store.close()
    click.echo(secret)


@token.command("set")
@click.argument("probe_id")
@CONFIG
@DATABASE
def token_set(probe_id: str, config_file: str, database: str | None) -> None:
    """Install a given token for PROBE_ID, read from standard input (provisioning from a vault).

    Prints `unchanged` when that token is already PROBE_ID's active one, so automation can
    tell a change from a no-op.
    """
    import re

    from collector.auth import hash_token

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", probe_id):
        _fail(f"{probe_id!r} is not a probe id (letters, digits, '.', '_', '-'; up to 64)")
    secret = sys.stdin.read().strip()
    if len(secret) < 16 or not re.fullmatch(r"[\x21-\x7e]+", secret):
        _fail("the token on standard input must be at least 16 printable characters, no spaces")
    _, store = _load(config_file, database)
    digest = hash_token(secret)
    if store.token_hash(probe_id) == digest:
        click.echo(f"unchanged {probe_id}")
    else:
        store.set_token(probe_id, digest)
        click.echo(f"set {probe_id}")
    store.close()


@token.command("list")
@CONFIG
@DATABASE
def token_list(config_file: str, database: str | None) -> None:
    """Probe ids with a token, when it was made, and whether it is revoked (never the token)."""
    _, store = _load(config_file, database)
    for probe_id, _hash, created, revoked in store.tokens():
        state = f"revoked {datetime.fromtimestamp(revoked, UTC):%Y-%m-%d %H:%M}" if revoked else "active"
        click.echo(f"{probe_id}\tcreated {datetime.fromtimestamp(created, UTC):%Y-%m-%d %H:%M}\t{state}")
    store.close()


@token.command("revoke")
@click.argument("probe_id")
@CONFIG
@DATABASE
def token_revoke(probe_id: str, config_file: str, database: str | None) -> None:
    """Revoke PROBE_ID's token: its reports are refused from now on."""
    _, store = _load(config_file, database)
    done = store.revoke_token(probe_id)
    store.close()
    if not done:
        _fail(f"probe {probe_id!r} has no active token")
    click.echo(f"revoked {probe_id}")


@cli.command()
@CONFIG
@DATABASE
@click.option("--order", help="Only this order (or control list) id.")
@click.option("--country", help="Only this ISO 3166-1 alpha-2 country.")
@click.option(
    "--since", default="30d", show_default=True, help="A start: 2026-11-01, or an age like 7d, 12h."
)
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "html"]), default="csv", show_default=True)
@click.option(
    "--timeline",
    is_flag=True,
    help="With --order: the order's compliance per country × resolver × transport, and its changes.",
)
def report(
    config_file: str,
    database: str | None,
    order: str | None,
    country: str | None,
    since: str,
    fmt: str,
    timeline: bool,
) -> None:
    """Every leak and overblock with first and last seen, probes, answers and the raw response;
    or (--timeline) an order's compliance over time."""
    from collector.report import build_report, build_timeline, render_report, render_timeline

    if timeline and not order:
        _fail("--timeline needs --order ID")
    start = _since(since)
    _, store = _load(config_file, database)
    cc = country.upper() if country else None
    if timeline and order:
        keys = build_timeline(store, order, start, time.time(), cc)
        store.close()
        sys.stdout.write(render_timeline(keys, fmt))
        return
    rows = build_report(store, start, order, cc)
    store.close()
    sys.stdout.write(render_report(rows, fmt))


def _since(text: str) -> float:
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([dhm])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60}[m.group(2)]
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
    except ValueError:
        _fail(f"--since: {text!r} is neither a date (2026-11-01) nor an age (7d, 12h, 30m)")


@cli.command("tls-init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    help="A DNS name or IP address the probes use (repeatable).",
)
def tls_init(directory: str, names: tuple[str, ...]) -> None:
    """Make a small CA and a certificate for NAMEs in DIRECTORY (kept when still good).

    Serve cert.pem and key.pem (config `tls`); give ca.pem to the probes (`collector.ca_file`).
    Prints `created` or `unchanged`.
    """
    from pathlib import Path

    from collector.tls import ensure_certificate

    click.echo("created" if ensure_certificate(Path(directory), list(names)) else "unchanged")


@cli.command()
@CONFIG
@DATABASE
def recount(config_file: str, database: str | None) -> None:
    """Rebuild the per-group series counts from the latest state (a repair; the ingest keeps
    them exact). Holds the database's write lock while it reads every current series."""
    _, store = _load(config_file, database)
    try:
        n = store.recount()
    finally:
        store.close()
    click.echo(f"counted {n} series")


@cli.command()
def openapi() -> None:
    """Print the API's OpenAPI description (committed as collector/openapi.json)."""
    from collector.app import create_app
    from collector.config import parse_collector_config

    class _NoStore:  # the description does not depend on a database
        pass

    app = create_app(parse_collector_config(""), _NoStore())  # type: ignore[arg-type]
    click.echo(json.dumps(app.openapi(), indent=2, sort_keys=True))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
