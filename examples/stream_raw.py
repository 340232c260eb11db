"""The primer's /stream, as a raw WSGI app: chunks written later by a greenlet.

Run (from a checkout): ``python -m examples.stream_raw [--port 8080]``, then
``curl -N http://127.0.0.1:8080/stream``:
START, MIDDLE and END appear one by one (3 s, then 5 s later), not all at the
end. ``?scale=0.1`` makes the pauses ten times shorter.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import gevent

from wsgi_detach import DetachedBody


def app(environ: dict[str, Any], start_response: Any) -> Any:
    if environ["PATH_INFO"] != "/stream":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /stream\n"]
    scale = float(parse_qs(environ.get("QUERY_STRING", "")).get("scale", ["1"])[0])
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    body = DetachedBody(idle_timeout=30)

    def stream() -> None:  # finishes the body when it returns, fails it if it raises
        body.put("START\n")
        gevent.sleep(3 * scale)
        body.put("MIDDLE\n")
        gevent.sleep(5 * scale)
        body.put("END\n")

    body.spawn(stream)
    return body


if __name__ == "__main__":
    from examples._run import main

    main(app, path="/stream", description="A streamed body, no framework.")
