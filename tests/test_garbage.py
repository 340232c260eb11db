"""Requests leave no reference cycles behind on the server.

Why it matters: an object in a cycle is not freed when its request ends but
when the cyclic collector finds it, and the collector runs more often, and
scans more, the more such garbage piles up. One cycle per request (the
disconnect watch held the request that held the watch) cost a long-poll
about a fifth of its server CPU (bench: 98 -> 78 us a poll once it was gone).
The server's ``/_server`` report runs ``gc.collect()`` and says how many
unreachable objects it freed; between two reports, a keep-alive connection
makes many requests of one kind.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client import keepalive_timings
from tests.servers import ServerProcess, serve

REQUESTS = 60


APPS = ("tests.mw_apps:app", "tests.pattern_apps:app")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerProcess]]:
    with serve("detach-server", APPS[0]) as first, serve("detach-server", APPS[1]) as second:
        yield {APPS[0]: first, APPS[1]: second}


@pytest.mark.parametrize(
    ("app", "path"),
    [
        # detach(), a producer greenlet, the disconnect watch
        (APPS[0], "/detached?n=3&interval=0"),
        # an ordinary response through the middleware
        (APPS[0], "/gen"),
        # the queue of Bottle's queue-as-body pattern, adopted and pumped into a body
        (APPS[0], "/queue_one?n=2&interval=0"),
        # a body that owns start_response
        (APPS[1], "/sse/echo"),
    ],
)
def test_a_request_leaves_no_cycle(servers: dict[str, ServerProcess], app: str, path: str) -> None:
    server = servers[app]
    server.info()  # collects what came before
    keepalive_timings(server.port, path, REQUESTS)
    # pywsgi's own handler makes one cycle per connection (a few dozen
    # objects); one per request would be thousands.
    assert server.info()["garbage"] < REQUESTS, f"{path} leaves cycles behind"
