"""The demo chat with test hooks, served by tests/servers.py for tests/test_browser.py.

``/_test/state?room=`` reports the room's subscribers, pending long-polls and
the ``Last-Event-ID`` of every SSE request so far; ``/_test/drop?room=&how=``
drops the room's SSE streams from the server side: ``finish`` ends them
cleanly (as a drain does), ``reset`` fails them, so the connection is
aborted without a terminating chunk. Everything else is the demo itself,
with a history of :data:`HISTORY` messages per room.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Callable
from urllib.parse import parse_qs

from wsgi_detach import EventStream
from wsgi_detach._demo import ChatApp

#: A short history, so that a test can make a client miss too much.
HISTORY = 20
chat = ChatApp(history=HISTORY)
_EVENTS = re.compile(r"^/api/rooms/([a-z0-9_-]+)/events$")
_lock = threading.Lock()
_last_ids: dict[str, list[str | None]] = {}
_streams: dict[str, list[EventStream]] = {}


class TestReset(ConnectionResetError):
    """The test dropped this stream on purpose."""


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path.startswith("/_test/"):
        room = query["room"]
        hub = chat.room(room)
        if hub is None:  # nobody posted there yet
            body = json.dumps({"subscribers": 0, "polls": 0, "last_event_ids": []}).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/_test/drop":
            with _lock:
                streams, _streams[room] = _streams.get(room, []), []
            if query["how"] == "finish":
                dropped = hub.disconnect_all()
            else:
                dropped = sum(1 for s in streams if s.state == "open")
                for stream in streams:
                    stream.fail(TestReset("dropped by the test (expected)"))
            state: dict[str, Any] = {"dropped": dropped}
        else:
            with _lock:
                ids = list(_last_ids.get(room, []))
            state = {"subscribers": hub.subscribers, "polls": hub.pending_polls,
                     "last_event_ids": ids}
        body = json.dumps(state).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    result = chat(environ, start_response)
    match = _EVENTS.match(path)
    if match and isinstance(result, EventStream):
        with _lock:
            _last_ids.setdefault(match.group(1), []).append(environ.get("HTTP_LAST_EVENT_ID"))
            _streams.setdefault(match.group(1), []).append(result)
    return result
