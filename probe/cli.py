"""The `probe` command. Thin: parse, build a plan, run the engine, print."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from probe import __version__
from probe.answers import AnswerChecker
from probe.catalogue import load_catalogue, resolve_spec
from probe.engine import Engine, ExpectFn, Plan
from probe.errors import BlockprobeError, InputError
from probe.expect import OrderIndex
from probe.identity import Canary
from probe.lists import (
    ISO_ALPHA2,
    Lists,
    ListsError,
    format_duration,
    format_instant,
    import_plain,
    load_lists,
    parse_lists,
)
from probe.model import Expectation, Finding, Measurement, Outcome
from probe.output import json_line, render_answer, render_rows, summary_line
from probe.specs import Resolver
from probe.transports import Options
from probe.wire import QTYPES, normalize_name, normalize_qtype

__all__ = ["main"]


def _fail(message: str) -> NoReturn:
    click.echo(f"probe: {message}", err=True)
    sys.exit(2)


def _fail_all(errors: Sequence[str]) -> NoReturn:
    """Every mistake, one line each, then exit 2 (bad config, bad lists)."""
    for line in errors:
        click.echo(f"probe: {line}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="probe")
def cli() -> None:
    """Check whether DNS blocks are enforced, and whether they overreach."""


def _resolvers(specs: Sequence[str]) -> list[Resolver]:
    cat = load_catalogue()
    names = list(specs) or [*cat.entries, "system"]
    return [resolve_spec(s, cat) for s in names]


def run_plan(
    plan: Plan,
    options: Options,
    *,
    concurrency: int,
    qps: float | None,
    on_measurement: Callable[[Measurement], None],
    progress: bool,
    checker: AnswerChecker | None = None,
) -> list[Measurement]:
    """Run a plan to completion on a fresh event loop; measurements also go to the callback."""

    async def go() -> list[Measurement]:
        out: list[Measurement] = []
        async with Engine(options, concurrency=concurrency, qps=qps, checker=checker) as engine:
            if progress:
                from rich.progress import Progress

                with Progress(transient=True, console=_stderr_console()) as bar:
                    task = bar.add_task("measuring", total=plan.size)
                    async for m in engine.run(plan):
                        out.append(m)
                        on_measurement(m)
                        bar.update(task, completed=len(out))
            else:
                async for m in engine.run(plan):
                    out.append(m)
                    on_measurement(m)
        return out

    return asyncio.run(go())


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _exit_status(measurements: Sequence[Measurement]) -> int:
    """0 all clear, 1 a leak or overblock, 3 nothing could be judged (docs/cli.md).

    3 keeps an outage from reading as "all clear" to a script: no measurement got a
    response, or expectations were given and every finding is inconclusive.
    """
    if any(m.finding in (Finding.LEAK, Finding.OVERBLOCK) for m in measurements):
        return 1
    if not any(m.outcome not in (Outcome.TIMEOUT, Outcome.ERROR) for m in measurements):
        return 3
    findings = [m.finding for m in measurements if m.finding is not None]
    if findings and all(f is Finding.INCONCLUSIVE for f in findings):
        return 3
    return 0


_ALL = click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="After the answer, every row (name × resolver × transport × type).",
)


@cli.command()
@click.argument("domains", nargs=-1)
@click.option(
    "-r",
    "--resolver",
    "resolvers",
    multiple=True,
    metavar="SPEC",
    help="Repeatable; default: the built-in public catalogue and `system`.",
)
@click.option(
    "-t",
    "--qtype",
    "qtypes",
    multiple=True,
    metavar="TYPE",
    help="Repeatable; A, AAAA, HTTPS; default: all three.",
)
@click.option(
    "--expect",
    type=click.Choice(["blocked", "resolves"]),
    help="The expectation for every DOMAIN on every resolver.",
)
@click.option(
    "--list",
    "list_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Derive expectations from a lists file; repeatable; not with --expect. Without DOMAIN, every listed name.",
)
@click.option("--country", metavar="CC", help="The probe's ISO 3166-1 alpha-2 country, for jurisdictions.")
@click.option(
    "--canary",
    "canaries",
    multiple=True,
    metavar="resolves=NAME|blocked=NAME",
    help="A name of known fate asked on every resolver first; if a `resolves` canary fails, "
    "that resolver's findings are inconclusive for the run.",
)
@click.option(
    "--no-identity", is_flag=True, help="Skip the identity checks that detect port-53 interception."
)
@click.option(
    "--control",
    "controls",
    multiple=True,
    metavar="SPEC",
    help="Control resolver for baselines; repeat for a fallback. Default: the catalogue's control.",
)
@click.option("--no-control", is_flag=True, help="Measure without a control baseline.")
@click.option(
    "--timeout", type=click.FloatRange(min=0.05), default=5.0, show_default=True, help="Seconds per query."
)
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Extra CA certificates for tls/https/h3/quic.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per measurement per line, nothing else on stdout.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Queries in flight at once.",
)
@click.option(
    "--qps",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    help="Queries per second per endpoint (0: unlimited); a spec's #qps= overrides it.",
)
@click.option(
    "--udp-linger",
    type=click.FloatRange(min=0),
    default=0.2,
    show_default=True,
    help="Seconds to keep listening after a UDP answer, to catch racing injected answers.",
)
@click.option("--doh-post", is_flag=True, help="Send DoH queries with POST instead of GET.")
@click.option(
    "--confirm-after",
    type=click.FloatRange(min=0),
    default=Options().confirm_after,
    show_default=True,
    help="Seconds after its first send before a silent query is asked again (past recursors' "
    "own upstream timeouts).",
)
@click.option(
    "--verify",
    type=click.Choice(["off", "tls", "http"]),
    default="off",
    show_default=True,
    help="Answer checks of the names --list names: connect to each answered address on port 443 "
    "with the name as SNI (tls), and send one HEAD / (http). Needs --list. Off for a spot check: "
    "it connects to the listed sites.",
)
@_ALL
def once(
    domains: tuple[str, ...],
    resolvers: tuple[str, ...],
    qtypes: tuple[str, ...],
    expect: str | None,
    list_files: tuple[str, ...],
    country: str | None,
    canaries: tuple[str, ...],
    no_identity: bool,
    controls: tuple[str, ...],
    no_control: bool,
    timeout: float,
    ca_file: str | None,
    as_json: bool,
    concurrency: int,
    qps: float,
    udp_linger: float,
    doh_post: bool,
    confirm_after: float,
    verify: str,
    show_all: bool,
) -> None:
    """Spot-check DOMAIN... on each resolver and transport, and say whether each answer is a block."""
    try:
        if expect and list_files:
            raise InputError("--expect and --list cannot be used together")
        if list_files and not country:
            raise InputError("--country is required with --list")
        if verify != "off" and not list_files:
            # Issue 16's safety rule: only names a lists file names are ever connected to.
            raise InputError(f"--verify {verify} checks only names a lists file names: give --list FILE")
        if country is not None and country.upper() not in ISO_ALPHA2:
            raise InputError(f"--country: {country!r} is not an ISO 3166-1 alpha-2 code")
        lists = load_lists(list_files) if list_files else None
        if not domains and lists is None:
            raise InputError("give at least one DOMAIN, or --list FILE to probe every listed name")
        names = list(dict.fromkeys(normalize_name(d) for d in domains)) or (
            lists.query_names() if lists else []
        )
        types = list(dict.fromkeys(normalize_qtype(t) for t in qtypes)) or list(QTYPES)
        targets = _resolvers(resolvers)
        if no_control:
            control_resolvers: list[Resolver] = []
        else:
            cat = load_catalogue()
            control_resolvers = [resolve_spec(c, cat) for c in (controls or (cat.control,))]
        canary_list = [_canary(c) for c in canaries]
    except ListsError as exc:
        _fail_all(exc.errors)
    except BlockprobeError as exc:
        _fail(str(exc))
    plan = Plan(
        names,
        types,
        targets,
        control_resolvers,
        _expectations(expect, lists, country),
        canary_list,
        not no_identity,
    )
    options = Options(
        timeout=timeout,
        ca_file=ca_file,
        udp_linger=udp_linger,
        doh_post=doh_post,
        confirm_after=confirm_after,
    )
    checker = AnswerChecker(verify, ca_file=ca_file, timeout=timeout) if verify != "off" else None
    measurements = _run_and_print(
        plan, options, as_json, concurrency, qps or None, show_all=show_all, checker=checker
    )
    sys.exit(_exit_status(measurements))


def _canary(text: str) -> Canary:
    kind, sep, name = text.partition("=")
    if not sep or kind not in ("resolves", "blocked"):
        raise InputError(f"--canary: {text!r} is not resolves=NAME or blocked=NAME")
    return Canary(normalize_name(name), Expectation(kind))


def _expectations(expect: str | None, lists: Lists | None, country: str | None) -> ExpectFn:
    if lists is not None and country is not None:
        orders = OrderIndex(lists)
        cc = country.upper()

        def by_lists(domain: str, resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
            # The engine asks when it sends the query: an order may start binding mid-run.
            return orders.expect(cc, resolver.kind, resolver.operator, domain, datetime.now(UTC))

        return by_lists
    expectation = Expectation(expect) if expect else None

    # The signature is ExpectFn's; the answer is the same for every name and endpoint.
    def expect_all(_domain: str, _resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
        return expectation, ({"option": "--expect"} if expectation else None)

    return expect_all


def _run_and_print(
    plan: Plan,
    options: Options,
    as_json: bool,
    concurrency: int,
    qps: float | None,
    *,
    show_all: bool = False,
    checker: AnswerChecker | None = None,
) -> list[Measurement]:
    def emit(m: Measurement) -> None:
        if as_json:
            sys.stdout.write(json_line(m) + "\n")
            sys.stdout.flush()

    progress = not as_json and sys.stderr.isatty() and plan.size >= 50
    measurements = run_plan(
        plan,
        options,
        concurrency=concurrency,
        qps=qps,
        on_measurement=emit,
        progress=progress,
        checker=checker,
    )
    if not as_json:
        click.echo(summary_line(measurements))
        render_answer(measurements)
        if show_all:
            render_rows(measurements)
        status = _exit_status(measurements)
        if status == 3:
            click.echo("Nothing could be judged: no answers, or every finding inconclusive (exit 3).")
        elif not show_all:
            click.echo("Every row: --all. Measurements as JSON lines: --json.")
    return measurements


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per endpoint per line.")
def resolvers(as_json: bool) -> None:
    """List the built-in catalogue of public resolvers and the endpoints each offers."""
    import json

    cat = load_catalogue()
    for name, entry in cat.entries.items():
        for ep in entry.endpoints:
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "name": name,
                            "operator": entry.operator,
                            "kind": "public",
                            "transport": str(ep.transport),
                            "endpoint": str(ep),
                            "address": ep.address,
                            "control": name == cat.control,
                        }
                    )
                )
        if not as_json:
            mark = "  (default control)" if name == cat.control else ""
            click.echo(f"{name}: {entry.title}, operator {entry.operator}, kind public{mark}")
            for ep in entry.endpoints:
                via = f" via {ep.address}" if ep.address else ""
                click.echo(f"  {ep.transport!s:5} {ep}{via}")
    if not as_json:
        click.echo("system: the host's resolvers from /etc/resolv.conf, kind system")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of the answer.")
@click.option("--timeout", type=click.FloatRange(min=0.05), default=2.0, show_default=True)
@click.option("--country", default="IT", show_default=True, help="Where the demo probe stands (try FR).")
@_ALL
def demo(as_json: bool, timeout: float, country: str, show_all: bool) -> None:
    """Start an offline lab of loopback resolvers on every transport, probe it, and print the findings."""
    from probe.demo import DEMO_DOMAINS, DemoLab, demo_lists
    from probe.lab import LabThread

    if country.upper() not in ISO_ALPHA2:
        _fail(f"--country: {country!r} is not an ISO 3166-1 alpha-2 code")
    lab = DemoLab.build()
    with LabThread() as thread:
        for server in lab.servers.values():
            thread.start(server)
        targets = [lab.resolver(n) for n in lab.servers if n != "control"]
        if not as_json:
            click.echo("blockprobe demo: lab resolvers on loopback, each on udp tcp dot doh doh3 doq")
            for r in [*targets, lab.resolver("control")]:
                address = r.endpoints[0].host
                click.echo(f"  {r.name:14} {r.kind:6} {address}")
            click.echo(f"probing from {country.upper()} against probe/data/demo-lists.yaml")
        expect = _expectations(None, demo_lists(), country)
        plan = Plan(DEMO_DOMAINS, QTYPES, targets, [lab.resolver("control")], expect)
        options = Options(timeout=timeout, ca_file=str(lab.ca.ca_file), udp_linger=0.05)
        measurements = _run_and_print(plan, options, as_json, 64, None, show_all=show_all)
    if not as_json:
        click.echo("Real-world spot check: probe once example.org")
    sys.exit(_exit_status(measurements))


@cli.group()
def lists() -> None:
    """Validate and build lists files (orders and control lists)."""


@lists.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
def lists_check(files: tuple[str, ...], as_json: bool) -> None:
    """Validate FILE... together; print every mistake (exit 2) or a summary."""
    import json

    try:
        loaded = load_lists(files)
    except ListsError as exc:
        _fail_all(exc.errors)
    summary = loaded.summary()
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"{len(files)} file(s) OK: {summary['orders']} orders, {summary['controls']} control lists, "
        f"{summary['patterns']} name patterns ({summary['names_to_query']} names to query)"
    )
    click.echo(f"jurisdictions: {', '.join(summary['jurisdictions']) or '-'}")
    click.echo(f"authorities: {', '.join(summary['authorities']) or '-'}")
    for o in loaded.orders:
        dates = " to ".join(format_instant(t) if t else "…" for t in (o.effective, o.expires))
        if o.deadline is not None:
            dates += f", enforce within {format_duration(o.deadline)}"
        click.echo(
            f"  {o.id}: {o.authority}, {'/'.join(sorted(o.jurisdictions))}, "
            f"applies to {', '.join(sorted(o.applies_to))}, {dates}, {len(o.domains)} patterns"
        )


@lists.command("import")
@click.argument("source", type=click.File("r"))
@click.option("--id", "order_id", required=True, help="The order's id (a metric label).")
@click.option("--authority", required=True)
@click.option("--jurisdiction", "jurisdictions", multiple=True, required=True, metavar="CC")
@click.option(
    "--applies-to", "applies_to", multiple=True, metavar="KIND|OPERATOR", help="Default: isp, public, system."
)
@click.option(
    "--effective",
    metavar="DATE|TIME|now",
    help="From a date (00:00 UTC), an RFC 3339 time (2026-12-01T14:05:00+01:00), or now.",
)
@click.option("--expires", metavar="DATE|TIME")
@click.option(
    "--deadline", metavar="DURATION", help="Time allowed to enforce, from --effective: 30m, 24h, 2d."
)
def lists_import(
    source: Any,
    order_id: str,
    authority: str,
    jurisdictions: tuple[str, ...],
    applies_to: tuple[str, ...],
    effective: str | None,
    expires: str | None,
    deadline: str | None,
) -> None:
    """Turn a plain list (one name per line, # comments) or a CSV with a `domain` column into an order (YAML on stdout)."""
    import datetime as dt

    import yaml

    if deadline and not effective:
        _fail("--deadline needs --effective: the time to enforce counts from it")
    if effective == "now":
        effective = format_instant(dt.datetime.now(dt.UTC).replace(microsecond=0))
    try:
        names = import_plain(source.read(), getattr(source, "name", "<stdin>"))
        order: dict[str, Any] = {
            "id": order_id,
            "authority": authority,
            "jurisdictions": [j.upper() for j in jurisdictions],
        }
        order["applies_to"] = list(applies_to) or ["isp", "public", "system"]
        if effective:
            order["effective"] = effective
        if expires:
            order["expires"] = expires
        if deadline:
            order["deadline"] = deadline
        order["domains"] = names
        text = yaml.safe_dump({"orders": [order]}, sort_keys=False, allow_unicode=True)
        parse_lists(text, "<imported>")  # the result must pass the same validation as any file
    except ListsError as exc:
        # Name the option the user typed, not the key of a file they never saw.
        options = {f"<imported>: orders[0].{k}:": f"--{k}:" for k in ("effective", "expires", "deadline")}
        _fail_all(
            [next((e.replace(k, v, 1) for k, v in options.items() if e.startswith(k)), e) for e in exc.errors]
        )
    click.echo(text, nl=False)


@cli.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="The daemon's config (or FILE)."
)
def check_config(file: str | None, config_file: str | None) -> None:
    """Validate a daemon config: every mistake (exit 2), or a summary of what will run."""
    from probe.daemon.config import ConfigError, check_budget, load_config

    given = {f for f in (file, config_file) if f is not None}
    if len(given) != 1:
        _fail("check-config: give the config once, as FILE or --config FILE")
    file = given.pop()
    try:
        config = load_config(file)
        lines, errors = check_budget(config)
    except (ConfigError, ListsError) as exc:
        _fail_all(exc.errors)
    if errors:
        _fail_all([f"{config.source}: {e}" for e in errors])
    for line in config.summary() + lines:
        click.echo(line)


@cli.command()
@click.option(
    "--config", "config_file", required=True, type=click.Path(dir_okay=False), help="The daemon's config."
)
def run(config_file: str) -> None:
    """The scheduled probe daemon: measure on a schedule, spool durably, push to the collector."""
    from probe.daemon.config import ConfigError, load_config
    from probe.daemon.run import Daemon, setup_logging

    try:
        config = load_config(config_file)
    except ConfigError as exc:
        _fail_all(exc.errors)
    setup_logging(config)
    try:
        daemon = Daemon(config)
    except OSError as exc:
        _fail(f"state_dir: {config.state_dir}: {exc.strerror or exc}")
    try:
        asyncio.run(daemon.run())
    except ListsError as exc:
        _fail_all(exc.errors)


def _daemon_commands() -> None:
    from probe.daemon.cli import spool, status

    cli.add_command(status)
    cli.add_command(spool)


_daemon_commands()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="probe: %(levelname)s %(name)s: %(message)s")
    cli()


if __name__ == "__main__":
    main()
