"""Target ``wsgi_detach``: our ``DetachedBody`` on gevent.pywsgi.

It uses whatever of the package has landed: ``DetachMiddleware`` around the
app and our TCP_NODELAY pywsgi handler when they exist (probed with
``hasattr``), plain pywsgi otherwise. The server's ready line records what
was used, so a result always says what it measured.

``wsgi_detach_nocoalesce`` is the same body with ``coalesce=0``: one server
write per ``put()``, like the queue targets, which isolates the hand-off
cost from the write-merging the body does by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import wsgi_detach
from bench.targets import _pywsgi

#: Names under which a pywsgi handler of ours may be exported; the first
#: one found is used. The core is being written as this harness is.
HANDLER_NAMES = ("DetachHandler", "WSGIHandler", "NoDelayHandler")


class DetachStream:
    """``DetachedBody`` behind the shared app's :class:`~bench.targets._pywsgi.Stream`."""

    def __init__(self, maxsize: int | None, chunk_size: int, options: dict[str, Any]) -> None:
        # max_buffer is in bytes; bound it to the same number of chunks the
        # queue targets may hold, so backpressure is comparable.
        limit = None if maxsize is None else maxsize * max(1, chunk_size)
        self.body = wsgi_detach.DetachedBody(max_buffer=limit, **options)

    def put(self, data: bytes) -> None:
        self.body.put(data)

    def finish(self, last: bytes | None = None) -> None:
        self.body.finish(last)

    # The body is documented as safe to write from any OS thread.
    def put_threadsafe(self, data: bytes) -> None:
        self.body.put(data)

    def finish_threadsafe(self) -> None:
        self.body.finish()

    def on_close(self, callback: Callable[[], None]) -> None:
        self.body.on_close(callback)

    def spawn(self, fn: Callable[..., object], *args: Any) -> None:
        self.body.spawn(fn, *args)


class Adapter:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def new_stream(self, maxsize: int | None, chunk_size: int = 0) -> DetachStream:
        return DetachStream(maxsize, chunk_size, self.options)


def pieces() -> dict[str, object]:
    """Which optional parts of wsgi_detach exist in this checkout."""
    handler = next((n for n in HANDLER_NAMES if hasattr(wsgi_detach, n)), None)
    return {
        "wsgi_detach": getattr(wsgi_detach, "__version__", "?"),
        "middleware": hasattr(wsgi_detach, "DetachMiddleware"),
        "own_handler": handler,
    }


def serve(
    announce: Callable[[int, dict[str, object]], None],
    nodelay: bool = False,
    coalesce: int | None = None,
) -> NoReturn:
    info = pieces()
    options = {} if coalesce is None else {"coalesce": coalesce}
    info["body_options"] = options
    app: Callable[..., Any] = _pywsgi.App(Adapter(options))
    if info["middleware"]:
        app = wsgi_detach.DetachMiddleware(app)
    handler: type | None = getattr(wsgi_detach, str(info["own_handler"]), None)
    if handler is None and nodelay:
        handler = _pywsgi.NoDelayHandler
    _pywsgi.serve(app, announce, handler, info)
