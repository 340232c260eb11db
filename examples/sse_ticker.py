"""An SSE ticker: one OS thread publishes a tick a second; every browser tab sees it.

Run (from a checkout): ``python -m examples.sse_ticker [--port 8080]``, open
http://127.0.0.1:8080/ in a few tabs, or ``curl -N http://127.0.0.1:8080/events``.
Reload a tab: it resumes from its last tick (``Last-Event-ID``) instead of starting over.

Plain WSGI: a :class:`~wsgi_detach.Hub` keeps the last 100 ticks, and
``hub.event_stream`` gives each request a subscribed ``EventStream``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from wsgi_detach import Hub

#: Paths tests/test_examples.py requests from a served copy of this module.
SMOKE_PATHS = ["/", "/events"]

hub = Hub(history=100)
_started = threading.Lock()

PAGE = b"""<!doctype html><meta charset="utf-8"><title>ticker</title>
<h1>Ticks: <span id="n">waiting</span></h1><ul id="log"></ul>
<script>
const source = new EventSource("/events");
source.addEventListener("tick", (e) => {
  document.getElementById("n").textContent = JSON.parse(e.data).n;
  const li = document.createElement("li");
  li.textContent = e.lastEventId + ": " + e.data;
  document.getElementById("log").prepend(li);
});
</script>
"""


def _tick_forever() -> None:
    n = 0
    while True:
        n += 1
        hub.publish({"n": n, "time": time.time()}, event="tick")
        time.sleep(1)


def app(environ: dict[str, Any], start_response: Any) -> Any:
    if _started.acquire(blocking=False):  # first request starts the ticker, once
        threading.Thread(target=_tick_forever, name="ticker", daemon=True).start()
    if environ["PATH_INFO"] == "/events":
        return hub.event_stream(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(PAGE)))])
    return [PAGE]


if __name__ == "__main__":
    from examples._run import main

    main(app, description="An SSE ticker.")
