"""`probe status` and `probe spool`: looking into a probe's spool, and its quarantine.

`status` only reads (a read-only SQLite connection that runs no schema and creates no
files), so it is safe as root beside a running daemon. `spool export` prints the
quarantine as JSON lines; `spool resend` offers quarantined measurements to the
collector again and keeps whatever it still refuses.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from probe.daemon.config import Config, ConfigError, load_config

__all__ = ["spool", "status"]


def _fail(lines: list[str]) -> NoReturn:
    for line in lines:
        click.echo(f"probe: {line}", err=True)
    sys.exit(2)


def _config(config_file: str) -> Config:
    try:
        return load_config(config_file)
    except ConfigError as exc:
        _fail(exc.errors)


def _spool_path(config: Config) -> Path:
    path = config.state_dir / "spool.sqlite3"
    if not path.exists():
        _fail([f"no spool at {path}: has `probe run` started with this config?"])
    return path


def _ago(seconds: object) -> str:
    return "never" if seconds is None else f"{seconds}s ago"


def _brief(m: dict[str, Any]) -> str:
    return (
        f"{m.get('domain')} {m.get('qtype')} via {m.get('resolver')} {m.get('transport')} at {m.get('time')}"
    )


@click.command()
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def status(config_file: str, as_json: bool) -> None:
    """Spool depth, batches waiting and why, quarantine, last round and push (read-only)."""
    from probe.daemon.spool import ReadOnlySpool

    config = _config(config_file)
    try:
        spool = ReadOnlySpool(_spool_path(config))
        now = time.time()

        def ago(key: str) -> float | None:
            value = spool.meta(key)
            return None if value is None else round(now - float(value), 1)

        quarantine = spool.quarantined(limit=20)
        doc: dict[str, Any] = {
            "probe": config.probe_id,
            "spool_results": spool.depth(),
            "spool_bound": config.spool_max_rows,
            "batches_waiting": [
                {"batch_id": b, "attempts": a, "retry_in_s": max(0.0, round(n - now, 1)), "last_error": e}
                for b, a, n, e in spool.pending_batches()
            ],
            "last_round_s_ago": ago("last_round"),
            "last_push_s_ago": ago("last_push"),
            "last_round_deadline_s_ago": ago("last_round_deadline"),
            "dropped": spool.dropped(),
            "quarantined": spool.quarantine_depth(),
            "quarantine": [
                {
                    "id": q.id,
                    "reason": q.reason,
                    "quarantined_s_ago": round(now - q.quarantined, 1),
                    "measurement": _brief(q.measurement),
                }
                for q in quarantine
            ],
            "lifetime": spool.counters(),
            # Set by a running probe whose lists outgrew the budget (slices mode).
            "schedule_over_budget": spool.meta("schedule_over_budget") or None,
        }
        spool.close()
    except sqlite3.Error as exc:
        _fail([f"cannot read the spool in {config.state_dir}: {exc}"])
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(
        f"probe {doc['probe']}: {doc['spool_results']} results in the spool (bound {doc['spool_bound']})"
    )
    click.echo(
        f"last round: {_ago(doc['last_round_s_ago'])}; last acknowledged push: {_ago(doc['last_push_s_ago'])}"
    )
    if doc["last_round_deadline_s_ago"] is not None:
        click.echo(f"last round that hit its deadline: {_ago(doc['last_round_deadline_s_ago'])}")
    for b in doc["batches_waiting"]:
        click.echo(
            f"  batch {b['batch_id']}: {b['attempts']} failed attempts, retry in {b['retry_in_s']}s"
            + (f" ({b['last_error']})" if b["last_error"] else "")
        )
    if doc["dropped"]:
        click.echo(
            "dropped because the spool was full: " + ", ".join(f"{k} {v}" for k, v in doc["dropped"].items())
        )
    if doc["schedule_over_budget"]:
        click.echo(f"schedule: the lists cannot be measured within full_pass: {doc['schedule_over_budget']}")
    life = doc["lifetime"]
    click.echo(
        f"over its life: {life['written_total']} measurements written, {life['pushed_total']} acknowledged, "
        f"{life['quarantined_total']} quarantined, {life['rounds_total']} rounds, "
        f"{life['unclean_starts_total']} unclean restarts"
    )
    if doc["quarantined"]:
        click.echo(
            f"quarantine: {doc['quarantined']} measurements the collector refuses "
            "(`probe spool export` for all, `probe spool resend` to offer them again)"
        )
        for q in doc["quarantine"]:
            click.echo(f"  #{q['id']} {q['measurement']}: {q['reason']}")
        if doc["quarantined"] > len(doc["quarantine"]):
            click.echo(f"  … and {doc['quarantined'] - len(doc['quarantine'])} more")


@click.group("spool")
def spool() -> None:
    """The probe's spool: export or resend the measurements the collector refused."""


@spool.command("export")
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
def spool_export(config_file: str) -> None:
    """Every quarantined measurement as a JSON line: id, quarantined (time), reason, measurement."""
    from probe.daemon.spool import ReadOnlySpool

    config = _config(config_file)
    try:
        ro = ReadOnlySpool(_spool_path(config))
        for q in ro.iter_quarantined():
            click.echo(json.dumps(q.to_json(), separators=(",", ":")))
        ro.close()
    except sqlite3.Error as exc:
        _fail([f"cannot read the spool in {config.state_dir}: {exc}"])


@spool.command("resend")
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--id", "ids", type=int, multiple=True, help="Only these quarantine ids (repeatable); default all."
)
def spool_resend(config_file: str, ids: tuple[int, ...]) -> None:
    """Offer quarantined measurements to the collector again; what it still refuses stays.

    Run it as the service's user (the spool is written). Exit 0 when the collector took
    them all, 1 when some are still refused, 2 when the collector could not be reached.
    """
    from probe.daemon.push import Pusher
    from probe.daemon.spool import Spool, SpoolThread

    config = _config(config_file)
    if config.collector is None:
        _fail([f"{config.source}: no collector configured"])
    path = _spool_path(config)

    async def go() -> tuple[int, int, int, str | None]:
        thread = SpoolThread(Spool(path, config.spool_max_rows))
        pusher = Pusher(config, thread)
        try:
            items = await thread.call(thread.spool.quarantined, None, list(ids) if ids else None)
            sent, refused, failure = await pusher.resend(items)
            return len(items), sent, refused, failure
        finally:
            await pusher.aclose()
            await thread.call(thread.spool.close)
            thread.shutdown()

    total, sent, refused, failure = asyncio.run(go())
    click.echo(f"{total} quarantined measurements offered: {sent} acknowledged, {refused} still refused")
    if failure:
        _fail([f"the collector failed ({failure}); the rest stays in the quarantine"])
    sys.exit(1 if refused else 0)
