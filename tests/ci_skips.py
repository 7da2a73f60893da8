"""Under CI a skipped test is a failure (a pytest plugin, loaded by tests/conftest.py).

A tool that did not install must not turn into a green run that tested less than it
claims. Locally skips stay skips, and `make test` lists them with -rs.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["pytest_runtest_logreport", "pytest_sessionfinish"]

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _skipped:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"CI=true: {len(_skipped)} skipped test(s) fail the run:", red=True)
            for nodeid in _skipped:
                reporter.write_line(f"  {nodeid}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
