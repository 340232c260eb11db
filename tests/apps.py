"""WSGI apps served by tests/servers.py for the integration tests.

One app, dispatching on the path, so that one server process serves every
scenario. Each scenario takes ``?key=`` to file what happened on the server
side (``on_close`` ran, a ``put`` raised, ...) as events the test reads back
from ``/_events?key=...`` -- the only window into the server process.

``?via=thread`` produces from a plain ``threading.Thread`` (never
monkey-patched in the ``pywsgi`` server), ``?via=greenlet`` (the default on
gevent servers) from a greenlet.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable
from urllib.parse import parse_qs

import gevent

from wsgi_detach import BodyClosed, DetachedBody

_events: dict[str, list[tuple[str, float]]] = {}
_events_lock = threading.Lock()


def record(key: str, name: str) -> None:
    with _events_lock:
        _events.setdefault(key, []).append((name, time.time()))


def _text(start_response: Callable[..., Any], body: bytes, status: str = "200 OK") -> list[bytes]:
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _producer(via: str) -> Callable[[DetachedBody, Callable[..., object]], None]:
    def run(body: DetachedBody, fn: Callable[..., object]) -> None:
        if via == "thread":
            body.spawn_thread(fn)
        else:
            body.spawn(fn)

    return run


def _pause(via: str, seconds: float) -> None:
    if via == "thread":
        # time.sleep looked up now: the real one in a plain thread, gevent's
        # after patch_all() (where threading.Thread is a greenlet).
        time.sleep(seconds)
    else:
        gevent.sleep(seconds)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    key = query.get("key", path)
    via = query.get("via", "greenlet")
    n = int(query.get("n", "5"))
    interval = float(query.get("interval", "0.1"))
    spawn = _producer(via)

    if path == "/_events":
        with _events_lock:
            events = list(_events.get(key, []))
        return _text(start_response, json.dumps(events).encode())

    if path == "/stream":
        # n chunks, one every interval seconds: the client checks arrival times.
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = DetachedBody(idle_timeout=10)

        def stream() -> None:
            for i in range(n):
                body.put(f"chunk {i} {time.time():.6f}\n")
                _pause(via, interval)

        spawn(body, stream)
        return body

    if path == "/forever":
        # Writes until the client leaves; files when on_close ran and put raised.
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = DetachedBody()
        body.on_close(lambda: record(key, "on_close"))

        def forever() -> None:
            try:
                for i in range(100_000):
                    body.put(f"{i}\n")
                    _pause(via, interval)
            except BodyClosed as exc:
                record(key, f"put raised {type(exc).__name__}")
                raise

        spawn(body, forever)
        return body

    if path == "/first_of_many":
        # Exactly one chunk is buffered when the server first looks: a server
        # trusting len()==1 would send it under a Content-Length and drop the rest.
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = DetachedBody()
        body.put(b"first;")

        def rest() -> None:
            for i in range(n):
                _pause(via, 0.02)
                body.put(f"more{i};")

        spawn(body, rest)
        return body

    if path == "/fail_mid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = DetachedBody()

        def fail_mid() -> None:
            body.put(b"partial-1;")
            _pause(via, 0.05)
            body.put(b"partial-2;")
            _pause(via, 0.05)
            body.fail(RuntimeError("producer broke mid-stream (expected by the test)"))

        spawn(body, fail_mid)
        return body

    if path == "/fail_first":
        # The body owns start_response: a failure before any data is a 500.
        body = DetachedBody(start_response=start_response)

        def fail_first() -> None:
            _pause(via, 0.05)
            body.fail(RuntimeError("producer broke before any data (expected by the test)"))

        spawn(body, fail_first)
        return body

    if path == "/late_start":
        # Status and headers decided by the producer after the app returned.
        body = DetachedBody(start_response=start_response)

        def late() -> None:
            _pause(via, 0.05)
            body.start("201 Created", [("Content-Type", "text/plain"), ("X-Late", "yes")])
            body.put(b"made later")
            body.finish()

        spawn(body, late)
        return body

    if path == "/flood":
        # A producer pushing 64 MiB into a 64 KiB buffer toward a client that
        # never reads: memory must stay bounded, and the blocked producer must
        # hear BodyClosed soon after the client leaves.
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        body = DetachedBody(max_buffer=64 * 1024)
        body.on_close(lambda: record(key, "on_close"))
        block = b"x" * 16384

        def flood() -> None:
            try:
                for _ in range(64 * 1024 * 1024 // len(block)):
                    body.put(block)
                record(key, "flood finished")
            except BodyClosed as exc:
                record(key, f"put raised {type(exc).__name__}")
                raise

        spawn(body, flood)
        return body

    return _text(start_response, b'"not found"', "404 Not Found")
