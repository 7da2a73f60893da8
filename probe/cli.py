"""The `probe` command. Thin: parse, build a plan, run the engine, print."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from probe import __version__
from probe.catalogue import load_catalogue
from probe.engine import Engine, Expect, Plan
from probe.errors import BlockprobeError, InputError
from probe.model import Expectation, Finding, Measurement
from probe.output import json_line, render_table, summary_line
from probe.specs import Resolver, resolve_spec
from probe.transports import Options
from probe.wire import QTYPES, normalize_name, normalize_qtype

__all__ = ["main"]


def _fail(message: str) -> NoReturn:
    click.echo(f"probe: {message}", err=True)
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
) -> list[Measurement]:
    """Run a plan to completion on a fresh event loop; measurements also go to the callback."""

    async def go() -> list[Measurement]:
        out: list[Measurement] = []
        async with Engine(options, concurrency=concurrency, qps=qps) as engine:
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
    return 1 if any(m.finding in (Finding.LEAK, Finding.OVERBLOCK) for m in measurements) else 0


@cli.command()
@click.argument("domains", nargs=-1, required=True)
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
@click.option("--country", metavar="CC", help="The probe's ISO 3166-1 alpha-2 country, for jurisdictions.")
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
def once(
    domains: tuple[str, ...],
    resolvers: tuple[str, ...],
    qtypes: tuple[str, ...],
    expect: str | None,
    country: str | None,
    controls: tuple[str, ...],
    no_control: bool,
    timeout: float,
    ca_file: str | None,
    as_json: bool,
    concurrency: int,
    qps: float,
    udp_linger: float,
    doh_post: bool,
) -> None:
    """Spot-check DOMAIN... on each resolver and transport, and say whether each answer is a block."""
    try:
        names = list(dict.fromkeys(normalize_name(d) for d in domains))
        types = list(dict.fromkeys(normalize_qtype(t) for t in qtypes)) or list(QTYPES)
        targets = _resolvers(resolvers)
        if no_control:
            control_resolvers: list[Resolver] = []
        else:
            cat = load_catalogue()
            control_resolvers = [resolve_spec(c, cat) for c in (controls or (cat.control,))]
        if country is not None and (len(country) != 2 or not country.isalpha()):
            raise InputError(f"--country: {country!r} is not an ISO 3166-1 alpha-2 code")
    except BlockprobeError as exc:
        _fail(str(exc))
    expectation = Expectation(expect) if expect else None

    def expect_all(domain: str, resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
        return expectation, ({"option": "--expect"} if expectation else None)

    plan = Plan(names, types, targets, control_resolvers, expect_all)
    options = Options(timeout=timeout, ca_file=ca_file, udp_linger=udp_linger, doh_post=doh_post)
    measurements = _run_and_print(plan, options, as_json, concurrency, qps or None)
    sys.exit(_exit_status(measurements))


def _run_and_print(
    plan: Plan,
    options: Options,
    as_json: bool,
    concurrency: int,
    qps: float | None,
    expect: Expect | None = None,
) -> list[Measurement]:
    def emit(m: Measurement) -> None:
        if as_json:
            sys.stdout.write(json_line(m) + "\n")
            sys.stdout.flush()

    progress = not as_json and sys.stderr.isatty() and plan.size >= 50
    measurements = run_plan(
        plan, options, concurrency=concurrency, qps=qps, on_measurement=emit, progress=progress
    )
    if not as_json:
        render_table(measurements)
        click.echo(summary_line(measurements))
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
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of the table.")
@click.option("--timeout", type=click.FloatRange(min=0.05), default=2.0, show_default=True)
def demo(as_json: bool, timeout: float) -> None:
    """Start an offline lab of loopback resolvers on every transport, probe it, and print the findings."""
    from probe.demo import DEMO_DOMAINS, DemoLab, demo_expect
    from probe.lab import LabThread

    lab = DemoLab.build()
    with LabThread() as thread:
        for server in lab.servers.values():
            thread.start(server)
        targets = [lab.resolver(n) for n in lab.servers if n != "control"]
        if not as_json:
            click.echo("blockprobe demo: lab resolvers on loopback, every transport")
            for r in targets:
                click.echo(f"  {r.name:14} {r.kind:6} " + " ".join(str(e) for e in r.endpoints))
            click.echo(f"  {'control':14} public " + str(lab.resolver("control").endpoints[0]))
        plan = Plan(DEMO_DOMAINS, QTYPES, targets, [lab.resolver("control")], demo_expect)
        options = Options(timeout=timeout, ca_file=str(lab.ca.ca_file), udp_linger=0.05)
        measurements = _run_and_print(plan, options, as_json, 64, None)
    if not as_json:
        leaks = sum(m.finding is Finding.LEAK for m in measurements)
        over = sum(m.finding is Finding.OVERBLOCK for m in measurements)
        click.echo(
            f"The lab shows {leaks} leaks and {over} overblocks, as scripted. "
            "Real-world spot check: probe once example.org"
        )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="probe: %(levelname)s %(name)s: %(message)s")
    cli()


if __name__ == "__main__":
    main()
