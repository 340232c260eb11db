"""make_server / DetachHandler / DetachServer: TCP_NODELAY, the socket in the environ, a
stop() that drains. Served from a child process (tests/servers.py)."""

from __future__ import annotations

import signal
import statistics
import time

import pytest

from tests.client import Stream, events, keepalive_timings, wait_until
from tests.servers import serve
from wsgi_detach import DetachMiddleware, make_server


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
