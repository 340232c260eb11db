"""The Bottle primer's two routes, with ``DetachedBody`` where the primer used a gevent queue.

Run (from a checkout): ``python -m examples.bottle_app [--port 8080]`` and ``curl -N http://127.0.0.1:8080/fetch``.

``/stream`` is the primer's generator, unchanged: a gevent server plus
monkey-patching is all it needs. ``/fetch`` is the primer's callback pattern;
the primer returned a ``gevent.queue.Queue``, which breaks on gevent.pywsgi
(it has ``__len__``, so the server derives a Content-Length from it), never
learns that the client left, and hangs when the worker dies. A
``DetachedBody`` is a drop-in for the queue: ``put`` is ``put``, and
``put(StopIteration)`` still ends the response.
"""

# ruff: noqa: E402 - the primer's first line must come before every other import
from gevent import monkey; monkey.patch_all()  # noqa: E702, I001

from time import sleep

from bottle import default_app, response, route

from examples._worker import SomeAsyncWorker
from wsgi_detach import DetachedBody

#: Paths tests/test_examples.py requests from a served copy of this module.
SMOKE_PATHS = ["/stream", "/fetch"]


@route("/stream")
def stream():  # type: ignore[no-untyped-def]
    yield "START"
    sleep(3)
    yield "MIDDLE"
    sleep(5)
    yield "END"


@route("/fetch")
def fetch():  # type: ignore[no-untyped-def]
    response.content_type = "text/plain"
    body = DetachedBody(idle_timeout=30)
    worker = SomeAsyncWorker()
    worker.on_data(lambda chunk: body.put(chunk))
    worker.on_finish(lambda: body.put(StopIteration))
    return body


app = default_app()

if __name__ == "__main__":
    from examples._run import main

    main(default_app(), path="/fetch", description="The Bottle primer's routes.")
