"""make_server / DetachHandler / DetachServer: TCP_NODELAY, the socket in the environ, a
stop() that honours its grace, a write path that sends pywsgi's bytes in fewer sends,
HEAD, the HTTP timeouts and connection cap, the reset that ends an aborted
close-delimited response. Served from a child process (tests/servers.py); the
request-path speed-ups are tests/test_speedups.py's."""

from __future__ import annotations

import json
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import gevent
import pytest
from gevent import socket as gsocket

from tests import wire_apps
from tests.client import Stream, events, get, keepalive_timings, wait_until
from tests.servers import ServerProcess, serve
from wsgi_detach import DetachedBody, DetachMiddleware, make_server


def test_tcp_nodelay_spares_each_small_response_the_delayed_ack() -> None:
    medians = {}
    for kind in ("detach-server", "detach-server-delay"):
        with serve(kind, "tests.mw_apps:app") as server:
            medians[kind] = statistics.median(keepalive_timings(server.port, "/gen", 20))
    # Measured: ~0.3 ms with TCP_NODELAY, ~44 ms without (the client's delayed
    # ACK holds pywsgi's separate write of the final zero chunk).
    assert medians["detach-server"] < 0.010
    assert medians["detach-server-delay"] > 3 * medians["detach-server"]


def test_sigterm_drains_then_exits() -> None:
    with serve("detach-server", "tests.mw_apps:app") as server:  # grace 0.5 s
        idle = Stream(server.port, "/idle?key=term-idle")
        busy = Stream(server.port, "/stream?n=1000&interval=0.05")
        busy.read_head()
        assert busy.read_chunk() is not None
        assert wait_until(lambda: events(server.port, "term-idle") == ["opened"])
        assert server.proc is not None
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Nothing sent yet: told to come back. Mid-stream: aborted, never a clean end.
        assert idle.read_all().status == 503
        busy.read_all()
        assert busy.response.complete is False
        assert server.proc.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 5
        idle.close()
        busy.close()


def test_make_server_takes_a_ready_middleware_as_it_is() -> None:
    middleware = DetachMiddleware(lambda environ, start_response: [], idle_timeout=5)
    server = make_server(middleware, port=0)
    assert server.middleware is middleware
    with pytest.raises(TypeError, match=r"^app is already a DetachMiddleware; configure it there, "
                                         r"not with \['idle_timeout'\]$"):
        make_server(middleware, port=0, idle_timeout=3)


# ---------------------------------------------------------------------- the write path

def _exchange(port: int, requests: list[str]) -> bytes:
    """Send ``requests`` pipelined on one connection; everything until the server closes."""
    wire = ""
    for request in requests:
        line, _, extra = request.partition("|")
        body_follows = "\r\n\r\n" in extra  # the extra headers end the head themselves
        wire += f"{line}\r\nHost: 127.0.0.1\r\n{extra}" + ("" if body_follows else "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire.encode("latin-1"))
        received = b""
        while more := sock.recv(1 << 20):
            received += more
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", received)


CLOSE = "Connection: close\r\n"

#: Request sequences, each on one connection; ``line|extra headers``.
WIRE_CASES = {
    **{
        path: [f"GET {path} HTTP/1.1|{CLOSE}"]
        for path in ("/list", "/gen", "/empty", "/clen", "/write", "/file", "/nocontent",
                     "/notmodified", "/fail_after", "/fail_first", "/liar", "/big", "/body_done",
                     "/body_later", "/body_empty_end", "/body_fail", "/poll", "/missing")
    },
    **{f"http/1.0 {path}": [f"GET {path} HTTP/1.0"]
       for path in ("/list", "/gen", "/clen", "/body_later", "/poll", "/empty")},
    # The environ, as the lean request path builds it: odd paths and queries,
    # repeated and spoofing headers, bodies by length and chunked, Expect.
    "environ plain": ["GET /environ?a=1&b=%20?c HTTP/1.1|X-Y:  spaced  \r\nAccept: */*\r\n"
                      "Cookie: a=1\r\ncookie: b=2\r\nX-Y: again\r\nX_Spoof: no\r\n"
                      "Content-Type: text/x\r\nUpgrade: websocket\r\n" + CLOSE],
    "environ odd path": ["GET /env%69ron/%C3%A9/..;x HTTP/1.1|" + CLOSE],
    "environ http/1.0": ["GET /environ HTTP/1.0|Connection: Keep-Alive\r\n",
                         "GET /environ HTTP/1.0"],
    "environ bodies": ["POST /environ HTTP/1.1|Content-Length: 5\r\n\r\nhello",
                       "POST /environ HTTP/1.1|Transfer-Encoding: chunked\r\n"
                       "Content-Length: 9\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                       "PUT /environ HTTP/1.1|Expect: 100-continue\r\nContent-Length: 2\r\n"
                       "content-length: 7\r\n\r\nhi",
                       "GET /environ HTTP/1.0|Connection: upgrade\r\n"],
    "environ folded": ["GET /environ HTTP/1.1|X-A: one\r\n two\r\n" + CLOSE],
    "bad content-length": ["GET /environ HTTP/1.1|Content-Length: -1\r\n"],
    "head with body": ["HEAD /environ HTTP/1.1|Content-Length: 3\r\n\r\nabc"],
    "http/0.9": ["GET /environ"],
    "http/1.0 keep-alive": ["GET /list HTTP/1.0|Connection: keep-alive\r\n",
                            "GET /clen HTTP/1.0|Connection: keep-alive\r\n", "GET /poll HTTP/1.0"],
    "pipelined": [f"GET {path} HTTP/1.1" for path in
                  ("/list", "/gen", "/body_done", "/body_later", "/poll", "/write", "/empty",
                   "/clen", "/nocontent", "/notmodified", "/file", "/body_empty_end")]
    + [f"GET /poll HTTP/1.1|{CLOSE}"],
}


@pytest.fixture(scope="module")
def wire_servers() -> Iterator[tuple[int, int]]:
    # Bare, without the validator (see tests/wire_apps.py): ServerProcess, not serve().
    with ServerProcess("pywsgi-plain", "tests.wire_apps:app") as plain, \
            ServerProcess("detach-handler", "tests.wire_apps:app") as ours:
        yield plain.port, ours.port


@pytest.mark.parametrize("case", sorted(WIRE_CASES))
def test_detach_handler_sends_what_plain_pywsgi_sends(
    wire_servers: tuple[int, int], case: str
) -> None:
    plain_port, our_port = wire_servers
    expected = _exchange(plain_port, WIRE_CASES[case])
    assert expected.startswith(b"HTTP/1.1 ")
    assert _exchange(our_port, WIRE_CASES[case]) == expected


@pytest.mark.parametrize("path", ["/list", "/gen", "/body_done", "/poll", "/empty", "/clen",
                                  "/write", "/fail_first", "/body_fail", "/fail_after"])
def test_detach_handler_answers_head_with_gets_head_alone(
    wire_servers: tuple[int, int], path: str
) -> None:
    """Plain pywsgi sends a body after a HEAD's head (for an endless stream,
    forever); ours sends exactly the head a GET gets, and nothing after it, so the
    next response on the connection follows at once. Regressions: write() chunks
    were sent after the head; a body failing before its first chunk got 200."""
    plain_port, our_port = wire_servers
    get_head = _exchange(plain_port, [f"GET {path} HTTP/1.1|{CLOSE}"]).partition(b"\r\n\r\n")[0]
    expected = get_head + b"\r\n\r\n"
    if b"\r\nConnection: close\r\n" not in expected:
        expected += _exchange(plain_port, [f"GET /list HTTP/1.1|{CLOSE}"])
    assert _exchange(our_port, [f"HEAD {path} HTTP/1.1", f"GET /list HTTP/1.1|{CLOSE}"]) == expected


def _sends(port: int, path: str) -> int:
    """How many sends the counting handler made for one request of ``path``."""
    def count() -> int:
        return int(get(port, "/_sends").body)

    before = count()
    assert get(port, path).complete
    return count() - before - 1  # the second /_sends answer came after its own count


@pytest.mark.parametrize(
    ("path", "sends"),
    [
        ("/poll", 1),  # head + the message + the terminator: what pywsgi sends in 3
        ("/body_done", 2),  # head + first chunk, then the last one + the terminator
        ("/body_later", 3),  # head + one;, two;, last + terminator
        ("/gen", 3),  # a generator cannot tell its last chunk: head + one, two, terminator
        ("/empty", 1),  # head + terminator
        ("/list", 2),  # head + "a", "bc" (Content-Length: no terminator)
    ],
)
def test_detach_handler_merges_head_data_and_terminator(
    wire_servers: tuple[int, int], path: str, sends: int
) -> None:
    assert _sends(wire_servers[1], path) == sends


def test_head_gets_the_head_alone_and_ends_the_stream() -> None:
    """pywsgi sends a body even for HEAD; an endless detached stream
    streamed forever after the HEAD headers, holding its producer and slot."""
    import socket

    with serve("detach-server", "tests.mw_apps:app") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
            sock.sendall(b"HEAD /forever?key=head&interval=0.02 HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
            # Keep-alive: the next response follows the head, no body between.
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
            give_up = time.monotonic() + 3
            while not received.endswith(b"hello world") and time.monotonic() < give_up:
                more = sock.recv(65536)
                assert more, received
                received += more
        head, _, rest = received.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()  # the same head as a GET
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
        assert wait_until(lambda: "on_close" in events(server.port, "head"), timeout=2)


# ---------------------------------------------------------------------- the grace


def check_grace(server: ServerProcess, grace: float) -> None:
    """SIGTERM with one stream due to end 2 s later and one due to outlive ``grace``:
    the first ends cleanly, the second is cut at the grace, the process exits at once."""
    assert grace > 2.5
    ending = Stream(server.port, "/detached?n=21&interval=0.1")  # its last chunk ~2 s on
    endless = Stream(server.port, "/detached?n=1000&interval=0.1")
    for stream in (ending, endless):
        stream.read_head()
        assert stream.read_chunk() is not None
    assert server.proc is not None
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    done = ending.read_all()
    ended = time.monotonic() - signalled
    assert (done.complete, done.body.count(b";")) == (True, 21), done
    assert 1.5 < ended < grace
    cut = endless.read_all()
    cut_at = time.monotonic() - signalled
    assert cut.complete is False  # no terminating chunk: visibly incomplete
    assert grace - 0.2 < cut_at < grace + 0.8, cut_at
    assert server.proc.wait(timeout=10) == 0
    assert time.monotonic() - signalled < cut_at + 0.8
    ending.close()
    endless.close()


def test_make_server_serve_forever_honours_a_grace_above_one_second() -> None:
    """Regression: stop() closed the listener, serve_forever() returned and called stop()
    again, which skipped the drain and killed every handler after one second."""
    with ServerProcess("detach-server", "tests.mw_apps:app", env={"TEST_GRACE": "3"}) as server:
        check_grace(server, 3.0)


# ---------------------------------------------------------------------- HTTP timeouts

_SHORT = {"head_timeout": 0.5, "body_timeout": 0.5}


@pytest.fixture(scope="module")
def timed_server() -> Iterator[ServerProcess]:
    env = {"TEST_SERVER_OPTIONS": json.dumps(_SHORT), "TEST_LOG_LEVEL": "INFO"}
    with serve("detach-server", "tests.mw_apps:app", env=env) as server:
        yield server


def _closed_after(sock: socket.socket, started: float, trickle: bytes = b"") -> tuple[float, bytes]:
    """Trickle ``trickle`` a byte every 50 ms, then wait; (seconds until the server
    closed the connection, what it sent)."""
    received = b""
    sock.settimeout(0.05)
    give_up = started + 10
    while time.monotonic() < give_up:
        if trickle:
            try:
                sock.send(trickle[:1])
            except OSError:
                pass
            trickle = trickle[1:]
        try:
            more = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            more = b""
        if not more:
            return time.monotonic() - started, received
        received += more
    pytest.fail(f"the connection was not closed within 10 s; got {received!r}")


def test_slow_silent_and_stalled_clients_are_closed_while_others_are_served(
    timed_server: ServerProcess,
) -> None:
    port = timed_server.port
    before = timed_server.stderr_text()
    started = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    slow_head = socket.create_connection(("127.0.0.1", port))
    slow_head.sendall(b"GET /plain HTTP/1.1\r\n")
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n")
    # Meanwhile other clients are answered without delay.
    for _ in range(5):
        asked = time.monotonic()
        assert get(port, "/plain").body == b"hello world"
        assert time.monotonic() - asked < 0.2
    head_closed, head_got = _closed_after(slow_head, started, b"X-Slow: " + b"y" * 100)
    body_closed, body_got = _closed_after(slow_body, started, b"z" * 100)
    silent_closed = [_closed_after(sock, started)[0] for sock in silent]
    for sock in (*silent, slow_head, slow_body):
        sock.close()
    # Closed after the configured 0.5 s (a generous upper bound: the machine is shared).
    for closed in (head_closed, body_closed, *silent_closed):
        assert 0.45 < closed < 2.0, (head_closed, body_closed, silent_closed)
    assert head_got == b""  # no complete head: nothing to answer
    assert body_got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), body_got
    assert timed_server.info()["violations"] == []
    # Each cut client logged once at INFO, no traceback.
    log = timed_server.stderr_text().removeprefix(before)
    assert log.count("INFO wsgi_detach: closed the connection from") == 21, log
    assert log.count("INFO wsgi_detach: closing the connection from") == 1, log
    assert "Traceback" not in log


@pytest.mark.parametrize("framing", [
    "Transfer-Encoding: chunked\r\n\r\n5\r\nab",
    "Expect: 100-continue\r\nContent-Length: 9\r\n\r\nab",
])
def test_a_stalled_chunked_or_continued_body_gets_a_408(
    timed_server: ServerProcess, framing: str
) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", timed_server.port)) as sock:
        sock.sendall(f"POST /read HTTP/1.1\r\nHost: x\r\n{framing}".encode())
        closed, got = _closed_after(sock, started)
    assert 0.45 < closed < 2.0, closed
    assert b"HTTP/1.1 408 Request Timeout\r\n" in got, got


def test_a_stream_idle_longer_than_the_timeouts_is_not_cut(timed_server: ServerProcess) -> None:
    with Stream(timed_server.port, "/idle?key=timed-idle&alive=1.5") as stream:
        stream.read_head()
        assert stream.read_all().body == b"alive"  # 3x the timeouts after its head


def test_a_keep_alive_connection_idle_past_the_head_timeout_closes_quietly(
    timed_server: ServerProcess,
) -> None:
    """Regression: the wait for the next head on a keep-alive connection sat outside
    the handler's client-error handling, so the head_timeout's close escaped the
    greenlet with a traceback and gevent's "failed" line."""
    before = len(timed_server.stderr_text())
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", timed_server.port)) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, got = _closed_after(sock, started)
    assert got.endswith(b"hello world") and 0.45 < closed < 2.0
    # The ordinary end: nothing at INFO or above, and no traceback at any level
    # (the stderr of a gevent greenlet that failed is read after a round trip).
    with socket.create_connection(("127.0.0.1", timed_server.port)) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _recv_until(sock, b"hello world")
    said = timed_server.stderr_text()[before:]
    assert "INFO" not in said and "Traceback" not in said and "failed" not in said, said


def test_each_wait_gets_the_whole_timeout(timed_server: ServerProcess) -> None:
    """Regression: one timer per connection, stopped and started again, resumed what
    was left of the previous wait, so the timeouts were budgets over all of a
    connection's waits: body reads each well within body_timeout, or keep-alive
    gaps each well within head_timeout, were cut once they summed above it."""
    port = timed_server.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Six 100-byte pieces 0.3 s apart, each awaited by its own read: 1.8 s in all.
        sock.sendall(b"POST /read?piece=100 HTTP/1.1\r\nHost: x\r\nContent-Length: 600\r\n\r\n")
        for _ in range(6):
            time.sleep(0.3)  # the client's pace, not a synchronisation
            sock.sendall(b"z" * 100)
        answer = _recv_until(sock, b'{"read": 600}')
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        # Then five keep-alive requests, each 0.3 s after the previous answer.
        for _ in range(5):
            time.sleep(0.3)
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _recv_until(sock, b"hello world").startswith(b"HTTP/1.1 200 OK\r\n")


def _recv_until(sock: socket.socket, end: bytes) -> bytes:
    """What arrives until it ends with ``end``; fails if the connection ends first."""
    received = b""
    while not received.endswith(end):
        more = sock.recv(65536)
        assert more, f"the connection ended after {received!r}"
        received += more
    return received


def test_a_wait_after_the_app_blocked_the_event_loop_gets_the_whole_timeout(
    timed_server: ServerProcess,
) -> None:
    """The event loop caches the time; an app that blocks it (a CPU-bound call, an
    unpatched library) leaves that time stale. A timer armed on the stale time
    would end the next read early, so the handler reads the clock as it arms it."""
    with socket.create_connection(("127.0.0.1", timed_server.port), timeout=10) as sock:
        sock.sendall(b"POST /block_then_read?block=1 HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 5\r\n\r\n")
        time.sleep(1.2)  # the body comes 0.2 s into the read that begins after the block
        sock.sendall(b"hello")
        answer = _recv_until(sock, b'{"read": 5}')
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer


def test_at_max_connections_the_longest_waiting_idle_connection_makes_room() -> None:
    """Silent clients cannot lock others out by filling the places; a stream is never
    the one closed."""
    options = {"max_connections": 2, "head_timeout": 30}
    env = {"TEST_SERVER_OPTIONS": json.dumps(options), "TEST_LOG_LEVEL": "INFO"}
    with serve("detach-server", "tests.mw_apps:app", env=env) as server, \
            Stream(server.port, "/idle?key=room&alive=2") as stream:
        # The stream holds one place, waiting for its producer (its head comes with "alive").
        assert wait_until(lambda: events(server.port, "room") == ["opened"])
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            silent.settimeout(3)
            asked = time.monotonic()
            assert get(server.port, "/plain").body == b"hello world"  # a newcomer
            assert time.monotonic() - asked < 0.5
            assert silent.recv(1) == b""  # the silent one made room for it
        assert stream.read_all().body == b"alive"  # the stream was never chosen
        assert server.stderr_text().count("to make room") == 1


# ---------------------------------------------------------------------- aborting


def _read_to_the_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the connection ends; and how it ended: "eof" or "reset"."""
    received = b""
    while True:
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            return received, "reset"
        if not more:
            return received, "eof"
        received += more


@pytest.mark.parametrize(("path", "version", "ending"), [
    ("/fail_mid", "HTTP/1.0", "reset"),  # close-delimited and aborted: a reset tells the client
    ("/detached?n=2", "HTTP/1.0", "eof"),  # close-delimited and complete: the ordinary FIN
    ("/fail_mid", "HTTP/1.1", "eof"),  # chunked: the missing terminator tells
])
def test_an_aborted_close_delimited_response_ends_with_a_reset(
    path: str, version: str, ending: str
) -> None:
    """Regression: an HTTP/1.0 stream aborted by fail() ended in a plain FIN, byte for
    byte like a complete one. What was put before the failure still arrives."""
    with serve("detach-server", "tests.mw_apps:app") as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {path} {version}\r\nHost: x\r\n\r\n".encode())
        received, how = _read_to_the_end(sock)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"partial;" in received or b"chunk 1;" in received
    assert how == ending


def test_the_reset_waits_until_what_was_put_has_left() -> None:
    """A reset discards unsent bytes; fail() promises what was put is delivered."""
    with serve("detach-server", "tests.mw_apps:app") as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /fail_big HTTP/1.0\r\nHost: x\r\n\r\n")
        time.sleep(0.3)  # a slow reader: the server's send queue is full meanwhile
        received, how = _read_to_the_end(sock)
    body = received.partition(b"\r\n\r\n")[2]
    assert (len(body), body.count(b"x"), how) == (4_000_000, 4_000_000, "reset")


@pytest.mark.parametrize(("path", "version", "ending"), [
    ("/slow_gen?n=50&interval=0.1", "HTTP/1.0", "reset"),  # an ordinary response
    ("/big_open", "HTTP/1.0", "reset"),  # a detached one, its client reading slowly
    ("/slow_gen?n=50&interval=0.1", "HTTP/1.1", "eof"),  # chunked: the missing terminator tells
])
def test_a_close_delimited_response_cut_at_the_grace_ends_with_a_reset(
    path: str, version: str, ending: str
) -> None:
    """Regression: a request outliving the grace is ended with a ConnectionResetError
    thrown into its handler, which pywsgi takes for a departed client and closes with
    a FIN: a close-delimited response cut there looked complete. A detached stream
    whose client reads slowly is cut there too (its handler is waiting in a send)."""
    with ServerProcess("detach-server", "tests.mw_apps:app") as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET {path} {version}\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(1)  # the response has begun
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0  # the grace (0.5 s) ran out, the server left
        received, how = _read_to_the_end(sock)
    assert b"chunk 1;" in received or b"xxxx" in received, received[:200]
    assert how == ending


def test_a_complete_response_whose_close_fails_ends_as_plain_pywsgi_ends_it(
    wire_servers: tuple[int, int],
) -> None:
    """Regression: an error from close() after the whole body was sent made an
    HTTP/1.0 response end with a reset, where plain pywsgi ends the complete
    response with a FIN."""
    endings = []
    for port in wire_servers:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /close_raises HTTP/1.0\r\nHost: x\r\n\r\n")
            received, how = _read_to_the_end(sock)
        endings.append((received.partition(b"\r\n\r\n")[2], how))
    assert endings == [(b"all of the body", "eof")] * 2


def test_a_body_timeout_after_the_head_ends_a_close_delimited_response_with_a_reset(
    timed_server: ServerProcess,
) -> None:
    """Regression: when body_timeout fired in a read made after the head was sent, the
    close-delimited response ended with a FIN and looked complete."""
    with socket.create_connection(("127.0.0.1", timed_server.port), timeout=10) as sock:
        sock.sendall(b"POST /read_late HTTP/1.0\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        received, how = _read_to_the_end(sock)
    assert (received.partition(b"\r\n\r\n")[2], how) == (b"started;", "reset")


@pytest.mark.parametrize("http10", [True, False])
def test_a_stream_cut_at_the_grace_is_one_warning_line(http10: bool) -> None:
    """Regression: a detached stream the drain cut at the grace logged the Unavailable
    it failed with as a full traceback."""
    with ServerProcess("detach-server", "tests.mw_apps:app", env={"TEST_LOG_LEVEL": "INFO"}) \
            as server, Stream(server.port, "/detached?n=1000&interval=0.1", http10=http10) \
            as stream:
        stream.read_head()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0
        log = server.stderr_text()
    assert "Traceback" not in log and "Unavailable" not in log, log
    assert log.count("WARNING wsgi_detach: stopping: 1 detached responses outlived the 0.5s "
                     "grace\n") == 1, log


def test_the_http_limits_are_on_by_default() -> None:
    """The defaults docs/servers.md gives and explains."""
    import resource

    server = make_server(wire_apps.plain, port=0)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected_cap = None if soft == resource.RLIM_INFINITY else max(soft - 64, soft // 2, 1)
    assert (server.head_timeout, server.body_timeout, server.max_connections) == (
        20.0, 60.0, expected_cap)
    with pytest.raises(ValueError, match=r"^head_timeout must be a number of seconds > 0 or "
                                         r"None, got 0$"):
        make_server(wire_apps.plain, port=0, head_timeout=0)
    with pytest.raises(ValueError, match=r"^max_connections must be a positive int, 'auto' or "
                                         r"None, got -1$"):
        make_server(wire_apps.plain, port=0, max_connections=-1)


def _read_until(sock: gsocket.socket, marker: bytes, buf: bytes = b"") -> bytes:
    with gevent.Timeout(5):
        while marker not in buf:
            data = sock.recv(65536)
            assert data, f"connection closed before {marker!r}"
            buf += data
    return buf


@contextmanager
def _held_stream(
    heartbeat: float | None = None, max_buffer: int | None = None, coalesce: int | None = None,
) -> Iterator[tuple[gsocket.socket, DetachedBody, list[int]]]:
    """A make_server server in this process, and a client holding its stream, its first
    chunk read; yields the client socket, the stream's body and a one-item list counting
    the handler's ``next()`` calls on it (counted on the class: a subclass that overrides
    ``__next__`` is not sent for directly)."""
    bodies: list[DetachedBody] = []
    nexts = [0]
    plain_next = DetachedBody.__next__

    def counting_next(self: DetachedBody) -> bytes:
        if bodies and self is bodies[0]:
            nexts[0] += 1
        return plain_next(self)

    def app(environ: dict[str, object], start_response: object) -> DetachedBody:
        start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
        options = {} if coalesce is None else {"coalesce": coalesce}
        body = DetachedBody(heartbeat=heartbeat, max_buffer=max_buffer, **options)
        body.put(b"first;")
        bodies.append(body)
        return body

    server = make_server(app, port=0, log=None)
    server.start()
    sock = gsocket.create_connection(("127.0.0.1", server.server_port))
    DetachedBody.__next__ = counting_next  # type: ignore[method-assign]
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_until(sock, b"first;\r\n")
        yield sock, bodies[0], nexts
    finally:
        DetachedBody.__next__ = plain_next  # type: ignore[method-assign]
        if bodies:
            bodies[0].finish()
        sock.close()
        server.stop(timeout=1)


@pytest.mark.parametrize("heartbeat", [None, 30.0])
def test_chunks_into_a_held_stream_are_sent_without_waking_its_handler(
    heartbeat: float | None,
) -> None:
    """The direct path: once a held stream's first chunk is out, a chunk put from the
    server's thread is sent from the hub, and the handler's greenlet stays parked
    (no next() per chunk); the bytes are the same."""
    with _held_stream(heartbeat) as (sock, body, nexts):
        buf = b""
        for i in range(20):
            body.put(b"m%d;" % i)
            buf = _read_until(sock, b"m%d;\r\n" % i, buf)
        body.finish(b"end")
        buf = _read_until(sock, b"0\r\n\r\n", buf)
        expected = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in
                            [*(b"m%d;" % i for i in range(20)), b"end"]) + b"0\r\n\r\n"
        assert buf == expected
        # The wait after first;, and the end: not one per chunk.
        assert nexts[0] <= 4, nexts


@pytest.mark.parametrize(
    ("coalesce", "max_buffer", "chunks"),
    [
        (0, None, [b"A;", b"B;"]),  # nothing coalesced: one chunk per take
        (None, None, [b"x" * 70000 + b";", b"B;"]),  # the first beyond coalesce alone
        (0, 64, [b"%029d;" % i for i in range(3)]),  # the third put waits for room
    ],
    ids=["coalesce0", "beyond-coalesce", "max-buffer"],
)
def test_chunks_left_behind_a_direct_send_are_sent_too(
    coalesce: int | None, max_buffer: int | None, chunks: list[bytes]
) -> None:
    """Regression: the direct path took one (coalesced) chunk and left the rest
    buffered with the handler parked and nothing scheduled, until the next put,
    timer or end -- never, for a stream that then stays quiet."""
    with _held_stream(max_buffer=max_buffer, coalesce=coalesce) as (sock, body, _):

        def produce() -> None:
            for chunk in chunks:  # back to back, from the server's thread
                body.put(chunk)

        producer = gevent.spawn(produce)
        buf = _read_until(sock, chunks[-1] + b"\r\n")
        producer.join(5)
        assert producer.successful()
        payload, rest = b"", buf
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            payload += rest[: int(size, 16)]
            rest = rest[int(size, 16) + 2:]
        assert payload == b"".join(chunks)
        assert body.buffered == 0


def test_a_body_subclass_that_overrides_next_is_never_sent_for_directly() -> None:
    """Regression: the direct path took chunks from any DetachedBody, so a subclass
    whose ``__next__`` changes the chunks was bypassed after its first chunk."""

    class Upper(DetachedBody):
        def __next__(self) -> bytes:
            return super().__next__().upper()

    bodies: list[Upper] = []

    def app(environ: dict[str, object], start_response: object) -> Upper:
        start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
        body = Upper()
        body.put(b"first;")
        bodies.append(body)
        return body

    server = make_server(app, port=0, log=None)
    server.start()
    try:
        with gsocket.create_connection(("127.0.0.1", server.server_port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            buf = _read_until(sock, b"FIRST;\r\n")
            for word in (b"second;", b"third;"):
                gevent.sleep(0.05)  # the handler parks between chunks (not a synchronisation)
                bodies[0].put(word)
                buf = _read_until(sock, word.upper() + b"\r\n", buf)
            bodies[0].finish()
            buf = _read_until(sock, b"0\r\n\r\n", buf)
        body = buf.split(b"\r\n\r\n", 1)[1]
        assert body == b"6\r\nFIRST;\r\n7\r\nSECOND;\r\n6\r\nTHIRD;\r\n0\r\n\r\n"
    finally:
        server.stop(timeout=1)


def test_a_producer_blocked_on_max_buffer_is_woken_by_the_direct_path() -> None:
    """A producer that fills max_buffer and waits is woken when the direct path takes the
    chunks, as when the handler takes them: everything arrives, in order, coalesced."""
    chunks = [b"%05d;" % i for i in range(2000)]
    with _held_stream(max_buffer=64) as (sock, body, _):

        def produce() -> None:
            for chunk in chunks:
                body.put(chunk)
            body.finish()

        producer = gevent.spawn(produce)
        buf = _read_until(sock, b"\r\n0\r\n\r\n")
        producer.join(5)
        assert producer.successful()
        payload, rest = b"", buf
        while rest != b"0\r\n\r\n":
            size, _, rest = rest.partition(b"\r\n")
            payload += rest[: int(size, 16)]
            rest = rest[int(size, 16) + 2:]
        assert payload == b"".join(chunks)


def test_a_chunk_put_from_another_thread_wakes_the_handler() -> None:
    """Only the connection's own thread may send for the handler: a chunk put from a
    plain OS thread is buffered and the handler sends it, as before."""
    with _held_stream() as (sock, body, nexts):
        buf = b""
        for i in range(3):
            thread = threading.Thread(target=body.put, args=(b"t%d;" % i,))
            thread.start()
            buf = _read_until(sock, b"t%d;\r\n" % i, buf)
            thread.join(5)
        assert nexts[0] >= 4, nexts  # one next() per chunk: the handler sent each


class _SendFails:
    """A connection's socket whose ``send`` raises something other than OSError."""

    def __init__(self, real: object) -> None:
        self.real = real

    def send(self, data: bytes) -> int:
        raise RuntimeError("send failed in a way the handler does not expect")


def test_a_chunk_the_direct_path_took_and_failed_to_send_aborts_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: an unexpected error after the direct path took a chunk was logged
    and the handler woken, but the chunk was gone and the stream went on as if
    whole. Now the stream fails: the connection ends without the last chunk."""
    with _held_stream() as (sock, body, _):
        handler = body._sink
        assert handler is not None
        handler._raw_socket = _SendFails(handler._raw_socket)  # type: ignore[attr-defined]
        body.put(b"lost;")
        buf = b""
        with gevent.Timeout(5):
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
        assert b"0\r\n\r\n" not in buf and b"lost;" not in buf, buf
        assert body.outcome == "failed"
    assert "sending a chunk for a held stream failed" in caplog.text


def _sent_for_by(handler_class: type, count: int) -> list[DetachedBody]:
    """``count`` bodies whose sink is one bare ``handler_class`` (the outbox calls only
    its ``_send_for``)."""
    handler = handler_class.__new__(handler_class)
    bodies = [DetachedBody() for _ in range(count)]
    for body in bodies:
        body._sink = handler
    return bodies


class _Escape(BaseException):
    """Not an Exception: passes the outbox's per-stream handling."""


def test_the_outbox_serves_on_after_an_error_escaped_it() -> None:
    """Regression: an error escaping the outbox's run left it marked as scheduled for
    good, so no stream of that hub was sent for again."""
    from wsgi_detach._server import StockDetachHandler, _Outbox

    served: list[DetachedBody] = []

    class Escaping(StockDetachHandler):
        def _send_for(self, body: DetachedBody) -> bool:
            served.append(body)
            if len(served) == 1:
                raise _Escape("out of the outbox")
            return False

    bodies = _sent_for_by(Escaping, 3)
    outbox = _Outbox()
    hub = gevent.get_hub()
    printed: list[object] = []
    handle_error = hub.handle_error
    hub.handle_error = lambda *args: printed.append(args[2])  # type: ignore[method-assign]
    try:
        outbox.add(bodies[0])
        outbox.add(bodies[1])  # in the same run, after the error
        with gevent.Timeout(5):
            while len(served) < 2:
                gevent.sleep(0.005)
        outbox.add(bodies[2])  # a later run
        with gevent.Timeout(5):
            while len(served) < 3:
                gevent.sleep(0.005)
    finally:
        hub.handle_error = handle_error  # type: ignore[method-assign]
    assert served == bodies
    assert [type(error) for error in printed] == [_Escape]


def test_the_direct_path_lets_timers_and_io_run_while_it_serves_many_streams() -> None:
    """The outbox serves streams for at most a switch interval per loop turn, as gevent
    runs its callbacks: a timer due meanwhile runs before the last stream is served,
    and every stream is still served once, in order."""
    from wsgi_detach._server import StockDetachHandler, _Outbox

    served: list[DetachedBody] = []

    class Slow(StockDetachHandler):
        def _send_for(self, body: DetachedBody) -> bool:
            until = time.perf_counter() + 0.001
            while time.perf_counter() < until:
                pass
            served.append(body)
            return False

    bodies = _sent_for_by(Slow, 40)
    outbox = _Outbox()
    seen: list[int] = []
    gevent.spawn_later(0.01, lambda: seen.append(len(served)))
    for body in bodies:
        outbox.add(body)
    with gevent.Timeout(5):
        while len(served) < len(bodies) or not seen:
            gevent.sleep(0.005)
    assert served == bodies
    assert seen[0] < len(bodies)
