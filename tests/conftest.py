"""Shared fixtures: real servers in subprocesses, one per (server kind) and module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import ServerProcess


@pytest.fixture(scope="module", params=["pywsgi", "pywsgi-patched", "wsgiref"])
def served(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """tests/apps.py served by each core server kind, over a real loopback socket."""
    with ServerProcess(request.param, "tests.apps:app") as server:
        yield server
