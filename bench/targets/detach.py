"""Target ``wsgi_detach``: our body, served the way the package means it to be.

It uses whatever of the package has landed, probed with ``hasattr``:

* with ``DetachMiddleware`` and ``detach``: bodies come from
  ``detach(environ, ...)`` inside an app wrapped in the middleware;
* with ``Hub``: held streams subscribe to our broadcast hub, and the
  publisher calls ``hub.publish`` once per message;
* with ``DetachServer``: that server (and so ``DetachHandler``: TCP_NODELAY,
  the socket exposed for disconnect watching) instead of plain pywsgi;
* otherwise a bare ``DetachedBody`` on plain gevent.pywsgi.

The server's ready line records what was used (kept in the JSON), so a
result always says what it measured. The opt-in probes isolate one effect
each: ``wsgi_detach_bare`` (the bare body on plain pywsgi, no middleware,
no handler, no hub), ``wsgi_detach_nohub`` (full stack, but the
publisher puts into each body itself), ``wsgi_detach_nowatch`` (full stack without the disconnect
watcher thread), ``wsgi_detach_nodelay`` (bare body, a handler that only sets
TCP_NODELAY), ``wsgi_detach_nocoalesce`` (full stack, ``coalesce=0``: one
server write per ``put()``, like the queue targets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from gevent import socket

import wsgi_detach
from bench.targets import _pywsgi


class DetachStream:
    """A detached body behind the shared app's :class:`~bench.targets._pywsgi.Stream`."""

    def __init__(self, body: Any) -> None:
        self.body = body

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
    def __init__(self, options: dict[str, Any], middleware: bool, hub: bool = False) -> None:
        self.options = options
        self.middleware = middleware
        has_hub = middleware and hasattr(wsgi_detach, "Hub")
        if has_hub:
            # Long-polls through the hub, as the docs show them (burst).
            self.hub = wsgi_detach.Hub()
            if hasattr(wsgi_detach, "long_poll"):
                self.long_poll = self._long_poll
        if hub and has_hub:
            # Held streams are delivered by our broadcast hub: one publish()
            # per message instead of one put() per stream from our loop.
            self.subscribe = self._subscribe
            self.broadcast = self._broadcast
        elif has_hub:
            self.publish_polls = self._broadcast

    def _subscribe(self, stream: DetachStream) -> None:
        self.hub.subscribe(stream.body, last_event_id=None, encode=_encode)

    def _broadcast(self, msg: bytes) -> None:
        self.hub.publish(msg.decode("ascii"))

    def _long_poll(self, environ: Any, start_response: Any) -> Any:
        return wsgi_detach.long_poll(self.hub, None, start_response, environ=environ)

    def new_stream(
        self, maxsize: int | None, chunk_size: int = 0, environ: Any = None
    ) -> DetachStream:
        # max_buffer is in bytes; bound it to the same number of chunks the
        # queue targets may hold, so backpressure is comparable.
        limit = None if maxsize is None else maxsize * max(1, chunk_size)
        if self.middleware:
            return DetachStream(wsgi_detach.detach(environ, max_buffer=limit, **self.options))
        return DetachStream(wsgi_detach.DetachedBody(max_buffer=limit, **self.options))


def _encode(message: Any, _last: list[Any] = [None, b""]) -> bytes:  # noqa: B006 - a cache
    """The producer's line as published; encoded once per message, not per stream."""
    if _last[0] is not message:
        _last[0], _last[1] = message, message.text.encode("ascii")
    return _last[1]  # type: ignore[no-any-return]


def listener() -> socket.socket:
    """A listening gevent socket with a backlog deep enough for 5 000 connects in bursts.

    It must be gevent's socket: a stdlib one would block the hub in accept().
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def serve(
    announce: Callable[[int, dict[str, object]], None],
    nodelay: bool = False,
    coalesce: int | None = None,
    bare: bool = False,
    watch: bool = True,
    hub: bool = True,
) -> NoReturn:
    options = {} if coalesce is None else {"coalesce": coalesce}
    use_mw = (
        not bare and hasattr(wsgi_detach, "DetachMiddleware") and hasattr(wsgi_detach, "detach")
    )
    use_server = use_mw and hasattr(wsgi_detach, "DetachServer")
    info: dict[str, object] = {
        "wsgi_detach": getattr(wsgi_detach, "__version__", "?"),
        "wsgi_detach_from": wsgi_detach.__file__,
        "middleware": use_mw,
        "body_options": options,
    }
    use_hub = hub and use_mw and hasattr(wsgi_detach, "Hub")
    info["hub"] = use_hub
    app: Any = _pywsgi.App(Adapter(options, use_mw, hub))
    if use_mw:
        app = wsgi_detach.DetachMiddleware(app, watch_disconnects=watch)
        info["watch_disconnects"] = watch
    if use_server:
        server = wsgi_detach.DetachServer(listener(), app, log=None)
        server.start()
        info.update(server="wsgi_detach.DetachServer", handler=server.handler_class.__name__)
        announce(server.server_port, info)
        server.serve_forever()
        raise SystemExit(0)
    _pywsgi.serve(app, announce, _pywsgi.NoDelayHandler if nodelay else None, info)
