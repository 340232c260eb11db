"""DetachedBody: a WSGI response body that any code can write to after the app returned.

Theory of operation
-------------------
The WSGI server is the *consumer*: it iterates the body (PEP 3333,
"Specification Details") and calls ``close()`` when the request ends, however
it ends. Any number of *producers* (greenlets, loop callbacks, plain OS
threads) call ``put()`` to append chunks and ``finish()`` or ``fail()`` to end
the response. Between them sits a buffer of bytes guarded by one real lock;
blocking on either side goes through :mod:`wsgi_detach._wakeup`, which is the
only place that knows whether a waiter is a greenlet or a thread.

The producer-side lifecycle is the table ``_PRODUCER_OPS`` below: for every
state, what each operation does. Anything that is not ``_OK`` or ``_NOOP`` is
the exception class to raise, with a message naming the state and the
operation (see :func:`_refuse`). The consumer side reads:

=========  ==========================================================
state      what ``next(body)`` does once the buffer is empty
=========  ==========================================================
open       waits (cooperatively under gevent, blocking on a thread);
           yields a heartbeat, or expires the body on a timeout
finished   ``StopIteration``
failed     raises the producer's exception once (a 500 response
           instead, if nothing was sent and the body owns
           ``start_response``), then ``StopIteration``
expired    raises ``BodyTimeout`` once (or the ``timeout_chunk`` was
           queued and is yielded), then ``StopIteration``
closed     ``StopIteration``; the buffer was discarded
=========  ==========================================================

Chunks put before ``finish()``/``fail()`` are always delivered before the end
is reported: a failure must not hide data the client could still use, and must
never look like a clean end (PEP 3333 "Error Handling": raising out of the
iterator makes the server abort the connection, so an HTTP/1.1 chunked client
sees no terminating chunk).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Final, Protocol, Union

import gevent

from ._budget import ByteBudget
from ._errors import (
    BodyAborted,
    BodyEnded,
    BodyTimeout,
    BufferFull,
    ProducerStopped,
    Unavailable,
    UsageError,
)
from ._wakeup import (
    CannotBlockHere,
    RealThread,
    Waiter,
    allocate_lock,
    make_waiter,
    reuse_waiter,
    spawn_greenlet,
    start_real_thread,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

__all__ = [
    "REGISTER_KEY",
    "BodyOptions",
    "Chunk",
    "DetachedBody",
    "Registrar",
    "register",
]

#: Where :class:`~wsgi_detach.DetachMiddleware` puts its :class:`Registrar` for
#: the request: every body made from the environ registers through it as it
#: is made, and takes the middleware's options from it.
REGISTER_KEY: Final = "wsgi_detach.detach"


class Registrar(Protocol):
    """What ``environ[REGISTER_KEY]`` holds under :class:`~wsgi_detach.DetachMiddleware`.

    ``options``: the middleware's :class:`BodyOptions` (its defaults and its
    shared ``budget``), for bodies an app builds itself from the environ (an
    ``EventStream``), so that they get what ``detach()`` gives.

    Calling it with a new body registers the body with the request: the
    middleware then counts it (``max_open``, ``stats()``), watches it, drains
    it and closes it with the request, whatever the app does with it
    afterwards. It raises :class:`~wsgi_detach.Unavailable` when full or
    draining (and :class:`~wsgi_detach.UsageError` once the app returned);
    :func:`register` then closes the body.
    """

    @property
    def options(self) -> BodyOptions: ...

    def __call__(self, body: DetachedBody) -> None: ...

    def release_closed(self) -> None:
        """Told when a body it registered closes (after the body's ``on_close`` callbacks)."""


class Sink(Protocol):
    """How a server's consumer sends for itself while it is parked on an empty body.

    A consumer iterating a body (our pywsgi handler) may set the body's
    ``_sink`` once the response's head and a first chunk are out. Then a
    ``put()`` that finds the consumer parked does not wake it: it calls
    :meth:`schedule`, and when the consumer's greenlet would have run, the
    sink runs instead -- in the hub, without a switch -- takes the chunk
    with :meth:`DetachedBody._sink_take` (coalesced exactly as ``next()``
    would) and sends it. Ends, failures, timeouts and heartbeats still wake
    the consumer, which stays registered as parked meanwhile; so does a
    chunk the sink could not send whole (:meth:`DetachedBody._sink_behind`).
    A chunk it took and then failed to send at all fails the body
    (:meth:`DetachedBody._sink_failed`): a response that lost a chunk must
    never end cleanly.
    """

    def schedule(self, body: DetachedBody, size: int) -> bool:
        """Arrange to take and send ``body``'s buffered chunks soon (the first is ``size``
        bytes); False if not from this caller, or not for this chunk.

        Called under the body's lock: it must only schedule, never send.
        """


log = logging.getLogger("wsgi_detach")

#: What ``put()`` accepts. ``StopIteration`` (the class) is the
#: end-of-stream marker of Bottle's queue-as-body pattern and means ``finish()``.
Chunk = Union[bytes, bytearray, memoryview, str]

OPEN: Final = "open"
FINISHED: Final = "finished"
FAILED: Final = "failed"
EXPIRED: Final = "expired"
CLOSED: Final = "closed"


class _Op:
    """A verdict in the lifecycle table that is not an exception."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_OK = _Op("ok")
_NOOP = _Op("no-op")

# The producer-side lifecycle. Rows: the state; columns: the operation.
#   finish   -- finish() with no last chunk: ending twice is harmless, and a
#               producer's ``with body:`` exits after the client left must not
#               raise, so it is a no-op in every ended state.
#   write    -- put()/write()/finish(chunk)/start(): data would be lost, so
#               refuse loudly; whose fault it is picks the exception.
#   fail     -- fail(exc): the first end wins; a later failure has nowhere to go.
_PRODUCER_OPS: Final[dict[str, dict[str, object]]] = {
    #            write        finish  fail
    OPEN: {"write": _OK, "finish": _OK, "fail": _OK},
    FINISHED: {"write": BodyEnded, "finish": _NOOP, "fail": _NOOP},
    FAILED: {"write": BodyEnded, "finish": _NOOP, "fail": _NOOP},
    EXPIRED: {"write": BodyAborted, "finish": _NOOP, "fail": _NOOP},
    CLOSED: {"write": BodyAborted, "finish": _NOOP, "fail": _NOOP},
}

_WHY: Final[dict[str, str]] = {
    FINISHED: "you already called finish()",
    FAILED: "you already called fail()",
    EXPIRED: "it timed out (idle_timeout or deadline) before the producer ended it",
    CLOSED: "the server closed it (the client disconnected or the request ended)",
}


def _refuse(body: DetachedBody, op: str, what: str) -> object:
    """Look up ``(body's state, op)``; return the verdict or raise the error it names."""
    state = body._state
    verdict = _PRODUCER_OPS[state][op]
    if isinstance(verdict, type):
        raise verdict(f"cannot {what}: the body is {state} because {_WHY[state]}", state, body)
    return verdict


_DEFAULT_COALESCE: Final = 64 * 1024
#: A year: longer is "no limit", which None says; inf and values past what a
#: lock or timer can wait for would fail later, inside the server.
_LONGEST_TIMEOUT: Final = 365 * 24 * 3600.0
_ERROR_HEADERS: Final = [("Content-Type", "text/plain; charset=utf-8")]


class DetachedBody:
    """A WSGI body iterable that producers fill later, from any greenlet or thread.

    Return it from a WSGI app and hand it to whatever produces the data::

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = DetachedBody(idle_timeout=30)
            body.spawn(ticker, body)          # or a callback, or a thread
            return body

        def ticker(body):
            for i in range(3):
                body.put(f"tick {i}\\n")
                gevent.sleep(1)
            body.finish()

    Producer side (any greenlet, loop callback or OS thread): :meth:`put`
    (alias :meth:`write`), :meth:`put_nowait`, :meth:`finish`, :meth:`fail`,
    :meth:`start`. Consumer side (the server): iteration and :meth:`close`.

    The body has no ``__len__`` on purpose: servers trust ``len()`` to derive
    Content-Length (PEP 3333 "Handling the Content-Length Header"), and a
    queue's length is not the length of the response.

    Args:
        idle_timeout: seconds the producer may stay silent (no ``put``) before
            iteration raises :class:`BodyTimeout`. Heartbeats do not count as
            activity. ``None``: no limit.
        deadline: seconds from construction after which the body expires,
            however active. ``None``: no limit.
        heartbeat: when nothing was yielded for this many seconds, yield
            ``heartbeat_chunk``. Keeps proxies from closing an idle stream, and
            is how a server that exposes no socket notices a departed client
            (its next write fails). ``None``: off.
        heartbeat_chunk: what a heartbeat sends; must be non-empty, since
            servers skip empty writes and an empty heartbeat detects nothing.
        max_buffer: bytes that may wait unsent. At the cap, ``put()`` blocks
            until the consumer drains (backpressure) and ``put_nowait()``
            raises :class:`BufferFull`. A single chunk larger than the cap is
            accepted when the buffer is empty. ``None``: unbounded.
        encoding: how ``str`` chunks are encoded.
        start_response: the server's ``start_response``, if the producer is to
            decide the status and headers later with :meth:`start`. They are
            handed to the server inside the first iteration, which PEP 3333
            allows ("The start_response() Callable"). A failure before any
            data then becomes a 500 response, a timeout a 504.
        timeout_chunk: if given, a timeout ends the body *cleanly* with this
            last chunk (may be ``b""``) instead of raising :class:`BodyTimeout`;
            what a long-poll wants when nothing happened.
        coalesce: when the client is behind and several chunks wait, join up
            to this many bytes into one yield, so the server makes one write
            instead of many. Never delays a chunk: it only merges chunks that
            are already waiting. ``0`` keeps every chunk separate.
        budget: a :class:`ByteBudget` shared with other bodies: a ``put()``
            that would take their total buffered bytes over its limit raises
            :class:`BufferFull` at once, even where ``max_buffer`` would block
            (see :mod:`wsgi_detach._budget` for why). ``None``: no shared cap.
        options: all of the above but ``start_response`` as one
            :class:`BodyOptions`, already checked; then pass none of them as
            keywords.
    """

    # Slots, not an instance dict: one body per open response, for as long as
    # it lasts. A subclass that declares no __slots__ of its own gets a dict
    # as usual, so attributes of its own just work.
    __slots__ = (
        "__weakref__",
        "_budget",
        "_buffered",
        "_callbacks",
        "_coalesce",
        "_consumer",
        "_deadline",
        "_deadline_at",
        "_encoding",
        "_end_error",
        "_first",
        "_flush_due",
        "_head_headers",
        "_head_sent",
        "_head_shared",
        "_head_status",
        "_heartbeat",
        "_heartbeat_chunk",
        "_idle_timeout",
        "_last_put",
        "_last_yield",
        "_lock",
        "_max_buffer",
        "_more",
        "_needs_head",
        "_outcome",
        "_producers",
        "_registrar",
        "_sent_data",
        "_sink",
        "_sink_scheduled",
        "_start_response",
        "_state",
        "_timed",
        "_timeout_chunk",
    )

    def __init__(
        self,
        *,
        idle_timeout: float | None = None,
        deadline: float | None = None,
        heartbeat: float | None = None,
        heartbeat_chunk: bytes = b"\n",
        max_buffer: int | None = None,
        encoding: str = "utf-8",
        start_response: StartResponse | None = None,
        timeout_chunk: Chunk | None = None,
        coalesce: int = _DEFAULT_COALESCE,
        budget: ByteBudget | None = None,
        options: BodyOptions | None = None,
    ) -> None:
        if options is None:
            # Checked here field by field, with the same checks BodyOptions
            # makes, rather than through a BodyOptions: a body built with
            # keywords (one per long-poll) costs no extra object.
            self._idle_timeout = _positive_or_none("idle_timeout", idle_timeout)
            self._deadline = _positive_or_none("deadline", deadline)
            self._heartbeat = _positive_or_none("heartbeat", heartbeat)
            self._heartbeat_chunk = _check_heartbeat_chunk(heartbeat_chunk)
            self._max_buffer = _check_max_buffer(max_buffer)
            self._encoding = _check_encoding(encoding)
            self._timeout_chunk = (
                None if timeout_chunk is None else _to_bytes(timeout_chunk, encoding)
            )
            self._coalesce = _check_coalesce(coalesce)
            self._budget = _check_budget(budget)
        else:
            if not isinstance(options, BodyOptions):
                raise TypeError(f"options must be a BodyOptions, got {type(options).__name__}")
            if not (
                idle_timeout is None
                and deadline is None
                and heartbeat is None
                and heartbeat_chunk == b"\n"
                and max_buffer is None
                and encoding == "utf-8"
                and timeout_chunk is None
                and coalesce == _DEFAULT_COALESCE
                and budget is None
            ):
                raise TypeError(
                    "pass the body's options either as keywords or as options=, not both "
                    "(use options.merge({...}) to change some)"
                )
            self._idle_timeout = options.idle_timeout
            self._deadline = options.deadline
            self._heartbeat = options.heartbeat
            self._heartbeat_chunk = options.heartbeat_chunk
            self._max_buffer = options.max_buffer
            self._encoding = options.encoding
            self._timeout_chunk = options.timeout_chunk  # type: ignore[assignment]
            self._coalesce = options.coalesce
            self._budget = options.budget
        if start_response is not None and not callable(start_response):
            raise TypeError(f"start_response must be callable, got {start_response!r}")
        self._start_response = start_response

        # Whether the consumer has a clock to watch while it waits.
        self._timed = (
            self._idle_timeout is not None
            or self._deadline is not None
            or self._heartbeat is not None
        )
        self._lock = allocate_lock()
        self._state: str = OPEN
        # The buffer: the oldest chunk waiting, then the ones after it. Most
        # bodies hold one chunk at a time (a message in, a message out), so
        # the deque is made only when a second one waits: an empty deque
        # costs 760 bytes (CPython allocates a block of 64 slots up front),
        # more than the rest of an idle body together.
        self._first: bytes | None = None  # None: nothing buffered
        self._more: deque[bytes] | None = None  # after _first; made when first needed
        self._buffered = 0  # bytes in _first and _more; 0 exactly when they are empty
        self._end_error: BaseException | None = None  # raised once the buffer drains
        self._consumer: Waiter | None = None
        # Blocked on max_buffer; replaced, never changed in place, so that the
        # usual "nobody" is a shared empty tuple rather than a list per body.
        self._producers: tuple[Waiter, ...] = ()
        # on_close callbacks: a shared empty tuple until the first one (most
        # bodies get none of the app's), None once closed.
        self._callbacks: list[Callable[[], object]] | tuple[()] | None = ()
        # The request that registered the body, told when it closes, after
        # the callbacks: its ``release_closed()``, not a bound method per body.
        self._registrar: Registrar | None = None
        # From start(); two slots, not a tuple: a waiting long-poll holds them.
        self._head_status = ""
        self._head_headers: list[tuple[str, str]] | None = None
        self._head_shared = False  # _head_headers is not the body's own: see _start()
        self._head_sent = start_response is None  # the app called start_response itself
        self._needs_head = start_response is not None  # owned, and start() not called yet
        self._sent_data = False  # a non-empty chunk went to the server
        # The server's direct path while its consumer is parked (see Sink).
        self._sink: Sink | None = None
        self._sink_scheduled = False  # the sink will send what is buffered
        self._flush_due = False  # the sink left part of a chunk: the consumer must come back
        self._outcome: str | None = None
        now = time.monotonic()
        self._deadline_at = None if self._deadline is None else now + self._deadline
        self._last_put = now
        self._last_yield = now

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> str:
        """``"open"``, ``"finished"``, ``"failed"``, ``"expired"`` or ``"closed"``."""
        return self._state

    @property
    def closed(self) -> bool:
        """True once the server called :meth:`close`."""
        return self._state == CLOSED

    @property
    def buffered(self) -> int:
        """Bytes put but not yet handed to the server."""
        return self._buffered

    @property
    def outcome(self) -> str | None:
        """How the response ended, known once closed; ``None`` before.

        ``"finished"``: the producer finished and every byte went to the
        server. ``"failed"``: the producer called ``fail()``. ``"timed_out"``:
        ``idle_timeout`` or ``deadline`` expired. ``"disconnected"``: the
        server closed the body before the producer ended it, or with data
        still undelivered; almost always a client that left.
        """
        return self._outcome

    def __repr__(self) -> str:
        return (
            f"<DetachedBody {self._state}, {self._chunks()} chunks / "
            f"{self._buffered} bytes buffered>"
        )

    # ------------------------------------------------------------------ producer side

    def start(self, status: str, headers: list[tuple[str, str]]) -> None:
        """Decide the status and headers of a body created with ``start_response``.

        Callable from any greenlet or thread, once, before the first
        :meth:`put`. The server receives them inside its first iteration.

        Raises:
            UsageError: the body was made without ``start_response``, or
                ``start()`` was already called.
            BodyClosed: the body already ended.
        """
        if not isinstance(status, str) or not isinstance(headers, list):
            raise TypeError(
                f"start() takes a status str and a list of (name, value) tuples, "
                f"got {type(status).__name__} and {type(headers).__name__}"
            )
        self._start(status, list(headers), shared=False)

    def _start(self, status: str, headers: list[tuple[str, str]], shared: bool) -> None:
        """:meth:`start` with checked arguments. ``shared``: ``headers`` is a list
        nobody changes (a module's constant) that other bodies use too: kept as
        it is while the body waits, and copied only as it goes to the server
        (which may add to it, as wsgiref does), so that a waiting body holds
        no list of its own."""
        with self._lock:
            _refuse(self, "write", "start()")
            if self._start_response is None:
                raise UsageError(
                    "start() needs a body created with DetachedBody(start_response=...); "
                    "this app calls start_response itself"
                )
            if self._head_headers is not None:
                raise UsageError("start() was already called on this body")
            self._head_status = status
            self._head_headers = headers
            self._head_shared = shared
            self._needs_head = False
            self._last_put = time.monotonic()
            # The consumer may be waiting with no heartbeat due (none can be
            # sent before the head): let it look again.
            consumer = self._take_consumer_locked()
        if consumer is not None:
            consumer.wake()

    def put(self, chunk: Chunk | type[StopIteration], timeout: float | None = None) -> None:
        """Append a chunk for the server to send; ``put(StopIteration)`` is :meth:`finish`.

        Accepts ``bytes``, ``bytearray``, ``memoryview`` (copied, so the caller
        may reuse its buffer) and ``str`` (encoded with ``encoding``). An empty
        chunk sends nothing but counts as activity for ``idle_timeout``.

        With ``max_buffer`` set and reached, blocks the calling greenlet or
        thread until the server drained enough (backpressure), until
        ``timeout`` seconds pass (:class:`BufferFull`), or until the body is
        closed (:class:`BodyAborted`).

        Raises:
            TypeError: the chunk is of another type; the body stays usable.
            BodyEnded: you already called ``finish()`` or ``fail()``.
            BodyAborted: the server closed the body, or it timed out.
            BufferFull: ``timeout`` passed, or the cap is reached and the
                caller is the gevent hub itself, where it must not block.
            UsageError: the body owns ``start_response`` and ``start()`` was
                not called yet.
        """
        if type(chunk) is not bytes:
            if chunk is StopIteration:
                self.finish()
                return
            chunk = self._coerce(chunk)
        self._put(chunk, True, timeout)

    write = put

    def put_nowait(self, chunk: Chunk | type[StopIteration]) -> None:
        """Like :meth:`put`, but raise :class:`BufferFull` instead of waiting for room."""
        if type(chunk) is not bytes:
            if chunk is StopIteration:
                self.finish()
                return
            chunk = self._coerce(chunk)
        self._put(chunk, False, None)

    def finish(self, chunk: Chunk | None = None) -> None:
        """End the response cleanly, optionally with a last chunk.

        Chunks already put are still delivered; then iteration stops. Calling
        it again, or after the body was closed or failed, does nothing (so a
        producer's cleanup path may always call it) -- unless it carries a
        chunk, which could not be delivered and therefore raises.

        The last chunk bypasses ``max_buffer``: finishing never blocks.
        """
        data = None if chunk is None else self._coerce(chunk)
        with self._lock:
            if data is not None:
                _refuse(self, "write", "finish() with a last chunk")
            elif _refuse(self, "finish", "finish()") is _NOOP:
                return
            if self._needs_head:
                # Ending a response that never got a status would leave the
                # server with nothing valid to send: make it a 500 rather than
                # a hang, and tell the caller.
                error = UsageError(
                    "finish() before start(): this body owns start_response, so call "
                    "body.start(status, headers) first"
                )
                self._end_locked(FAILED, error)
                consumer = self._take_consumer_locked()
            else:
                error = None
                if data:
                    self._append_locked(data)
                self._end_locked(FINISHED, None)
                consumer = self._take_consumer_locked()
        if consumer is not None:
            consumer.wake()
        if error is not None:
            raise error

    def fail(self, exc: BaseException | type[BaseException]) -> None:
        """End the response as broken: deliver what was put, then raise ``exc`` in the server.

        The server then aborts the connection, so the client sees a truncated
        response, never a clean end (over chunked HTTP/1.1: no terminating
        chunk). If nothing was sent yet and the body owns ``start_response``,
        the client gets a 500 instead. A no-op once the body ended.
        """
        if isinstance(exc, type) and issubclass(exc, BaseException):
            exc = exc()
        if not isinstance(exc, BaseException):
            raise TypeError(f"fail() takes an exception, got {type(exc).__name__}")
        if not isinstance(exc, Exception):
            # GreenletExit, gevent.Timeout, KeyboardInterrupt... raised inside a
            # server they are not request errors: waitress, for one, then never
            # ends the connection. The server gets an ordinary exception.
            stopped = ProducerStopped(
                f"the producer was stopped by {type(exc).__name__} before it ended the body"
            )
            stopped.__cause__ = exc
            exc = stopped
        with self._lock:
            ignored = _refuse(self, "fail", "fail()") is _NOOP
            if not ignored:
                self._end_locked(FAILED, exc)
                consumer = self._take_consumer_locked()
            state = self._state
        if ignored:  # logged outside the lock: a handler may yield to other greenlets
            log.debug("fail(%r) on a %s body ignored", exc, state)
            return
        if consumer is not None:
            consumer.wake()

    def on_close(self, callback: Callable[[], object]) -> Callable[[], object]:
        """Run ``callback()`` once when the server closes the body.

        That is at the end of every request: finished, failed, timed out or
        abandoned by the client; the usual place to unsubscribe a producer.
        Registered after close, it runs at once. An exception from a callback
        is logged to the ``wsgi_detach`` logger and does not stop the others.
        Returns ``callback``, so it works as a decorator.
        """
        if not callable(callback):
            raise TypeError(f"on_close() takes a callable, got {callback!r}")
        with self._lock:
            callbacks = self._callbacks
            if callbacks is not None:
                if callbacks:
                    callbacks.append(callback)
                else:
                    self._callbacks = [callback]
                return callback
        _run_callback(callback)
        return callback

    def _tell_on_close(self, registrar: Registrar) -> None:
        """Call ``registrar.release_closed()`` once when the body closes, after its
        ``on_close`` callbacks (at once if it is closed): the middleware's ``on_close``,
        held as the request itself."""
        with self._lock:
            if self._callbacks is not None and self._registrar is None:
                self._registrar = registrar
                return
            closed = self._callbacks is None
        if closed:
            _run_callback(registrar.release_closed)
        else:  # registered with a second request: a callback of its own
            self.on_close(registrar.release_closed)

    def __enter__(self) -> DetachedBody:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Finish on a normal exit, fail on an exception: a dead producer never hangs a request.

        A :class:`BodyAborted` raised by this very body (the client left or it
        timed out) is the ordinary end of a producer and is swallowed.
        """
        if exc is None:
            self.finish()
            return False
        if isinstance(exc, BodyAborted) and exc.body is self:
            log.debug("producer stopped: %s", exc)
            return True
        self.fail(exc)
        return False

    def spawn(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> gevent.Greenlet:
        """Run ``fn(*args, **kwargs)`` in a new greenlet tied to this body.

        When ``fn`` returns the body finishes; when it raises, the body fails
        (see :meth:`__exit__`). Called from a greenlet (gevent servers), the new
        greenlet runs in the same hub. Called from a plain thread (a threaded
        server's request thread), it runs in wsgi_detach's producer hub thread
        instead: a greenlet left on the request thread would freeze the moment
        the request ended, and never learn that the client left.
        """
        return spawn_greenlet(self._run_tied, fn, args, kwargs)

    def spawn_thread(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> RealThread:
        """Run ``fn(*args, **kwargs)`` in a new OS thread tied to this body.

        Like :meth:`spawn`, for blocking code that must not run in a greenlet
        (a C library, a blocking client). Always a real thread, even after
        ``gevent.monkey.patch_all()`` (where ``threading.Thread`` is a
        greenlet that would block the hub). The body is safe to write from it.
        Returns a handle with ``join(timeout)`` and ``is_alive()``.
        """
        return start_real_thread(self._run_tied, fn, args, kwargs, name="wsgi_detach-producer")

    def _run_tied(self, fn: Callable[..., object], args: Any, kwargs: Any) -> object:
        with self:
            return fn(*args, **kwargs)
        return None  # only reached when __exit__ swallowed BodyAborted

    # ------------------------------------------------------------------ consumer side

    def __iter__(self) -> DetachedBody:
        return self

    def __next__(self) -> bytes:
        """The server's side: the next non-empty chunk, blocking until there is one."""
        if self._first is None or self._flush_due:
            # Nothing waiting (a held stream between messages), or the rest of
            # a chunk the sink began must go first: the slow path looks again
            # under the lock, so reading these without it is safe.
            return self._next_slow()
        # Fast path: data waiting and no producer blocked on the cap.
        with self._lock:
            chunk: bytes | None = self._first  # still there? another thread may have closed us
            if (
                chunk is not None
                and not self._producers
                and (self._deadline_at is None or time.monotonic() < self._deadline_at)
            ):
                if self._more:
                    chunk = self._pop_locked()
                else:  # the one chunk waiting: the usual case
                    self._first = None
                    self._buffered -= len(chunk)
                    if self._budget is not None:
                        self._budget.give(len(chunk))
            else:
                chunk = None
        if chunk is None:
            return self._next_slow()
        if self._head_sent and self._heartbeat is None:
            self._sent_data = True
            return chunk
        return self._emit(chunk)

    def _exhausted(self) -> bool:
        """True when the next ``next()`` raises StopIteration without waiting.

        For :class:`~wsgi_detach.DetachHandler`, which then sends the
        terminating chunk with the chunk it has in hand (one write per
        long-poll instead of two). A hint only: the handler still calls
        ``next()`` and trusts what it does.
        """
        return (
            self._state is not OPEN
            and self._first is None
            and self._end_error is None
            and not self._flush_due
        )

    def _next_slow(self) -> bytes:
        while True:
            to_wake: tuple[Waiter, ...] = ()
            waiter: Waiter | None = None
            chunk: bytes | None = None
            error: BaseException | None = None
            with self._lock:
                if self._flush_due:
                    # The sink sent part of a chunk: the server sends the rest
                    # before anything else (see Sink). The empty chunk brings
                    # it back to do so.
                    self._flush_due = False
                    return b""
                if self._first is not None and self._deadline_passed_locked():
                    # A hard cap holds even while data waits for a slow client:
                    # the unsent rest is dropped, so the end must not look clean.
                    self._discard_locked()
                    self._end_locked(
                        EXPIRED,
                        BodyTimeout(
                            f"response timed out: deadline={self._deadline}s passed with "
                            f"data still waiting for the client"
                        ),
                    )
                    continue
                if self._first is not None:
                    chunk = self._pop_locked()
                    if self._producers:
                        to_wake, self._producers = self._producers, ()
                        # They waited for the client, not the other way round:
                        # that is not producer silence (idle_timeout).
                        self._last_put = time.monotonic()
                elif self._end_error is not None:
                    error, self._end_error = self._end_error, None
                elif self._state != OPEN:
                    raise StopIteration
                else:
                    wait_for = self._due_locked(time.monotonic()) if self._timed else None
                    if wait_for is None or wait_for > 0:
                        if self._consumer is not None:
                            raise UsageError("two consumers iterate the same DetachedBody")
                        waiter = self._consumer = reuse_waiter()
                    else:
                        chunk = self._on_due_locked()
                        if chunk is None:
                            continue
            for producer in to_wake:
                producer.wake()
            if chunk is not None:
                return self._emit(chunk)
            if error is not None:
                return self._raise_end(error)
            assert waiter is not None
            woken = False
            try:
                woken = waiter.wait(wait_for)
            finally:
                # Whoever woke us took us off the body already (under the lock);
                # still on it after a wake-up: a late one meant for an earlier
                # wait of the reused waiter -- look again all the same.
                if not woken or self._consumer is waiter:
                    with self._lock:
                        if self._consumer is waiter:
                            self._consumer = None

    def close(self) -> None:
        """PEP 3333's close(): the request is over, whatever its outcome.

        Idempotent. Discards what is still buffered, wakes a blocked consumer
        and every blocked producer (they get :class:`BodyAborted`), then runs
        the ``on_close`` callbacks, each exactly once.
        """
        if self._state == CLOSED:
            # Closed already (the server's close() and the middleware's end of
            # the request both close every body); a body never leaves CLOSED,
            # so this needs no lock.
            return
        with self._lock:
            if self._state == CLOSED:
                return
            self._outcome = self._outcome_locked()
            self._state = CLOSED
            self._sink = None
            self._discard_locked()
            self._end_error = None
            waiters, self._producers = self._producers, ()
            consumer = self._take_consumer_locked()
            callbacks, self._callbacks = self._callbacks or (), None
            registrar, self._registrar = self._registrar, None
        for waiter in waiters:
            waiter.wake()
        if consumer is not None:
            consumer.wake()
        for callback in callbacks:
            _run_callback(callback)
        if registrar is not None:
            # Last: a drain waits for the slot, so it also waits for the
            # app's callbacks (an unsubscribe) to have run.
            _run_callback(registrar.release_closed)

    # ------------------------------------------------------------------ internals

    def _coerce(self, chunk: object) -> bytes:
        return _to_bytes(chunk, self._encoding)

    def _put(self, data: bytes, block: bool, timeout: float | None) -> None:
        # The hot path of every stream: keep it to one lock round-trip and no
        # calls when the body is open and has room.
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._state is not OPEN:
                    _refuse(self, "write", "put()")
                if self._needs_head:
                    raise UsageError(
                        "put() before start(): this body owns start_response, so call "
                        "body.start(status, headers) first"
                    )
                cap = self._max_buffer
                buffered = self._buffered
                if cap is None or not buffered or buffered + len(data) <= cap:
                    if data and self._budget is not None and not self._budget.take(len(data)):
                        raise BufferFull(
                            f"the shared budget of {self._budget.limit} bytes buffered across "
                            f"all bodies is used up; the process is overloaded, so drop or "
                            f"retry this chunk rather than wait for other clients"
                        )
                    if self._idle_timeout is not None:
                        self._last_put = time.monotonic()
                    if not data:
                        return
                    if buffered:
                        self._more_locked().append(data)
                    else:
                        self._first = data
                    self._buffered = buffered + len(data)
                    consumer = self._consumer
                    if consumer is None or self._sink_scheduled:
                        return
                    sink = self._sink
                    if sink is not None and sink.schedule(self, len(data)):
                        # The consumer sleeps on; the sink sends for it (see Sink).
                        self._sink_scheduled = True
                        return
                    self._consumer = None
                    break
                if not block:
                    raise BufferFull(
                        f"max_buffer={cap} bytes reached ({self._buffered} waiting for the client)"
                    )
                try:
                    waiter = make_waiter()
                except CannotBlockHere:
                    raise BufferFull(
                        f"max_buffer={cap} bytes reached and put() was called from the gevent hub "
                        f"(a loop callback), where blocking would stop every greenlet; use "
                        f"put_nowait() and handle BufferFull, or produce from a greenlet"
                    ) from None
                self._producers = (*self._producers, waiter)
            remaining = None if give_up is None else give_up - time.monotonic()
            woken = False
            try:
                woken = waiter.wait(remaining)
            finally:
                if not woken:
                    with self._lock:
                        if waiter in self._producers:
                            self._producers = tuple(w for w in self._producers if w is not waiter)
                        else:
                            woken = True  # woken as the timer fired: look again
            if not woken and give_up is not None and time.monotonic() >= give_up:
                raise BufferFull(
                    f"put() waited {timeout}s for room under max_buffer={cap} bytes; the client "
                    f"is not reading fast enough"
                )
        consumer.wake()

    def _sink_take(self) -> bytes | None:
        """For the sink, when its turn comes: what the parked consumer would send now, or None.

        ``None`` when the consumer is not parked any more (woken by an end, a
        timer, another thread: it sends the buffer itself) or when the
        deadline passed: then the consumer is woken to expire the body as
        usual. The chunk is taken exactly as the consumer's ``next()`` would
        take it -- coalesced with what waits behind it, its bytes given back
        to the budget, the heartbeat clock reset, producers blocked on the
        cap woken. When more stays buffered behind it (more than
        ``coalesce`` waited, or ``coalesce`` is 0), ``_sink_scheduled`` stays
        set: the sink must come back for the rest (and ``put()`` need not
        schedule it again) or, if it cannot send all of this chunk, call
        :meth:`_sink_behind`, which clears it.
        """
        consumer = None
        to_wake: tuple[Waiter, ...] = ()
        with self._lock:
            self._sink_scheduled = False
            if self._consumer is None or self._first is None:
                return None
            if self._deadline_passed_locked():
                consumer = self._take_consumer_locked()
                chunk = None
            else:
                chunk = self._pop_locked()
                # Never left buffered with the consumer parked and nothing due.
                self._sink_scheduled = self._first is not None
                if self._producers:  # as in _next_slow: they waited for the client
                    to_wake, self._producers = self._producers, ()
                    self._last_put = time.monotonic()
                self._sent_data = True
                if self._heartbeat is not None:
                    self._last_yield = time.monotonic()
        if consumer is not None:
            consumer.wake()
        for producer in to_wake:
            producer.wake()
        return chunk

    def _sink_behind(self) -> None:
        """The sink could not send all it took: wake the consumer to send the rest first.

        The consumer then sends what is still buffered too: the sink does not
        come back for it.
        """
        with self._lock:
            self._flush_due = True
            self._sink_scheduled = False
            consumer = self._take_consumer_locked()
        if consumer is not None:
            consumer.wake()

    def _sink_failed(self, error: Exception) -> None:
        """The sink took a chunk and failed before it was out: the response is broken.

        In whatever state the body is (a producer may have finished it
        meanwhile), what is buffered is dropped and the consumer is woken to
        raise ``error``, so that the server aborts the connection: a response
        that lost a chunk must never end cleanly.
        """
        with self._lock:
            self._sink_scheduled = False
            if self._state == CLOSED:
                return
            self._discard_locked()
            self._end_locked(FAILED, error)
            consumer = self._take_consumer_locked()
        if consumer is not None:
            consumer.wake()

    def _take_consumer_locked(self) -> Waiter | None:
        consumer, self._consumer = self._consumer, None
        return consumer

    def _end_locked(self, state: str, error: BaseException | None) -> None:
        self._state = state
        self._end_error = error
        # Producers blocked on a full buffer must hear that the body ended.
        waiters, self._producers = self._producers, ()
        for waiter in waiters:
            waiter.wake()

    def _chunks(self) -> int:
        """How many chunks are buffered."""
        return (self._first is not None) + len(self._more or ())

    def _more_locked(self) -> deque[bytes]:
        """The deque behind the first chunk, made the first time one more waits."""
        more = self._more
        if more is None:
            more = self._more = deque()
        return more

    def _pop_locked(self) -> bytes:
        """Take the oldest chunk (with those waiting behind it, up to ``coalesce``)."""
        chunk = self._first
        assert chunk is not None
        more = self._more
        if more:
            if len(chunk) < self._coalesce:
                chunk = self._join_locked(chunk)
            self._first = more.popleft() if more else None
        else:
            self._first = None
        self._buffered -= len(chunk)
        if self._budget is not None:
            self._budget.give(len(chunk))
        return chunk

    def _join_locked(self, first: bytes) -> bytes:
        """Join chunks that are already waiting onto ``first``, up to ``coalesce`` bytes."""
        buffer = self._more
        assert buffer is not None
        limit = self._coalesce
        parts = [first]
        size = len(first)
        while buffer and size + len(buffer[0]) <= limit:
            part = buffer.popleft()
            parts.append(part)
            size += len(part)
        return first if len(parts) == 1 else b"".join(parts)

    def _append_locked(self, data: bytes) -> None:
        """Buffer a chunk that must not be refused (a last chunk, a timeout chunk)."""
        if self._buffered:
            self._more_locked().append(data)
        else:
            self._first = data
        self._buffered += len(data)
        if self._budget is not None:
            self._budget.force(len(data))

    def _can_send_locked(self) -> bool:
        return self._head_sent or self._head_headers is not None

    def _due_locked(self, now: float) -> float | None:
        """Seconds until the next timeout or heartbeat is due (<= 0: due now); None: never."""
        due: float | None = None
        if self._idle_timeout is not None:
            due = self._last_put + self._idle_timeout
        end = self._deadline_at
        if end is not None:
            due = end if due is None else min(due, end)
        if self._heartbeat is not None and self._can_send_locked():
            beat = self._last_yield + self._heartbeat
            due = beat if due is None else min(due, beat)
        return None if due is None else due - now

    def _deadline_passed_locked(self) -> bool:
        return self._deadline_at is not None and time.monotonic() >= self._deadline_at

    def _discard_locked(self) -> None:
        """Drop what is buffered, giving its bytes back to the shared budget."""
        self._first = None
        if self._more:
            self._more.clear()
        if self._budget is not None:
            self._budget.give(self._buffered)
        self._buffered = 0

    def _on_due_locked(self) -> bytes | None:
        """Something is due: expire the body, or return a heartbeat chunk."""
        now = time.monotonic()
        idle = self._idle_timeout is not None and now >= self._last_put + self._idle_timeout
        late = self._deadline_at is not None and now >= self._deadline_at
        if idle or late:
            what = (
                f"deadline={self._deadline}s passed"
                if late
                else f"the producer was silent for idle_timeout={self._idle_timeout}s"
            )
            if self._timeout_chunk is not None and self._can_send_locked():
                if self._timeout_chunk:
                    self._append_locked(self._timeout_chunk)
                self._end_locked(EXPIRED, None)
            else:
                self._end_locked(EXPIRED, BodyTimeout(f"response timed out: {what}"))
            return None
        return self._heartbeat_chunk

    def _emit(self, chunk: bytes) -> bytes:
        """Hand a chunk to the server, calling the owned start_response first if due."""
        if not self._head_sent:
            headers = self._head_headers
            assert headers is not None and self._start_response is not None
            self._head_sent = True
            if self._head_shared:
                headers = list(headers)
            self._start_response(self._head_status, headers)
        self._sent_data = True
        if self._heartbeat is not None:
            self._last_yield = time.monotonic()
        return chunk

    def _raise_end(self, error: BaseException) -> bytes:
        """Report a failure or timeout to the server: an error response if still possible."""
        if self._start_response is None or self._sent_data:
            raise error
        self._head_sent = True
        self._sent_data = True
        return error_response(self._start_response, error)

    def _outcome_locked(self) -> str:
        if self._state == FAILED:
            return "failed"
        if self._state == EXPIRED:
            return "timed_out"
        if self._state == FINISHED and self._first is None:
            return "finished"
        return "disconnected"


def error_response(start_response: StartResponse, error: BaseException) -> bytes:
    """Turn ``error`` into a 5xx response (504 a timeout, 503 a drain) before any data went out.

    Calls ``start_response`` with ``exc_info``, which replaces headers decided
    but not yet sent (PEP 3333 "Error Handling"; the server raises it back if
    they were sent after all), and returns the body to yield. Shared with the
    middleware, which does the same for bodies it did not create.
    """
    if isinstance(error, BodyTimeout):
        status = "504 Gateway Timeout"
    elif isinstance(error, Unavailable):  # cut off by a drain: the client should come back
        status = "503 Service Unavailable"
    else:
        status = "500 Internal Server Error"
    log.error("detached response failed before any data was sent: %s", status, exc_info=error)
    message = status.encode("ascii") + b"\n"
    headers = [*_ERROR_HEADERS, ("Content-Length", str(len(message)))]
    try:
        raise error
    except BaseException:
        start_response(status, headers, sys.exc_info())
    return message


def _positive_or_none(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= _LONGEST_TIMEOUT
    ):
        raise ValueError(
            f"{name} must be a positive number of seconds up to {_LONGEST_TIMEOUT:.0f} "
            f"(or None for no limit), got {value!r}"
        )
    return float(value)


def register(body: DetachedBody, hook: Registrar | None) -> None:
    """Hand a new ``body`` to its request's middleware (``environ[REGISTER_KEY]``), if any.

    The one registration path: every body made from an environ goes through
    here as it is made. A refused body (``max_open``, a drain, too late) is
    closed before the error goes on, so nothing it was charged is kept.
    """
    if hook is None:
        return
    try:
        hook(body)
    except BaseException:
        body.close()
        raise


def _to_bytes(chunk: object, encoding: str) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, str):
        return chunk.encode(encoding)
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(
        f"a chunk must be bytes, bytearray, memoryview or str (or StopIteration to "
        f"finish), got {type(chunk).__name__}"
    )


def _check_heartbeat_chunk(chunk: object) -> bytes:
    if not isinstance(chunk, bytes) or not chunk:
        raise TypeError(
            f"heartbeat_chunk must be non-empty bytes (an empty write detects nothing), "
            f"got {chunk!r}"
        )
    return chunk


def _check_max_buffer(max_buffer: object) -> int | None:
    if max_buffer is not None and (
        not isinstance(max_buffer, int) or isinstance(max_buffer, bool) or max_buffer <= 0
    ):
        raise ValueError(f"max_buffer must be a positive int or None, got {max_buffer!r}")
    return max_buffer


def _check_encoding(encoding: str) -> str:
    "".encode(encoding)  # fail now on an unknown encoding, not at the first put()
    return encoding


def _check_coalesce(coalesce: object) -> int:
    if not isinstance(coalesce, int) or isinstance(coalesce, bool) or coalesce < 0:
        raise ValueError(f"coalesce must be an int >= 0, got {coalesce!r}")
    return coalesce


def _check_budget(budget: object) -> ByteBudget | None:
    if budget is not None and not isinstance(budget, ByteBudget):
        raise TypeError(f"budget must be a ByteBudget or None, got {budget!r}")
    return budget


def _run_callback(callback: Callable[[], object]) -> None:
    try:
        callback()
    except Exception:
        log.exception("on_close callback %r raised; the other callbacks still run", callback)


@dataclass(frozen=True, eq=False)
class BodyOptions:
    """The options of a :class:`DetachedBody`, checked once, immutable, shared freely.

    :class:`~wsgi_detach.DetachMiddleware` builds one from its keyword
    arguments; :func:`~wsgi_detach.detach` and
    :class:`~wsgi_detach.EventStream` derive theirs from it with
    :meth:`merge` -- the one place options are combined -- and a body built
    from it (``DetachedBody(options=...)``) copies its fields without
    checking them again. Each field is documented on :class:`DetachedBody`;
    docs/body.md has them in one table. Compared by identity (a budget is
    one object), so that a derived value can be cached per middleware.

    Example::

        options = BodyOptions(idle_timeout=60, max_buffer=1 << 20)
        app = DetachMiddleware(app, options=options)    # its budget added
        quick = options.merge({"idle_timeout": 5})      # a new value; options unchanged

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range,
            naming it, at construction.
    """

    idle_timeout: float | None = None
    deadline: float | None = None
    heartbeat: float | None = None
    heartbeat_chunk: bytes = b"\n"
    max_buffer: int | None = None
    encoding: str = "utf-8"
    #: Given as any :data:`Chunk`, kept as bytes (a str encoded with ``encoding``,
    #: and encoded again when :meth:`merge` changes the encoding).
    timeout_chunk: Chunk | None = None
    coalesce: int = _DEFAULT_COALESCE
    budget: ByteBudget | None = None
    # The timeout_chunk as given, when it was a str, for merge() to encode anew.
    _timeout_text: str | None = dataclasses.field(default=None, init=False, repr=False)
    # Options derived from these for an EventStream, by heartbeat (see
    # wsgi_detach._sse): they live and die with this value.
    _derived: dict[float | None, BodyOptions] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "deadline", "heartbeat"):
            object.__setattr__(self, name, _positive_or_none(name, getattr(self, name)))
        _check_heartbeat_chunk(self.heartbeat_chunk)
        _check_max_buffer(self.max_buffer)
        _check_encoding(self.encoding)
        if self.timeout_chunk is not None:
            if isinstance(self.timeout_chunk, str):
                object.__setattr__(self, "_timeout_text", self.timeout_chunk)
            object.__setattr__(self, "timeout_chunk", _to_bytes(self.timeout_chunk, self.encoding))
        _check_coalesce(self.coalesce)
        _check_budget(self.budget)

    def merge(self, overrides: Mapping[str, Any], who: str = "BodyOptions") -> BodyOptions:
        """These options with ``overrides`` in place; ``self`` when there are none.

        Raises:
            TypeError: an option ``who`` does not take (named, with those it takes).
            TypeError, ValueError: a bad value, as at construction.
        """
        if not overrides:
            return self
        unknown = set(overrides) - OPTION_NAMES
        if unknown:
            raise TypeError(
                f"{who} got unknown options {sorted(unknown)}; it takes {sorted(OPTION_NAMES)}"
            )
        if (
            "encoding" in overrides
            and "timeout_chunk" not in overrides
            and self._timeout_text is not None
        ):
            # A str timeout_chunk is text: it goes out in the body's encoding,
            # whichever level chose each (a middleware's chunk, a detach()'s
            # encoding), never in the bytes of an encoding the body does not use.
            overrides = {**overrides, "timeout_chunk": self._timeout_text}
        return dataclasses.replace(self, **overrides)


def rebase(given: object, base: BodyOptions, who: str) -> BodyOptions:
    """The options a body registered with ``base`` starts from when given ``options=given``.

    ``base`` is the middleware's options (its budget included) or the
    defaults; ``given`` (``None``: keep ``base``) replaces them, except that
    under a middleware the budget stays its ``max_buffered`` budget: bytes
    charged to another one would escape the cap.

    Raises:
        TypeError: ``given`` is not a BodyOptions, or carries a budget of
            its own under a middleware.
    """
    if given is None:
        return base
    if not isinstance(given, BodyOptions):
        raise TypeError(f"options must be a BodyOptions, got {type(given).__name__}")
    if base.budget is None or given.budget is base.budget:
        return given
    if given.budget is not None:
        raise TypeError(NO_BUDGET.format(who=who))
    return given.merge({"budget": base.budget})


#: Why a body registered with a middleware takes no budget of its own.
NO_BUDGET: Final = (
    "{who} takes no budget: the middleware's max_buffered is the one budget shared by its bodies"
)

#: The names of the :class:`BodyOptions` fields.
OPTION_NAMES: Final = frozenset(f.name for f in dataclasses.fields(BodyOptions) if f.init)
#: The options of a body built with no arguments.
DEFAULT_OPTIONS: Final = BodyOptions()
