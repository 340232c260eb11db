"""WSGI scenarios for the registration and publishing-vocabulary tests, behind DetachMiddleware.

``app`` is a :class:`DetachMiddleware` with a small ``max_buffered`` (4 KiB)
and ``find_wrapped=False``, so a body it counts was registered when it was
made, not found later in what the app returned. Served by tests/servers.py;
everything else falls through to :func:`tests.apps.app` (``/_events``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Callable

from tests import apps
from tests.apps import json_response, query, record
from wsgi_detach import DetachMiddleware, EventStream, Hub, encode_event, long_poll
from wsgi_detach._wakeup import start_beside

#: What drain() sends every open stream as its last chunk.
FAREWELL = encode_event("bye", event="bye")
#: The shared budget: 150 leaked opening comments (27 bytes each) used it up.
MAX_BUFFERED = 4096

hub = Hub(history=50)


class _Wrapped:
    """An iterable around a stream that is not the stream: what a framework returns."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.stream)

    def close(self) -> None:
        self.stream.close()


def scenarios(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    params = query(environ)

    if path == "/_stats":
        return json_response(start_response, dataclasses.asdict(mw.stats()))

    if path == "/_drain":
        grace = float(params.get("grace", "1"))
        start_beside(lambda: mw.drain(grace, FAREWELL))  # a greenlet, or a thread (gthread)
        return json_response(start_response, "draining", "202 Accepted")

    if path == "/sse/direct":
        # The documented raw-WSGI way: an EventStream built from the environ.
        key = params.get("key", path)
        stream = EventStream(environ, start_response, heartbeat=None)
        stream.on_close(lambda: record(key, f"outcome {stream.outcome}"))
        stream.send("hello", id="h1")
        record(key, "opened")
        return _Wrapped(stream) if "wrap" in params else stream

    if path == "/hub/events":
        return hub.event_stream(environ, start_response, last_event_id=params.get("after"))

    if path == "/hub/poll":
        return long_poll(hub, params.get("cursor"), start_response, timeout=5, environ=environ)

    if path == "/hub/publish":
        message = hub.publish(params.get("data", "m"))
        return json_response(start_response, {"id": message.id, "subscribers": hub.subscribers})

    if path == "/hub/cursor":
        return json_response(start_response, {"cursor": hub.cursor})

    return apps.app(environ, start_response)


mw = DetachMiddleware(scenarios, max_buffered=MAX_BUFFERED, find_wrapped=False)
app = mw
