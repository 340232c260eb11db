"""Disconnect watchers: a client that leaves an idle stream is noticed within 1 s, and
pipelined or unread bytes are never taken for a departure.

In-process tests watch real loopback TCP sockets; the rest serve
tests/mw_apps.py from the servers that expose the connection.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from tests.client import Stream, event_times, events, wait_until
from tests.servers_extra import ExtraServerProcess
from wsgi_detach._watchers import SOCKET_KEY, watch

# ---------------------------------------------------------------------- in-process


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side) of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def _watch_from_a_thread(environ: dict[str, Any]) -> tuple[threading.Event, Callable[[], object]]:
    """Start a watch from a fresh thread (no gevent hub: the callback runs in the watcher)."""
    gone = threading.Event()
    result: list[Callable[[], object]] = []
    thread = threading.Thread(target=lambda: result.append(watch(environ, gone.set)))  # type: ignore[arg-type]
    thread.start()
    thread.join(5)
    (cancel,) = result
    return gone, cancel


def test_fin_and_reset_are_noticed(connection: tuple[socket.socket, socket.socket]) -> None:
    server, client = connection
    gone, _ = _watch_from_a_thread({SOCKET_KEY: server})
    client.sendall(b"late request bytes are fine")  # readable is not gone
    assert not gone.wait(0.3)
    server.recv(100)
    client.close()
    assert gone.wait(1.0)


def test_bytes_before_the_fin_are_not_eof(connection: tuple[socket.socket, socket.socket]) -> None:
    server, client = connection
    gone, _ = _watch_from_a_thread({SOCKET_KEY: server})
    client.sendall(b"GET /next HTTP/1.1\r\n\r\n")  # a pipelined request, then a half-close
    client.shutdown(socket.SHUT_WR)
    assert not gone.wait(0.5)


def test_cancel_stops_the_watch(connection: tuple[socket.socket, socket.socket]) -> None:
    server, client = connection
    gone, cancel = _watch_from_a_thread({SOCKET_KEY: server})
    cancel()
    client.close()
    assert not gone.wait(0.5)


def test_waitress_flag_is_polled() -> None:
    flag = threading.Event()
    gone, _ = _watch_from_a_thread({"waitress.client_disconnected": flag.is_set})
    assert not gone.wait(0.3)
    flag.set()
    assert gone.wait(1.0)


def test_servers_that_expose_nothing_get_no_watch() -> None:
    assert watch({"wsgi.version": (1, 0)}, lambda: None) is None


# ---------------------------------------------------------------------- real servers

WATCHED = ["detach-pywsgi", "gunicorn-gevent", "gunicorn-gthread", "waitress"]


@pytest.fixture(scope="module", params=WATCHED)
def served(request: pytest.FixtureRequest) -> Iterator[ExtraServerProcess]:
    with ExtraServerProcess(request.param, "tests.mw_apps:app") as server:
        yield server


@pytest.mark.parametrize("leave", ["close", "reset"])
def test_idle_stream_left_by_its_client_is_closed_within_1s(
    served: ExtraServerProcess, leave: str
) -> None:
    key = f"leave-{leave}"
    stream = Stream(served.port, f"/idle?key={key}")
    assert wait_until(lambda: events(served.port, key) == ["opened"])
    left = time.time()
    stream.reset() if leave == "reset" else stream.close()
    assert wait_until(lambda: len(events(served.port, key)) == 2, timeout=2)
    times = event_times(served.port, key)
    assert list(times) == ["opened", "outcome disconnected"]
    assert times["outcome disconnected"] - left < 1.0


def _raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n", id="pipelined"),
        pytest.param(b"", id="unread-body"),
    ],
)
def test_waiting_bytes_are_not_a_disconnect(served: ExtraServerProcess, extra: bytes) -> None:
    key = f"bytes-{len(extra)}"
    method, body = (b"GET", b"") if extra else (b"POST", b"hello")
    request = (
        method + b" /idle?alive=0.4&key=" + key.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    sock = _raw(served.port, request + extra)
    try:
        received = _read_until(sock, b"hello world" if extra else b"0\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 200")
        assert b"\r\n5\r\nalive\r\n0\r\n\r\n" in received  # the stream lived to its end
        if extra and b"Connection: close" not in received:  # waitress closes instead
            assert received.endswith(b"hello world")  # the pipelined request came next
    finally:
        sock.close()
    assert wait_until(lambda: events(served.port, key) == ["opened", "outcome finished"])


def test_a_wrapped_queue_is_ended_when_its_client_leaves() -> None:
    with ExtraServerProcess("detach-pywsgi", "tests.mw_apps:app") as server:
        stream = Stream(server.port, "/queue_idle?n=1&key=wq")
        stream.read_head()
        assert stream.read_chunk() == b"item 0;"
        stream.close()
        # The watcher put StopIteration into the queue: the framework's iterator
        # ended and the server closed it, though the producer never ended it.
        assert wait_until(lambda: events(server.port, "wq") == ["wrapper closed"], timeout=2)
