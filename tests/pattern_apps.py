"""WSGI scenarios for the SSE, broadcast and long-poll tests, served by tests/servers.py.

Everything else falls through to :func:`tests.apps.app`. Hubs are created by
name on first use (``?hub=``), so each test gets its own history.

Publishing takes ``?via=``: ``direct`` (in the request's greenlet or thread),
``thread`` (a plain OS thread, never monkey-patched under ``pywsgi``) or
``callback`` (a gevent loop callback, i.e. from the hub greenlet itself).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable
from urllib.parse import parse_qs

import gevent

from tests import apps
from wsgi_detach import DetachedBody, EventStream, Hub, long_poll
from wsgi_detach._sse import read_last_event_id

_hubs: dict[str, Hub] = {}
_hubs_lock = threading.Lock()
_connects: dict[str, list[tuple[str | None, float]]] = {}
_drops: dict[str, list[float]] = {}

#: The browser tests' page: one EventSource, every event and state change logged.
PAGE = """<!doctype html><meta charset="utf-8"><title>events</title><script>
window.got = []; window.opens = []; window.errors = [];
const source = new EventSource("/hub/events?hub=HUB");
const keep = (e) => window.got.push(
  {type: e.type, data: e.data, lastEventId: e.lastEventId, at: Date.now()});
source.onmessage = keep;
source.addEventListener("resync", keep);
source.addEventListener("named", keep);
source.onopen = () => window.opens.push(Date.now());
source.onerror = () => window.errors.push(Date.now());
</script>"""


def hub_for(query: dict[str, str]) -> Hub:
    """The hub named ``?hub=``; ``?history=`` and ``?max_pending=`` apply when it is made."""
    name = query.get("hub", "default")
    with _hubs_lock:
        if name not in _hubs:
            _hubs[name] = Hub(
                history=int(query.get("history", "1000")),
                max_pending=int(query.get("max_pending", str(1 << 20))),
            )
        return _hubs[name]


def _json(start_response: Callable[..., Any], obj: object) -> list[bytes]:
    body = json.dumps(obj).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _publish(hub: Hub, via: str, items: list[tuple[str, str | None]],
             **fields: Any) -> None:
    def run() -> None:
        for data, event in items:
            hub.publish(data, event=event, **fields)

    if via == "thread":
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(10)
    elif via == "callback":
        gevent.get_hub().loop.run_callback(run)
    else:
        run()


#: Events the ticker sends: multi-line, CR/CRLF, unicode, an empty one, types and ids.
TICKER = [
    {"data": "plain", "id": "1"},
    {"data": "two\nlines", "event": "multi", "id": "2"},
    {"data": "cr\rand\r\ncrlf", "id": "3"},
    {"data": "unicode \u00e9\u4e2d\U0001f600", "event": "\u00e9v\u00e9nement", "id": "4"},
    {"data": "", "id": "5"},
    {"data": " leading space", "id": "6"},
]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}

    if path == "/sse/ticker":
        stream = EventStream(environ, start_response, retry=50)

        def tick() -> None:
            for event in TICKER:
                stream.send(event["data"], event=event.get("event"), id=event["id"])
                gevent.sleep(0.01)

        stream.spawn(tick)
        return stream

    if path == "/sse/idle":
        # Nothing to say, ever: the headers must go out all the same.
        beat = float(query["heartbeat"]) if "heartbeat" in query else None
        return EventStream(environ, start_response, heartbeat=beat, idle_timeout=30)

    if path == "/sse/echo":
        stream = EventStream(environ, start_response)
        stream.send(repr(stream.last_event_id))
        stream.finish()
        return stream

    if path == "/hub/events":
        hub = hub_for(query)
        stream = hub.event_stream(environ, start_response, last_event_id=query.get("after"),
                                  retry=int(query.get("retry", "3000")))
        with _hubs_lock:
            _connects.setdefault(query.get("hub", "default"), []).append(
                (read_last_event_id(environ), time.time()))
        return stream

    if path == "/hub/connects":
        # Every /hub/events request of the hub (its Last-Event-ID header and when it
        # came) and when each /hub/disconnect began, on the server's clock.
        name = query.get("hub", "default")
        with _hubs_lock:
            seen = {"connects": _connects.get(name, []), "drops": _drops.get(name, [])}
            return _json(start_response, seen)

    if path == "/hub/comment":
        hub = hub_for(query)
        return _json(start_response, {"reached": hub.comment(query.get("text", ""))})

    if path == "/page/events":
        # An EventSource page for the browser tests: window.got collects every event.
        body = PAGE.replace("HUB", query.get("hub", "default")).encode()
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    if path == "/hub/ndjson":
        hub = hub_for(query)
        start_response("200 OK", [("Content-Type", "application/x-ndjson")])
        body = DetachedBody()
        hub.subscribe(body, last_event_id=query.get("after"))
        return body

    if path == "/hub/publish" and environ["REQUEST_METHOD"] == "POST":
        # {"data", "event", "id", "retry"} as JSON: any value, refused ones answered 400.
        hub = hub_for(query)
        size = int(environ.get("CONTENT_LENGTH") or 0)
        fields = json.loads(environ["wsgi.input"].read(size))
        try:
            message = hub.publish(fields.pop("data"), **fields)
        except (TypeError, ValueError) as exc:
            body = str(exc).encode()
            start_response("400 Bad Request", [("Content-Type", "text/plain"),
                                               ("Content-Length", str(len(body)))])
            return [body]
        return _json(start_response, {"id": message.id, "cursor": hub.cursor})

    if path == "/hub/publish":
        hub = hub_for(query)
        n = int(query.get("n", "1"))
        data = query.get("data", "m")
        items = [(data if n == 1 else f"{data}{i}", query.get("event")) for i in range(n)]
        fields: dict[str, Any] = {}
        if "id" in query:
            fields["id"] = query["id"]
        if "retry" in query:
            fields["retry"] = int(query["retry"])
        _publish(hub, query.get("via", "direct"), items, **fields)
        return _json(start_response, {"cursor": hub.cursor})

    if path == "/hub/poll":
        hub = hub_for(query)
        return long_poll(hub, query.get("cursor"), start_response,
                         timeout=float(query.get("timeout", "5")))

    if path == "/hub/stats":
        hub = hub_for(query)
        return _json(start_response, {"subscribers": hub.subscribers, "cursor": hub.cursor,
                                      "polls": hub.pending_polls})

    if path == "/hub/disconnect":
        with _hubs_lock:
            _drops.setdefault(query.get("hub", "default"), []).append(time.time())
        return _json(start_response, {"ended": hub_for(query).disconnect_all()})

    return apps.app(environ, start_response)
