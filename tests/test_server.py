"""make_server / DetachHandler / DetachServer: TCP_NODELAY, the socket in the environ, a
stop() that drains. Served from a child process (tests/servers_extra.py)."""

from __future__ import annotations

import signal
import statistics
import time

import pytest

from tests.client import Stream, events, keepalive_timings, wait_until
from tests.servers_extra import ExtraServerProcess
from wsgi_detach import DetachMiddleware, make_server


def test_tcp_nodelay_spares_each_small_response_the_delayed_ack() -> None:
    medians = {}
    for kind in ("detach-pywsgi", "detach-pywsgi-delay"):
        with ExtraServerProcess(kind, "tests.mw_apps:app") as server:
            medians[kind] = statistics.median(keepalive_timings(server.port, "/gen", 20))
    # Measured: ~0.3 ms with TCP_NODELAY, ~44 ms without (the client's delayed
    # ACK holds pywsgi's separate write of the final zero chunk).
    assert medians["detach-pywsgi"] < 0.010
    assert medians["detach-pywsgi-delay"] > 3 * medians["detach-pywsgi"]


def test_sigterm_drains_then_exits() -> None:
    server = ExtraServerProcess("detach-pywsgi", "tests.mw_apps:app").start()  # grace 0.5 s
    try:
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
    finally:
        server.stop()
        if server.proc is not None and server.proc.stdout is not None:
            server.proc.stdout.close()  # stop() leaves it open when the child already exited


def test_make_server_takes_a_ready_middleware_as_it_is() -> None:
    middleware = DetachMiddleware(lambda environ, start_response: [], idle_timeout=5)
    server = make_server(middleware, port=0)
    assert server.middleware is middleware
    with pytest.raises(TypeError, match=r"^app is already a DetachMiddleware; configure it there, "
                                         r"not with \['idle_timeout'\]$"):
        make_server(middleware, port=0, idle_timeout=3)


def test_head_gets_the_head_alone_and_ends_the_stream() -> None:
    """Finding 12: pywsgi sends a body even for HEAD; an endless detached stream
    streamed forever after the HEAD headers, holding its producer and slot."""
    import socket

    with ExtraServerProcess("detach-pywsgi", "tests.mw_apps:app") as server:
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
