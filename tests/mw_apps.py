"""Scenario apps behind DetachMiddleware, for the middleware, watcher, server and CLI tests.

For: what the middleware does with each kind of response (ordinary, generator,
detached, Bottle's queue-as-body pattern, failures, limits, drain). Not for: the
conformance matrix (tests/matrix_apps.py, which also serves the same scenarios without the
middleware) or the frameworks (tests/framework_apps.py).

:func:`make_app` builds one scenario app (dispatching on the path) behind a
``DetachMiddleware`` with the given options; the module-level instances are
what the tests name as ``tests.mw_apps:NAME``. Paths this module does not
know go to tests/apps.py (``/_events``, ``/stream``, ``/forever``...), so the
core scenarios also run through the middleware. Events are filed with
``tests.apps.record`` and read back from ``/_events?key=``.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import gevent
import gevent.queue
from gevent import monkey
from werkzeug.wsgi import ClosingIterator

from tests import apps
from tests.apps import json_response, pause, producer, query, record
from wsgi_detach import BufferFull, DetachedBody, DetachMiddleware, Unavailable, detach

Start = Callable[..., Any]

#: Whether gevent had patched the socket module by the time this module was
#: imported: ``python -m wsgi_detach serve`` must patch before importing the app.
PATCHED_AT_IMPORT = monkey.is_module_patched("socket")


class _Recorded(list):  # type: ignore[type-arg]
    """An ordinary response body that files each close() call."""

    def __init__(self, items: list[bytes], key: str) -> None:
        super().__init__(items)
        self.key = key

    def close(self) -> None:
        record(self.key, "plain closed")


def starts_in_first_iteration(start_response: Start, closed: Callable[[], object]) -> Any:
    """A generator body that calls start_response inside its first iteration.

    PEP 3333 allows that; it yields an empty chunk between two, and calls
    ``closed`` when it is closed or exhausted.
    """
    try:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"a"
        yield b""
        yield b"b"
    finally:
        closed()


def make_app(**options: Any) -> DetachMiddleware:
    mw: DetachMiddleware

    def scenarios(environ: dict[str, Any], start_response: Start) -> Any:
        path = environ["PATH_INFO"]
        params = query(environ)
        key = params.get("key", path)
        via = params.get("via", "greenlet")
        n = int(params.get("n", "3"))
        interval = float(params.get("interval", "0.02"))
        spawn = producer(via)

        if path == "/_patched":
            return json_response(start_response, {"at_import": PATCHED_AT_IMPORT})

        if path == "/_stats":
            return json_response(start_response, dataclasses.asdict(mw.stats()))

        if path == "/_drain":
            grace = float(params.get("grace", "1"))
            farewell = params["farewell"].encode() if "farewell" in params else None

            def drain() -> None:
                record(key, "drain started")
                cut = mw.drain(grace, farewell)
                record(key, f"drain cut {cut}")

            if via == "thread":
                threading.Thread(target=drain, daemon=True).start()
            else:
                gevent.spawn(drain)
            return json_response(start_response, "draining", "202 Accepted")

        if path == "/read":  # reads the request body in pieces (?piece=BYTES), answers its length
            read, size = 0, int(params.get("piece", "65536"))
            while piece := environ["wsgi.input"].read(size):
                read += len(piece)
            return json_response(start_response, {"read": read})

        if path == "/plain":
            body = b"hello world"
            start_response("200 OK", [("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(body)))])
            return _Recorded([b"hello ", b"world"], key)

        if path == "/gen":
            return starts_in_first_iteration(start_response, lambda: record(key, "gen closed"))

        if path in ("/detached", "/own_headers"):
            headers = [("Content-Type", "text/plain")]
            if path == "/own_headers":
                headers.append(("Cache-Control", "private, max-age=5"))
            start_response("200 OK", headers)
            body = detach(environ)
            body.on_close(lambda: record(key, f"outcome {body.outcome}"))

            def produce() -> None:
                for i in range(n):
                    body.put(f"chunk {i};")
                    pause(via, interval)

            spawn(body, produce)
            return body

        if path == "/idle":
            # Never writes, unless ?alive=SECONDS: then one chunk after that
            # long, and the end -- proof that the stream was not cut.
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = detach(environ, idle_timeout=30)
            body.on_close(lambda: record(key, f"outcome {body.outcome}"))
            record(key, "opened")
            if "alive" in params:
                def alive() -> None:
                    pause(via, float(params["alive"]))
                    body.put(b"alive")

                spawn(body, alive)
            return body

        if path == "/fail_first":
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = detach(environ)

            def fail_first() -> None:
                pause(via, 0.02)
                body.fail(RuntimeError("producer broke before any data (expected by the test)"))

            spawn(body, fail_first)
            return body

        if path == "/timeout_first":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return detach(environ, idle_timeout=0.1)

        if path == "/fail_mid":
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = detach(environ)

            def fail_mid() -> None:
                body.put(b"partial;")
                pause(via, 0.02)
                body.fail(RuntimeError("producer broke mid-stream (expected by the test)"))

            spawn(body, fail_mid)
            return body

        if path == "/fail_big":  # more than the socket buffers hold, then a failure
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = detach(environ)
            body.put(b"x" * 4_000_000)
            body.fail(RuntimeError("producer broke after a big chunk (expected by the test)"))
            return body

        if path == "/block_then_read":  # blocks the event loop ?block= seconds, then reads
            monkey.get_original("time", "sleep")(float(params["block"]))  # not cooperative
            read = len(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
            return json_response(start_response, {"read": read})

        if path == "/big_open":  # more than the socket buffers hold, then the body stays open
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = detach(environ, idle_timeout=30)
            body.put(b"x" * 4_000_000)
            return body

        if path == "/slow_gen":  # an ordinary (not detached) body: n chunks, interval apart
            start_response("200 OK", [("Content-Type", "text/plain")])

            def slowly() -> Any:
                for i in range(n):
                    yield f"chunk {i};".encode()
                    gevent.sleep(interval)

            return slowly()

        if path == "/read_late":  # streams, then reads the request body mid-response
            start_response("200 OK", [("Content-Type", "text/plain")])

            def read_late() -> Any:
                yield b"started;"
                environ["wsgi.input"].read(10)
                yield b"read"

            return read_late()

        if path.startswith("/queue"):
            # Bottle's queue-as-body pattern, unchanged: a gevent queue ended by StopIteration.
            start_response("200 OK", [("Content-Type", "text/plain")])
            queue: gevent.queue.Queue = gevent.queue.Queue()  # type: ignore[type-arg]
            if path == "/queue_one":
                queue.put("first;")  # a server trusting len()==1 would stop here
            wrapped = path in ("/queue_wrapped", "/queue_idle")
            # Bottle's queue-as-body pattern puts str (Bottle encodes it); a bare
            # ClosingIterator does not.
            items: list[object] = [f"item {i};".encode() if wrapped else f"item {i};"
                                   for i in range(n)]
            if path == "/queue_bad":
                items = [None, "never sent"]

            def fill() -> None:
                for item in items:
                    gevent.sleep(interval)
                    queue.put(item)
                if path != "/queue_idle":
                    queue.put(StopIteration)

            gevent.spawn(fill)
            if wrapped:
                # What Flask returns for Response(queue): Werkzeug's ClosingIterator.
                return ClosingIterator(queue, lambda: record(key, "wrapper closed"))
            return queue

        if path == "/caught":
            # A framework that turns every exception into its own error page.
            try:
                body = detach(environ)
            except Unavailable as exc:
                record(key, f"refused: {exc}")
                return json_response(
                    start_response, "framework error page", "500 Internal Server Error"
                )
            start_response("200 OK", [("Content-Type", "text/plain")])
            body.on_close(lambda: record(key, f"outcome {body.outcome}"))
            return body

        if path == "/fill":
            # Two bodies of this request, 40 000 bytes each, against max_buffered.
            start_response("200 OK", [("Content-Type", "text/plain")])
            first, second = detach(environ), detach(environ)
            first.put(b"x" * 40000)
            try:
                second.put(b"y" * 40000)
                record(key, "second put accepted")
            except BufferFull as exc:
                record(key, f"BufferFull: {exc}")
            record(key, f"buffered {mw.stats().buffered}")
            second.close()
            first.finish()
            return first

        if path == "/own_body":
            # A body the app made itself, not through detach(): still managed.
            start_response("200 OK", [("Content-Type", "text/plain")])
            own = DetachedBody()
            own.on_close(lambda: record(key, f"outcome {own.outcome}"))
            return own

        return apps.app(environ, start_response)

    mw = DetachMiddleware(scenarios, **options)
    return mw


app = make_app(idle_timeout=10)
capped = make_app(max_open=2, max_buffered=64 * 1024, retry_after=7)
