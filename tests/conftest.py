"""Shared fixtures: real servers in subprocesses, one per server kind and module."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Hypothesis loads third-party "hypothesis" entry points on import; a trio
# release that selenium pulls in registers one that no longer exists and
# crashes the run. We register no strategies through plugins.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

import pytest

from tests import matrix_report
from tests.servers import ServerProcess


@pytest.fixture(scope="module", params=["pywsgi", "pywsgi-patched", "wsgiref"])
def served(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """tests/apps.py served by each core server kind, over a real loopback socket.

    On teardown, asserts that wsgiref.validate (wrapped around the app in the
    server) objected to nothing during the whole module.
    """
    with ServerProcess(request.param, "tests.apps:app") as server:
        yield server
        problems = server.validation_problems()
    assert not problems, f"wsgiref.validate objected on {request.param}: {problems}"


# The conformance matrix records every (server, case) outcome; written to
# build/matrix.json at the end of the session for tests/matrix_report.py.
_matrix_results: dict[str, dict[str, dict[str, object]]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    entry = dict(report.user_properties).get("matrix")
    if not isinstance(entry, dict):
        return
    outcome = report.outcome
    if outcome == "passed" and entry.get("broken"):
        outcome = "broken"
    elif outcome == "passed" and entry["note"]:
        outcome = "limited"
    matrix_report.record(
        _matrix_results,
        entry["server"],
        entry["case"],
        outcome=outcome,
        text=entry["text"],
        note=entry["note"],
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _matrix_results:
        matrix_report.write_results(_matrix_results)
