"""Resolver specs (docs/cli.md, resolver specs): what parses to what, and the exact error for each mistake."""

from __future__ import annotations

import pytest

from probe.catalogue import resolve_spec
from probe.errors import SpecError
from probe.model import Transport
from probe.specs import parse_endpoint

GOOD = [
    ("udp://127.0.0.1", Transport.UDP, "127.0.0.1", 53, ""),
    ("127.0.0.1:5353", Transport.UDP, "127.0.0.1", 5353, ""),
    ("[::1]:53", Transport.UDP, "::1", 53, ""),
    ("::1", Transport.UDP, "::1", 53, ""),
    ("tcp://127.0.0.2", Transport.TCP, "127.0.0.2", 53, ""),
    ("tls://Dns.Example:8853", Transport.DOT, "dns.example", 8853, ""),
    ("https://dns.example", Transport.DOH, "dns.example", 443, "/dns-query"),
    ("https://[::1]:8443/custom/q", Transport.DOH, "::1", 8443, "/custom/q"),
    ("h3://dns.example/dns-query", Transport.DOH3, "dns.example", 443, "/dns-query"),
    ("quic://[::1]", Transport.DOQ, "::1", 853, ""),
]


@pytest.mark.parametrize(("spec", "transport", "host", "port", "path"), GOOD)
def test_good_specs(spec: str, transport: Transport, host: str, port: int, path: str) -> None:
    ep, _ = parse_endpoint(spec)
    assert (ep.transport, ep.host, ep.port, ep.path) == (transport, host, port, path)


BAD = [
    ("tls//x", "'tls//x' is not a resolver spec: expected SCHEME://HOST[:PORT] or HOST[:PORT]"),
    (
        "ftp://x",
        "'ftp://x' is not a resolver spec: unknown scheme 'ftp' (one of udp, tcp, tls, https, h3, quic)",
    ),
    ("udp://x:99999", "'udp://x:99999' is not a resolver spec: bad port '99999'"),
    ("udp://bad host", "'udp://bad host' is not a resolver spec: bad host 'bad host'"),
    ("tcp://127.0.0.1/x", "'tcp://127.0.0.1/x' is not a resolver spec: tcp:// takes no path"),
    ("udp://[::1", "'udp://[::1' is not a resolver spec: unclosed '['"),
    (
        "udp://192.0.2.1#kind=evil",
        "'udp://192.0.2.1#kind=evil' is not a resolver spec: kind 'evil' is not one of isp, public, system",
    ),
    (
        "udp://192.0.2.1#colour=red",
        "'udp://192.0.2.1#colour=red' is not a resolver spec: fragment item 'colour=red' "
        "(expected key=value with key in address, kind, operator, qps)",
    ),
    (
        "udp://192.0.2.1#qps=-1",
        "'udp://192.0.2.1#qps=-1' is not a resolver spec: qps '-1' is not a positive number",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_bad_specs_name_the_mistake(spec: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        resolve_spec(spec)
    assert str(info.value) == message


def test_catalogue_name_takes_every_endpoint_and_the_operator() -> None:
    r = resolve_spec("google")
    assert (r.kind, r.operator) == ("public", "google")
    assert {e.transport for e in r.endpoints} == {
        Transport.UDP,
        Transport.TCP,
        Transport.DOT,
        Transport.DOH,
        Transport.DOH3,
    }
    dot = next(e for e in r.endpoints if e.transport is Transport.DOT)
    assert (dot.host, dot.address) == ("dns.google", "8.8.8.8")  # bootstrap: no system DNS needed


@pytest.mark.parametrize(
    ("spec", "kind", "operator"),
    [
        ("1.1.1.1", "public", "cloudflare"),  # an address of a catalogue entry
        ("tls://dns.quad9.net", "public", "quad9"),
        ("udp://192.0.2.53", "isp", None),  # any other address: an ISP's, with no operator
        ("udp://192.0.2.53#kind=isp,operator=tim", "isp", "tim"),
        ("udp://8.8.8.8#kind=isp", "isp", "google"),  # an explicit kind wins
    ],
)
def test_kind_and_operator_rules(spec: str, kind: str, operator: str | None) -> None:
    r = resolve_spec(spec)
    assert (r.name, r.kind, r.operator) == (spec, kind, operator)


def test_catalogue_host_gets_its_bootstrap_address() -> None:
    (ep,) = resolve_spec("https://cloudflare-dns.com/dns-query").endpoints
    assert ep.address == "1.1.1.1"
