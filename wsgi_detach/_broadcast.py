"""Broadcast: publish a message once, deliver it to every open stream, resume after a reconnect.

When to use it: many clients watch the same feed (a chat room, a ticker, a
build log) over SSE, a plain streamed body, or long-polling, and a client
that reconnects must get what it missed -- or be told that it missed too
much.

When not to: several processes publish or serve the same feed (the hub
lives in one process's memory: put a broker such as Redis in front), or
every message must survive a server restart (the history is a ring buffer in
memory, not a log).

Theory of operation
-------------------
:meth:`Hub.publish` numbers each message, keeps it in a bounded history (a
ring buffer) and puts it, already encoded, into every subscribed body with
``put_nowait``: publishing never blocks, so it works from a greenlet, a
loop callback or a plain OS thread alike. Numbering, the history and the
hand-over to the bodies happen under one real lock (never a cooperative
one; see :mod:`wsgi_detach._wakeup`), which makes "replay what you missed,
then register for what comes next" one atomic step, so that a reconnecting
client gets each message exactly once. The subscribers' ``encode`` and any
logging run *outside* that lock (a logging handler that yields under gevent
while a real lock is held would freeze its thread); messages encoded out of
order wait for their turn, so the order is still the same for every
subscriber. (The catch-up of :meth:`Hub.subscribe` is encoded under the lock,
to stay atomic: keep a custom ``encode`` free of blocking and yielding.)

Ids are ``"<epoch>-<seq>"``: ``seq`` counts up from 1, ``epoch`` is random
per hub, so an id kept by a browser across a server restart is recognised as
foreign instead of being mistaken for a recent one.

Slow subscribers
----------------
Each subscriber may have at most ``max_pending`` bytes waiting to be sent (and
no more than its own ``max_buffer``, if it has one). A message that would
exceed that *drops the subscriber*: it is unsubscribed and its body ends
after the bytes already queued -- an :class:`~wsgi_detach.EventStream`
cleanly, so the browser reconnects and resumes from its ``Last-Event-ID``;
a plain body with :class:`SlowSubscriber`, so that its client sees a
truncated response rather than a complete one. The other subscribers and
the publisher never wait for it, and its memory stays bounded.

Choose ``max_pending`` above the largest burst you publish without yielding:
messages published in a tight loop sit in *every* body until the server's
greenlets or threads get to run, and a burst over the cap drops fast clients
too (they reconnect and resume, but needlessly).

Resync
------
A client whose last id is no longer in the history (it was away too long, or
the id comes from another epoch) gets one ``resync`` event instead of a
replay: SSE ``event: resync`` whose data is ``{"reason": ..., "cursor": ...}``
and whose id is the current cursor. It should reload its state (e.g. fetch
the recent messages) and carry on; the stream continues after it.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Final, NamedTuple

from ._body import DetachedBody
from ._errors import BodyClosed, BufferFull, DetachError, UsageError
from ._sse import EventStream, encode_event
from ._wakeup import allocate_lock

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["RESYNC", "Batch", "Hub", "Message", "SlowSubscriber", "Subscription"]

#: The event type of the resync notice.
RESYNC: Final = "resync"

log = logging.getLogger("wsgi_detach")

_DEFAULT_HISTORY: Final = 1000
# 1 MiB: room for a few thousand chat-sized messages behind; a client further
# behind than that is better served by reconnecting and replaying.
_DEFAULT_MAX_PENDING: Final = 1 << 20

#: A sentinel: take the last id from the EventStream itself.
_FROM_STREAM: Final[Any] = object()


class SlowSubscriber(DetachError):
    """A subscriber fell ``max_pending`` bytes behind and was dropped (who: its client).

    Raised in the server as the end of a plain body subscriber, so the client
    sees an incomplete response; an EventStream ends cleanly instead.
    """


class Message:
    """One published message: ``id``, ``seq``, ``event`` and ``data``, immutable.

    ``data`` is what was published: a ``str`` is sent as is; anything else
    is sent as its JSON text over SSE and as JSON in long-poll responses.
    """

    __slots__ = ("_sse", "data", "event", "id", "seq", "text")

    def __init__(self, seq: int, id: str, data: Any, event: str | None) -> None:
        self.seq = seq
        self.id = id
        self.data = data
        self.event = event
        self.text: str = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        self._sse: bytes | None = None

    def sse(self) -> bytes:
        """This message as one SSE event, encoded once however many streams get it."""
        if self._sse is None:
            self._sse = encode_event(self.text, event=self.event, id=self.id)
        return self._sse

    def as_dict(self) -> dict[str, Any]:
        """``{"id", "event", "data"}``, for JSON."""
        return {"id": self.id, "event": self.event, "data": self.data}

    def __repr__(self) -> str:
        return f"<Message {self.id} event={self.event!r} data={self.text[:40]!r}>"


class Batch(NamedTuple):
    """What a reader gets: the messages after its cursor, and the cursor to ask with next.

    ``resync`` is True when the old cursor was no longer in the history (or
    unknown): ``messages`` is then empty and the reader should reload its
    state and continue from ``cursor``.
    """

    messages: list[Message]
    cursor: str
    resync: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": [m.as_dict() for m in self.messages],
            "cursor": self.cursor,
            "resync": self.resync,
        }


def _ndjson(message: Message) -> bytes:
    return (json.dumps(message.as_dict(), separators=(",", ":")) + "\n").encode("utf-8")


class Subscription:
    """A body's registration with a :class:`Hub`; :meth:`cancel` ends the delivery."""

    __slots__ = ("_hub", "body", "encode")

    def __init__(self, hub: Hub, body: DetachedBody, encode: Callable[[Message], bytes]) -> None:
        self._hub = hub
        self.body = body
        self.encode = encode

    @property
    def active(self) -> bool:
        """True while the hub delivers to this body."""
        return self._hub._is_subscribed(self)

    def cancel(self) -> None:
        """Stop delivering to the body; idempotent. The body itself stays open."""
        self._hub._unsubscribe(self)


class Hub:
    """Fan messages out to many bodies, with ids and a bounded history.

    ::

        hub = Hub(history=500)

        def events(environ, start_response):        # SSE
            return hub.event_stream(environ, start_response)

        def on_new_price(price):                     # any greenlet or thread
            hub.publish({"price": price}, event="price")

    Args:
        history: how many recent messages are kept for replay to a
            reconnecting client (and for long-polls); older ones fall out,
            and a client whose last id fell out gets a resync.
        max_pending: bytes that may wait in one subscriber's body; a message
            beyond it drops that subscriber (see the module docs).

    Every method is safe from any greenlet, loop callback or OS thread, and
    none blocks.
    """

    def __init__(
        self, *, history: int = _DEFAULT_HISTORY, max_pending: int = _DEFAULT_MAX_PENDING
    ) -> None:
        for name, value in (("history", history), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._max_pending = max_pending
        self._lock = allocate_lock()
        self._epoch = secrets.token_hex(3)
        self._seq = 0
        self._history: deque[Message] = deque(maxlen=history)
        self._delivered = 0  # the last seq delivered to every subscriber
        self._ready: dict[int, dict[Subscription, bytes | None]] = {}  # encoded, awaiting turn
        self._subscribers: dict[Subscription, None] = {}  # insertion-ordered set
        self._polls: dict[Callable[[Batch], object], str] = {}  # one-shot callbacks

    # ------------------------------------------------------------------ reading

    @property
    def cursor(self) -> str:
        """The id of the latest message (``"<epoch>-0"`` before the first)."""
        return f"{self._epoch}-{self._seq}"

    @property
    def subscribers(self) -> int:
        """How many bodies are subscribed."""
        return len(self._subscribers)

    @property
    def pending_polls(self) -> int:
        """How many :meth:`poll` callbacks (long-polls) wait for the next message."""
        return len(self._polls)

    def recent(self, n: int | None = None) -> Batch:
        """The last ``n`` messages in the history (all of it by default), and the cursor."""
        with self._lock:
            items = list(self._history)
            cursor = self.cursor
        return Batch(items if n is None else items[max(len(items) - n, 0) :], cursor)

    def since(self, cursor: str | None) -> Batch:
        """The messages after ``cursor``, without waiting.

        ``None`` or ``""`` means "from now": no messages, the current cursor.
        """
        with self._lock:
            return self._since_locked(cursor)

    # ------------------------------------------------------------------ writing

    def publish(self, data: Any, *, event: str | None = None) -> Message:
        """Number ``data``, keep it in the history and queue it for every subscriber.

        Never blocks: a subscriber with no room is dropped (see the module
        docs), not waited for. Safe from any greenlet, loop callback or OS
        thread. Pending long-polls are answered after the lock is released,
        in the caller's context.

        Raises:
            TypeError: ``data`` is neither a str nor JSON-serialisable.
            ValueError: ``event`` contains a line break.
        """
        with self._lock:
            seq = self._seq + 1
            message = Message(seq, f"{self._epoch}-{seq}", data, event)
            message.sse()  # checks event and data now, in the caller, before anyone sees it
            self._seq = seq
            self._history.append(message)
            subscribers = list(self._subscribers)
            polls, self._polls = self._polls, {}
        # Encoders are user code, and so is a logging handler: neither runs
        # under the real lock. Under gevent, one that yields (a socket
        # handler, say) while the lock is held would let another greenlet of
        # the thread block the whole OS thread on it, for good.
        chunks: dict[Subscription, bytes | None] = {}  # None: its encoder raised
        broken: list[tuple[Subscription, Exception]] = []
        try:
            for sub in subscribers:
                try:
                    chunks[sub] = sub.encode(message)
                except Exception as exc:  # one broken encoder must not stop the others
                    chunks[sub] = None
                    broken.append((sub, exc))
        finally:
            if len(chunks) < len(subscribers):
                for sub in subscribers:  # interrupted (GreenletExit): drop the rest, lose no order
                    chunks.setdefault(sub, None)
            dropped = self._deliver(seq, chunks)
        for sub, error in broken:
            log.error(
                "encode=%r raised on %r; that subscriber is dropped",
                sub.encode,
                message,
                exc_info=error,
            )
        for sub, why in dropped:
            _drop(sub.body, why, self._max_pending)
        for callback, cursor in polls.items():
            _run(callback, self.since(cursor))
        return message

    def subscribe(
        self,
        body: DetachedBody,
        *,
        last_event_id: str | None = _FROM_STREAM,
        encode: Callable[[Message], bytes] | None = None,
    ) -> Subscription:
        """Deliver every message published from now on to ``body``.

        If ``last_event_id`` names a message still in the history, the
        messages after it are queued first, in the same atomic step, so none
        is lost or duplicated; if it fell out of the history, a resync event
        is queued instead. By default an :class:`EventStream` uses its own
        :attr:`~EventStream.last_event_id` (the ``Last-Event-ID`` header).

        The subscription ends by itself when the body closes.

        Args:
            body: an :class:`EventStream` (messages go out as SSE events) or
                any :class:`DetachedBody`.
            last_event_id: where the client left off; ``None``: from now.
            encode: how a message becomes bytes for this body; default: SSE
                for an EventStream, one JSON object per line otherwise.
        """
        if not isinstance(body, DetachedBody):
            raise TypeError(f"subscribe() takes a DetachedBody, got {type(body).__name__}")
        is_sse = isinstance(body, EventStream)
        if last_event_id is _FROM_STREAM:
            last_event_id = body.last_event_id if isinstance(body, EventStream) else None
        if encode is None:
            encode = Message.sse if is_sse else _ndjson
        sub = Subscription(self, body, encode)
        with self._lock:
            batch = self._since_locked(last_event_id)
            if batch.resync:
                catch_up = _resync_chunk(batch, is_sse)
            else:
                catch_up = b"".join(encode(m) for m in batch.messages)
            try:
                if catch_up:
                    try:
                        body.put_nowait(catch_up)
                    except BufferFull:  # more backlog than its max_buffer: start afresh
                        resync = Batch([], batch.cursor, True)
                        body.put_nowait(_resync_chunk(resync, is_sse, "backlog too large"))
                self._subscribers[sub] = None
            except (BodyClosed, BufferFull):
                return sub  # nobody to deliver to; inactive
        body.on_close(sub.cancel)
        return sub

    def event_stream(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse | None = None,
        *,
        last_event_id: str | None = None,
        **options: Any,
    ) -> EventStream:
        """An :class:`EventStream` for this request, subscribed: return it from the app.

        Resumes from the ``Last-Event-ID`` header, or from ``last_event_id``
        when the header is absent (the first connect, when the page passes
        its cursor in the URL). ``options`` go to :class:`EventStream`.
        """
        stream = EventStream(environ, start_response, **options)
        if stream.last_event_id is None:
            stream.last_event_id = last_event_id
        self.subscribe(stream)
        return stream

    def poll(self, cursor: str | None, callback: Callable[[Batch], object]) -> Batch | None:
        """Return what is after ``cursor`` now, or arrange ``callback(batch)`` for later.

        If messages after ``cursor`` exist (or it needs a resync), they are
        returned at once and ``callback`` is not registered. Otherwise
        ``callback`` is called once, with the batch, by the next
        :meth:`publish`, in the publisher's greenlet or thread: keep it short
        and non-blocking. :meth:`cancel_poll` withdraws it. This is the
        primitive under :func:`~wsgi_detach.long_poll`.
        """
        with self._lock:
            if not cursor:
                cursor = self.cursor
            batch = self._since_locked(cursor)
            if batch.messages or batch.resync:
                return batch
            self._polls[callback] = cursor
            return None

    def cancel_poll(self, callback: Callable[[Batch], object]) -> bool:
        """Withdraw a :meth:`poll` callback; False if it already ran (or is running)."""
        with self._lock:
            return self._polls.pop(callback, None) is not None

    def disconnect_all(self) -> int:
        """End every subscriber's body cleanly and answer every pending poll; returns how many.

        For a restart or a drain: EventSource clients reconnect and resume
        from their last id, long-pollers get an empty answer and poll again.
        """
        with self._lock:
            subs = list(self._subscribers)
            self._subscribers.clear()
            polls, self._polls = self._polls, {}
        for sub in subs:
            sub.body.finish()
        for callback, cursor in polls.items():
            _run(callback, Batch([], cursor))
        return len(subs) + len(polls)

    def __repr__(self) -> str:
        return (
            f"<Hub cursor={self.cursor} history={len(self._history)}/{self._history.maxlen} "
            f"subscribers={len(self._subscribers)}>"
        )

    # ------------------------------------------------------------------ internals

    def _is_subscribed(self, sub: Subscription) -> bool:
        return sub in self._subscribers

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.pop(sub, None)

    def _since_locked(self, cursor: str | None) -> Batch:
        now = self.cursor
        if not cursor:
            return Batch([], now)
        epoch, _, seq_text = cursor.rpartition("-")
        if epoch != self._epoch or not seq_text.isdigit():
            return Batch([], now, True)
        seq = int(seq_text)
        oldest = self._history[0].seq if self._history else self._seq + 1
        if seq > self._seq or seq < oldest - 1:
            return Batch([], now, True)
        return Batch(list(itertools.islice(self._history, seq - oldest + 1, None)), now)

    def _deliver(
        self, seq: int, chunks: dict[Subscription, bytes | None]
    ) -> list[tuple[Subscription, str]]:
        """Hand in message ``seq`` encoded, then deliver every message whose turn has come.

        Publishers encode concurrently, outside the lock, so message 7 may be
        ready before message 6: it waits in ``_ready`` and whoever completes
        6 delivers both, in order -- every subscriber sees one order. Returns
        the subscribers to drop, and why.
        """
        dropped: list[tuple[Subscription, str]] = []
        with self._lock:
            self._ready[seq] = chunks
            while self._delivered + 1 in self._ready:
                self._delivered += 1
                for sub, chunk in self._ready.pop(self._delivered).items():
                    if sub not in self._subscribers:
                        continue  # cancelled or dropped meanwhile
                    why = _BROKEN if chunk is None else self._put_locked(sub, chunk)
                    if why is not None:
                        del self._subscribers[sub]
                        dropped.append((sub, why))
        return dropped

    def _put_locked(self, sub: Subscription, chunk: bytes) -> str | None:
        """Queue an encoded message for one subscriber; None, or why it must be dropped."""
        body = sub.body
        if body.buffered + len(chunk) > self._max_pending:
            return _SLOW
        try:
            body.put_nowait(chunk)
        except BufferFull:
            return _SLOW
        except BodyClosed:
            return _GONE  # the client left; on_close would unsubscribe it anyway
        return None


_SLOW: Final = "slow"
_BROKEN: Final = "broken"
_GONE: Final = "gone"


def _resync_chunk(batch: Batch, is_sse: bool, reason: str = "missed too much") -> bytes:
    notice = Message(0, batch.cursor, {"reason": reason, "cursor": batch.cursor}, RESYNC)
    return notice.sse() if is_sse else _ndjson(notice)


def _drop(body: DetachedBody, why: str, max_pending: int) -> None:
    """End a dropped subscriber after what it already has: see "Slow subscribers"."""
    if why == _GONE or body.state != "open":
        return
    if why == _BROKEN:
        body.fail(UsageError("the subscription's encode() raised; see the wsgi_detach log"))
    elif isinstance(body, EventStream):
        body.finish()
    else:
        behind = f"subscriber fell more than max_pending={max_pending} bytes behind; dropped"
        body.fail(SlowSubscriber(behind))


def _run(callback: Callable[[Batch], object], batch: Batch) -> None:
    try:
        callback(batch)
    except Exception:
        log.exception("poll callback %r raised; the other callbacks still run", callback)
