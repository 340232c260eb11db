"""The Bottle primer's ``/stream`` and ``/fetch`` on Flask.

Run (from a checkout): ``python -m examples.flask_app`` and ``curl -N http://127.0.0.1:8080/fetch``.

Flask wraps whatever iterable a ``Response`` gets in its own iterator and
calls the body's ``close()`` at the end of the request, so a
``DetachedBody`` works as a response body unchanged. Serve it from a gevent
server (below): a threaded server would hold one thread per open stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import gevent
from flask import Flask, Response

from examples._worker import SomeAsyncWorker
from wsgi_detach import DetachedBody

#: Paths tests/test_examples.py requests from a served copy of this module.
SMOKE_PATHS = ["/stream", "/fetch"]

app = Flask(__name__)


@app.route("/stream")
def stream() -> Response:
    def generate() -> Iterator[str]:
        yield "START"
        gevent.sleep(3)
        yield "MIDDLE"
        gevent.sleep(5)
        yield "END"

    return Response(generate(), mimetype="text/plain")


@app.route("/fetch")
def fetch() -> Response:
    body = DetachedBody(idle_timeout=30)
    worker = SomeAsyncWorker()
    worker.on_data(lambda chunk: body.put(chunk))
    worker.on_finish(lambda: body.put(StopIteration))
    return Response(body, mimetype="text/plain")


if __name__ == "__main__":
    from gevent.pywsgi import WSGIServer

    print("serving on http://127.0.0.1:8080/fetch", flush=True)
    WSGIServer(("127.0.0.1", 8080), app).serve_forever()
