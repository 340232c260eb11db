"""A gevent.pywsgi server tuned for detached responses: ``make_server`` and ``DetachHandler``.

Use it to serve any WSGI app under gevent.pywsgi with :class:`DetachMiddleware`
in front, which is what ``python -m wsgi_detach serve module:app`` does. It
differs from a plain ``gevent.pywsgi.WSGIServer`` in three ways:

* the handler puts the client socket in ``environ["wsgi_detach.socket"]``, so
  the middleware notices a client that leaves an idle stream within
  milliseconds (:mod:`wsgi_detach._watchers`); plain pywsgi exposes nothing;
* it sets ``TCP_NODELAY`` on every accepted connection: pywsgi writes a
  chunked response's final ``0\\r\\n\\r\\n`` separately, and without
  ``TCP_NODELAY`` that small write waits for the client's delayed ACK
  (~40 ms on Linux) -- each small response, each long-poll, pays it;
* ``stop()`` drains the middleware first (:meth:`DetachMiddleware.drain`), so
  open streams get a farewell or a grace period instead of being killed.

:class:`DetachHandler` is a plain ``WSGIHandler`` subclass so that pywsgi's
per-write work can be trimmed here later without touching the middleware.

When not to use it: under gunicorn (``-k gevent`` already exposes
``gunicorn.socket``; wrap the app in ``DetachMiddleware`` and call ``drain``
from a ``worker_exit`` hook), or with another server; and not in a process
that is not monkey-patched if your app uses blocking libraries (the
``serve`` command patches for you).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any, Final

from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from ._body import Chunk
from ._middleware import DetachMiddleware
from ._watchers import SOCKET_KEY

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

__all__ = ["DetachHandler", "DetachServer", "make_server"]

log = logging.getLogger("wsgi_detach")

#: After the drain, how long pywsgi may wait for the remaining handlers (idle
#: keep-alive connections, responses that were not detached) before killing them.
_AFTER_DRAIN: Final = 1.0


class DetachHandler(WSGIHandler):  # type: ignore[misc]  # gevent ships no type hints
    """A ``WSGIHandler`` that exposes its socket and sets ``TCP_NODELAY``."""

    def handle(self) -> None:
        if getattr(self.server, "nodelay", True):
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (a Unix socket): nothing to tune
                pass
        super().handle()

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ[SOCKET_KEY] = self.socket
        return environ


class DetachServer(WSGIServer):  # type: ignore[misc]
    """A pywsgi ``WSGIServer`` whose ``stop()`` drains the middleware first.

    Made by :func:`make_server`; ``middleware`` is the
    :class:`DetachMiddleware` in front of the app.
    """

    handler_class = DetachHandler

    def __init__(
        self,
        listener: Any,
        middleware: DetachMiddleware,
        *,
        nodelay: bool = True,
        farewell: Chunk | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("spawn", Pool())  # a pool, so that stop() can end the handlers
        super().__init__(listener, middleware, **kwargs)
        self.middleware = middleware
        self.nodelay = nodelay
        self.farewell = farewell
        self._drained = False

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, drain detached responses for ``timeout`` seconds, then stop.

        ``timeout`` defaults to ``stop_timeout``. Call it from a greenlet (a
        ``gevent.signal_handler`` callback is one); ``serve_forever`` calls it
        when it returns.
        """
        if not self._drained:  # serve_forever() calls stop() again once it returns
            self._drained = True
            grace = self.stop_timeout if timeout is None else timeout
            self.close()
            cut = self.middleware.drain(grace, self.farewell)
            if cut:
                log.warning("stopping: %d detached responses outlived the %ss grace", cut, grace)
        super().stop(timeout=_AFTER_DRAIN)


def make_server(
    app: WSGIApplication,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    nodelay: bool = True,
    grace: float = 10.0,
    farewell: Chunk | None = None,
    log: Any = "default",
    **middleware_options: Any,
) -> DetachServer:
    """A gevent.pywsgi server for ``app`` behind :class:`DetachMiddleware`; not yet started.

    Args:
        app: a WSGI app; wrapped in ``DetachMiddleware(app, **middleware_options)``
            unless it already is one.
        host, port: where to listen; port 0 picks a free port
            (``server.server_port`` after ``server.start()``).
        nodelay: set ``TCP_NODELAY`` on accepted connections (see the
            module docstring; ``False`` only to measure the difference).
        grace: seconds ``stop()`` lets detached responses end.
        farewell: the last chunk ``stop()`` sends every open detached body.
        log: pywsgi's access log (``"default"``: stderr; ``None``: off).

    Example::

        server = make_server(app, "0.0.0.0", 8000, idle_timeout=60)
        server.serve_forever()
    """
    if isinstance(app, DetachMiddleware):
        if middleware_options:
            raise TypeError(
                f"app is already a DetachMiddleware; configure it there, not with "
                f"{sorted(middleware_options)}"
            )
        middleware = app
    else:
        middleware = DetachMiddleware(app, **middleware_options)
    server = DetachServer((host, port), middleware, nodelay=nodelay, farewell=farewell, log=log)
    server.stop_timeout = grace
    return server
