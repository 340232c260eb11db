"""Apps the testing kit's own tests serve (tests/test_testing.py), in a thread or a subprocess.

``app`` (a DetachMiddleware) answers:

* ``/events``: an SSE stream from ``hub`` (``retry: 50``), resumable, with a
  heartbeat every 0.2 s (every server notices a departed client at a write);
* ``/publish?data=X``: publishes X to ``hub`` (so that a test can publish into
  a server subprocess);
* ``/poll?cursor=C``: a long-poll on ``hub`` (empty after 0.5 s);
* ``/silent``: a detached response that never sends anything (so its head
  never goes out either), timed out after 2 s;
* ``/mute``: a detached response that sends one chunk, then nothing, timed
  out after 2 s of that;
* ``/hello``: ``hello`` with a Content-Length.

``plain_app`` is the same without the middleware (for detach-server, which
adds its own and drains it when it stops). ``missing`` is not defined, on
purpose (a server that cannot load its app).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from wsgi_detach import DetachMiddleware, Hub, detach, long_poll

hub = Hub()


def plain_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/events":
        return hub.event_stream(environ, start_response, retry=50, heartbeat=0.2)
    if path == "/publish":
        message = hub.publish(query["data"][0])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [message.id.encode()]
    if path == "/poll":
        return long_poll(hub, query.get("cursor", [None])[0], start_response, timeout=0.5)
    if path == "/silent":
        return detach(environ, start_response=start_response, heartbeat=None, idle_timeout=2)
    if path == "/mute":
        body = detach(environ, heartbeat=None, idle_timeout=2)
        start_response("200 OK", [("Content-Type", "text/plain")])
        body.put(b"started\n")
        return body
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


app = DetachMiddleware(plain_app)
