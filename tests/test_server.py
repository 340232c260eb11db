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
