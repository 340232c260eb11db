"""Shared fixtures: real servers in subprocesses, one per server kind and module."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Hypothesis loads third-party "hypothesis" entry points on import; a trio
# release that selenium pulls in registers one that no longer exists and
# crashes the run. We register no strategies through plugins.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

import pytest

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
