"""Disconnect watchers: a client that leaves an idle stream is noticed within 1 s, and
pipelined or unread bytes are never taken for a departure.

In-process tests watch real loopback TCP sockets; the rest serve
tests/mw_apps.py from the servers that expose the connection.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import gevent
import gevent.event
import pytest

from tests.client import Stream, event_times, events, wait_until
from tests.servers import ServerProcess, serve
from wsgi_detach._watchers import (
    OWN_WATCH_KEY,
    SOCKET_KEY,
    WATCH_DELAY,
    ConnectionReader,
    _get_monitor,
    watch,
)

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


def _epoll_watches(fd: int) -> bool:
    """Whether the kernel has ``fd`` registered in the watcher thread's epoll."""
    epoll_fd = _get_monitor()._epoll.fileno()
    with open(f"/proc/self/fdinfo/{epoll_fd}") as info:
        return any(line.startswith(f"tfd: {fd:8d} ") for line in info)


def _epoll_soon_watches(fd: int, timeout: float = 2.0) -> bool:
    """Whether the watcher thread registers ``fd`` within ``timeout`` (the hub keeps running)."""
    give_up = time.monotonic() + timeout
    while not _epoll_watches(fd) and time.monotonic() < give_up:
        gevent.sleep(0.01)
    return _epoll_watches(fd)


def _recorded() -> tuple[gevent.event.Event, list[Any], Callable[[], None]]:
    """An ``on_disconnect`` that sets the event and records the greenlet it ran in."""
    gone = gevent.event.Event()
    reported_in: list[Any] = []

    def on_gone() -> None:
        reported_in.append(gevent.getcurrent())
        gone.set()

    return gone, reported_in, on_gone


def _assert_beside_the_hub(glet: Any) -> None:
    """A callback ran in a greenlet of this hub, not in the hub itself."""
    hub = gevent.get_hub()
    assert glet is not hub and glet.parent is hub


def test_a_watch_ended_within_the_delay_never_reaches_epoll(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, _client = connection
    _, cancel = _watch_from_a_thread({SOCKET_KEY: server})
    assert not _epoll_watches(server.fileno())
    cancel()
    time.sleep(WATCH_DELAY * 2)  # past the moment it would have been registered
    assert not _epoll_watches(server.fileno())
    _, cancel = _watch_from_a_thread({SOCKET_KEY: server})
    assert wait_until(lambda: _epoll_watches(server.fileno()), timeout=1.0)
    cancel()
    assert not _epoll_watches(server.fileno())


def test_a_client_that_leaves_before_the_registration_is_noticed(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    gone, _ = _watch_from_a_thread({SOCKET_KEY: server})
    client.close()
    assert gone.wait(1.0)


def test_waitress_flag_is_polled() -> None:
    flag = threading.Event()
    gone, _ = _watch_from_a_thread({"waitress.client_disconnected": flag.is_set})
    assert not gone.wait(0.3)
    flag.set()
    assert gone.wait(1.0)


def _pending_for(fd: int) -> bool:
    """Whether the watcher thread holds a watch of ``fd`` that it has not registered yet."""
    return any(entry.fd == fd for entry in list(_get_monitor()._pending))


def test_from_a_greenlet_a_watch_ended_within_the_delay_never_reaches_the_watcher_thread(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """Under a gevent server most responses end within the delay: their watches stay
    in their hub, and the watcher thread never hears of them."""
    server, _client = connection
    seen = []

    def short_response() -> None:
        cancel = watch({SOCKET_KEY: server}, lambda: None)
        assert cancel is not None
        seen.append(_pending_for(server.fileno()))
        assert cancel() is True
        assert cancel() is False  # a second stop: nothing left to stop

    gevent.spawn(short_response).join(5)
    assert seen == [False]
    gevent.sleep(WATCH_DELAY * 2)  # the hub's hand-over has run meanwhile
    assert not _pending_for(server.fileno())
    assert not _epoll_watches(server.fileno())


def test_from_a_greenlet_a_longer_watch_is_registered_and_reports_in_its_hub(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    gone, reported_in, on_gone = _recorded()
    started = time.monotonic()
    cancel = gevent.spawn(watch, {SOCKET_KEY: server}, on_gone).get(timeout=5)
    assert _epoll_soon_watches(server.fileno())
    assert time.monotonic() - started >= WATCH_DELAY / 2 * 0.9  # not at once: when due
    client.close()
    assert gone.wait(2)
    _assert_beside_the_hub(reported_in[0])
    assert cancel() is False  # reported: no longer watched
    assert not _epoll_watches(server.fileno())


def test_after_a_fork_the_watches_waiting_in_a_hub_are_dropped(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """A child process does not watch the parent's connections: what waited in a hub
    at the fork is dropped, as the watcher thread's own pending watches are."""
    from wsgi_detach._watchers import _deferrals_here

    server, _client = connection

    def in_a_greenlet() -> tuple[Any, Any]:
        return watch({SOCKET_KEY: server}, lambda: None), _deferrals_here()

    cancel, deferrals = gevent.spawn(in_a_greenlet).get(timeout=5)
    deferrals.forget_all()  # what the fork handler does to every hub's
    assert cancel() is False  # nothing left to stop
    gevent.sleep(WATCH_DELAY * 2)
    assert not _pending_for(server.fileno())
    assert not _epoll_watches(server.fileno())


# ------------------------------------------------ through the connection's own read watcher


@pytest.fixture
def reader(connection: tuple[socket.socket, socket.socket]) -> Iterator[ConnectionReader]:
    server, _client = connection
    found = ConnectionReader(gevent.get_hub().loop, server, server.fileno())
    try:
        yield found
    finally:
        found.close()


def _own_watch(reader: ConnectionReader, on_gone: Callable[[], object]) -> Any:
    """What the middleware does under DetachHandler: watch() with the reader's own watch."""
    environ = {SOCKET_KEY: reader.sock, OWN_WATCH_KEY: reader.watch}
    return gevent.spawn(watch, environ, on_gone).get(timeout=5)


def _watched(reader: ConnectionReader) -> tuple[gevent.event.Event, Any]:
    """(set when the client is taken for gone, the watch's cancel)."""
    gone = gevent.event.Event()
    return gone, _own_watch(reader, gone.set)


@pytest.mark.parametrize("leave", ["close", "reset"])
def test_through_the_reader_a_departure_is_noticed_at_once_in_the_hub(
    connection: tuple[socket.socket, socket.socket], reader: ConnectionReader, leave: str
) -> None:
    """No WATCH_DELAY and no watcher thread: the descriptor is already in the
    hub's epoll set, so the callback runs as soon as the kernel reports the FIN."""
    server, client = connection
    gone, reported_in, on_gone = _recorded()
    cancel = _own_watch(reader, on_gone)
    assert cancel is not None
    if leave == "reset":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    started = time.monotonic()
    client.close()
    assert gone.wait(2)
    assert time.monotonic() - started < WATCH_DELAY / 2  # sooner than any hand-over
    _assert_beside_the_hub(reported_in[0])
    assert not _pending_for(server.fileno()) and not _epoll_watches(server.fileno())
    assert cancel() is False  # reported: nothing left to stop


def test_through_the_reader_bytes_move_the_watch_to_the_thread(
    connection: tuple[socket.socket, socket.socket], reader: ConnectionReader
) -> None:
    """A pipelined request makes the read watcher fire without a hang-up: the
    watch goes on in the watcher thread, which waits for EPOLLRDHUP only."""
    server, client = connection
    gone, cancel = _watched(reader)
    client.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _epoll_soon_watches(server.fileno())
    assert not gone.is_set()  # bytes are not a departure
    server.recv(100)  # the server reads them; then the client leaves
    client.close()
    assert gone.wait(2)
    assert cancel() is False


def test_through_the_reader_a_half_close_after_bytes_is_not_a_departure(
    connection: tuple[socket.socket, socket.socket], reader: ConnectionReader
) -> None:
    _server, client = connection
    gone, cancel = _watched(reader)
    client.sendall(b"GET /next HTTP/1.1\r\n\r\n")
    client.shutdown(socket.SHUT_WR)
    assert not gone.wait(0.5)
    cancel()


def test_through_the_reader_cancel_restores_the_wait_and_a_late_cancel_undoes_nothing(
    connection: tuple[socket.socket, socket.socket], reader: ConnectionReader
) -> None:
    _server, client = connection
    gone, cancel = _watched(reader)
    assert cancel() is True
    assert cancel() is False
    # The connection waits for its next request; a stale watch's cancel
    # (the first response's, arriving late) must not take that wait over.
    stale = _own_watch(reader, gone.set)
    waiting = gevent.spawn(reader.wait)
    gevent.sleep(0)  # the wait is in place
    assert stale() is True
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    waiting.join(2)
    assert waiting.dead and waiting.successful()
    client.close()
    assert not gone.wait(0.3)  # every watch was stopped


def test_through_the_reader_a_detached_socket_falls_back(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """The app took the socket (fd -1): the reader declines, the other ways are tried."""
    server, _client = connection
    reader = ConnectionReader(gevent.get_hub().loop, server, server.fileno())
    try:
        fd = server.detach()
        try:
            assert reader.watch(lambda: None) is None
        finally:
            os.close(fd)
    finally:
        reader.close()
    closed = ConnectionReader(gevent.get_hub().loop, _client, _client.fileno())
    closed.close()
    assert closed.watch(lambda: None) is None  # the connection is over


def test_servers_that_expose_nothing_get_no_watch() -> None:
    assert watch({"wsgi.version": (1, 0)}, lambda: None) is None


# ---------------------------------------------------------------------- real servers

WATCHED = ["detach-server", "gunicorn-gevent", "gunicorn-gthread", "waitress"]


@pytest.fixture(scope="module", params=WATCHED)
def served(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with serve(request.param, "tests.mw_apps:app") as server:
        yield server


@pytest.mark.parametrize("leave", ["close", "reset"])
def test_idle_stream_left_by_its_client_is_closed_within_1s(
    served: ServerProcess, leave: str
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
def test_waiting_bytes_are_not_a_disconnect(served: ServerProcess, extra: bytes) -> None:
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


def test_a_wrapped_queue_is_ended_when_its_client_leaves(served: ServerProcess) -> None:
    stream = Stream(served.port, "/queue_idle?n=1&key=wq")
    stream.read_head()
    assert stream.read_chunk() == b"item 0;"
    stream.close()
    # The watcher put StopIteration into the queue: the framework's iterator
    # ended and the server closed it, though the producer never ended it.
    assert wait_until(lambda: events(served.port, "wq") == ["wrapper closed"], timeout=2)


def test_a_descriptor_epoll_refuses_is_left_unwatched(tmp_path: Any) -> None:
    """the fd was stored before epoll.register, which raised out of watch()."""
    from wsgi_detach import _watchers

    with open(tmp_path / "regular", "w") as regular:  # epoll refuses regular files (EPERM)
        fd = regular.fileno()
        cancel = watch({SOCKET_KEY: regular}, lambda: None)
        monitor = _watchers._monitor
        assert monitor is not None and cancel is not None
        # Registration happens WATCH_DELAY later in the watcher thread, which
        # drops the refused descriptor instead of keeping a stale entry.
        assert wait_until(
            lambda: fd not in monitor._by_fd and all(e.fd != fd for e in list(monitor._pending)),
            timeout=2,
        )
        cancel()  # harmless on a descriptor that was never registered


@pytest.mark.parametrize("pipelined", [False, True], ids=["half-close", "pipelined+half-close"])
def test_a_half_closed_client_sees_an_aborted_response(
    served: ServerProcess, pipelined: bool
) -> None:
    """a client that half-closes and keeps reading was taken for gone and
    got a clean end (terminating chunk): a truncated response that looked complete.
    pywsgi reads a pipelined request ahead, so FIONREAD did not protect that case."""
    if pipelined and served.server == "waitress":
        pytest.skip("waitress reports no disconnect after a pipelined request: it serves both")
    request = b"GET /stream?n=2&interval=5 HTTP/1.1\r\nHost: x\r\n\r\n"  # chunk 1 after 5 s
    if pipelined:
        request += b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = _raw(served.port, request)
    try:
        received = _read_until(sock, b"chunk 0")
        sock.shutdown(socket.SHUT_WR)
        half_closed = time.monotonic()
        received += _read_until(sock, b"never sent: read to the end")
        took = time.monotonic() - half_closed
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200") and b"chunk 0" in received
    assert took < 4  # ended before chunk 1, by the watcher
    assert b"chunk 1" not in received
    assert not received.endswith(b"0\r\n\r\n")  # aborted, never a clean end
    assert received.count(b"HTTP/1.1 ") == 1  # the pipelined request is not served after it


def test_a_slow_on_close_delays_no_other_detection() -> None:
    """on a threaded server (no hub in the request thread) every body's
    on_close ran in the one watcher thread, one after another: a 1 s callback
    (an unsubscribe RPC, say) delayed noticing every other departure by 1 s."""
    from wsgi_detach import DetachMiddleware, detach

    started: dict[str, float] = {}
    all_started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = detach(environ)
        name = environ["name"]

        def slow_unsubscribe() -> None:
            started[name] = time.monotonic()
            if len(started) == 3:
                all_started.set()
            time.sleep(1.0)  # the slow cleanup itself, not a synchronisation

        body.on_close(slow_unsubscribe)
        return body

    middleware = DetachMiddleware(app)
    pairs = [socket.socketpair() for _ in range(3)]
    responses: list[Any] = []

    def serve(name: str, sock: socket.socket) -> None:  # a gthread worker's request
        environ = {SOCKET_KEY: sock, "name": name}
        responses.append(middleware(environ, lambda *args: None))

    threads = [threading.Thread(target=serve, args=(n, p[0])) for n, p in zip("ABC", pairs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    try:
        left = time.monotonic()
        for _, client in pairs:
            client.close()  # three clients leave at once
        assert all_started.wait(3), started
        assert max(started.values()) - left < 0.5, started
    finally:
        for response in responses:
            response.close()
        for server, _ in pairs:
            server.close()


def test_a_forked_child_gets_a_watcher_thread_of_its_own() -> None:
    """The monitor is looked up without a lock or getpid(); a fork must still replace it."""
    parent = _get_monitor()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's teardown
        try:
            child = _get_monitor()
            os.write(write_end, b"new" if child is not parent and child.pid == os.getpid()
                     else b"old")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 3) == b"new"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert _get_monitor() is parent
