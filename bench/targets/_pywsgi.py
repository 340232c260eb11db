"""The one WSGI app shared by every gevent.pywsgi target.

Why shared: the pywsgi targets differ only in the *body* (our
``DetachedBody``, a gevent queue as in Bottle's queue-as-body pattern, a plain generator). Routing,
subscriber bookkeeping and the producer schedule live here once, and each
target supplies a :class:`Stream` factory.

Routes (the same on every target, see ``bench/README.md``)::

    /stream?n=&size=        throughput: n chunks of size bytes, then end
    /fanout                 held stream: hello, then every broadcast message
    /poll                   long-poll: held until the next message, then end
    /lpoll                  the same through the target's hub, answered as JSON
                            (burst; only targets with a ``long_poll`` hook)
    /start?n=&interval_ms=  start the publisher (n messages)
    /xthread?n=&sleep_ms=   a plain OS thread produces n stamped messages

No monkey-patching anywhere: the cross-thread scenario needs real threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from urllib.parse import parse_qs

import gevent
from gevent import pywsgi

from bench import producer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

HEADERS = [("Content-Type", "application/octet-stream"), ("Cache-Control", "no-cache")]


class Stream(Protocol):
    """What a target's body must offer the shared app."""

    body: Iterable[bytes]

    def put(self, data: bytes) -> None: ...
    def finish(self, last: bytes | None = None) -> None: ...
    def put_threadsafe(self, data: bytes) -> None: ...
    def finish_threadsafe(self) -> None: ...
    def on_close(self, callback: Callable[[], None]) -> None: ...
    def spawn(self, fn: Callable[..., object], *args: Any) -> None: ...


class Adapter(Protocol):
    """A target: how it makes a stream.

    Optional hooks, found with ``getattr``: ``direct_stream(n, size)`` (a
    body for /stream that needs no producer), ``subscribe(stream)`` and
    ``broadcast(msg)`` (the target's own hub delivers to held streams and
    answers its long-polls), ``publish_polls(msg)`` (without ``broadcast``:
    the hub that answers long-polls only), ``long_poll(environ,
    start_response)`` (a JSON long-poll through that hub).
    """

    def new_stream(
        self, maxsize: int | None, chunk_size: int = 0, environ: WSGIEnvironment | None = None
    ) -> Stream:
        """A stream holding at most ``maxsize`` chunks of ``chunk_size`` (None: unbounded).

        ``environ`` is the request's, for bodies a middleware must know of.
        """
        ...


#: The routes that take query parameters.
_WITH_QUERY = frozenset({"/start", "/stream", "/xthread"})


def query(environ: WSGIEnvironment) -> dict[str, int]:
    """Parse the integer query parameters every route uses."""
    return {k: int(v[0]) for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


class App:
    """WSGI app over an :class:`Adapter`; keeps the subscribers of the publisher."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.streams: set[Stream] = set()
        self.polls: list[Stream] = []

    # -- publisher side -------------------------------------------------
    def publish(self, msg: bytes) -> None:
        broadcast = getattr(self.adapter, "broadcast", None)
        if broadcast is not None:  # the target's own hub delivers to held streams
            broadcast(msg)
        else:
            for s in list(self.streams):
                s.put(msg)
            publish_polls = getattr(self.adapter, "publish_polls", None)
            if publish_polls is not None:
                publish_polls(msg)
        waiting, self.polls = self.polls, []
        for s in waiting:
            s.finish(msg)

    def end(self) -> None:
        streams, self.streams = list(self.streams), set()
        for s in streams:
            s.finish()

    # -- WSGI side ------------------------------------------------------
    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        # Only the routes with parameters parse the query, as the Starlette
        # and Tornado targets do: /poll and /fanout pay no parsing.
        q = query(environ) if path in _WITH_QUERY else {}
        if path == "/start":
            interval = q.get("interval_ms", 100) / 1000.0
            gevent.spawn(
                producer.publish_loop, self.publish, self.end, q["n"], interval, gevent.sleep
            )
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
            return [b"ok\n"]
        direct = getattr(self.adapter, "direct_stream", None)
        if path == "/stream" and direct is not None:
            start_response("200 OK", HEADERS)
            return direct(q["n"], q["size"])  # type: ignore[no-any-return]
        if path == "/stream":
            s = self.adapter.new_stream(producer.QUEUE_CHUNKS, q["size"], environ)
            s.spawn(producer.produce, s.put, s.finish, q["n"], q["size"])
        elif path == "/fanout":
            s = self.adapter.new_stream(None, 0, environ)
            s.put(producer.HELLO)
            self.streams.add(s)  # end() still finishes it, whoever delivers
            subscribe = getattr(self.adapter, "subscribe", None)
            if subscribe is not None:
                subscribe(s)
            s.on_close(lambda: self.streams.discard(s))
        elif path == "/lpoll":
            long_poll = getattr(self.adapter, "long_poll", None)
            if long_poll is None:
                start_response("404 Not Found", [("Content-Length", "0")])
                return []
            return long_poll(environ, start_response)  # type: ignore[no-any-return]
        elif path == "/poll":
            s = self.adapter.new_stream(None, 0, environ)
            self.polls.append(s)
        elif path == "/xthread":
            s = self.adapter.new_stream(None, 0, environ)
            args = (s.put_threadsafe, s.finish_threadsafe, q["n"], q.get("sleep_ms", 0) / 1000.0)
            threading.Thread(target=producer.thread_producer, args=args, daemon=True).start()
        else:
            start_response("404 Not Found", [("Content-Length", "0")])
            return []
        start_response("200 OK", HEADERS)
        return s.body


class NoDelayHandler(pywsgi.WSGIHandler):
    """pywsgi handler that sets TCP_NODELAY, which pywsgi itself does not.

    Without it the separate final ``0\\r\\n\\r\\n`` write of a chunked
    response waits for the client's delayed ACK (~40 ms on Linux).
    """

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, *args, **kwargs)


def serve(
    app: Callable[..., Iterable[bytes]],
    announce: Callable[[int, dict[str, object]], None],
    handler_class: type | None = None,
    info: dict[str, object] | None = None,
) -> NoReturn:
    """Serve ``app`` with gevent.pywsgi on an ephemeral port until killed."""
    kwargs: dict[str, Any] = {"backlog": 4096, "log": None}
    if handler_class is not None:
        kwargs["handler_class"] = handler_class
    server = pywsgi.WSGIServer(("127.0.0.1", 0), app, **kwargs)
    server.start()
    details = {"server": "gevent.pywsgi", "handler": (handler_class or pywsgi.WSGIHandler).__name__}
    announce(server.server_port, {**details, **(info or {})})
    server.serve_forever()
    raise SystemExit(0)
