"""A detached body returned from Bottle, Flask, WebOb, Django and a raw callable.

Every framework wraps the returned iterable in its own response object; these
tests prove that each one still streams incrementally, and still passes the
server's ``close()`` through to the body, so ``on_close`` runs when the client
leaves (PEP 3333 "Middleware": whoever wraps an iterable must close it), and
that DetachMiddleware's policies (streaming headers, ``idle_timeout``) reach
the body through each of them. Served by gevent.pywsgi in a subprocess,
inside ``wsgiref.validate``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from tests.client import Stream, get, wait_event
from tests.servers import ServerProcess

#: The app's idle_timeout: silent streams are cut after it.
IDLE_TIMEOUT = 0.5

#: Each framework's route returning the same detached body.
ROUTES = {
    "bottle": "/bottle/detached",
    "flask": "/flask/detached",
    "flask-stream_with_context": "/flask/context",
    "webob": "/webob/detached",
    "django": "/django/detached",
    "raw": "/raw/detached",
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {"TEST_IDLE_TIMEOUT": str(IDLE_TIMEOUT)}
    with ServerProcess("pywsgi", "tests.framework_apps:app", env=env) as process:
        yield process
        assert process.info()["violations"] == []


@pytest.mark.parametrize("route", ROUTES.values(), ids=list(ROUTES))
def test_streams_incrementally_and_closes(server: ServerProcess, route: str) -> None:
    key = uuid.uuid4().hex
    n, interval = 4, 0.08
    response = get(server.port, f"{route}?key={key}&n={n}&interval={interval}")
    assert response.status == 200 and response.complete, response
    assert response.body == b"".join(f"line {i}\n".encode() for i in range(n))
    assert "content-length" not in response.headers
    first, last = response.chunks[0][0], response.chunks[-1][0]
    assert last - first > (n - 1) * interval * 0.8, f"not incremental: {response.chunks}"
    wait_event(server.port, key, "on_close", timeout=2)


@pytest.mark.parametrize("route", ROUTES.values(), ids=list(ROUTES))
def test_client_disconnect_runs_on_close(server: ServerProcess, route: str) -> None:
    key = uuid.uuid4().hex
    with Stream(server.port, f"{route}?key={key}&n=100000&interval=0.03") as stream:
        assert stream.read_chunk() and stream.read_chunk()
        left = time.time()  # the with block closes the connection right after
    closed = wait_event(server.port, key, "on_close", timeout=2)
    assert closed - left < 2
    wait_event(server.port, key, "put raised BodyAborted", timeout=1)


@pytest.mark.parametrize("route", ROUTES.values(), ids=list(ROUTES))
def test_idle_timeout_cuts_a_silent_stream(server: ServerProcess, route: str) -> None:
    key = uuid.uuid4().hex
    with Stream(server.port, f"{route}?key={key}&n=2&interval=30") as stream:
        assert stream.read_chunk() == b"line 0\n"
        got_first = time.monotonic()
        stream.read_all()
        cut = time.monotonic() - got_first
    # An error, not a clean end: the client can tell it was cut off.
    assert not stream.response.complete and stream.response.body == b"line 0\n"
    assert IDLE_TIMEOUT * 0.9 < cut < IDLE_TIMEOUT + 0.5, cut
    wait_event(server.port, key, "on_close", timeout=2)


@pytest.mark.parametrize("route", ROUTES.values(), ids=list(ROUTES))
def test_streaming_headers(server: ServerProcess, route: str) -> None:
    response = get(server.port, f"{route}?n=1&interval=0.01")
    assert response.headers.get("cache-control") == "no-cache", response.headers
    assert response.headers.get("x-accel-buffering") == "no", response.headers


def test_bottle_primer_stream(server: ServerProcess) -> None:
    response = get(server.port, "/bottle/stream")
    assert response.status == 200 and response.complete, response
    assert response.body == b"STARTMIDDLEEND"
    assert [data for _, data in response.chunks] == [b"START", b"MIDDLE", b"END"]
    assert response.chunks[-1][0] - response.chunks[0][0] > 0.15


@pytest.mark.parametrize("route", ["/bottle/fetch", "/bottle/fetch_queue"])
def test_bottle_primer_fetch(server: ServerProcess, route: str) -> None:
    response = get(server.port, route)
    assert response.status == 200 and response.complete, response
    assert response.body == b"one;two;three;"
    assert len(response.chunks) == 3
    # Recognised as detached even inside Bottle's iterator.
    assert response.headers.get("cache-control") == "no-cache", response.headers
