"""The primer's /fetch, as a raw WSGI app: a callback-driven worker writes later.

The primer's ``SomeAsyncWorker`` calls ``on_data`` for each piece and
``on_finish`` at the end, from the gevent loop. Here its callbacks go straight
into a DetachedBody, which is what the primer did with a queue, minus the
queue's traps (a lying ``len()``, no ``close()``, no timeouts).

Run (from a checkout): ``python -m examples.fetch_raw [--port 8080]``, then
``curl -N http://127.0.0.1:8080/fetch``.
"""

from __future__ import annotations

from typing import Any, Callable

import gevent

from wsgi_detach import DetachedBody


class SomeAsyncWorker:
    """Stands in for any callback API: emits a few pieces from loop timers."""

    def __init__(self, pieces: int = 5, interval: float = 0.5) -> None:
        self._pieces = pieces
        self._interval = interval
        self._on_data: Callable[[str], None] = lambda chunk: None
        self._on_finish: Callable[[], None] = lambda: None
        self._timer: Any = None
        self._sent = 0

    def on_data(self, callback: Callable[[str], None]) -> None:
        self._on_data = callback

    def on_finish(self, callback: Callable[[], None]) -> None:
        self._on_finish = callback

    def start(self) -> None:
        self._timer = gevent.get_hub().loop.timer(self._interval, self._interval)
        self._timer.start(self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.close()

    def _tick(self) -> None:  # runs in the gevent hub, as loop callbacks do
        self._sent += 1
        self._on_data(f"piece {self._sent}\n")
        if self._sent == self._pieces:
            self.stop()
            self._on_finish()


def app(environ: dict[str, Any], start_response: Any) -> Any:
    if environ["PATH_INFO"] != "/fetch":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /fetch\n"]
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    body = DetachedBody(idle_timeout=30)
    worker = SomeAsyncWorker()
    worker.on_data(lambda chunk: body.put(chunk))
    worker.on_finish(lambda: body.put(StopIteration))  # the queue pattern's end marker still works
    body.on_close(worker.stop)  # the client left: stop the worker, no orphaned producer
    worker.start()
    return body


if __name__ == "__main__":
    from examples._run import main

    main(app, path="/fetch", description="A callback-fed body, no framework.")
