"""A gevent.pywsgi server tuned for detached responses: ``make_server`` and ``DetachHandler``.

Use it to serve any WSGI app under gevent.pywsgi with :class:`DetachMiddleware`
in front, which is what ``python -m wsgi_detach serve module:app`` does. It
differs from a plain ``gevent.pywsgi.WSGIServer`` in these ways (each
deliberate difference on the wire is listed, with its reason, in
docs/servers.md and pinned by tests/test_conformance.py):

* the handler puts the client socket in ``environ["wsgi_detach.socket"]``, so
  the middleware notices a client that leaves an idle stream within
  milliseconds (:mod:`wsgi_detach._watchers`); plain pywsgi exposes nothing;
* it sets ``TCP_NODELAY`` on every accepted connection: pywsgi writes a
  chunked response's final ``0\\r\\n\\r\\n`` separately, and without
  ``TCP_NODELAY`` that small write waits for the client's delayed ACK
  (~40 ms on Linux) -- each small response, each long-poll, pays it;
* HEAD gets the head a GET gets and no body; an aborted close-delimited
  response ends with a reset, not a FIN that would make it look complete;
* ``head_timeout``, ``body_timeout`` and ``max_connections`` bound what a
  slow or silent client can hold (plain pywsgi waits for ever); the timers
  run only while a request head or body is awaited, never while a response
  is sent or a detached stream waits for its producer;
* ``stop()`` drains the middleware first (:meth:`DetachMiddleware.drain`), so
  open streams get a farewell or a grace period instead of being killed.

:class:`DetachHandler` also replaces pywsgi's write path (same bytes on the
wire, fewer system calls; see "The write path" in its docstring) and, in
:mod:`wsgi_detach._speedups`, its request path (one switch turns that off).

When not to use it: under gunicorn (``-k gevent`` already exposes
``gunicorn.socket``; wrap the app in ``DetachMiddleware`` and call ``drain``
from a ``worker_exit`` hook), or with another server; and not in a process
that is not monkey-patched if your app uses blocking libraries (the
``serve`` command patches for you).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Final

from gevent import get_hub, getcurrent, pywsgi
from gevent import sleep as gevent_sleep
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.socket import socket as _GeventSocket

from ._body import Chunk, DetachedBody
from ._errors import RequestTimeout, Unavailable
from ._middleware import DIRECT_TYPES, DetachMiddleware, python_next
from ._speedups import SpeedUps
from ._wakeup import get_ident
from ._watchers import OWN_WATCH_KEY, SOCKET_KEY

try:
    import fcntl
    import termios
except ImportError:  # not a POSIX system: no send-queue look-up, the reset goes at once
    fcntl = termios = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

__all__ = ["DetachHandler", "DetachServer", "handler_class", "make_server"]

log = logging.getLogger("wsgi_detach")

#: After the drain, the least time the streams it has just cut get to abort
#: (each takes milliseconds) before every handler still running is ended.
_AFTER_CUT: Final = 0.2
#: How long pywsgi then waits for the handlers it ends before killing them.
_AFTER_DRAIN: Final = 1.0

#: Default ``head_timeout``: the longest a connection may take to send a whole
#: request head, and the longest it may stay idle between keep-alive
#: requests. A client sends a head in one go (milliseconds); a long-poll
#: client asks again at once. 20 s is under nginx's 60 s client_header_timeout
#: and far over gunicorn's 2 s keep-alive and uvicorn's 5 s, which close idle
#: connections that a chat's next message would reuse; docs/servers.md.
HEAD_TIMEOUT: Final = 20.0
#: Default ``body_timeout``: the longest one read of the request body may
#: wait. Frameworks read uploads in pieces (64 KiB for Werkzeug and Django),
#: so 60 s is a floor of about 1 KiB/s; nginx's client_body_timeout is 60 s.
BODY_TIMEOUT: Final = 60.0
#: A cap no server reaches (for ``max_connections=None``).
_NO_CAP: Final = float("inf")
#: File descriptors ``max_connections="auto"`` leaves for the app (files,
#: a broker connection, logs) below the process's limit.
_FD_RESERVE: Final = 64

#: The longest an aborted close-delimited response waits for its sent bytes
#: to be acknowledged before the reset (which would discard them), and how
#: often it looks.
_FLUSH_BEFORE_RESET: Final = 2.0
_FLUSH_POLL: Final = 0.005
#: SO_LINGER on, 0 seconds: close() sends a reset.
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
#: The ioctl for a TCP socket's send queue (Linux: SIOCOUTQ == TIOCOUTQ).
_OUTQ: Final = getattr(termios, "TIOCOUTQ", None) if termios is not None else None

#: The terminating chunk of a chunked response (RFC 9112 section 7.1).
_LAST_CHUNK: Final = b"0\r\n\r\n"
#: What ``next(iterator, _END)`` returns at the end of a body.
_END: Final = object()

class _Closing(ConnectionAbortedError):
    """Thrown into a handler waiting for a request head when the server ends the connection."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ECONNABORTED, why)


class _Cut(ConnectionResetError):
    """Thrown into a handler whose request outlived the server's grace (see ``end_request``)."""

    def __init__(self) -> None:
        super().__init__(
            errno.ECONNRESET, "the server is stopping and the request outlived its grace"
        )


class _TimedReader:
    """The request body's reads, each ended by the server's ``body_timeout``.

    Put under pywsgi's ``Input`` (which reads with ``read`` and ``readline``
    only), so that plain, chunked and ``Expect: 100-continue`` bodies, and
    pywsgi's discarding of an unread body after the response, are all timed.
    """

    __slots__ = ("_handler", "_rfile")

    def __init__(self, rfile: Any, handler: StockDetachHandler) -> None:
        self._rfile = rfile
        self._handler = handler

    def read(self, *args: Any) -> bytes:
        return self._handler.timed_read(self._rfile.read, *args)

    def readline(self, *args: Any) -> bytes:
        return self._handler.timed_read(self._rfile.readline, *args)


def _make_room(connections: set[StockDetachHandler]) -> None:
    """A newcomer took the place beyond ``max_connections``: close the connection that has
    waited longest for a request head, if any.

    Without it, with every place taken, new clients wait in the backlog,
    possibly for ``head_timeout``. A connection waiting for a head is idle
    (between keep-alive requests) or slow: closing it lets the newcomer in
    now, so silent or slow clients cannot lock others out by filling the
    places (nginx closes idle keep-alive connections when it runs out the
    same way). Connections with a request running (a response being sent, a
    stream waiting for its producer) are never chosen; when none waits, the
    newcomer keeps the extra place and gevent stops accepting until one frees.
    """
    waiting = [handler for handler in connections if handler._awaiting_head]
    if not waiting:
        return
    oldest = min(waiting, key=lambda handler: handler._waiting_since)
    level = logging.DEBUG if oldest._served else logging.INFO
    log.log(level, "closed the connection from %s to make room: the server is at "
            "max_connections and it had sent no complete request head", _peer(oldest))
    get_hub().loop.run_callback(oldest._throw, _Closing("the server is full"), True)


def _wait_timer(seconds: float) -> Any:
    """A libev timer that ends one wait of a connection, armed with ``again()`` for each wait.

    Each wait gets the whole ``seconds``, however long the earlier waits were:
    a keep-alive connection idle 15 s between each of its requests is as
    fresh at the tenth as at the first. That takes ``again()`` on a timer
    whose repeat is ``seconds`` (libev's ``ev_timer_again`` re-arms it to the
    repeat): ``start()`` after ``stop()`` would resume what was left of the
    previous wait, making the timeout a budget over all the connection's
    waits. ``again()`` costs what ``stop()``/``start()`` does, a third of a
    fresh timer per wait. ``update=True`` reads the clock first, so a loop
    that an app blocked does not shorten the wait.
    """
    return get_hub().loop.timer(seconds, seconds, ref=False)


def _unsent(sock: Any) -> int:
    """Bytes in ``sock``'s send queue not yet acknowledged (0 where the kernel cannot say)."""
    if _OUTQ is None:
        return 0
    queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", queued)[0])


def _peer(handler: Any) -> str:
    address = handler.client_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address or "-")


#: pywsgi's error answers' headers, for the 408 (RFC 9110 15.5.9).
_TIMEOUT_HEADERS: Final = (
    ("Content-Type", "text/plain"),
    ("Connection", "close"),
    ("Content-Length", "0"),
)


class StockDetachHandler(WSGIHandler):  # type: ignore[misc]  # gevent ships no type hints
    """``DetachHandler`` without the speed-ups (:mod:`wsgi_detach._speedups`): pywsgi's
    own request path, our write path and connection handling.

    It exposes its socket, sets ``TCP_NODELAY``, answers HEAD with the head
    alone, closes idle connections when the server stops, and writes leaner.

    The write path: the bytes a client receives are exactly those plain
    pywsgi sends for the same app (tests/test_conformance.py compares them;
    the deliberate differences -- HEAD, an aborted close-delimited response --
    are listed in docs/servers.md), in fewer system calls:

    * the status line and headers go out in the same ``send`` as the first
      chunk (pywsgi sends them separately);
    * a chunk and its chunked framing are one ``send`` of one buffer;
    * a chunk is handed to the kernel with one non-blocking ``send`` when it
      fits, instead of gevent's ``sendall``, which also asks the kernel for
      the buffer size (``getsockopt``) on every call; only what does not fit
      waits in ``sendall``;
    * when the body can say, without waiting, that the chunk it just yielded
      is its last (a :class:`DetachedBody` that is finished and drained, as a
      long-poll's is), the terminating ``0\\r\\n\\r\\n`` rides in the
      same ``send``. The iteration has then really ended before the
      terminator is sent: an error raised at that last step still aborts the
      connection without it.

    Nothing is held back: each chunk is sent before the next is asked for.

    The direct path: once the head and a first chunk of a chunked response
    are out, a :class:`DetachedBody` or :class:`~wsgi_detach.EventStream`
    (the app's, or the one inside ``DetachMiddleware``'s response; exactly
    those types, never a subclass, whose ``__next__`` may differ) gets this
    handler as its :class:`~wsgi_detach._body.Sink`. A ``put()`` from the
    connection's own OS thread that finds the handler parked on the empty
    body then schedules the hub's outbox (``_Outbox``) instead of
    waking the handler's greenlet: the outbox takes the chunk as ``next()``
    would, frames it and sends it with one non-blocking ``send``, and comes
    back for whatever stays buffered behind it -- a held stream's cost per
    message is then about the system call. Anything else (a put from another
    thread while no send is due, the end of the body, a timer) wakes the
    handler, which takes the path above. When the kernel takes part of a
    chunk, the handler is woken, keeps the rest and sends it before anything
    else; an unexpected error after a chunk was taken fails the body.
    """

    def handle(self) -> None:
        server = self.server
        if getattr(server, "nodelay", True):
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (a Unix socket): nothing to tune
                pass
        # The kernel socket under gevent's, for the non-blocking first try of
        # each send; only for gevent's plain socket class (a TLS socket's
        # ``_sock`` would bypass the encryption). The socket, not its bound
        # ``send``: that would be one more object per connection.
        self._raw_socket = self.socket._sock if type(self.socket) is _GeventSocket else None
        self._greenlet = getcurrent()
        self._ident = get_ident()  # the OS thread whose hub runs this connection
        self._outbox = _outbox()
        head_timeout = getattr(server, "head_timeout", None)
        if head_timeout:
            # One timer per connection, armed for each request head and
            # stopped once it is in: a libev timer, no greenlet, no Timeout.
            self._head_timer = _wait_timer(head_timeout)
        connections = getattr(server, "connections", None)
        if connections is not None:
            connections.add(self)
            if len(connections) > (getattr(server, "max_connections", None) or _NO_CAP):
                _make_room(connections)
        # pywsgi hands the app ``self.start_response``: bound once here, not
        # once per request -- the middleware keeps it for as long as a
        # detached response waits, and every object a waiting response holds
        # brings the garbage collector's next young collection closer.
        self.__dict__["start_response"] = self.start_response
        try:
            super().handle()
        finally:
            self.__dict__.pop("start_response", None)  # a cycle through this handler
            self._raw_socket = None  # pywsgi drops its socket references here too
            self._greenlet = None
            self._head_expired_callback = None  # a bound method of ours: a cycle otherwise
            for timer in (self._head_timer, self._body_timer):
                if timer is not None:
                    timer.close()
            self._head_timer = self._body_timer = None
            if connections is not None:
                connections.discard(self)

    # ------------------------------------------------------------------ between requests

    #: True while the connection waits for (the rest of) a request head: the
    #: one time ``stop()`` or ``head_timeout`` may close it without cutting
    #: anything.
    _awaiting_head = False
    _greenlet: Any = None
    _head_timer: Any = None
    _head_expired_callback: Any = None
    _body_timer: Any = None
    #: A request was served on this connection (a head timeout is then the
    #: ordinary end of an idle keep-alive connection, not a slow client).
    _served = False
    #: When the connection began to wait for the current request head.
    _waiting_since = 0.0
    #: ``body_timeout`` fired: every later read of the body fails at once.
    _body_timed_out = False
    #: The handler's own disconnect watch for the environ (the speed-ups
    #: have one); without it the middleware's watch goes to the watcher thread.
    _watch_here: Any = None

    def close_if_idle(self) -> None:
        """End the connection if it is waiting for a request (the server is stopping)."""
        # From the hub, so that the stopping greenlet keeps running; and only
        # if still waiting when the hub gets there.
        get_hub().loop.run_callback(self._throw, _Closing("the server is stopping"), True)

    def end_request(self) -> None:
        """End the connection whatever it is doing: the request outlived the server's grace.

        The request's greenlet gets a ``ConnectionResetError`` where it
        waits, as if the client had left: an app reading the body sees it
        there, and pywsgi closes the connection without an error page or a
        traceback, as it does for a departed client. pywsgi takes that error
        for the client's doing and would end the connection with a FIN, so
        an unfinished close-delimited response is set to end with a reset
        here, at once: the grace is over, no waiting for the send queue.
        """
        self._abandon_input()
        get_hub().loop.run_callback(self._cut)

    def _cut(self) -> None:
        """``end_request``'s work in the hub: decided on the state the handler is in now."""
        glet = self._greenlet
        if glet is None:
            return
        if self._aborted_visibly():
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except (AttributeError, OSError):  # the socket is already gone
                pass
        glet.throw(_Cut())

    def _abandon_input(self) -> None:
        """Do not read the rest of this request's body: the connection closes after it.

        pywsgi reads an unread body to its end after the response (to find
        the next request); a client that stopped sending would hold it there.
        """
        self.close_connection = True
        reader = getattr(self, "wsgi_input", None)
        if reader is not None and hasattr(reader, "_chunked_input_error"):
            reader._chunked_input_error = True  # pywsgi's "do not discard": state unknown

    def _throw(self, error: BaseException, only_if_idle: bool) -> None:
        glet = self._greenlet
        if glet is not None and (self._awaiting_head or not only_if_idle):
            glet.throw(error)

    def _head_expired(self) -> None:
        """``head_timeout`` passed while waiting for a request head (runs in the hub)."""
        if not self._awaiting_head or self._greenlet is None:
            return
        if self._served:  # nothing to report: an idle keep-alive connection ends
            log.debug("closed idle keep-alive connection from %s", _peer(self))
        else:
            log.info(
                "closed the connection from %s: no complete request head within %ss",
                _peer(self), self.server.head_timeout,
            )
        self._greenlet.throw(_Closing("no complete request head in time"))

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, _Closing):
            return None  # we ended the wait ourselves (and said so): no 400
        return super()._handle_client_error(ex)

    # ------------------------------------------------------------------ the request path

    def handle_one_request(self) -> Any:
        if getattr(self.server, "stopping", False):
            return None  # the server is stopping: no further request on this connection
        timer = self._head_timer
        if timer is not None:
            # The full head_timeout: see _wait_timer. One bound method for the
            # connection, not one per request (a request's garbage is what
            # makes the young collections under thousands of connections).
            expired = self._head_expired_callback
            if expired is None:
                expired = self._head_expired_callback = self._head_expired
            timer.again(expired, update=True)
        self._awaiting_head = True
        self._waiting_since = time.monotonic()
        try:
            return super().handle_one_request()
        finally:
            self._awaiting_head = False
            if timer is not None:
                timer.stop()

    def get_environ(self) -> dict[str, Any]:
        self._awaiting_head = False  # the head is in: from here on, the request runs
        timer = self._head_timer
        if timer is not None:
            timer.stop()
        self._served = True
        self._complete = False
        environ: dict[str, Any] = super().get_environ()
        environ[SOCKET_KEY] = self.socket
        own_watch = self._watch_here
        if own_watch is not None:
            environ[OWN_WATCH_KEY] = own_watch
        reader = environ["wsgi.input"]
        if (
            isinstance(reader, pywsgi.Input)
            # Without a length and not chunked, pywsgi's Input reads nothing.
            and (reader.content_length or reader.chunked_input)
            and getattr(self.server, "body_timeout", None)
        ):
            reader.rfile = _TimedReader(reader.rfile, self)
        return environ

    def timed_read(self, read: Callable[..., bytes], *args: Any) -> bytes:
        """``read(*args)`` on the request body, ended by ``body_timeout`` (see RequestTimeout)."""
        timeout = self.server.body_timeout
        if self._body_timed_out:
            raise RequestTimeout(f"the request body did not arrive within {timeout}s")
        timer = self._body_timer
        if timer is None:
            timer = self._body_timer = _wait_timer(timeout)
        timer.again(self._body_expired, getcurrent(), update=True)  # the full timeout, each read
        try:
            return read(*args)
        finally:
            timer.stop()

    def _body_expired(self, reader: Any) -> None:
        """``body_timeout`` passed in a read of the request body (runs in the hub)."""
        timeout = self.server.body_timeout
        log.info(
            "closing the connection from %s: a read of the request body waited %ss",
            _peer(self), timeout,
        )
        self._body_timed_out = True
        self._abandon_input()
        reader.throw(RequestTimeout(f"the request body did not arrive within {timeout}s"))

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        if isinstance(v, Unavailable) and getattr(self.server, "stopping", False):
            # The drain cut this stream at the grace: stop() says so in one
            # WARNING line for all of them; not a fault of the app, no traceback.
            self._send_error_response_if_possible(500)  # what follows as for any error
        elif not isinstance(v, RequestTimeout):
            super().handle_error(t, v, tb)
        else:
            # The client's doing, and logged where it happened: no traceback.
            # RFC 9110 15.5.9: 408, then the connection closes.
            self.close_connection = True
            if not self.response_length and not self.headers_sent:
                try:
                    self.start_response("408 Request Timeout", list(_TIMEOUT_HEADERS))
                    self.write(b"")
                except OSError:
                    pass
        if self._aborted_visibly():
            self._reset_when_flushed()

    # ------------------------------------------------------------------ aborting

    #: The response's body was sent whole (its iteration ended and the last
    #: bytes went out); set per request. An error after it (in ``close()``)
    #: leaves a complete response: it ends as plain pywsgi ends it.
    _complete = False

    def _aborted_visibly(self) -> bool:
        """Whether the response under way must end with a reset: close-delimited and unfinished."""
        return not self._complete and not self._awaiting_head and self._delimited_by_close()

    def _delimited_by_close(self) -> bool:
        """Whether the response under way is ended by closing the connection (and has begun).

        HTTP/1.0, or a response without chunking or a length: the client
        takes the connection's end for the body's end (RFC 9112 6.3), so an
        aborted one would look complete.
        """
        return bool(
            self.headers_sent
            and self.code is not None
            and self.code > 0  # negative: pywsgi's mark of a failed send, the client is gone
            and self.code not in (204, 304)
            and self.command != "HEAD"
            and not self.response_use_chunked
            and not self.connection_upgraded
            and not any(name.lower() == b"content-length" for name, _ in self.response_headers)
        )

    def _reset_when_flushed(self) -> None:
        """End the connection with a reset (RST), not a FIN, once what was sent has left.

        An aborted close-delimited response must not look complete (PEP 3333
        "Error Handling": the client should be able to tell). A reset tells
        it; but a reset also discards what is still in the socket's send
        queue, and ``fail()`` promises that what was put is delivered: so
        first wait (bounded, cooperatively) until the kernel holds no unsent
        or unacknowledged byte (``SIOCOUTQ``), then set ``SO_LINGER`` to 0,
        which makes pywsgi's close send the reset.
        """
        sock = self.socket
        if sock is None:
            return
        self.close_connection = True
        give_up = time.monotonic() + _FLUSH_BEFORE_RESET
        try:
            while _unsent(sock) and time.monotonic() < give_up:
                gevent_sleep(_FLUSH_POLL)
        except _Cut:  # the grace ran out meanwhile: the reset goes now (end_request set it)
            return
        except OSError:  # the kernel cannot say (not a TCP socket): reset without waiting
            pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:  # already gone (or not a socket that lingers): nothing to tell
            pass

    # ------------------------------------------------------------------ the write path

    # pywsgi's per-response attributes this class reads and writes.
    status: Any
    code: Any
    headers_sent: bool
    response_headers: list[tuple[bytes, bytes]]
    response_use_chunked: bool
    response_length: int
    provided_date: Any
    provided_content_length: Any
    connection_upgraded: bool
    close_connection: bool
    request_version: str
    result: Any
    _orig_status: str
    _raw_socket: Any = None
    #: The OS thread of the connection's hub: direct sends only from there.
    _ident = 0
    _outbox: _Outbox
    #: The rest of a chunk the direct path could not send: it goes out first.
    _pending_out: bytes | memoryview = b""
    #: The last send did not fit at once: no direct path until one does.
    _behind = False
    #: The largest chunk the direct path takes. A message is far smaller; a
    #: stream of large chunks is paced by the client, and measured slower
    #: through the direct path (16 KiB chunks: 124 k against 143 k chunks/s
    #: in the same run, ``python -m bench --only throughput``).
    direct_max = 8192

    def write(self, data: bytes) -> None:
        """PEP 3333's ``write()`` callable, and how each chunk of the body is sent."""
        # pywsgi sends nothing for any empty value, and its own 400 answer
        # passes a str body (''): never concatenate that with the head.
        self._send(data or b"", False)

    def process_result(self) -> None:
        if self.command == "HEAD":
            self._send_head_only()
            return
        # pywsgi's loop, with the terminator merged into the last chunk where
        # the body can tell, without waiting, that it has no more.
        result = self.result
        tells_end = callable(getattr(result, "_exhausted", None))
        # The body that may send for us while we wait on it (see "The direct
        # path"); armed once the head and a chunk are out.
        direct = _direct_body(result) if self._raw_socket is not None else None
        iterator: Iterator[bytes] = iter(result)
        in_place = python_next(iterator)
        ended = False
        try:
            data: Any = _next_or_end(iterator, in_place)
            while data is not _END:
                if not data:
                    if self._pending_out:  # the body came back for the rest of a direct send
                        self._sendall(b"")
                    data = _next_or_end(iterator, in_place)
                    continue
                if not tells_end or not result._exhausted():
                    self._send(data, False)
                    if direct is not None and direct._sink is not self:
                        direct = self._arm(direct)
                    data = _next_or_end(iterator, in_place)
                    continue
                try:
                    following = _next_or_end(iterator, in_place)  # does not wait: the body said so
                except BaseException:
                    self._send(data, False)  # yielded before the error: pywsgi sends it
                    raise
                ended = following is _END
                self._send(data, ended)
                data = following
        finally:
            if direct is not None and direct._sink is self:
                direct._sink = None  # and no cycle body -> handler -> result -> body
        if not ended:
            if self.status and not self.headers_sent:
                # An empty body: the headers (and the terminator) still go out.
                self._send(b"", True)
            elif self.response_use_chunked:
                self._sendall(_LAST_CHUNK)
        self._complete = True

    def _arm(self, body: DetachedBody) -> DetachedBody | None:
        """Let ``body`` send for us from now on, if this response allows it; the body or None."""
        if not (self.headers_sent and self.response_use_chunked and self.command != "HEAD"):
            return None
        body._sink = self
        return body

    def schedule(self, body: DetachedBody, size: int) -> bool:
        """:meth:`Sink.schedule <wsgi_detach._body.Sink.schedule>`: send for ``body`` from
        this connection's hub, if called in its thread, for a chunk of at most
        ``direct_max`` bytes."""
        if (
            size > self.direct_max
            or self._behind
            or get_ident() != self._ident
            or self._pending_out
        ):
            return False
        self._outbox.add(body)
        return True

    def _send_for(self, body: DetachedBody) -> bool:
        """In the hub, where the parked handler would have run: send what ``body`` holds.

        True when a chunk went out whole and more waits behind it (see
        ``DetachedBody._sink_take``): the caller must call again.
        """
        if body._sink is not self:
            return False  # the response ended meanwhile
        data = body._sink_take()
        if data is None:
            return False  # the handler was woken and sends it itself
        out = b"%x\r\n%s\r\n" % (len(data), data)
        raw = None if self._pending_out else self._raw_socket
        sent = 0
        if raw is not None:
            try:
                sent = raw.send(out)
            except OSError:  # full, or the client left: the handler's own send decides
                pass
        self.response_length += sent
        if sent < len(out):
            # The client is behind: the handler sends the rest, and the
            # chunks after it, until a send fits at once again (_sendall).
            self._behind = True
            self._pending_out = memoryview(out)[sent:] if sent else out
            body._sink_behind()
            return False
        return body._sink_scheduled

    def _send_head_only(self) -> None:
        # HEAD gets GET's head and no body (RFC 9110 9.3.2). pywsgi sends the
        # body anyway -- for an endless detached stream, forever. GET's head
        # goes out with the first non-empty chunk, or at the end of an empty
        # body: iterate as far, so that an error before it becomes GET's 500
        # (pywsgi's error path, through write(), which sends no body for
        # HEAD), then send the head alone and stop: run_application closes
        # the result, which ends the stream and frees its producer and
        # max_open slot.
        for data in self.result:
            if data or self.headers_sent:  # a write() call already sent the head
                break
        if self.status and not self.headers_sent:
            self._send(b"", False)

    def _send(self, data: bytes, last: bool) -> None:
        """Send ``data`` (the headers first if due; the terminator too if ``last``) in one go."""
        if data and self.code in (304, 204):
            raise self.ApplicationError(f"The {self.code} response must have no body")
        if self.command == "HEAD":
            # The head alone, never a body: not what a write() call passes,
            # not pywsgi's error page.
            if self.headers_sent:
                return
            data, last = b"", False
        if self.headers_sent:
            if not data and not last:
                return  # PEP 3333 allows empty writes; they send nothing
            head = b""
        else:
            if not self.status:
                raise self.ApplicationError("The application did not call start_response()")
            self.headers_sent = True
            self.finalize_headers()
            head = b"HTTP/1.1 %s\r\n%s\r\n" % (
                self.status,
                b"".join([b"%s: %s\r\n" % item for item in self.response_headers]),
            )
        if self.response_use_chunked:
            if data:
                out = b"%s%x\r\n%s\r\n%s" % (head, len(data), data, _LAST_CHUNK if last else b"")
            else:
                out = head + _LAST_CHUNK if last else head
        else:
            out = head + data if head else data
        if out:
            self._sendall(out)

    def _sendall(self, data: bytes | memoryview) -> None:
        # pywsgi's _sendall (same error bookkeeping), trying one plain
        # non-blocking send first.
        pending = self._pending_out
        if pending:  # the rest of a direct send goes first
            self._pending_out = b""
            data = pending if not data else bytes(pending) + data
        raw = self._raw_socket
        try:
            sent = 0
            if raw is not None:
                try:
                    sent = raw.send(data)
                except BlockingIOError:
                    pass
            # The direct path only while the client keeps up: a client that
            # is behind gets its chunks coalesced by the handler, as before.
            self._behind = sent < len(data)
            if sent < len(data):
                self.socket.sendall(memoryview(data)[sent:] if sent else data)
        except OSError as ex:
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)


class _Outbox:
    """The bodies whose handlers' direct sends are due, for one thread's hub.

    A loop callback sends for them, where each handler would have been
    switched to: a fan-out to thousands of streams schedules one callback,
    not one (and its arguments) per stream, which would also feed the
    garbage collector's young generation on every message. Like gevent's
    own run of callbacks, it stops after a switch interval (5 ms) and goes
    on in the next loop iteration, after the timers and I/O due meanwhile:
    a publisher that got ahead then puts its next messages into streams not
    yet served, and they go out coalesced, as when each handler was woken.
    """

    __slots__ = ("_bodies", "_loop", "_next", "_resume", "_scheduled")

    def __init__(self) -> None:
        self._loop = get_hub().loop
        self._bodies: list[DetachedBody] = []
        self._next = 0  # the first body in _bodies not served yet
        self._scheduled = False
        self._resume = self._loop.timer(0.0)  # the next iteration, after timers and I/O

    def add(self, body: DetachedBody) -> None:
        """Send for ``body`` soon (in the hub's own thread only)."""
        self._bodies.append(body)
        if not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self._send)

    def _send(self) -> None:
        bodies = self._bodies
        index = self._next
        until = time.perf_counter() + _SWITCH_INTERVAL
        paused = False
        try:
            while index < len(bodies):  # bodies may grow meanwhile: served in this run too
                body = bodies[index]
                index += 1
                sink = body._sink
                if isinstance(sink, StockDetachHandler):
                    try:
                        if sink._send_for(body):
                            # More waits behind what went out: served again after
                            # the streams already due, in this run or the next.
                            bodies.append(body)
                    except Exception as exc:
                        # The chunk taken may be lost: that stream is broken
                        # (its handler aborts the connection); never the others.
                        log.exception("sending a chunk for a held stream failed")
                        body._sink_failed(exc)
                if not index % 16 and index < len(bodies) and time.perf_counter() >= until:
                    self._next = index
                    self._resume.start(self._send)
                    paused = True
                    return
        finally:
            if not paused:
                # Whatever escaped, the bodies after it are served next turn and
                # later add() calls schedule again: never a stuck outbox.
                rest = bodies[index:]
                self._bodies = rest
                self._next = 0
                self._scheduled = bool(rest)
                if rest:
                    self._resume.start(self._send)


#: How long an outbox sends before letting timers and I/O run: gevent's own
#: limit for a run of loop callbacks.
_SWITCH_INTERVAL: Final = sys.getswitchinterval()
#: Each thread's outbox, made by its first connection (``get_ident()`` -> outbox).
_outboxes: dict[int, _Outbox] = {}


def _outbox() -> _Outbox:
    """The calling thread's outbox; its hub must be this thread's."""
    ident = get_ident()
    outbox = _outboxes.get(ident)
    if outbox is None or outbox._loop is not get_hub().loop:  # a new hub on a reused id
        outbox = _outboxes[ident] = _Outbox()
    return outbox


def _direct_body(result: object) -> DetachedBody | None:
    """The body a response iterates, when it is one whose chunks may be sent directly."""
    if type(result) in DIRECT_TYPES:  # exactly: see DIRECT_TYPES
        return result  # type: ignore[return-value]
    inner = getattr(result, "_direct_body", None)
    return None if inner is None else inner()


def _next_or_end(iterator: Iterator[bytes], in_place: bool) -> Any:
    """``next(iterator, _END)``; with ``in_place``, without nesting the interpreter loop.

    See :func:`~wsgi_detach._middleware.python_next` for why: a greenlet
    waiting in a body would keep the nested loop's C stack.
    """
    if not in_place:
        return next(iterator, _END)
    try:
        return iterator.__next__()
    except StopIteration:
        return _END


class DetachHandler(StockDetachHandler, SpeedUps):
    """The handler ``make_server`` uses: :class:`StockDetachHandler` with pywsgi's request
    path made faster (:class:`~wsgi_detach._speedups.SpeedUps`).

    Use it with a plain ``gevent.pywsgi.WSGIServer`` too
    (``WSGIServer(address, app, handler_class=DetachHandler)``).
    """


def handler_class(*, speedups: bool = True) -> type[StockDetachHandler]:
    """The handler class: :class:`DetachHandler`, or without the speed-ups the stock one.

    The one switch for :mod:`wsgi_detach._speedups`: with ``speedups=False``
    every request goes through pywsgi's own request path, to tell whether a
    difference on the wire comes from there.
    """
    return DetachHandler if speedups else StockDetachHandler


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
        head_timeout: float | None = HEAD_TIMEOUT,
        body_timeout: float | None = BODY_TIMEOUT,
        max_connections: int | str | None = "auto",
        **kwargs: Any,
    ) -> None:
        for name, value in (("head_timeout", head_timeout), ("body_timeout", body_timeout)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value!r}")
        if max_connections == "auto":
            max_connections = _auto_max_connections()
        elif max_connections is not None and (
            not isinstance(max_connections, int) or max_connections <= 0
        ):
            raise ValueError(
                f"max_connections must be a positive int, 'auto' or None, got {max_connections!r}"
            )
        # A pool, so that stop() can end the handlers; a full pool stops
        # accepting (new connections wait in the listen backlog). One place
        # more than the cap: a newcomer is let in to see whether an idle
        # connection can make room for it (see _make_room).
        kwargs.setdefault("spawn", Pool(None if max_connections is None else max_connections + 1))
        super().__init__(listener, middleware, **kwargs)
        self.middleware = middleware
        self.nodelay = nodelay
        self.farewell = farewell
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        #: Set once the first stop() has finished: a later call waits for it.
        self._stopped: Event | None = None
        #: The handlers of the open connections (see DetachHandler.handle).
        self.connections: set[DetachHandler] = set()

    @property
    def stopping(self) -> bool:
        """True from the first :meth:`stop` call on: connections end after their response."""
        return self._stopped is not None

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let responses end within ``timeout`` seconds, then stop.

        ``timeout`` (the grace) defaults to ``stop_timeout``. In order: the
        listener closes; connections waiting for their next request are
        closed at once; detached responses are drained
        (:meth:`DetachMiddleware.drain`: the farewell, then the grace);
        ordinary responses still running get what is left of the grace; any
        handler still running then is killed (after at least
        ``_AFTER_DRAIN`` seconds, time for the streams the drain cut to
        abort). Every connection closes after its current response.

        Call it from a greenlet (a ``gevent.signal_handler`` callback is
        one). ``serve_forever`` calls it again once it returns, and a second
        signal may too: every later call waits for the first to finish
        instead of cutting its grace short.
        """
        stopped = self._stopped
        if stopped is not None:
            stopped.wait()
            return
        stopped = self._stopped = Event()
        try:
            grace = self.stop_timeout if timeout is None else timeout
            until = time.monotonic() + grace
            self.close()
            for handler in list(self.connections):
                handler.close_if_idle()
            cut = self.middleware.drain(grace, self.farewell)
            if cut:
                log.warning("stopping: %d detached responses outlived the %ss grace", cut, grace)
            self.pool.join(timeout=max(until - time.monotonic(), _AFTER_CUT))
            if self.connections:
                log.warning(
                    "stopping: %d requests outlived the %ss grace; closing their connections",
                    len(self.connections), grace,
                )
                for handler in list(self.connections):
                    handler.end_request()
            super().stop(timeout=_AFTER_DRAIN)
        finally:
            stopped.set()


def _auto_max_connections() -> int | None:
    """The soft limit on open files, less a reserve; ``None`` where there is no limit."""
    try:
        import resource
    except ImportError:  # not on this platform: no cap
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - _FD_RESERVE, soft // 2, 1)


def make_server(
    app: WSGIApplication,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    nodelay: bool = True,
    grace: float = 10.0,
    farewell: Chunk | None = None,
    log: Any = "default",
    speedups: bool = True,
    head_timeout: float | None = HEAD_TIMEOUT,
    body_timeout: float | None = BODY_TIMEOUT,
    max_connections: int | str | None = "auto",
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
        head_timeout: seconds a connection may take to send a whole request
            head, or stay idle between requests; then it is closed (an INFO
            log line unless it had served a request). ``None``: no limit.
        body_timeout: seconds one read of ``environ["wsgi.input"]`` may wait;
            then it raises :class:`RequestTimeout` and the connection closes
            after a 408. ``None``: no limit.
        max_connections: most connections open at once; a newcomer beyond it
            closes the connection that has waited longest for a request head,
            or (none waiting) waits in the listen backlog. ``"auto"``:
            ``max(soft - 64, soft // 2, 1)`` for the soft open-files limit
            ``soft`` (none where there is no limit);
            ``None``: no cap.
        speedups: parse requests with :mod:`wsgi_detach._speedups` (``False``:
            pywsgi's own request path; the same bytes, slower -- to bisect a
            difference on the wire).

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
    server = DetachServer(
        (host, port),
        middleware,
        nodelay=nodelay,
        farewell=farewell,
        log=log,
        handler_class=handler_class(speedups=speedups),
        head_timeout=head_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
    )
    server.stop_timeout = grace
    return server
