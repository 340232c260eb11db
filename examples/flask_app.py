"""The Bottle primer's ``/stream`` and ``/fetch`` on Flask, and an SSE stream at ``/events``.

Run (from a checkout): ``python -m examples.flask_app [--port 8080]`` and ``curl -N http://127.0.0.1:8080/fetch``.

Flask wraps whatever iterable a ``Response`` gets in its own iterator and
calls the body's ``close()`` at the end of the request, so a
``DetachedBody`` works as a response body unchanged. Serve it from a gevent
server (below): a threaded server would hold one thread per open stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import gevent
from flask import Flask, Response, request

from examples._worker import SomeAsyncWorker
from wsgi_detach import DetachedBody, EventStream

#: Paths tests/test_examples.py requests from a served copy of this module.
SMOKE_PATHS = ["/stream", "/fetch", "/events"]

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


@app.route("/events")
def events() -> Response:
    # Flask starts the response, so it gets the SSE headers; the stream reads
    # Last-Event-ID from the environ and resumes the count after it.
    stream = EventStream(request.environ, retry=1000)
    last = stream.last_event_id
    first = int(last) + 1 if last and last.isdigit() else 0

    def count() -> None:
        for n in range(first, first + 10):
            stream.send(f"count {n}", id=n)
            gevent.sleep(0.5)

    stream.spawn(count)
    return Response(stream, headers=list(EventStream.HEADERS))


if __name__ == "__main__":
    from examples._run import main

    main(app, path="/fetch", description="The Flask example.")
