"""DetachMiddleware: transparent for ordinary responses, policy for detached ones.

In-process tests call the middleware directly (with ``wsgiref.validate`` on
both sides where the check matters); the rest serve tests/mw_apps.py from
real servers and read the wire with tests/client.py.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

from tests.client import Stream, events, get, wait_until
from tests.servers import ServerProcess
from tests.servers_extra import ExtraServerProcess
from wsgi_detach import DetachMiddleware, UsageError, detach

SERVERS = ["pywsgi", "wsgiref", "detach-pywsgi", "waitress"]


def _process(kind: str, app: str) -> ServerProcess:
    if kind in ("pywsgi", "pywsgi-patched", "wsgiref"):
        return ServerProcess(kind, app)
    return ExtraServerProcess(kind, app)


@pytest.fixture(scope="module", params=SERVERS)
def served(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with _process(request.param, "tests.mw_apps:app") as server:
        yield server


# ---------------------------------------------------------------------- in-process


class _Server:
    """The server side of an in-process call: records what start_response and write got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], Any]] = []
        self.written: list[bytes] = []

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None):  # type: ignore[no-untyped-def]
        self.calls.append((status, headers, exc_info))
        return self.written.append


def _environ(path: str = "/") -> dict[str, Any]:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, SCRIPT_NAME="", QUERY_STRING="")
    return environ


class _Closing(list):  # type: ignore[type-arg]
    closed = 0

    def close(self) -> None:
        self.closed += 1


def test_ordinary_response_is_handed_back_unchanged() -> None:
    body = _Closing([b"hello ", b"world"])
    headers = [("Content-Type", "text/plain"), ("Content-Length", "11")]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", headers)
        return body

    server = _Server()
    result = DetachMiddleware(app)(_environ(), server.start_response)
    # The same object: its len(), close() and any file_wrapper survive.
    assert result is body
    assert server.calls == [("200 OK", headers, None)]


def test_generator_that_starts_inside_its_first_iteration_passes_through() -> None:
    closed = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        try:
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"a"
            yield b""
            yield b"b"
        finally:
            closed.append(True)

    server = _Server()
    result = validator(DetachMiddleware(validator(app)))(_environ(), server.start_response)
    assert server.calls == []  # PEP 3333 allows start_response inside the first iteration
    chunks = list(result)
    result.close()  # type: ignore[attr-defined]
    assert chunks == [b"a", b"", b"b"]  # one value per value, the empty one too
    assert server.calls == [("200 OK", [("Content-Type", "text/plain")], None)]
    assert closed == [True]


def test_write_callable_sends_the_head_first() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"returned"]

    server = _Server()
    result = DetachMiddleware(app)(_environ(), server.start_response)
    assert server.calls == [("200 OK", [("Content-Type", "text/plain")], None)]
    assert server.written == [b"written "]
    assert list(result) == [b"returned"]


def test_detach_without_the_middleware_says_how_to_fix_it() -> None:
    with pytest.raises(UsageError, match=r"^detach\(environ\) needs the app wrapped in "
                                         r"DetachMiddleware: app = DetachMiddleware\(app\)"):
        detach(_environ())


def test_unknown_options_are_named() -> None:
    with pytest.raises(TypeError, match=r"DetachMiddleware got unknown options \['idle'\]"):
        DetachMiddleware(lambda e, s: [], idle=3)
    with pytest.raises(ValueError, match=r"idle_timeout must be a positive number of seconds"):
        DetachMiddleware(lambda e, s: [], idle_timeout=-1)
    with pytest.raises(ValueError, match=r"max_open must be a positive int or None, got 0"):
        DetachMiddleware(lambda e, s: [], max_open=0)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        return detach(environ, budget=None)

    with pytest.raises(TypeError, match=r"detach\(\) got unknown options \['budget'\]"):
        DetachMiddleware(app)(_environ(), _Server().start_response)


def test_a_body_made_by_detach_carries_the_defaults() -> None:
    bodies = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = detach(environ, heartbeat=2)
        bodies.append(body)
        body.finish(b"done")
        return body

    server = _Server()
    middleware = DetachMiddleware(app, idle_timeout=7, max_buffer=1000)
    result = middleware(_environ(), server.start_response)
    (body,) = bodies
    assert (body._idle_timeout, body._heartbeat, body._max_buffer) == (7, 2, 1000)
    assert list(result) == [b"done"]
    result.close()  # type: ignore[attr-defined]
    assert body.outcome == "finished"
    assert server.calls[0][1] == [
        ("Content-Type", "text/plain"),
        ("Cache-Control", "no-cache"),
        ("X-Accel-Buffering", "no"),
    ]


def test_drain_refuses_to_block_the_hub() -> None:
    import gevent

    middleware = DetachMiddleware(lambda environ, start_response: [])
    raised: list[BaseException] = []

    def in_a_loop_callback() -> None:
        try:
            middleware.drain(1)
        except UsageError as exc:
            raised.append(exc)

    gevent.get_hub().loop.run_callback(in_a_loop_callback)
    gevent.sleep(0)
    (error,) = raised
    with pytest.raises(UsageError, match=r"^drain\(\) blocks until streams end; call it from a "
                                         r"greenlet \(gevent.spawn\(middleware.drain, grace\)\)"):
        raise error


# ---------------------------------------------------------------------- real servers


def test_ordinary_responses_are_untouched(served: ServerProcess) -> None:
    response = get(served.port, "/plain?key=plain")
    assert (response.status, response.body, response.complete) == (200, b"hello world", True)
    assert response.headers["content-length"] == "11"
    assert "cache-control" not in response.headers
    assert "x-accel-buffering" not in response.headers
    assert wait_until(lambda: events(served.port, "plain") == ["plain closed"])

    response = get(served.port, "/gen?key=gen")
    assert (response.status, response.body, response.complete) == (200, b"ab", True)
    assert "cache-control" not in response.headers
    assert wait_until(lambda: events(served.port, "gen") == ["gen closed"])


@pytest.mark.parametrize("path", ["/detached?n=3&key=d", "/own_headers?n=3&key=o"])
def test_detached_responses_get_streaming_headers(served: ServerProcess, path: str) -> None:
    response = get(served.port, path)
    assert (response.status, response.body, response.complete) == (
        200, b"chunk 0;chunk 1;chunk 2;", True
    )
    expected = "private, max-age=5" if path.startswith("/own") else "no-cache"
    assert response.headers["cache-control"] == expected  # the app's own value wins
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-length" not in response.headers
    key = path.rpartition("=")[2]
    assert wait_until(lambda: events(served.port, key) == ["outcome finished"])


def test_start_response_inside_the_first_iteration_still_gets_the_headers(
    served: ServerProcess,
) -> None:
    # tests/apps.py's /late_start: the body owns start_response and calls it
    # (our wrapper) from inside the server's first next(), after the app returned.
    response = get(served.port, "/late_start")
    assert (response.status, response.body) == (201, b"made later")
    assert response.headers["x-late"] == "yes"
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/queue?n=3", b"item 0;item 1;item 2;"),
        # One chunk queued when the server first looks: len()==1 must not leak.
        ("/queue_one?n=2", b"first;item 0;item 1;"),
        # Inside Werkzeug's ClosingIterator, as Flask returns it.
        ("/queue_wrapped?n=2", b"item 0;item 1;"),
    ],
)
def test_the_seeds_queue_is_served_correctly(served: ServerProcess, path: str, body: bytes) -> None:
    response = get(served.port, path)
    assert (response.status, response.body, response.complete) == (200, body, True)
    assert "content-length" not in response.headers
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/fail_first", 500), ("/queue_bad", 500), ("/timeout_first", 504)],
)
def test_a_failure_before_the_first_chunk_is_a_5xx(
    served: ServerProcess, path: str, status: int
) -> None:
    response = get(served.port, path)
    assert response.status == status
    assert response.body == {500: b"500 Internal Server Error\n", 504: b"504 Gateway Timeout\n"}[
        status
    ]


def test_a_failure_after_the_first_chunk_aborts(served: ServerProcess) -> None:
    if served.server == "wsgiref":
        pytest.skip("HTTP/1.0 close-delimited: a truncated body looks complete (PEP3333-NOTES 10)")
    response = get(served.port, "/fail_mid")
    assert (response.status, response.body, response.complete) == (200, b"partial;", False)


def test_stats_count_outcomes(served: ServerProcess) -> None:
    def stats() -> dict[str, Any]:
        result: dict[str, Any] = json.loads(get(served.port, "/_stats").body)
        return result

    before = stats()
    get(served.port, "/detached?n=1")
    get(served.port, "/fail_first")
    get(served.port, "/timeout_first")
    assert wait_until(lambda: stats()["open"] == 0)
    after = stats()
    changed = {k: after[k] - before[k] for k in ("finished", "failed", "timed_out")}
    assert changed == {"finished": 1, "failed": 1, "timed_out": 1}
    assert after["buffered"] == 0


# ---------------------------------------------------------------------- limits and drain


@pytest.fixture(scope="module")
def capped() -> Iterator[ServerProcess]:
    """max_open=2, max_buffered=64 KiB, retry_after=7; our server, so a leaver frees its slot."""
    with ExtraServerProcess("detach-pywsgi", "tests.mw_apps:capped") as server:
        yield server


def test_beyond_max_open_is_503_with_retry_after(capped: ServerProcess) -> None:
    first = Stream(capped.port, "/idle?key=cap1")
    second = Stream(capped.port, "/idle?key=cap2")
    try:
        assert wait_until(lambda: events(capped.port, "cap1") == ["opened"])
        assert wait_until(lambda: events(capped.port, "cap2") == ["opened"])
        refused = get(capped.port, "/idle?key=cap3")
        assert refused.status == 503
        assert refused.headers["retry-after"] == "7"
        assert refused.body.startswith(b"503 Service Unavailable: too many open streams")
        # A framework that catches the exception and makes its own 500 page:
        # the middleware still answers 503.
        caught = get(capped.port, "/caught?key=caught")
        assert caught.status == 503
        assert events(capped.port, "caught") == [
            "refused: no new detached response: max_open=2 detached responses are open; "
            "retry later"
        ]
        # Ordinary responses are not limited.
        assert get(capped.port, "/plain").status == 200
    finally:
        first.close()
        second.close()
    # The watcher closes the bodies of the leavers: the slots are free again.
    assert wait_until(lambda: events(capped.port, "cap2") == ["opened", "outcome disconnected"])
    with Stream(capped.port, "/idle?key=cap4&alive=0.01") as again:
        response = again.read_all()
    assert (response.status, response.body) == (200, b"alive")


def test_max_buffered_caps_bytes_across_bodies(capped: ServerProcess) -> None:
    assert get(capped.port, "/fill?key=fill").body == b"x" * 40000
    assert events(capped.port, "fill") == [
        "BufferFull: the shared budget of 65536 bytes buffered across all bodies is used up; "
        "the process is overloaded, so drop or retry this chunk rather than wait for other "
        "clients",
        "buffered 40000",
    ]


@pytest.mark.parametrize("farewell", [None, "bye"])
def test_drain_ends_open_streams_and_refuses_new_ones(farewell: str | None) -> None:
    with ExtraServerProcess("detach-pywsgi", "tests.mw_apps:app") as server:
        streams = [Stream(server.port, f"/idle?key=s{i}") for i in range(2)]
        assert wait_until(lambda: all(events(server.port, f"s{i}") == ["opened"] for i in range(2)))
        # A queue inside Werkzeug's ClosingIterator, one item sent, then idle.
        wrapped = Stream(server.port, "/queue_idle?n=1&key=wq")
        wrapped.read_head()
        assert wrapped.read_chunk() == b"item 0;"
        query = "grace=0.3" + (f"&farewell={farewell}" if farewell else "")
        assert get(server.port, f"/_drain?key=drain&{query}").status == 202
        for stream in streams:
            response = stream.read_all()
            if farewell:
                assert (response.status, response.body, response.complete) == (200, b"bye", True)
            else:  # cut after the grace before any data: told to come back
                assert (response.status, response.body) == (503, b"503 Service Unavailable\n")
            stream.close()
        response = wrapped.read_all()
        wrapped.close()
        if farewell:
            assert (response.body, response.complete) == (b"item 0;bye", True)
        else:  # cut mid-stream: aborted, never a clean end
            assert (response.body, response.complete) == (b"item 0;", False)
        assert get(server.port, "/idle").status == 503
        assert get(server.port, "/plain").status == 200
        expected = "outcome finished" if farewell else "outcome failed"
        assert wait_until(lambda: events(server.port, "s0") == ["opened", expected])
        cut = 0 if farewell else 3
        assert events(server.port, "drain") == ["drain started", f"drain cut {cut}"]
        stats = json.loads(get(server.port, "/_stats").body)
        assert (stats["open"], stats["draining"]) == (0, True)
        assert stats["finished" if farewell else "failed"] == 3


@pytest.mark.parametrize("worker", ["gevent", "gthread"])
def test_drain_on_signal_under_gunicorn(worker: str) -> None:
    """gunicorn's graceful SIGTERM: the hook's drain says farewell, the worker then exits."""
    server = ExtraServerProcess(f"gunicorn-{worker}-drain", "tests.mw_apps:app").start()
    try:
        with Stream(server.port, f"/idle?key=g{worker}") as stream:
            assert wait_until(lambda: events(server.port, f"g{worker}") == ["opened"])
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)  # to the arbiter, which passes it on
            response = stream.read_all()
        assert (response.status, response.body, response.complete) == (200, b"bye", True)
        assert server.proc.wait(timeout=15) == 0
    finally:
        server.stop()
        if server.proc is not None and server.proc.stdout is not None:
            server.proc.stdout.close()


def test_an_ordinary_request_leaves_no_reference_cycle() -> None:
    """The environ holds our detach(); nothing of ours may point back at it."""
    import gc
    import weakref

    class Environ(dict):  # type: ignore[type-arg]
        pass

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"x"]

    environ = Environ(_environ())
    alive = weakref.ref(environ)
    gc.disable()
    try:
        DetachMiddleware(app)(environ, _Server().start_response)
        del environ
        assert alive() is None  # freed by reference counting, not left for the collector
    finally:
        gc.enable()
