"""DetachMiddleware: transparent for ordinary responses, policy for detached ones.

In-process tests call the middleware directly (with ``wsgiref.validate`` on
both sides where the check matters); the rest serve tests/mw_apps.py from
real servers and read the wire with tests/client.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

from tests.client import Stream, events, get, get_json, wait_until
from tests.mw_apps import starts_in_first_iteration
from tests.servers import ServerProcess, serve
from wsgi_detach import (
    BodyOptions,
    DetachedBody,
    DetachMiddleware,
    EventStream,
    UsageError,
    detach,
)
from wsgi_detach._middleware import python_next

SERVERS = ["pywsgi", "wsgiref", "detach-server", "waitress"]


@pytest.fixture(scope="module", params=SERVERS)
def served(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with serve(request.param, "tests.mw_apps:app") as server:
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

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        return starts_in_first_iteration(start_response, lambda: closed.append(True))

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


def test_a_body_the_app_returns_already_closed_gives_its_slot_back() -> None:
    """The middleware's on_close runs at once on a closed body, so the body must
    be among the request's before that callback is registered."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = DetachedBody()
        body.close()
        return body

    middleware = DetachMiddleware(app, max_open=1, watch_disconnects=False)
    result = middleware(_environ(), _Server().start_response)
    assert middleware.stats().open == 0
    assert list(result) == []
    result.close()  # type: ignore[attr-defined]
    stats = middleware.stats()
    assert (stats.open, stats.disconnected) == (0, 1)


def test_python_next_picks_the_iterators_to_call_without_next() -> None:
    """Those whose __next__ is Python code; see python_next for why."""
    assert python_next(DetachedBody())
    assert python_next(EventStream())
    assert not python_next(iter([b"x"]))
    assert not python_next(chunk for chunk in [b"x"])


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

    with pytest.raises(TypeError, match=r"detach\(\) takes no budget: the middleware's"):
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


def test_detach_merges_the_same_overrides_once_and_still_checks_each_kind() -> None:
    """The options derived for an app's overrides are kept: two requests passing the same
    get the same options object; a value equal to a kept one but of a refused type
    (True == 1) is still refused."""
    made = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = detach(environ, **environ["test.overrides"])
        made.append(body)
        body.finish()
        return body

    middleware = DetachMiddleware(app)
    options = []
    for _ in range(2):
        result = middleware({**_environ(), "test.overrides": {"idle_timeout": 1}},
                            _Server().start_response)
        result.close()  # type: ignore[attr-defined]
        options.append(middleware._derived({"idle_timeout": 1}))
    assert options[0] is options[1] and options[0].idle_timeout == 1.0
    assert made[0]._idle_timeout == made[1]._idle_timeout == 1.0
    with pytest.raises(ValueError, match="idle_timeout must be a positive number"):
        middleware._derived({"idle_timeout": True})
    unhashable = middleware._derived({"heartbeat_chunk": b":\n", "timeout_chunk": bytearray(b"x")})
    assert unhashable.timeout_chunk == b"x"


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
def test_a_gevent_queue_body_is_served_correctly(
    served: ServerProcess, path: str, body: bytes
) -> None:
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
        pytest.skip("HTTP/1.0 close-delimited: a truncated body looks complete")
    response = get(served.port, "/fail_mid")
    assert (response.status, response.body, response.complete) == (200, b"partial;", False)


def test_stats_count_outcomes(served: ServerProcess) -> None:
    def stats() -> dict[str, Any]:
        result: dict[str, Any] = get_json(served.port, "/_stats")
        return result

    # Streams of earlier tests on this server may still be ending (on a
    # threaded server, after their client already had the response): their
    # outcomes must not land between before and after.
    assert wait_until(lambda: stats()["open"] == 0)
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
    with serve("detach-server", "tests.mw_apps:capped") as server:
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
    with serve("detach-server", "tests.mw_apps:app") as server:
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
        stats = get_json(server.port, "/_stats")
        assert (stats["open"], stats["draining"]) == (0, True)
        assert stats["finished" if farewell else "failed"] == 3


@pytest.mark.parametrize("worker", ["gevent", "gthread"])
def test_drain_on_signal_under_gunicorn(worker: str) -> None:
    """gunicorn's graceful SIGTERM: the hook's drain says farewell, the worker then exits."""
    with serve(f"gunicorn-{worker}-drain", "tests.mw_apps:app") as server:
        with Stream(server.port, f"/idle?key=g{worker}") as stream:
            assert wait_until(lambda: events(server.port, f"g{worker}") == ["opened"])
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)  # to the arbiter, which passes it on
            response = stream.read_all()
        assert (response.status, response.body, response.complete) == (200, b"bye", True)
        assert server.proc.wait(timeout=15) == 0


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


# -----------------------------------------------------------------------regressions


def _run_wsgiref(app: Any) -> bytes:
    """One request through wsgiref's real handler, in-process; the raw response bytes."""
    import io
    from wsgiref.handlers import SimpleHandler

    out, errors = io.BytesIO(), io.StringIO()
    SimpleHandler(io.BytesIO(), out, errors, _environ(), multithread=False).run(app)
    return out.getvalue()


def test_a_str_timeout_chunk_goes_out_in_the_encoding_detach_chose() -> None:
    """The middleware's timeout_chunk is text: a detach() that changes the
    encoding sends it in that encoding, not in the middleware's."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
        return detach(environ, encoding="utf-8", idle_timeout=0.05)

    middleware = DetachMiddleware(app, timeout_chunk="caf\u00e9", encoding="latin-1")
    assert _run_wsgiref(middleware).endswith(b"\r\n\r\ncaf\xc3\xa9")
    merged = BodyOptions(timeout_chunk="caf\u00e9", encoding="latin-1").merge({"encoding": "utf-8"})
    assert merged.timeout_chunk == b"caf\xc3\xa9"
    with pytest.raises(UnicodeEncodeError):
        BodyOptions(timeout_chunk="\u20ac").merge({"encoding": "latin-1"})
    assert BodyOptions(timeout_chunk=b"\xe9").merge({"encoding": "utf-8"}).timeout_chunk == b"\xe9"


class _Inner:
    """A framework's wrapper around a body (like Werkzeug's ClosingIterator)."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        self.closed += 1


def test_a_start_response_that_raises_ends_the_detached_response() -> None:
    """wsgiref asserts on a hop-by-hop header when the held head is
    flushed; the body, its max_open slot and the inner iterable leaked."""
    made: list[_Inner] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "keep-alive")])
        made.append(_Inner(detach(environ)))
        return made[-1]

    middleware = DetachMiddleware(app, max_open=1)
    assert _run_wsgiref(middleware).startswith(b"HTTP/1.0 500")
    (inner,) = made
    assert (inner.closed, inner.body.outcome) == (1, "failed")
    stats = middleware.stats()
    assert (stats.open, stats.failed) == (0, 1)
    assert _run_wsgiref(middleware).startswith(b"HTTP/1.0 500")  # not 503: the slot is free


def test_a_start_response_that_raises_closes_an_ordinary_response() -> None:
    """The pass-through path: the server never got the iterable."""
    body = _Closing([b"x"])

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
        return body

    assert _run_wsgiref(DetachMiddleware(app)).startswith(b"HTTP/1.0 500")
    assert body.closed == 1


def test_a_watch_that_raises_ends_the_detached_response() -> None:
    """an exception from watch() leaked the body like a refused head."""
    import os

    from wsgi_detach._watchers import SOCKET_KEY

    bodies: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        bodies.append(detach(environ))
        return bodies[-1]

    closed_file = open(os.devnull)
    closed_file.close()  # fileno() now raises ValueError
    environ = _environ()
    environ[SOCKET_KEY] = closed_file
    middleware = DetachMiddleware(app)
    with pytest.raises(ValueError, match=r"^I/O operation on closed file"):
        middleware(environ, _Server().start_response)
    assert bodies[0].outcome == "failed"
    assert middleware.stats().open == 0


def test_drain_on_signal_without_a_hub_drains_then_dies_by_the_signal() -> None:
    """on a server without a gevent hub (waitress, wsgiref, cheroot) the
    drain ran in a thread, whose signal.signal() raised: SIGTERM was swallowed."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import threading, time
        from wsgi_detach import DetachMiddleware, detach

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return detach(environ)

        mw = DetachMiddleware(app)
        response = mw({}, lambda status, headers, exc_info=None: None)  # one open stream

        def serve():  # what a threaded server's worker does
            try:
                for chunk in response:
                    print("sent", chunk, flush=True)
            finally:
                response.close()

        threading.Thread(target=serve, daemon=True).start()
        mw.drain_on_signal(5, b"bye")
        print("ready", flush=True)
        for _ in range(50):  # bounded: 5 s
            time.sleep(0.1)
        print("still alive", flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=8)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # The drain said farewell, the stream ended, then the signal's default action.
    assert (proc.returncode, out, err) == (-signal.SIGTERM, "sent b'bye'\n", "")


def test_a_second_start_response_without_exc_info_raises() -> None:
    """PEP 3333: behind the middleware the second call silently
    replaced the held head; without it the server raises."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        start_response("404 Not Found", [("Content-Type", "text/plain")])  # the app's bug
        return [b"x"]

    with pytest.raises(UsageError, match=r"^start_response\(\) called a second time without "
                                         r"exc_info; only an error handler may replace"):
        DetachMiddleware(app)(_environ(), _Server().start_response)
    assert _run_wsgiref(DetachMiddleware(app)).startswith(b"HTTP/1.0 500")  # as bare wsgiref


def test_detach_after_the_app_returned_is_refused() -> None:
    """detach() inside the iterator (Flask's stream_with_context) was
    accepted, counted in max_open and never released."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = detach(environ)  # lazily, at the first iteration
        body.finish(b"hello")
        yield from body

    middleware = DetachMiddleware(app, max_open=1)
    for _ in range(2):
        result = middleware(_environ(), _Server().start_response)
        with pytest.raises(UsageError, match=r"^detach\(environ\) was called after the app "
                                             r"returned \(inside the response iterator"):
            list(result)
        result.close()  # type: ignore[attr-defined]
    assert middleware.stats().open == 0


def test_a_body_closed_elsewhere_while_its_callbacks_yield_still_frees_its_slot() -> None:
    """The producer (or the watcher) closes the body; its app-registered on_close yields
    (an unsubscribe over the network) before the middleware's own runs; meanwhile the
    server's close() ends the request. The max_open slot must still come back."""
    import gevent

    from wsgi_detach import DetachedBody

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = DetachedBody()
        body.on_close(lambda: gevent.sleep(0))
        body.put(b"hello\n")
        gevent.spawn_later(0.05, body.close)
        return body

    middleware = DetachMiddleware(app, max_open=1, watch_disconnects=False)

    def serve_one() -> str:
        server = _Server()
        result = middleware(_environ(), server.start_response)
        try:
            for _ in result:
                pass
        finally:
            result.close()
        return server.calls[0][0]

    assert serve_one().startswith("200")
    assert wait_until(lambda: middleware.stats().open == 0, timeout=2)
    assert serve_one().startswith("200")  # not a 503: the slot came back


def test_the_streaming_headers_go_on_a_new_list_each_time() -> None:
    """What to add is kept per distinct headers; when something is added the server
    gets a new list (wsgiref appends to it), so one response's additions never
    reach the next."""
    mw = DetachMiddleware(lambda environ, start_response: [])
    headers = [("Content-Type", "text/plain")]
    expected = [*headers, ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
    first = mw._streaming(headers)
    first.append(("Date", "then"))
    assert mw._streaming(headers) == expected
    assert headers == [("Content-Type", "text/plain")]
    assert mw._streaming([("cache-control", "private")]) == [
        ("cache-control", "private"), ("X-Accel-Buffering", "no")]
    assert mw._streaming([("cache-control", "private")]) == [
        ("cache-control", "private"), ("X-Accel-Buffering", "no")]
