"""The app the conformance matrix and the soak test serve on every server kind.

For: the same request judged on every server, with and without the middleware
(tests/test_matrix.py), and the leak soak (tests/test_soak.py). Not for: the
middleware's own options and limits (tests/mw_apps.py).

It adds what the matrix needs to :mod:`tests.apps` (whose scenarios it serves
unchanged):

``/idle?key=&heartbeat=``
    one chunk, then silence: the producer has nothing to say, so only the
    server (or a heartbeat) can notice that the client left.
``/queue?n=&interval=``
    Bottle's queue-as-body pattern verbatim: a ``gevent.queue.Queue`` filled by a worker,
    ended with ``StopIteration``, returned as the body.
``/soak?interval=``
    an endless stream that counts bodies made and ``on_close`` runs per body,
    read back from ``/_counts``: the soak test checks that every body was
    closed exactly once.
``/fail_before_data``
    the app calls ``start_response("200 OK")`` itself, then the body fails
    before any data: only a middleware holding the headers can turn that
    into a 5xx.

The whole app is wrapped in :class:`~wsgi_detach.DetachMiddleware`, its
bodies come from :func:`~wsgi_detach.detach`, and ``/_stats`` returns the
middleware's ``stats()``. Any path with ``/raw`` in front (``/raw/queue``)
is served without the middleware, to show what it is there for.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import Counter
from typing import Any, Callable

import gevent
import gevent.queue

from tests.apps import app as scenarios
from tests.apps import json_response, query, record
from wsgi_detach import BodyClosed, DetachedBody, DetachMiddleware, detach

RAW_KEY = "tests.without_middleware"


def make_body(environ: dict[str, Any], **options: Any) -> DetachedBody:
    """A body for this request: the middleware's, unless the request bypasses it."""
    if environ.get(RAW_KEY):
        return DetachedBody(**options)
    return detach(environ, **options)


_numbers = itertools.count()
_closes: Counter[int] = Counter()  # body number -> on_close runs
_made = 0
_counts_lock = threading.Lock()


def _counts() -> dict[str, int]:
    with _counts_lock:
        made = _made
        closes = list(_closes.values())
    return {
        "made": made,
        "closed": len(closes),
        "closed_twice_or_more": sum(1 for c in closes if c > 1),
    }


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    params = query(environ)
    key = params.get("key", path)

    if path == "/idle":
        start_response("200 OK", [("Content-Type", "text/plain")])
        heartbeat = float(params["heartbeat"]) if "heartbeat" in params else None
        # The deadline only bounds a leak if every detection fails.
        body = make_body(environ, heartbeat=heartbeat, deadline=30)
        body.on_close(lambda: record(key, "on_close"))
        body.put(b"hello\n")
        return body

    if path == "/queue":
        n = int(params.get("n", "5"))
        interval = float(params.get("interval", "0.05"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        queued = int(params.get("queued", "0"))
        queue: gevent.queue.Queue[Any] = gevent.queue.Queue()
        for i in range(queued):  # ready before the server first looks
            queue.put(f"queued {i};".encode())

        def worker() -> None:
            for i in range(queued, n):
                queue.put(f"queued {i};".encode())
                gevent.sleep(interval)
            queue.put(StopIteration)

        gevent.spawn(worker)
        return queue

    if path == "/soak":
        interval = float(params.get("interval", "0.01"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        global _made
        with _counts_lock:
            number = next(_numbers)
            _made += 1
        body = make_body(environ, deadline=60)

        @body.on_close
        def closed() -> None:
            with _counts_lock:
                _closes[number] += 1

        def produce() -> None:
            try:
                while True:
                    body.put(b"x" * 512)
                    gevent.sleep(interval)
            except BodyClosed:
                pass

        body.spawn(produce)
        return body

    if path == "/fail_before_data":
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = make_body(environ)

        def fail() -> None:
            gevent.sleep(0.05)
            raise RuntimeError("producer broke before any data (expected by the test)")

        body.spawn(fail)
        return body

    if path == "/_counts":
        return json_response(start_response, _counts())

    if path == "/_stats":
        return json_response(start_response, dataclasses.asdict(wrapped.stats()))

    return scenarios(environ, start_response)


wrapped = DetachMiddleware(_app)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    if path.startswith("/raw/"):
        environ["PATH_INFO"] = path[len("/raw") :]
        environ[RAW_KEY] = True
        return _app(environ, start_response)
    return wrapped(environ, start_response)
