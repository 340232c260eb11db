"""What a client receives, and what the app observes, are what plain gevent.pywsgi gives.

Every case runs on one connection against several servers, each a child
process (tests/servers.py) serving tests/wire_apps.py:

* ``plain``: gevent.pywsgi as it comes, the app alone -- the reference;
* ``middleware``: gevent.pywsgi with ``DetachMiddleware`` in front;
* ``handler``: ``DetachHandler`` with the middleware (what ``make_server``
  builds), speed-ups on;
* ``handler-stock``: the same with the speed-ups off.

The bytes on the wire are compared (``Date`` normalised). Where we differ
on purpose, the difference is written here with its reason and listed in
docs/servers.md; nothing else may differ.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from tests.servers import ServerProcess


def exchange(port: int, wire: bytes) -> bytes:
    """Send ``wire`` on one connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire)
        received = b""
        while more := sock.recv(1 << 20):
            received += more
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", received)


def request(line: str, *headers: str, body: bytes = b"", close: bool = True) -> bytes:
    lines = [line, "Host: 127.0.0.1", *headers] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


SERVERS = {
    "plain": ("pywsgi-plain", "tests.wire_apps:plain"),
    "middleware": ("pywsgi-plain", "tests.wire_apps:app"),
    "handler": ("detach-handler", "tests.wire_apps:app"),
    "handler-stock": ("detach-handler-stock", "tests.wire_apps:app"),
}


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    processes = {name: ServerProcess(*spec) for name, spec in SERVERS.items()}
    try:
        yield {name: process.start().port for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.stop()


@pytest.mark.parametrize("what", sorted(__import__("tests.wire_apps").wire_apps.REFUSED))
def test_a_refused_head_raises_in_the_app_where_it_can_be_caught(
    ports: dict[str, int], what: str
) -> None:
    """Regression: behind DetachMiddleware the server's checks ran only after the app
    returned, so the app could not catch them and the client got a 500."""
    wire = request(f"GET /refused?{what} HTTP/1.1")
    expected = exchange(ports["plain"], wire)
    assert expected.startswith(b"HTTP/1.1 500 Fallback\r\n"), expected
    for name in ("middleware", "handler", "handler-stock"):
        assert exchange(ports[name], wire) == expected, name
