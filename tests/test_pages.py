"""The status and evidence pages: what they say (on both stores) and what a first screen shows (Chromium)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

import collector.pages as pages_module
from collector.compliance import run_pass
from collector.config import CollectorConfigError, parse_collector_config
from collector.pages import display_name, runs_of
from collector.store import open_store

from .browser import Browser, chromium
from .test_collector import Server, batch, measurement, post, postgres, server  # noqa: F401 - fixtures

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
TRANSPORTS = ("udp", "tcp", "dot", "doh", "doh3", "doq")
ORDER = {
    "order": "agcom-2026-1",
    "authority": "AGCOM",
    "pattern": "calcio.example",
    "orders": ["agcom-2026-1"],
}
PAGE_IP = "83.224.65.74"


def _spec(host: str, transport: str) -> str:
    return {
        "udp": f"udp://{host}:5301",
        "tcp": f"tcp://{host}:5302",
        "dot": f"tls://{host}:8531",
        "doh": f"https://{host}:4431/dns-query",
        "doh3": f"h3://{host}:4432/dns-query",
        "doq": f"quic://{host}:8532",
    }[transport]


def _lab_batch(country: str) -> list[dict[str, Any]]:
    """What a demo probe reports: a leaky public resolver, a block-page ISP, an EDE refuser."""
    out = []
    binding = country == "IT"
    for t in TRANSPORTS:
        leaky = {
            "resolver": _spec("127.53.0.3", t),
            "transport": t,
            "operator": "leakydns",
            "kind": "public",
            "endpoint": _spec("127.53.0.3", t),
        }
        page = {
            "resolver": _spec("127.53.0.2", t),
            "transport": t,
            "operator": "isp-b",
            "kind": "isp",
            "endpoint": _spec("127.53.0.2", t),
        }
        censor = {
            "resolver": _spec("127.53.0.4", t),
            "transport": t,
            "operator": "censordns",
            "kind": "public",
            "endpoint": _spec("127.53.0.4", t),
        }
        control = {"outcome": "resolved", "answers": ["185.199.108.10"]}
        if binding:
            out.append(
                measurement(
                    "calcio.example",
                    "leak",
                    **leaky,
                    control=control,
                    expected_by=ORDER,
                    answers=["185.199.108.10"],
                    evidence={"nsid": "leaky-fra1"},
                )
            )
            out.append(
                measurement(
                    "calcio.example",
                    "enforced",
                    **page,
                    outcome="sinkhole",
                    blocked=True,
                    answers=[PAGE_IP],
                    sinkhole={"match": PAGE_IP, "source": "agcom"},
                    expected_by=ORDER,
                    control=control,
                )
            )
        else:
            out.append(
                measurement(
                    "calcio.example",
                    "ok",
                    **leaky,
                    expected="resolves",
                    control=control,
                    expected_by={**ORDER, "list": "agcom-2026-1", "reason": "ordered in IT, not in FR"},
                )
            )
            out.append(
                measurement(
                    "calcio.example",
                    "overblock",
                    **page,
                    outcome="sinkhole",
                    blocked=True,
                    expected="resolves",
                    answers=[PAGE_IP],
                    sinkhole={"match": PAGE_IP, "source": "agcom"},
                    expected_by={**ORDER, "list": "agcom-2026-1", "reason": "ordered in IT, not in FR"},
                    control=control,
                )
            )
        out.append(
            measurement(
                "wiki.example",
                "overblock",
                **censor,
                outcome="ede_blocked",
                blocked=True,
                expected="resolves",
                rcode="REFUSED",
                answers=[],
                ede=[{"code": 16, "text": "court order"}],
                expected_by={"list": "controls", "pattern": "wiki.example"},
                control=control,
            )
        )
        out.append(
            measurement(
                "wiki.example",
                "inconclusive",
                **leaky,
                outcome="timeout",
                blocked=None,
                expected="resolves",
                rcode=None,
                answers=[],
                wire=None,
                expected_by={"list": "controls"},
            )
        )
    return out


def _fill(s: Server) -> None:
    for probe, country in (("it-1", "IT"), ("it-2", "IT"), ("fr-1", "FR")):
        token = s.token(probe)
        body = batch(probe, _lab_batch(country))
        body["probe"].update(country=country, region=f"{country.lower()}-demo")
        assert post(s, token, body).status_code == 200


def _text(html: str) -> str:
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))).strip()


def test_display_names_never_show_a_url() -> None:
    assert display_name("https://127.53.0.2:4431/dns-query", "isp-b") == "isp-b"
    assert display_name("tls://[2001:db8::1]:853", None) == "2001:db8::1:853"
    assert display_name("cloudflare", "cloudflare") == "cloudflare"


def test_status_page_leads_with_the_matrix_then_leaks_then_overblocks(server: Server) -> None:  # noqa: F811
    _fill(server)
    html = server.client.get("/").text
    text = _text(html)
    # Two probes in Italy see 6 transports leak; one row says so, with both probes and every transport.
    assert "<title>blockprobe — 1 leak, 3 overblocks</title>" in html
    matrix = html.index('id="matrix"')
    assert matrix < html.index('id="leaks"') < html.index('id="overblocks"')
    assert "https://127.53" not in text  # resolvers by name
    assert "udp://" not in text  # resolvers by name
    rows = re.findall(r'<tr class="problem-row leak-row">(.*?)</tr>', html, re.S)
    assert len(rows) == 1
    leak = _text(rows[0])
    assert leak.split()[:6] == ["IT", "leakydns", "public", "calcio.example", "A", "agcom-2026-1"]
    assert "185.199.108.10" in leak
    assert "udp tcp dot doh doh3 doq" in leak
    assert "it-1, it-2" in leak
    over = [_text(r) for r in re.findall(r'<tr class="problem-row overblock-row">(.*?)</tr>', html, re.S)]
    assert any(
        "ede_blocked (REFUSED); EDE 16 “court order”" in r and r.startswith("FR censordns") for r in over
    )
    assert any(f"block page {PAGE_IP} (agcom)" in r and r.startswith("FR isp-b isp") for r in over)
    # The matrix: IT leakydns is red over every transport, counting two probes' leaks and inconclusives.
    cells = re.findall(r'<td class="cell (\w+)"[^>]*>(.*?)</td>', html[matrix:], re.S)
    assert ("leak", "2 leak 2 ?") in [(c, _text(v)) for c, v in cells]
    evidence = re.search(r'href="(/evidence\?[^"]+)">why\?', html)
    assert evidence is not None
    assert server.client.get(unescape(evidence.group(1))).status_code == 200
    # No probe here checks answers: no column of "not checked", one line that says so instead.
    assert "what a user meets there" not in html
    assert "no probe checked these answers at their addresses" in text


def test_long_sections_are_paged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages_module, "SHOW_PAGE", 60)
    monkeypatch.setattr(pages_module, "NAMES_COUNTED", 100)
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    s = Server(store)
    try:
        token = s.token("it-1")
        many = [measurement(f"n{i:03}.example") for i in range(130)]
        assert post(s, token, batch(measurements=many)).status_code == 200
        page = s.client.get("/").text
        assert page.count("leak-row") == 50
        # Counted up to a bound, the series exactly (from the kept counts).
        assert "<title>blockprobe — 100+ leaks, 0 overblocks</title>" in page
        assert "100+ (name × type × country; 130 series)" in _text(page)
        assert "All 100+ leaks, 60 names a page" in _text(page)
        # Every name once, in order, following the "next" links.
        seen: list[str] = []
        url: str | None = "/?show=leak"
        pages = 0
        while url is not None:
            html = s.client.get(url).text
            seen += re.findall(r'<td class="name">([^<]+)</td>', html)
            nxt = re.search(r'href="(/\?show=leak&amp;after=[^"#]+)', html)
            url = unescape(nxt.group(1)) if nxt else None
            pages += 1
        assert pages == 3
        assert seen == [f"n{i:03}.example" for i in range(130)]
        assert s.client.get("/?show=nonsense").status_code == 422
        bad = s.client.get("/?show=leak&after=bm90LWEtY3Vyc29y")
        assert bad.status_code == 422
        assert "not a cursor this collector made" in bad.text
    finally:
        s.stop()
        store.close()


def test_every_finding_is_served_page_by_page_as_json_and_csv(server: Server) -> None:  # noqa: F811
    """The full list behind the capped metrics: every series once over the pages, filters that
    narrow both the rows and the total, CSV a spreadsheet opens without running a formula."""
    for probe in ("it-1", "it-2"):
        token = server.token(probe)
        ms = [measurement(f"n{i:02}.example", transport=t) for i in range(20) for t in ("udp", "doh")]
        ms.append(measurement("-x.example", answers=["=cmd|' /C calc'!A0"]))
        ms.append(measurement("fine.example", "ok", expected="resolves"))
        ms.append(measurement("canary.example", expected_by={"canary": "resolves"}))
        assert post(server, token, batch(probe, ms)).status_code == 200
    got: list[tuple[str, ...]] = []
    url: str | None = "/api/v1/findings?finding=leak&limit=7"
    while url is not None:
        r = server.client.get(url)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["series"] == 82
        assert r.headers["x-total-series"] == "82"
        assert len(body["findings"]) <= 7
        got += [
            (f["country"], f["domain"], f["qtype"], f["resolver"], f["transport"], f["probe"])
            for f in body["findings"]
        ]
        url = body["next"]
        if url is not None:
            assert r.headers["link"] == f'<{url}>; rel="next"'
    assert len(got) == 82 == len(set(got))  # every leak once; the ok and the canary are not leaks
    assert got == sorted(got)
    first = server.client.get("/api/v1/findings?limit=1").json()["findings"][0]
    assert first["order"] == "agcom-1"
    assert first["list"] is None
    assert first["reach"] == "unchecked"
    assert first["evidence"].startswith("/evidence?probe=")
    assert server.client.get(first["evidence"]).status_code == 200
    narrow = server.client.get("/api/v1/findings?probe=it-2&transport=doh&limit=100").json()
    assert narrow["series"] == 20
    assert len(narrow["findings"]) == 20
    assert narrow["next"] is None
    assert {(f["probe"], f["transport"]) for f in narrow["findings"]} == {("it-2", "doh")}
    assert server.client.get("/api/v1/findings?order=other").json() == {
        "finding": "leak",
        "series": 0,
        "findings": [],
        "next": None,
    }
    csv_text = server.client.get("/api/v1/findings?probe=it-1&transport=udp&format=csv&limit=3").text
    lines = csv_text.split("\r\n")
    assert lines[0].startswith("probe,region,country,resolver,transport,qtype,domain,finding,order")
    assert "'-x.example" in lines[1]
    assert "'=cmd|" in lines[1]
    assert len([line for line in lines[1:] if line]) == 3
    for bad in (
        "finding=ok",
        "limit=0",
        "limit=10001",
        "transport=smoke",
        "after=!!",
        "after=bm90LWEtY3Vyc29y",
    ):
        r = server.client.get("/api/v1/findings?" + bad)
        assert r.status_code == 422, bad
        assert r.json()["detail"], bad


def _series(resolver: str = "udp://192.0.2.53") -> dict[str, str]:
    return {
        "probe": "it-1",
        "resolver": resolver,
        "transport": "udp",
        "qtype": "A",
        "domain": "calcio.example",
    }


def test_evidence_page_says_why_then_the_history_in_runs(server: Server) -> None:  # noqa: F811
    token = server.token("it-1")
    leak = measurement(
        "calcio.example",
        "leak",
        expected_by=ORDER,
        operator="leakydns",
        kind="public",
        control={"outcome": "resolved", "answers": ["185.199.108.10"]},
        evidence={"nsid": "leaky-fra1", "connect_ms": 1.5},
    )
    for _ in range(3):
        assert post(server, token, batch(measurements=[leak])).status_code == 200
    enforced = measurement(
        "calcio.example",
        "enforced",
        outcome="nxdomain",
        rcode="NXDOMAIN",
        blocked=True,
        answers=[],
        expected_by=ORDER,
        control={"outcome": "resolved", "answers": ["185.199.108.10"]},
    )
    assert post(server, token, batch(measurements=[enforced])).status_code == 200
    html = server.client.get("/evidence", params=_series()).text
    text = _text(html)
    assert (
        "The name must be blocked, and the resolver answered NXDOMAIN (no such name) while the control has records for it, a block."
        in text
    )
    assert "Order agcom-2026-1 (AGCOM) requires calcio.example to be blocked on this resolver here." in text
    assert "The control answered 185.199.108.10" in text
    assert 'href="/"' in html
    history = re.search(r'<table id="history">(.*?)</table>', html, re.S)
    assert history is not None
    runs = [_text(r).split() for r in re.findall(r"<tr><td>(.*?)</tr>", history.group(1), re.S)]
    assert [(r[2], r[3]) for r in runs] == [("1", "enforced"), ("3", "leak")]
    assert html.index('<details id="raw">') > html.index('id="history"')  # wire data folded away, last
    # JSON is unchanged: every archived row, newest first, with its wire data.
    rows = server.client.get("/evidence", params={**_series(), "format": "json"}).json()
    assert [r["finding"] for r in rows] == ["enforced", "leak", "leak", "leak"]
    assert rows[0]["wire"] == "AAA="


def test_runs_of_collapses_identical_neighbours_only() -> None:
    a = {"time": "t4", "outcome": "resolved", "finding": "leak", "answers": ["1.2.3.4"]}
    b = {"time": "t2", "outcome": "nxdomain", "finding": "enforced", "answers": []}
    rows = [a, {**a, "time": "t3"}, b, {**a, "time": "t1"}]
    assert [(r["first"], r["last"], r["count"]) for r in runs_of(rows)] == [
        ("t3", "t4", 2),
        ("t2", "t2", 1),
        ("t1", "t1", 1),
    ]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (make test installs it)")
    b = Browser(exe, tmp_path / "chrome", 1400, 900)
    yield b
    b.close()


def test_first_screen_at_1400x900_shows_the_matrix_and_a_leak(tmp_path: Path, browser: Browser) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    s = Server(store)
    try:
        _fill(s)
        run_pass(store, s.config.stale_after)
        browser.load(s.url + "/")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.screenshot(ARTIFACTS / "status-page-1400x900.png")
        assert browser.evaluate("window.innerWidth") == 1400
        assert browser.evaluate("window.innerHeight") == 900
        assert browser.visible("#matrix")
        assert browser.visible("tr.leak-row")
        assert (
            browser.evaluate("document.querySelector('tr.leak-row td.name').textContent") == "calcio.example"
        )
        assert (
            browser.evaluate("document.querySelectorAll('#compliance table.order-matrix td.cell').length")
            == 12
        )
        browser.load(s.url + "/evidence?" + urlencode(_series(_spec("127.53.0.3", "udp"))))
        browser.screenshot(ARTIFACTS / "evidence-page-1400x900.png")
        for selector in ("#reason", "#expected", "#answered", "#control"):
            assert browser.visible(selector), selector
        assert "agcom-2026-1" in browser.evaluate("document.querySelector('#expected').textContent")
        assert "185.199.108.10" in browser.evaluate("document.querySelector('#control').textContent")
        assert browser.evaluate("document.querySelector('#raw').open") is False
    finally:
        s.stop()
        store.close()


def test_an_unreachable_prometheus_is_said_not_hidden(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    s = Server(store, f"prometheus: http://127.0.0.1:{closed.getsockname()[1]}\n")
    try:
        page = s.client.get("/").text
        assert f"Prometheus at http://127.0.0.1:{closed.getsockname()[1]} did not answer" in page
        assert "alerts unknown" in page
    finally:
        s.stop()
        store.close()
        closed.close()


def test_the_prometheus_url_is_checked() -> None:
    with pytest.raises(CollectorConfigError) as exc:
        parse_collector_config("prometheus: ftp://127.0.0.1:9090\n")
    assert exc.value.errors == [
        "<config>: prometheus: 'ftp://127.0.0.1:9090' is not an http:// or https:// URL"
    ]
    assert (
        parse_collector_config("prometheus: http://127.0.0.1:9090\n").prometheus_url
        == "http://127.0.0.1:9090"
    )
    assert parse_collector_config("").prometheus_url is None


def test_orders_have_a_matrix_by_enforcement_share_and_a_timeline(server: Server) -> None:  # noqa: F811
    _fill(server)
    now = time.time()
    when = {t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + t)) for t in (-3600, -1800, -60)}
    late = measurement(
        "live.example",
        "leak",
        resolver=_spec("127.53.0.3", "udp"),
        operator="leakydns",
        kind="public",
        time=when[-60],
        expected_by={**ORDER, "order": "ps-2026-9", "effective": when[-3600], "due": when[-1800]},
    )
    assert post(server, server.token("it-1"), batch(measurements=[late])).status_code == 200
    run_pass(server.store, server.config.stale_after)
    html = server.client.get("/").text
    assert 'href="#compliance">deadline missed on 1</a>' in html  # said on the first line
    section = html[html.index('id="compliance"') :]
    assert section.index('id="order-ps-2026-9"') < section.index('id="order-agcom-2026-1"')  # the miss first
    agcom = section[section.index('id="order-agcom-2026-1"') :]
    cells = [(c, _text(v)) for c, v in re.findall(r'<td class="cell (\w+)"[^>]*>(.*?)</td>', agcom, re.S)]
    # Two Italian probes: leakydns leaks on every transport, isp-b enforces on every one.
    assert cells.count(("leak", "0 % 0/2 · 1 leaking")) == 6
    assert cells.count(("fine", "100 % 2/2")) == 6
    assert len(cells) == 12
    assert 'points="0,30 300,30"' in agcom  # half of all series enforced, since the first pass
    assert "50 % enforced" in _text(agcom)
    ps = _text(section[: section.index('id="order-agcom-2026-1"')])
    assert "0 % 0/1 · 1 leaking · missed" in ps
    assert "deadline missed on 1 of 1" in ps, ps


# --- what a user meets at a leak (issue 16) ---------------------------------------------------


def _leak_rows(s: Server) -> dict[str, str]:
    html = s.client.get("/").text
    rows = [_text(r) for r in re.findall(r'<tr class="problem-row leak-row">(.*?)</tr>', html, re.S)]
    return {r.split()[2]: r for r in rows}


def test_a_leak_that_leads_nowhere_says_it_leaks_nothing(server: Server) -> None:  # noqa: F811
    tokens = {p: server.token(p) for p in ("it-1", "it-2")}

    def send(probe: str, ms: list[dict[str, Any]]) -> None:
        body = batch(probe, ms)
        assert post(server, tokens[probe], body).status_code == 200

    send(
        "it-1",
        [
            measurement("cdn.example", reach="http_451"),
            measurement("dark.example", reach="unreachable"),
            measurement("site.example", reach="reachable"),
            measurement("split.example", reach="http_451"),
            measurement("plain.example"),  # from a probe that does not check answers
            measurement("cert.example", reach="tls_error"),
        ],
    )
    send(
        "it-2",
        [measurement("split.example", reach="reachable"), measurement("cdn.example", reach="unreachable")],
    )
    rows = _leak_rows(server)
    column = {name: row.split(" 93.184.216.34 ", 1)[1].split(" udp ", 1)[0] for name, row in rows.items()}
    assert column == {
        "cdn.example": "leaks nothing: HTTP 451 (Unavailable For Legal Reasons) from it-1; no connection from it-2",
        "dark.example": "leaks nothing: no connection",
        "site.example": "a proven leak: the site itself (a valid certificate)",
        "split.example": "the site itself (a valid certificate) from it-2; HTTP 451 (Unavailable For Legal Reasons) from it-1",
        "plain.example": "not checked",
        "cert.example": "no valid certificate",
    }
    assert "what a user meets there" in server.client.get("/").text


def test_the_evidence_page_lists_each_address_check(server: Server) -> None:  # noqa: F811
    token = server.token("it-1")
    checks = [
        {
            "name": "calcio.example",
            "address": "93.184.216.34",
            "status": "http_451",
            "phase": None,
            "cert_valid": True,
            "cert": {"names": ["calcio.example", "*.calcio.example"], "issuer": "CN=Lab CA"},
            "http_code": 451,
            "time": "2026-12-01T10:00:00.000Z",
            "cached": True,
        },
        {
            "name": "calcio.example",
            "address": "2001:db8::7",
            "status": "refused",
            "error": "connect: connection refused",
        },
        "not a check",
        {"name": "calcio.example", "address": "192.0.2.1", "status": "invalid_cert", "cert": ["odd"]},
    ]
    leak = measurement("calcio.example", reach="http_451", evidence={"answer_checks": checks})
    assert post(server, token, batch(measurements=[leak])).status_code == 200
    html = server.client.get("/evidence", params=_series("udp://192.0.2.53")).text
    rows = [_text(r) for r in re.findall(r"<tr><td>(.*?)</tr>", html[html.index('id="checks"') :], re.S)][:3]
    assert rows == [
        "answer 93.184.216.34 http_451 certificate for calcio.example, *.calcio.example from CN=Lab CA; HTTP 451 "
        "2026-12-01T10:00:00.000Z (cached)",
        "answer 2001:db8::7 refused connect: connection refused",
        "answer 192.0.2.1 invalid_cert",
    ]
    assert "A user would meet" in html
    assert "HTTP 451 Unavailable For Legal Reasons" in html


def test_the_matrix_shows_an_operator_that_differs_from_the_name(server: Server) -> None:  # noqa: F811
    """A catalogue resolver is shown by its name; its operator gets a column where it says more."""
    token = server.token("it-1")
    rows = [
        measurement("calcio.example", "leak", resolver="quad9", operator="Quad9 Foundation", kind="public"),
        measurement(
            "calcio.example", "enforced", resolver="cloudflare", operator="cloudflare", kind="public"
        ),
    ]
    assert post(server, token, batch("it-1", rows)).status_code == 200
    html = server.client.get("/").text
    matrix = html[html.index('id="matrix"') : html.index("</table>", html.index('id="matrix"'))]
    assert "<th>operator</th>" in matrix
    by_name = {
        _text(m.group(1)).split()[0]: _text(m.group(2))
        for m in re.finditer(r'<td>(.*?)</td>\s*<td class="operator">(.*?)</td>', matrix, re.S)
    }
    assert by_name == {"quad9": "Quad9 Foundation", "cloudflare": ""}


def test_the_matrix_has_no_operator_column_when_names_say_it_all(server: Server) -> None:  # noqa: F811
    _fill(server)  # resolvers given as URLs: shown by their operator, which then needs no column
    html = server.client.get("/").text
    assert "<th>operator</th>" not in html
    assert 'class="operator"' not in html
