"""One detached stream returned from five WSGI frameworks, served side by side.

``app`` dispatches on the first path segment to a Bottle, Flask, WebOb,
Django or raw WSGI app; each returns the same :func:`detached` body from its
own response type. ``?key=`` files server-side events (``on_close`` ran, the
producer's ``put()`` raised) that the tests read back from ``/_events``.

Everything is served through :class:`~wsgi_detach.DetachMiddleware` and the
bodies come from :func:`~wsgi_detach.detach`, so its policies (streaming
headers, ``idle_timeout``) reach every framework. Bottle's ``/fetch`` makes
its :class:`DetachedBody` directly: the middleware must find it inside
Bottle's iterator.

Bottle also serves the primer's two examples almost verbatim: ``/stream``
(a generator with sleeps; ``gevent.sleep`` because this server is not
monkey-patched, as the primer suggests) and ``/fetch`` (a callback-driven
worker filling the body, ended with ``body.put(StopIteration)``), the latter
both with a :class:`DetachedBody` and, to the letter, with a gevent queue.
"""

from __future__ import annotations

import os
from typing import Any, Callable
from urllib.parse import parse_qs

import bottle
import django
import flask
import gevent
import gevent.queue
import webob
from django.conf import settings

from tests.apps import app as scenarios
from tests.apps import record
from wsgi_detach import BodyClosed, DetachedBody, DetachMiddleware, detach

#: The middleware's idle_timeout, the policy every framework's stream gets;
#: the test passes it in.
IDLE_TIMEOUT = float(os.environ.get("TEST_IDLE_TIMEOUT", "10"))


def detached(environ: dict[str, Any]) -> DetachedBody:
    """``n`` lines, one every ``interval`` seconds, from a greenlet; events under ``key``."""
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    key = query.get("key", "none")
    n = int(query.get("n", "4"))
    interval = float(query.get("interval", "0.05"))
    body = detach(environ)  # with the middleware's defaults
    body.on_close(lambda: record(key, "on_close"))

    def produce() -> None:
        try:
            for i in range(n):
                body.put(f"line {i}\n")
                gevent.sleep(interval)
        except BodyClosed as exc:
            record(key, f"put raised {type(exc).__name__}")
            raise

    body.spawn(produce)
    return body


# ---------------------------------------------------------------------------- Bottle

bottle_app = bottle.Bottle()


@bottle_app.route("/bottle/detached")
def bottle_detached() -> Any:
    bottle.response.content_type = "text/plain"
    return detached(bottle.request.environ)


@bottle_app.route("/bottle/stream")
def bottle_stream() -> Any:
    # The primer's /stream, with gevent.sleep instead of a monkey-patched sleep.
    yield "START"
    gevent.sleep(0.1)
    yield "MIDDLE"
    gevent.sleep(0.1)
    yield "END"


class SomeAsyncWorker:
    """The primer's imaginary worker: reports data and the end through callbacks."""

    def __init__(self, chunks: list[str], interval: float) -> None:
        self._chunks = chunks
        self._interval = interval
        self._on_data: Callable[[str], object] = lambda chunk: None
        self._on_finish: Callable[[], object] = lambda: None
        gevent.spawn(self._run)

    def on_data(self, callback: Callable[[str], object]) -> None:
        self._on_data = callback

    def on_finish(self, callback: Callable[[], object]) -> None:
        self._on_finish = callback

    def _run(self) -> None:
        for chunk in self._chunks:
            gevent.sleep(self._interval)
            self._on_data(chunk)
        self._on_finish()


@bottle_app.route("/bottle/fetch")
def fetch() -> Any:
    body = DetachedBody()
    worker = SomeAsyncWorker(["one;", "two;", "three;"], 0.05)
    worker.on_data(lambda chunk: body.put(chunk))
    worker.on_finish(lambda: body.put(StopIteration))
    return body


@bottle_app.route("/bottle/fetch_queue")
def fetch_queue() -> Any:
    # The primer's /fetch to the letter: a gevent queue as the body.
    body = gevent.queue.Queue()
    worker = SomeAsyncWorker(["one;", "two;", "three;"], 0.05)
    worker.on_data(lambda chunk: body.put(chunk))
    worker.on_finish(lambda: body.put(StopIteration))
    return body


# ---------------------------------------------------------------------------- Flask

flask_app = flask.Flask(__name__)


@flask_app.route("/flask/detached")
def flask_detached() -> Any:
    return flask.Response(detached(flask.request.environ), mimetype="text/plain")


@flask_app.route("/flask/context")
def flask_context() -> Any:
    body = detached(flask.request.environ)
    return flask.Response(flask.stream_with_context(body), mimetype="text/plain")


# ---------------------------------------------------------------------------- WebOb


def webob_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    response = webob.Response(app_iter=detached(environ), content_type="text/plain")
    return response(environ, start_response)


# ---------------------------------------------------------------------------- Django

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="test-only, not secret",
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    LOGGING_CONFIG=None,
)
django.setup(set_prefix=False)

from django.core.handlers.wsgi import WSGIHandler  # noqa: E402 (needs settings)
from django.http import HttpRequest, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402


def django_detached(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(detached(request.META), content_type="text/plain")


urlpatterns = [path("django/detached", django_detached)]
django_app = WSGIHandler()


# ---------------------------------------------------------------------------- raw WSGI


def raw_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return detached(environ)


FRAMEWORKS: dict[str, Callable[..., Any]] = {
    "bottle": bottle_app,
    "flask": flask_app,
    "webob": webob_app,
    "django": django_app,
    "raw": raw_app,
}


def dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    framework = environ["PATH_INFO"].split("/")[1]
    return FRAMEWORKS.get(framework, scenarios)(environ, start_response)


app = DetachMiddleware(dispatch, idle_timeout=IDLE_TIMEOUT)
