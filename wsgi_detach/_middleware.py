"""DetachMiddleware: detached responses made safe and policy-driven, whatever framework made them.

When to use it
--------------
Wrap your WSGI app once (``app = DetachMiddleware(app, idle_timeout=60)``)
when it returns detached responses -- :class:`~wsgi_detach.DetachedBody`
objects or the ``gevent.queue.Queue`` of Bottle's queue-as-body pattern -- and
you want, in one place:
the same timeouts, heartbeat and buffer limits on every stream; a client
that leaves an idle stream noticed within a second (on servers that expose
the connection, see :mod:`wsgi_detach._watchers`); a 5xx instead of a
truncated 200 when a stream fails before its first byte; headers that keep
proxies from holding a stream back; a cap on open streams and buffered
bytes; a graceful :meth:`~DetachMiddleware.drain` for shutdown; and
:meth:`~DetachMiddleware.stats`.

Inside the app, ask for a body with :func:`detach` (the one line per
framework is in docs/middleware.md): the body carries the middleware's
:class:`~wsgi_detach.BodyOptions` and is registered with the request as it is
made, so the middleware finds it even inside a framework's own iterator, and
closes it exactly once when the response ends. Every body made from the
environ goes the same way (``EventStream(environ)``, ``Hub.event_stream``,
``long_poll(..., environ=environ)``): ``environ["wsgi_detach.detach"]`` is the
request's registrar (:class:`~wsgi_detach._body.Registrar`), the one
registration path.

When not to use it: for an app that never detaches a response it costs a
function call and a short look at the returned iterable per request, and
changes nothing. It is not a general streaming middleware: it adds nothing
to responses it does not recognise as detached.

Theory of operation
-------------------
Per request the middleware holds the app's ``start_response`` call instead
of passing it on, until the app returns: only then is it known whether the
response is detached (a body was registered, or one came back), and so
whether to add the streaming headers or to answer 503 instead. Holding is
invisible to the server, which sends nothing before the first non-empty
chunk anyway (PEP 3333 "The start_response() Callable"); on gevent.pywsgi
the server still checks the head when the app makes the call, so the app
can catch what it refuses (see ``_check_now``). An ordinary
response is then handed back *unchanged* -- same object, so same ``len()``,
same ``close()``, same ``wsgi.file_wrapper`` -- and any later
``start_response`` call passes straight through. A detached response is
wrapped in :class:`_DetachedResponse`, which yields one value per value the
app yields (PEP 3333 "Buffering and Streaming"), turns an error before the
first non-empty chunk into a 5xx via ``exc_info`` (PEP 3333 "Error
Handling"), lets a later error propagate so the server aborts the
connection, and on ``close()`` closes the app's iterable once, then every
body of the request (idempotent).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import FunctionType
from typing import TYPE_CHECKING, Any, Callable, Final

from ._adopt import feed, find_inside, is_queue
from ._body import (
    DEFAULT_OPTIONS,
    NO_BUDGET,
    REGISTER_KEY,
    BodyOptions,
    Chunk,
    DetachedBody,
    error_response,
    rebase,
    register,
)
from ._budget import ByteBudget
from ._errors import DetachError, Unavailable, UsageError
from ._sse import EventStream
from ._wakeup import CannotBlockHere, Waiter, allocate_lock, make_waiter, start_beside
from ._watchers import exposes_socket, watch

if TYPE_CHECKING:
    from types import FrameType

    from _typeshed import OptExcInfo as ExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["BODIES_KEY", "DETACH_KEY", "DetachMiddleware", "DetachStats", "detach"]

log = logging.getLogger("wsgi_detach")

#: The environ key of the request's registrar (see ``Registrar``), which
#: :func:`detach` asks for a body.
DETACH_KEY: Final = REGISTER_KEY
#: The environ key of the list of bodies created for this request.
BODIES_KEY: Final = "wsgi_detach.bodies"

#: Added to detached responses unless the app set them: an intermediary that
#: buffers or caches a stream would hold every chunk back. X-Accel-Buffering
#: is nginx's per-response switch for proxy_buffering.
_STREAMING_HEADERS: Final = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))
_STREAMING_NAMES: Final = frozenset(name.lower() for name, _ in _STREAMING_HEADERS)

_OUTCOMES: Final = ("finished", "failed", "timed_out", "disconnected")
#: How many kinds of ``detach()`` overrides the middleware keeps merged options for.
_DERIVED_MAX: Final = 64
#: How many distinct response heads ``_streaming`` keeps what to add for.
_STREAMING_MAX: Final = 256


@dataclass(frozen=True)
class DetachStats:
    """A snapshot of :meth:`DetachMiddleware.stats`; the totals count since construction."""

    #: Detached responses open now (bodies and recognised queues).
    open: int
    #: Bytes waiting in all bodies the middleware made (its ``max_buffered`` budget).
    buffered: int
    #: Responses that ended as the producer intended, every byte handed to the server.
    finished: int
    #: Responses whose producer called ``fail()`` (or died), including drain's cut-offs.
    failed: int
    #: Responses ended by ``idle_timeout`` or ``deadline``.
    timed_out: int
    #: Responses the client left (or the server closed) before they ended.
    disconnected: int
    #: Requests answered 503 because of ``max_open`` or a drain.
    refused: int
    #: True once :meth:`DetachMiddleware.drain` was called.
    draining: bool


def detach(environ: WSGIEnvironment, **overrides: Any) -> DetachedBody:
    """Create a :class:`DetachedBody` for this request, with the middleware's defaults.

    ``overrides`` replace single defaults (``idle_timeout``, ``heartbeat``,
    ``max_buffer``, ``start_response``...); ``options=BodyOptions(...)``
    replaces the middleware's options as a whole (other keywords still win
    over it), except the budget, which stays the middleware's
    ``max_buffered`` one. The body is registered in
    ``environ["wsgi_detach.bodies"]``, so the middleware treats the response
    as detached and closes the body when the request ends even if a
    framework wraps it. Call it while the app handles the request (not from
    a producer later on).

    Example (raw WSGI)::

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = detach(environ, idle_timeout=30)
            body.spawn(produce, body)
            return body

    Raises:
        UsageError: the app is not wrapped in :class:`DetachMiddleware`.
        Unavailable: ``max_open`` responses are open or the server is
            draining; let it propagate, the middleware answers 503.
        TypeError: an unknown option; ``budget=``, or a BodyOptions with a
            budget of its own (the middleware's is the one shared budget).
    """
    try:
        registrar = environ[DETACH_KEY]
    except KeyError:
        raise UsageError(
            "detach(environ) needs the app wrapped in DetachMiddleware: "
            "app = DetachMiddleware(app); or create a DetachedBody() yourself"
        ) from None
    body: DetachedBody = registrar.detach(**overrides)
    return body


class DetachMiddleware:
    """Wrap a WSGI app so that its detached responses follow one policy.

    Args:
        app: any WSGI application.
        max_open: most detached bodies (and recognised queues) open at once,
            counted per body -- a request usually has one; beyond it a new
            one is answered ``503`` with ``Retry-After``. Each open stream
            holds a connection, a greenlet or thread and its buffer.
            ``None``: no cap.
        max_buffered: most bytes buffered across all bodies the middleware
            creates; at the cap ``put()`` raises :class:`BufferFull` on any of
            them, even where ``max_buffer`` would block (see
            :mod:`wsgi_detach._budget`). ``None``: counted, not capped.
        retry_after: seconds announced in ``Retry-After`` on a 503.
        streaming_headers: add ``Cache-Control: no-cache`` and
            ``X-Accel-Buffering: no`` to detached responses that did not set
            them, so proxies pass chunks on at once.
        watch_disconnects: watch the connection of idle detached responses
            where the server exposes it, and close the bodies of a client
            that left (``outcome == "disconnected"``).
        find_wrapped: look inside the iterable an ordinary-looking response
            returned for a gevent queue or body a framework wrapped (see
            :mod:`wsgi_detach._adopt`). Bodies from :func:`detach` never
            need it.
        options: a :class:`BodyOptions` for every body of the middleware's
            requests (``detach()`` bodies, an ``EventStream`` built from the
            environ); its ``budget`` is replaced by the middleware's own.
        **defaults: single :class:`BodyOptions` fields on top of
            ``options``: ``idle_timeout``, ``deadline``, ``heartbeat``,
            ``heartbeat_chunk``, ``max_buffer``, ``encoding``,
            ``timeout_chunk``, ``coalesce``. Checked here, once.

    Example::

        app = DetachMiddleware(app, idle_timeout=60, heartbeat=15, max_open=5000)
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        max_open: int | None = None,
        max_buffered: int | None = None,
        retry_after: int = 5,
        streaming_headers: bool = True,
        watch_disconnects: bool = True,
        find_wrapped: bool = True,
        options: BodyOptions | None = None,
        **defaults: Any,
    ) -> None:
        if not callable(app):
            raise TypeError(f"DetachMiddleware wraps a WSGI app (a callable), got {app!r}")
        _refuse_budget("DetachMiddleware", defaults)
        if max_open is not None and (not isinstance(max_open, int) or max_open <= 0):
            raise ValueError(f"max_open must be a positive int or None, got {max_open!r}")
        if not isinstance(retry_after, int) or retry_after < 0:
            raise ValueError(f"retry_after must be an int >= 0 (seconds), got {retry_after!r}")
        self.app = app
        self.max_open = max_open
        self.retry_after = retry_after
        self.streaming_headers = streaming_headers
        self.watch_disconnects = watch_disconnects
        self.find_wrapped = find_wrapped
        self.budget = ByteBudget(max_buffered)
        #: The :class:`BodyOptions` of every body of the middleware's
        #: requests, its ``budget`` included: checked here (bad values fail
        #: at construction, not at the first request), immutable, and handed
        #: to ``detach()`` and ``EventStream`` through the environ as is.
        self.options: BodyOptions = (options or DEFAULT_OPTIONS).merge(
            {**defaults, "budget": self.budget}, "DetachMiddleware"
        )
        self._lock = allocate_lock()
        self._open: set[object] = set()
        self._totals = dict.fromkeys(_OUTCOMES, 0)
        self._refused = 0
        self._draining = False
        self._drain_waiters: list[Waiter] = []
        self._derived_options: dict[Any, BodyOptions] = {}  # see _derived
        self._streaming_extra: dict[Any, tuple[tuple[str, str], ...]] = {}  # see _streaming

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if DETACH_KEY in environ:  # an outer DetachMiddleware already looks after this request
            return self.app(environ, start_response)
        return _Request(self, start_response).run(environ)

    # ------------------------------------------------------------------ introspection

    def stats(self) -> DetachStats:
        """Open responses, buffered bytes, and how the ended ones ended."""
        with self._lock:
            return DetachStats(
                open=len(self._open),
                buffered=self.budget.used,
                refused=self._refused,
                draining=self._draining,
                **self._totals,
            )

    # ------------------------------------------------------------------ shutdown

    def drain(self, grace: float, farewell: Chunk | None = None) -> int:
        """Stop taking detached responses and end the open ones within ``grace`` seconds.

        From the call on, a new detached response is answered 503 (with
        ``Retry-After``). With ``farewell`` (say, an SSE event that tells the
        client to reconnect elsewhere), every open body gets it as its last
        chunk and finishes at once. Then the open responses have ``grace``
        seconds to end; those still open are failed with
        :class:`Unavailable`, which makes the server abort their connection
        (a client sees a truncated stream, not a clean end). Blocks the
        calling greenlet or thread until then.

        Call it from a SIGTERM handler (:meth:`drain_on_signal` installs
        one; under gunicorn from ``post_worker_init`` -- its ``worker_exit``
        runs after the worker stopped waiting for connections, too late), or
        before ``WSGIServer.stop()`` (``make_server``'s server does).

        Returns:
            How many responses had to be cut off when the grace ran out.

        Raises:
            UsageError: called from the gevent hub itself (a loop callback),
                where it must not block; call it from a greenlet.
        """
        with self._lock:
            self._draining = True
            streams = list(self._open)
        if farewell is not None:
            for stream in streams:
                _say_farewell(stream, farewell)
        try:
            waiter = make_waiter()
        except CannotBlockHere:
            raise UsageError(
                "drain() blocks until streams end; call it from a greenlet "
                "(gevent.spawn(middleware.drain, grace)), not from a loop callback"
            ) from None
        with self._lock:
            waiting = bool(self._open)
            if waiting:
                self._drain_waiters.append(waiter)
        if waiting:
            waiter.wait(grace)
        with self._lock:
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)
            left = list(self._open)
        for stream in left:
            _cut(stream, grace)
        return len(left)

    def drain_on_signal(
        self, grace: float, farewell: Chunk | None = None, signum: int = signal.SIGTERM
    ) -> None:
        """On ``signum``, drain (see :meth:`drain`) beside whatever the process did before.

        Installs a handler (call it from the main thread) that starts
        ``drain(grace, farewell)`` in a new greenlet (gevent) or thread, then
        hands the signal to the handler that was there before -- gunicorn's
        worker, for one, then stops accepting and waits for its connections,
        which the drain ends. Where the previous handler was the default
        (the process would die at once), the drain runs first and the signal
        is then delivered again with the default handler; a second signal
        during the drain kills at once. This works on servers without a
        gevent hub too (waitress, wsgiref, cheroot), where the drain runs in
        a thread.

        The place for it under gunicorn is a ``post_worker_init`` hook, where
        ``worker.wsgi`` is this middleware::

            def post_worker_init(worker):  # gunicorn.conf.py
                worker.wsgi.drain_on_signal(worker.cfg.graceful_timeout - 1, b"bye\\n")
        """
        previous = signal.getsignal(signum)

        def die_after_drain() -> None:
            try:
                self.drain(grace, farewell)
            finally:
                os.kill(os.getpid(), signum)

        def handler(number: int, frame: FrameType | None) -> None:
            if callable(previous):
                start_beside(lambda: self.drain(grace, farewell))
                previous(number, frame)
            elif previous == signal.SIG_IGN:
                start_beside(lambda: self.drain(grace, farewell))
            else:
                # Reset here: a handler runs on the main thread, the one place
                # signal.signal() works; the drain may run in another thread
                # (servers without a gevent hub). A second signal during the
                # drain now kills at once, as without us.
                signal.signal(signum, signal.SIG_DFL)
                start_beside(die_after_drain)

        signal.signal(signum, handler)

    # ------------------------------------------------------------------ bookkeeping

    def _admit(self, stream: object) -> None:
        """Count ``stream`` as open, or raise Unavailable when full or draining."""
        with self._lock:
            if self._draining:
                reason = "the server is shutting down (draining)"
            elif self.max_open is not None and len(self._open) >= self.max_open:
                reason = f"max_open={self.max_open} detached responses are open"
            else:
                self._open.add(stream)
                return
            self._refused += 1
        raise Unavailable(f"no new detached response: {reason}; retry later")

    def _release(self, stream: object, outcome: str | None) -> None:
        if stream not in self._open:
            # Released already (a request releases its bodies when they close
            # and again when it ends); a stream is admitted once, so one that
            # is out stays out: no lock needed to see it.
            return
        with self._lock:
            if stream not in self._open:
                return
            self._open.discard(stream)
            self._totals[outcome or "disconnected"] += 1
            waiters: list[Waiter] = []
            if not self._open and self._drain_waiters:
                waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.wake()

    def _derived(self, overrides: dict[str, Any]) -> BodyOptions:
        """The middleware's options with ``overrides`` (``detach()``'s), checked once per kind.

        An app passes the same overrides on every request (``detach(environ,
        idle_timeout=30)``): merging and checking them again each time cost
        more than the rest of building a body. Kept per distinct overrides,
        up to ``_DERIVED_MAX`` kinds; values that cannot be a key are merged
        every time.
        """
        try:
            # The types too: 1 == 1.0 == True, but a bool is refused. In the
            # order given: one call site passes them in one order, always.
            key: Any = (tuple(overrides.items()), tuple(map(type, overrides.values())))
            options = self._derived_options.get(key)
        except TypeError:  # an unhashable value
            key, options = None, None
        if options is None:
            overrides = dict(overrides)
            base = rebase(overrides.pop("options", None), self.options, "detach()")
            _refuse_budget("detach()", overrides)
            options = base.merge(overrides, "detach()")
            if key is not None and len(self._derived_options) < _DERIVED_MAX:
                self._derived_options[key] = options
        return options

    def _streaming(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` with the streaming headers the app did not set itself.

        What to add depends on the header names only, and an endpoint sends
        the same headers every time: it is kept per distinct headers, up to
        ``_STREAMING_MAX`` of them (then the record starts again, empty).
        """
        if not self.streaming_headers:
            return headers
        key: Any = None
        extra = None
        if type(headers) is list:
            try:
                key = tuple(headers)
                extra = self._streaming_extra.get(key)
            except TypeError:  # an unhashable item: the server will refuse it
                key = None
        if extra is None:
            given = {lower for name, _ in headers if (lower := name.lower()) in _STREAMING_NAMES}
            extra = tuple(item for item in _STREAMING_HEADERS if item[0].lower() not in given)
            if key is not None:
                if len(self._streaming_extra) >= _STREAMING_MAX:
                    self._streaming_extra.clear()
                self._streaming_extra[key] = extra
        return [*headers, *extra] if extra else headers


def _refuse_budget(who: str, options: dict[str, Any]) -> None:
    if "budget" in options:
        raise TypeError(NO_BUDGET.format(who=who))


def _say_farewell(stream: object, farewell: Chunk) -> None:
    """Give an open stream (a body, or a request with a wrapped queue) its last chunk."""
    try:
        if isinstance(stream, DetachedBody):
            if stream.state == "open":
                stream.finish(farewell)
        else:
            assert isinstance(stream, _Request)
            stream.end_queue(farewell)
    except DetachError as exc:
        log.warning("drain: could not send the farewell to %r: %s", stream, exc)


def _cut(stream: object, grace: float) -> None:
    error = Unavailable(f"the server is shutting down; the stream outlived {grace}s grace")
    if isinstance(stream, DetachedBody):
        stream.fail(error)
    else:
        assert isinstance(stream, _Request)
        stream.cut_off = error
        stream.end_queue()


_HOLD: Final = "hold"  # the app is running: start_response is held back
_PASS: Final = "pass"  # an ordinary response: everything goes straight through
_DETACHED: Final = "detached"  # a detached response: streaming headers, our wrapper

# Where the app's start_response call is (PEP 3333 "The start_response()
# Callable"); one state per request, changed only by _Request's
# start_response, flush_head, forward and refuse:
#
#   state    meaning                        app calls start_response        app calls write()
#   unset    not called yet                 mode hold: hold it (-> checked  UsageError
#                                           or held); else pass it on
#                                           (-> sent)
#   held     kept back; the server has      with exc_info: replace it;      pass the head on
#            not seen it                    without: UsageError             (-> sent), write
#   checked  kept back; the server checked  as held                         -> sent (the server
#            it and holds it (_check_now)                                   has it), write
#   sent     the server has it              pass it on: the server decides  the server's write
#
# Passing a checked head on is free for an ordinary response (the server
# holds it already); a detached one is passed on again with its streaming
# headers.
_UNSET: Final = "unset"
_HELD: Final = "held"
_CHECKED: Final = "checked"
_SENT: Final = "sent"


class _Request:
    """The middleware's state for one request."""

    __slots__ = (
        "bodies",
        "cancel_watch",
        "cut_by_watcher",
        "cut_off",
        "failed",
        "gone",
        "head",
        "mode",
        "mw",
        "queue",
        "refused",
        "sent_data",
        "server_keeps_connection",
        "server_start_response",
        "server_write",
        "started",
        "stop_pump",
    )

    def __init__(self, mw: DetachMiddleware, start_response: StartResponse) -> None:
        # No reference to the environ: it holds our detach() method, and a
        # cycle would keep every request's environ alive until the next
        # garbage collection.
        self.mw = mw
        self.server_start_response = start_response
        self.mode: str = _HOLD
        self.started: str = _UNSET  # see the table above _UNSET
        self.head: tuple[str, list[tuple[str, str]], ExcInfo | None] | None = None  # if held
        self.server_write: Callable[[bytes], object] | None = None  # once sent
        self.bodies: list[DetachedBody] = []
        self.stop_pump: Callable[[], None] | None = None  # for an adopted bare queue
        self.queue: Any = None  # a gevent queue a framework wrapped, if one was found
        self.cut_off: Unavailable | None = None  # drain's grace ran out on that queue
        self.failed = False  # the server refused the head of a detached response
        self.refused = False
        self.gone = False  # the watcher saw the client leave
        # ...and ended the response before its producer did: the server must
        # then abort, not end cleanly (see _DetachedResponse.__next__).
        self.cut_by_watcher = False
        self.server_keeps_connection = False  # a socket watch: see on_disconnect
        self.sent_data = False
        self.cancel_watch: Callable[[], object] | None = None

    def run(self, environ: WSGIEnvironment) -> Iterable[bytes]:
        # One object for what the app's bodies need from the middleware (see
        # Registrar): no bound method, no extra key per request.
        environ[DETACH_KEY] = self
        environ[BODIES_KEY] = self.bodies
        try:
            result = self.mw.app(environ, self.start_response)
        except Unavailable:
            self.close_bodies()
            return self.refuse()
        except BaseException:
            self.close_bodies()
            raise
        return self.respond(environ, result)

    # ------------------------------------------------------------------ what the app calls

    def detach(self, **overrides: Any) -> DetachedBody:
        options = self.mw.options
        start_response = None
        if overrides:
            start_response = overrides.pop("start_response", None)
            options = self.mw._derived(overrides)
        body = DetachedBody(options=options, start_response=start_response)
        register(body, self)
        return body

    @property
    def options(self) -> BodyOptions:
        """The middleware's options, for bodies made from the environ (Registrar)."""
        return self.mw.options

    def __call__(self, body: DetachedBody) -> None:
        """Register a body built for this request (``environ[REGISTER_KEY]``); see track().

        The one way in for every body made from the environ -- ``detach()``,
        ``EventStream(environ)`` and what builds on them -- at the moment it
        is built, so that a body the app then abandons (a later step raised)
        is still closed with the request and its budgeted bytes come back.
        The caller closes the body when this raises.

        Raises:
            Unavailable: ``max_open`` bodies are open or the server is draining.
            UsageError: the app already returned.
        """
        if self.mode != _HOLD:
            # Too late to count, watch or close it: the response is already
            # decided (an ordinary one passes through untouched).
            made = "detach(environ)" if type(body) is DetachedBody else "EventStream(environ)"
            raise UsageError(
                f"{made} was called after the app returned (inside the response iterator, "
                f"e.g. a stream_with_context generator); call it in the app or view itself, "
                f"before returning the body"
            )
        try:
            self.track(body)
        except Unavailable:
            self.refused = True  # even if a framework turns the exception into its own page
            raise

    def track(self, body: DetachedBody) -> None:
        """Count ``body`` as open (or raise Unavailable); close and release it with the request."""
        self.mw._admit(body)
        self.bodies.append(body)  # before this runs, at once if it is closed already
        body._tell_on_close(self)

    def release_closed(self) -> None:
        """Each body's close tells us: give back the ``max_open`` slots of the bodies that closed.

        Releasing is idempotent, so the body needs only the request, not a
        closure over itself or a bound method: nothing of its own for a
        waiting body to hold (see DetachedBody._tell_on_close).
        """
        for body in self.bodies:
            if body.closed:
                self.mw._release(body, body.outcome)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        started = self.started
        if started == _SENT or self.mode != _HOLD:
            if self.mode == _DETACHED:
                headers = self.mw._streaming(headers)
            return self.forward(status, headers, exc_info)
        if started != _UNSET and exc_info is None:
            # PEP 3333 "The start_response() Callable": a fatal error, as
            # every server but pywsgi treats it; silently replacing the held
            # head would hide an app bug that breaks elsewhere.
            raise UsageError(
                "start_response() called a second time without exc_info; only an "
                "error handler may replace the status and headers, passing "
                "exc_info=sys.exc_info()"
            )
        if type(headers) is not list:  # held, so read once: an iterator would be used up
            headers = list(headers)
        if _check_now(self.server_start_response):
            # The server's own checks, where the app can catch what they raise.
            try:
                self.server_write = self.server_start_response(status, headers, exc_info)
            except BaseException:
                if started == _CHECKED:
                    # What the server holds now is unknown (pywsgi sets a
                    # 204/304 status before refusing its length): the kept
                    # head is passed on again.
                    self.started = _HELD
                raise
            started = _CHECKED
        else:
            started = _HELD
        self.head = (status, headers, exc_info)  # a later call with exc_info replaces it
        self.started = started
        return self.write

    def write(self, data: bytes) -> object:
        """PEP 3333's write() callable: the head must go out first, unchanged."""
        if self.started != _SENT:
            if self.started == _UNSET:
                raise UsageError("write() called before start_response()")
            self.flush_head()
        assert self.server_write is not None
        return self.server_write(data)

    # ------------------------------------------------------------------ deciding

    def respond(self, environ: WSGIEnvironment, result: Iterable[bytes]) -> Iterable[bytes]:
        mw = self.mw
        if self.refused:
            _close(result)
            self.close_bodies()
            return self.refuse()
        if not self.bodies:
            found: Any = None
            if isinstance(result, DetachedBody) or is_queue(result):
                found = result
            elif mw.find_wrapped:
                found = find_inside(result)
            if found is None:
                self.mode = _PASS
                try:
                    self.flush_head()
                except BaseException:
                    # The server refused the head: it never gets ``result``,
                    # so nobody else would close it (PEP 3333 "Specification
                    # Details": close() must be called).
                    _close_quietly(result)
                    raise
                return result
            try:
                if isinstance(found, DetachedBody):
                    self.track(found)  # made by the app itself: counted, closed, watched
                elif found is result:
                    body = self.detach()  # Bottle's queue-as-body pattern: served through a body
                    self.stop_pump = feed(body, found)
                    result = body
                else:
                    mw._admit(self)  # the request stands for the queue in the count
                    self.queue = found
            except Unavailable:
                _close(result)
                self.close_bodies()
                return self.refuse()
        response = _DetachedResponse(self, result)
        self.mode = _DETACHED
        try:
            self.flush_head()
            if mw.watch_disconnects:
                # The response is the callback (its __call__): a bound
                # method would be one more object alive for as long as the
                # response waits, and every such object brings the garbage
                # collector's next young collection closer.
                self.cancel_watch = watch(environ, response)
                self.server_keeps_connection = exposes_socket(environ)
        except BaseException as exc:
            # The server's start_response refused the head (wsgiref asserts on
            # a hop-by-hop header), or the watch could not start: the server
            # never gets the response, so end it here -- fail the bodies (the
            # producers learn, stats count a failure), close the app's
            # iterable, free the max_open slot.
            if isinstance(exc, Exception):
                for body in self.bodies:
                    body.fail(exc)
                self.failed = True
            _close_quietly(response)
            raise
        return response

    def flush_head(self) -> None:
        started = self.started
        if started == _UNSET or started == _SENT:
            return
        assert self.head is not None
        status, headers, exc_info = self.head
        self.head = None  # PEP 3333: do not keep a reference to exc_info
        if self.mode == _DETACHED:
            headers = self.mw._streaming(headers)
        elif started == _CHECKED:
            self.started = _SENT  # the server holds this very head already
            return
        self.forward(status, headers, exc_info)

    def forward(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None
    ) -> Callable[[bytes], object]:
        if exc_info is None:
            self.server_write = self.server_start_response(status, headers)
        else:
            self.server_write = self.server_start_response(status, headers, exc_info)
        self.started = _SENT
        return self.write

    def refuse(self) -> list[bytes]:
        message = b"503 Service Unavailable: too many open streams, or shutting down; retry later\n"
        self.mode = _PASS
        self.head = None
        self.started = _SENT
        self.server_write = self.server_start_response(
            "503 Service Unavailable",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(message))),
                ("Retry-After", str(self.mw.retry_after)),
            ],
        )
        return [message]

    # ------------------------------------------------------------------ ending

    def on_disconnect(self) -> None:
        """The watcher saw the client leave an idle stream: end it, so the server lets go."""
        self.gone = True
        for body in self.bodies:
            body.close()  # open -> outcome "disconnected"; the server's close() later is a no-op
            if body.outcome == "disconnected":
                self.cut_by_watcher = True
        if self.queue is not None:
            self.end_queue()
            self.cut_by_watcher = True

    def end(self, ended: bool) -> None:
        """The response is over (the server closed it): stop watching, close every body."""
        # Dropped, not just called: the watch holds our on_disconnect, so a
        # kept reference would be a cycle -- garbage for the collector on
        # every request instead of freed at once (measured: ~15 us a request).
        cancel_watch, self.cancel_watch = self.cancel_watch, None
        if cancel_watch is not None:
            cancel_watch()
        self.close_bodies()
        # A body that owns start_response (an EventStream) holds our
        # start_response method: let go of them, for the same reason -- after
        # releasing their max_open slots here, since release_closed (their
        # on_close) may still be on its way (another greenlet or thread is
        # running their close callbacks) and will find the list empty.
        bodies, self.bodies = self.bodies, []
        for body in bodies:
            self.mw._release(body, body.outcome)
        stop_pump, self.stop_pump = self.stop_pump, None
        if stop_pump is not None:
            # Here, in the server's close(), we are on the request's own thread:
            # the one place a threaded server's pump can still be stopped,
            # even when a watcher closed the body first.
            stop_pump()
        if self.queue is not None:
            if self.cut_off is not None or self.failed:
                outcome = "failed"
            else:
                outcome = "finished" if ended and not self.gone else "disconnected"
            self.mw._release(self, outcome)

    def end_queue(self, farewell: Chunk | None = None) -> None:
        """End the framework's iteration of the wrapped queue, after ``farewell`` if given.

        The farewell goes in as given: the framework, not we, turns queue
        items into bytes (Flask and Django take bytes; Bottle wants the type
        of the first chunk).
        """
        if farewell is not None:
            self.queue.put_nowait(farewell)
        self.queue.put_nowait(StopIteration)

    def close_bodies(self) -> None:
        for body in self.bodies:
            body.close()


class _DetachedResponse:
    """What the server iterates for a detached response; see the module docstring."""

    __slots__ = ("_closed", "_done", "_ended", "_in_place", "_inner", "_iterator", "_request")

    def __init__(self, request: _Request, inner: Iterable[bytes]) -> None:
        self._request = request
        self._inner = inner
        self._iterator: Iterator[bytes] | None = None
        self._in_place = False  # call the iterator's __next__ directly: see python_next
        self._done = False  # an error response was yielded in place of the body
        self._ended = False  # the app's iterable ran to its end
        self._closed = False

    def __iter__(self) -> _DetachedResponse:
        return self

    def __call__(self) -> None:
        """The disconnect watch's callback: the client left (see _Request.on_disconnect)."""
        self._request.on_disconnect()

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        request = self._request
        try:
            iterator = self._iterator
            if iterator is None:
                iterator = self._iterator = iter(self._inner)
                self._in_place = python_next(iterator)
            chunk = iterator.__next__() if self._in_place else next(iterator)
            if type(chunk) is not bytes:
                raise TypeError(
                    f"a WSGI response body must yield bytes (PEP 3333), this one yielded "
                    f"{type(chunk).__name__}: {chunk!r:.60}"
                )
        except StopIteration:
            if request.cut_off is not None:  # never a clean-looking end for a cut stream
                return self._failed(request, request.cut_off)
            if request.cut_by_watcher and request.server_keeps_connection:
                # The watcher saw the read side end: the client left -- or only
                # half-closed (shutdown(SHUT_WR)) and still reads. A clean end
                # would show that client a truncated stream as complete. An
                # ECONNRESET is what pywsgi and gunicorn treat as a departed
                # client: they close the connection without the terminating
                # chunk, log nothing, and serve no pipelined request after it.
                raise ConnectionResetError(
                    errno.ECONNRESET,
                    "the client closed its side of the connection before the response "
                    "ended; aborting the response",
                ) from None
            self._ended = True
            raise
        except Exception as exc:
            return self._failed(request, exc)
        if chunk:
            request.sent_data = True
        return chunk

    def _exhausted(self) -> bool:
        """True when the next ``next()`` ends the iteration without waiting; see
        :meth:`DetachedBody._exhausted`. Known only when the app's iterable is
        the body itself."""
        if self._done:
            return True
        inner = self._inner
        return type(inner) is DetachedBody and self._request.cut_off is None and inner._exhausted()

    def _direct_body(self) -> DetachedBody | None:
        """The app's body, which a server may let send for it (see ``Sink``); else None.

        The server arms it only after a chunk went through ``__next__``, so
        the response is decided and ``sent_data`` set by then.
        """
        inner = self._inner
        if type(inner) in DIRECT_TYPES and self._request.cut_off is None:
            return inner  # type: ignore[return-value]
        return None

    def _failed(self, request: _Request, error: Exception) -> bytes:
        if request.sent_data:
            raise error  # the server aborts the connection: never a clean-looking end
        self._done = True
        request.sent_data = True
        # PEP 3333 "Error Handling": replace the unsent head; a server that
        # would otherwise send the held 200 (cheroot does) sends a 5xx.
        return error_response(request.start_response, error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _close(self._inner)
        finally:
            self._request.end(self._ended)


#: The body types whose chunks a server may send while their consumer waits
#: (see ``Sink``), without calling their ``__next__``: exactly these, never a
#: subclass, which may change or count chunks in ``__next__``. EventStream
#: only adds ways to put (``send``, ``comment``); a consumer calls nothing it
#: overrides.
DIRECT_TYPES: Final = frozenset({DetachedBody, EventStream})


def python_next(iterator: object) -> bool:
    """True when ``iterator.__next__`` is a Python function (a body, our own wrapper).

    Such a method is best called as ``iterator.__next__()`` from Python code.
    Under the builtin ``next()``, a C function, it runs in a nested
    interpreter loop, and a greenlet that waits in there -- every idle
    detached stream does -- keeps that loop's C stack, about 480 bytes a
    level (``bench/mem_idle.py``), copied on the heap for as long as it
    waits. Called from Python it runs in the caller's loop (CPython 3.11 and
    later). Anything else (a generator, a list) is faster through ``next()``.
    """
    return isinstance(getattr(type(iterator), "__next__", None), FunctionType)


#: Handler classes by whether their start_response is gevent.pywsgi's (see _check_now).
_PYWSGI_HANDLERS: dict[type, bool] = {}


def _check_now(start_response: object) -> bool:
    """Whether to call ``start_response`` when the app does, to check the head.

    PEP 3333 has the server check the status and headers when
    ``start_response`` is called, so that the app can catch the error (a
    CR or LF in a header, a character beyond latin-1, a 304 with a body
    length); holding the call would move that error past the app. For
    gevent.pywsgi's handler (and subclasses, such as ``DetachHandler``)
    calling it is free of lasting effects: each call replaces the last
    until the head is sent, so the middleware calls it at once to run
    those checks, and again when it passes the head on. Other servers
    refuse a second call, so there the head is checked when passed on.
    """
    owner = getattr(start_response, "__self__", None)
    if owner is None:
        return False
    kind = type(owner)
    known = _PYWSGI_HANDLERS.get(kind)
    if known is None:
        known = _PYWSGI_HANDLERS[kind] = any(
            base.__module__ == "gevent.pywsgi" and base.__name__ == "WSGIHandler"
            for base in kind.__mro__
        )
    return known


def _close(iterable: object) -> None:
    close = getattr(iterable, "close", None)
    if close is not None:
        close()


def _close_quietly(iterable: object) -> None:
    """Close ``iterable`` while another exception is on its way out: log, do not replace it."""
    try:
        _close(iterable)
    except Exception:
        log.exception("closing %r after the response failed raised too", iterable)
