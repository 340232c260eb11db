"""Broadcast: publish a message once, deliver it to every open stream, resume after a reconnect.

When to use it: many clients watch the same feed (a chat room, a ticker, a
build log) over SSE, a plain streamed body, or long-polling, and a client
that reconnects must get what it missed -- or be told that it missed too
much.

When not to: several processes publish or serve the same feed (the hub
lives in one process's memory: use :class:`~wsgi_detach.RedisBroker`'s hubs), or
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

Ids
---
Each message has a ``seq`` (the hub's position, counting up from 1) and an
``id`` (what the client sees and hands back). The id is the application's own
when it passes one (``publish(data, id=row_id)``), verbatim; otherwise the
hub assigns ``"<epoch>-<seq>"``, where ``epoch`` is random per hub, so that an
id kept by a browser across a server restart is recognised as foreign
instead of being mistaken for a recent one. Either kind is accepted back as
``Last-Event-ID``, as ``event_stream(last_event_id=...)`` or as a long-poll
cursor, and resumes right after its message.

An application's id must be unique in its feed, as SSE ids are meant to be:
a client resuming from an id that names two messages would resume after
the wrong one and silently skip what it missed. :class:`History` enforces
it for as long as it remembers the id -- the history plus as many messages
again, at least :data:`REMEMBERED_IDS` -- by refusing the second
``publish`` with ``ValueError``; an id reused after that is accepted
(memory stays bounded), and a client still holding the old one resumes
after the new one: reusing ids is then the application's bug, which the
hub cannot see. A client whose id is remembered but older than the
history gets the resync reason ``"older than the history"``; one the hub
no longer remembers gets ``"unknown id"``.

Storage
-------
The hub keeps its messages in a :class:`MessageStore` (by default
:class:`History`, a ring buffer in this process) and talks to it through
five calls, all made under the hub's lock: ``append(data, text, *, event,
id, retry) -> Message`` numbers and keeps a message (and refuses a duplicate
id); ``resolve(client_id) -> int | str`` turns a client's id into the
``seq`` to resume after, or into the reason for a resync;
``read_since(seq) -> list[Message]`` and ``recent(n) -> list[Message]`` read;
``cursor`` and ``last_seq`` say where the latest message is. Delivery stays
in the hub: :meth:`Hub.publish` stores the message, then hands it to
``_fan_out``, which encodes it for each subscriber outside the lock and
delivers in ``seq`` order. Several processes sharing one feed use
:class:`~wsgi_detach.ChannelHub` instead (see :mod:`wsgi_detach._broker`): its
messages are numbered in Redis, outside any lock, and its receiver feeds them
to the local subscribers.

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
A client whose last id cannot be resumed from gets one ``resync`` event
instead of a replay: SSE ``event: resync`` whose data is ``{"reason": ...,
"cursor": ...}`` and whose id is the current cursor (a long-poll gets
``"resync": true`` and the ``"reason"``). It should reload its state (e.g.
fetch the recent messages) and carry on; the stream continues after it. The
reasons: ``"older than the history"`` (it was away too long), ``"from another
epoch"`` (an id of a previous run of the server), ``"unknown id"`` (anything
else: not an id this hub sent, too long, not canonical digits -- a client's
id is parsed strictly, never with ``int()`` on arbitrary text), and
``"backlog too large"`` (the replay would not fit the body's
``max_buffer``).
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Final, NamedTuple, Protocol

from ._body import DetachedBody
from ._errors import BodyClosed, BufferFull, DetachError, UsageError
from ._sse import EventStream, check_fields, encode_comment, encode_event
from ._wakeup import allocate_lock

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = [
    "RESYNC",
    "Batch",
    "History",
    "Hub",
    "Message",
    "MessageStore",
    "SlowSubscriber",
    "Subscription",
]

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
    """One published message: ``id``, ``seq``, ``event``, ``retry`` and ``data``, immutable.

    ``data`` is what was published: a ``str`` is sent as is; anything else
    is sent as its JSON text over SSE and as JSON in long-poll responses.
    ``id`` is what the client sees and echoes back (the application's own id,
    or ``"<epoch>-<seq>"``); ``seq`` is the hub's position, counting up from 1.
    """

    __slots__ = ("_sse", "data", "event", "id", "retry", "seq", "text")

    def __init__(
        self,
        seq: int,
        id: str,
        data: Any,
        event: str | None,
        retry: int | None = None,
        text: str | None = None,
    ) -> None:
        self.seq = seq
        self.id = id
        self.data = data
        self.event = event
        self.retry = retry
        if text is None:
            text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        self.text: str = text
        self._sse: bytes | None = None

    def sse(self) -> bytes:
        """This message as one SSE event, encoded once however many streams get it."""
        if self._sse is None:
            self._sse = encode_event(self.text, event=self.event, id=self.id, retry=self.retry)
        return self._sse

    def as_dict(self) -> dict[str, Any]:
        """``{"id", "event", "data"}``, for JSON."""
        return {"id": self.id, "event": self.event, "data": self.data}

    def __repr__(self) -> str:
        return f"<Message {self.id} event={self.event!r} data={self.text[:40]!r}>"


class Batch(NamedTuple):
    """What a reader gets: the messages after its cursor, and the cursor to ask with next.

    ``resync`` is True when the old cursor could not be resumed from:
    ``messages`` is then empty, ``reason`` says why (see "Resync" in the
    module docs), and the reader should reload its state and continue from
    ``cursor``.
    """

    messages: list[Message]
    cursor: str
    resync: bool = False
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"messages", "cursor", "resync"}``, and ``"reason"`` on a resync, for JSON."""
        answer: dict[str, Any] = {
            "messages": [m.as_dict() for m in self.messages],
            "cursor": self.cursor,
            "resync": self.resync,
        }
        if self.resync:
            answer["reason"] = self.reason
        return answer


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


#: Why a client's id could not be resumed from: the ``reason`` of a resync.
UNKNOWN_ID: Final = "unknown id"
OTHER_EPOCH: Final = "from another epoch"
TOO_OLD: Final = "older than the history"
BACKLOG: Final = "backlog too large"

#: How many messages, at least, beyond the history a :class:`History` still
#: knows the application's ids of (more when the history is longer): 1000
#: ids of at most MAX_ID_LENGTH characters cost well under 1 MiB.
REMEMBERED_IDS: Final = 1000

#: The longest id a client may hand back, and so the longest one the hub
#: sends: a header or query value beyond it is not one of ours (and is not
#: looked up or parsed).
MAX_ID_LENGTH: Final = 256
# An epoch is 6 hex digits (secrets.token_hex(3)); a seq at most 19 digits
# (below 2**63, and far below Python's int-conversion limit).
_EPOCH_LENGTH: Final = 6
_MAX_SEQ_DIGITS: Final = 19
_HEX: Final = frozenset("0123456789abcdef")


class MessageStore(Protocol):
    """Where a :class:`Hub` numbers, keeps and finds its messages; see "Storage" above.

    The hub calls every method under its own lock, so an implementation
    needs no lock of its own -- and must not block or yield. That rules out
    a store that asks the network (a database, Redis) on each call: the
    Redis broker is therefore not a store but a hub of its own,
    :class:`~wsgi_detach.ChannelHub`, which numbers messages in Redis
    outside any lock and keeps a local replica that it reads under its lock.
    A store is for another in-memory layout (a history bounded in bytes, an
    index of your own), not for sharing a feed between processes.
    """

    @property
    def cursor(self) -> str:
        """The id of the latest message (``"<epoch>-0"`` before the first)."""

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the latest message (0 before the first)."""

    def append(
        self, data: Any, text: str, *, event: str | None, id: str | None, retry: int | None
    ) -> Message:
        """Number and keep one message; ``id=None`` assigns ``"<epoch>-<seq>"``.

        Raises ValueError, before anything is kept, for an id it already
        holds (or one in the form it assigns itself).
        """

    def resolve(self, client_id: str) -> int | str:
        """The ``seq`` after which a client that last saw ``client_id`` resumes,
        or, when it cannot resume, the reason (:data:`UNKNOWN_ID`,
        :data:`OTHER_EPOCH`, :data:`TOO_OLD`)."""

    def read_since(self, seq: int) -> list[Message]:
        """The messages after ``seq`` (a position :meth:`resolve` returned), oldest first."""

    def recent(self, n: int | None) -> list[Message]:
        """The last ``n`` messages kept (all of them for ``None``), oldest first."""


class History:
    """The in-process :class:`MessageStore`: a ring buffer of the last ``size`` messages.

    Ids the application chose are indexed for the latest ``size + max(size,
    REMEMBERED_IDS)`` messages, so that a client that echoes one resumes
    right after it (the message that just fell out included, as for the
    hub's own ids), an older one gets "older than the history", and an id
    published again within that window is refused; the hub's own ids are
    parsed instead, strictly (see :meth:`resolve`).
    """

    __slots__ = (
        "_given",
        "_given_order",
        "_items",
        "_prefix",
        "_remember",
        "_seq",
        "cursor",
        "epoch",
    )

    def __init__(self, size: int) -> None:
        self.epoch = secrets.token_hex(_EPOCH_LENGTH // 2)
        self._prefix = self.epoch + "-"
        self._items: deque[Message] = deque(maxlen=size)
        # Application-chosen ids -> seq, for the latest `_remember` messages:
        # the history, the message that just fell out (still a place to
        # resume from, as it is for the hub's own ids, whose position is
        # parsed rather than looked up), and as many again, at least
        # REMEMBERED_IDS, before it -- so that a reused id is refused and an
        # old one answered "older than the history" well after it fell out.
        self._given: dict[str, int] = {}
        self._given_order: deque[tuple[str, int]] = deque()  # the same, oldest first
        self._remember = size + max(size, REMEMBERED_IDS)
        self._seq = 0
        self.cursor = self._prefix + "0"

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def size(self) -> int:
        """How many messages are kept at most."""
        assert self._items.maxlen is not None
        return self._items.maxlen

    def __len__(self) -> int:
        return len(self._items)

    def append(
        self, data: Any, text: str, *, event: str | None, id: str | None, retry: int | None
    ) -> Message:
        seq = self._seq + 1
        items = self._items
        if id is None:
            id = self._prefix + str(seq)
        else:
            if id in self._given:
                raise ValueError(
                    f"id {id!r} was already published (within the last {self._remember} "
                    f"messages): a client resuming from it could not tell the two apart"
                )
            if id.startswith(self._prefix):
                raise ValueError(
                    f"id {id!r} has the form of the ids this hub assigns itself "
                    f"({self._prefix}<n>); pick another, or let the hub number the message"
                )
        message = Message(seq, id, data, event, retry, text)
        items.append(message)
        given, order = self._given, self._given_order
        if not id.startswith(self._prefix):
            given[id] = seq
            order.append((id, seq))
        while order and order[0][1] <= seq - self._remember:
            del given[order.popleft()[0]]  # no longer indexed (ids are unique in the index)
        self._seq = seq
        self.cursor = id
        return message

    def resolve(self, client_id: str) -> int | str:
        """Where ``client_id`` leaves off, or why it cannot be resumed from.

        Strict, since the id comes from the client: an id of the hub's own
        form must be ``<this epoch>-<seq>`` with ``seq`` in ASCII digits, no
        leading zero and at most 19 of them, and within the history; an
        application-chosen id must still be kept. Anything else is a reason,
        never an exception.
        """
        if len(client_id) > MAX_ID_LENGTH:
            return UNKNOWN_ID
        seq = self._given.get(client_id)
        if seq is not None:
            return TOO_OLD if seq < self._oldest() - 1 else seq
        epoch, dash, digits = client_id.rpartition("-")
        if not dash or not _is_seq(digits):
            return UNKNOWN_ID
        if epoch != self.epoch:
            is_epoch = len(epoch) == _EPOCH_LENGTH and _HEX.issuperset(epoch)
            return OTHER_EPOCH if is_epoch else UNKNOWN_ID
        seq = int(digits)
        if seq > self._seq:
            return UNKNOWN_ID  # ahead of the hub: never one of its ids
        if seq < self._oldest() - 1:
            return TOO_OLD
        return seq

    def read_since(self, seq: int) -> list[Message]:
        return list(itertools.islice(self._items, max(seq - self._oldest() + 1, 0), None))

    def recent(self, n: int | None) -> list[Message]:
        items = list(self._items)
        return items if n is None else items[max(len(items) - n, 0) :]

    def _oldest(self) -> int:
        return self._items[0].seq if self._items else self._seq + 1

    def __repr__(self) -> str:
        return f"<History {len(self._items)}/{self.size} epoch={self.epoch}>"


def _is_seq(digits: str) -> bool:
    """ASCII digits, canonical (no leading zero), short enough to convert at once."""
    return (
        0 < len(digits) <= _MAX_SEQ_DIGITS
        and digits.isascii()
        and digits.isdigit()
        and (digits[0] != "0" or digits == "0")
    )


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
        store: where messages are numbered and kept (see "Storage" in the
            module docs); default: a :class:`History` of ``history`` messages.

    Every method is safe from any greenlet, loop callback or OS thread, and
    none blocks.
    """

    def __init__(
        self,
        *,
        history: int = _DEFAULT_HISTORY,
        max_pending: int = _DEFAULT_MAX_PENDING,
        store: MessageStore | None = None,
    ) -> None:
        for name, value in (("history", history), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._max_pending = max_pending
        self._lock = allocate_lock()
        self._store: MessageStore = History(history) if store is None else store
        self._delivered = self._store.last_seq  # the last seq delivered to every subscriber
        self._ready: dict[int, dict[Subscription, bytes | None]] = {}  # encoded, awaiting turn
        self._subscribers: dict[Subscription, None] = {}  # insertion-ordered set
        self._polls: dict[Callable[[Batch], object], str] = {}  # one-shot callbacks

    # ------------------------------------------------------------------ reading

    @property
    def cursor(self) -> str:
        """The id of the latest message (``"<epoch>-0"`` before the first)."""
        return self._store.cursor

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
            return Batch(self._store.recent(n), self._store.cursor)

    def since(self, cursor: str | int | None) -> Batch:
        """The messages after ``cursor``, without waiting.

        ``None`` or ``""`` means "from now": no messages, the current cursor.
        """
        with self._lock:
            return self._since_locked(cursor)

    # ------------------------------------------------------------------ writing

    def publish(
        self,
        data: Any,
        *,
        event: str | None = None,
        id: str | int | None = None,
        retry: int | None = None,
    ) -> Message:
        """Number ``data``, keep it in the history and queue it for every subscriber.

        Never blocks: a subscriber with no room is dropped (see the module
        docs), not waited for. Safe from any greenlet, loop callback or OS
        thread. Pending long-polls are answered after the lock is released,
        in the caller's context. Every argument is checked first: a bad one
        raises here, and nothing is numbered, kept or sent.

        Args:
            data: a str (sent as is) or anything ``json.dumps`` takes.
            event: the SSE event type (``addEventListener(event)``);
                ``None``: ``"message"``.
            id: the application's own id for this message (a database row
                id, an offset), sent verbatim as the SSE ``id`` and accepted
                back as ``Last-Event-ID`` or a long-poll cursor: a client
                that echoes it gets exactly what was published after it.
                ``None``: the hub assigns ``"<epoch>-<seq>"``.
            retry: milliseconds: the client's reconnection delay from this
                event on, sent as a ``retry:`` field with it.

        Returns:
            The :class:`Message`, with its ``id``.

        Raises:
            TypeError: ``data`` is neither a str nor JSON-serialisable;
                ``event`` is not a str, ``id`` not a str or int, ``retry``
                not an int (bool, float and str are refused).
            ValueError: ``event`` or ``id`` contains CR or LF; ``id``
                contains NUL, starts or ends with whitespace, is empty,
                longer than :data:`MAX_ID_LENGTH`,
                already published among the messages the hub remembers
                (see "Ids" in the module docs), or of the hub's own
                ``<epoch>-<n>`` form; ``retry`` is negative or above
                :data:`~wsgi_detach._sse.MAX_RETRY` (2**31 - 1).
        """
        event, given_id, retry = check_fields(event, id, retry)
        if given_id is not None:
            _check_given_id(given_id)
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        with self._lock:
            message = self._store.append(data, text, event=event, id=given_id, retry=retry)
            subscribers = list(self._subscribers)
            polls, self._polls = self._polls, {}
        self._fan_out(message, subscribers, polls)
        return message

    def comment(self, text: str = "") -> int:
        """Send an SSE comment to every subscriber that gets SSE; returns how many.

        That is every subscription whose ``encode`` is SSE's
        (:meth:`Message.sse`, the default for an :class:`EventStream`),
        whatever the body: a comment line is only meaningful in an event
        stream, so a subscriber given NDJSON or a custom encoding gets
        nothing. A comment is never an event: ``EventSource`` handlers do
        not see it, nothing is numbered or kept, and a reconnecting client
        does not get it again. Each line of ``text`` (split at CR, LF or
        CRLF) becomes a comment line of its own, so a line break cannot turn
        the rest into an event. A comment may overtake
        a message that a concurrent :meth:`publish` is still encoding; it
        counts against ``max_pending`` like a message.

        Raises:
            TypeError: ``text`` is not a str.
        """
        chunk = encode_comment(text)
        dropped: list[tuple[Subscription, str]] = []
        with self._lock:
            reached = 0
            for sub in [s for s in self._subscribers if s.encode is Message.sse]:
                why = self._put_locked(sub, chunk)
                if why is None:
                    reached += 1
                else:
                    del self._subscribers[sub]
                    dropped.append((sub, why))
        for sub, why in dropped:
            _drop(sub.body, why, self._max_pending)
        return reached

    def _fan_out(
        self,
        message: Message,
        subscribers: list[Subscription],
        polls: dict[Callable[[Batch], object], str],
    ) -> None:
        """Encode ``message`` for each subscriber, deliver it in ``seq`` order, answer the polls.

        ``subscribers`` and ``polls`` were taken under the lock in the same
        step that stored the message (that is what makes subscribe's
        "replay, then register" exact).
        """
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
            dropped = self._deliver(message.seq, chunks)
        for sub, error in broken:
            log.error(
                "encode=%r raised on %r; that subscriber is dropped",
                sub.encode,
                message,
                exc_info=error,
            )
        for sub, why in dropped:
            _drop(sub.body, why, self._max_pending)
        # Pending polls mostly share a cursor (they waited for this very
        # message): one batch per cursor, the same object for each of them,
        # which long_poll then renders once.
        batches: dict[str, Batch] = {}
        for callback, cursor in polls.items():
            batch = batches.get(cursor)
            if batch is None:
                batch = batches[cursor] = self.since(cursor)
            _run(callback, batch)

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
        is queued instead. If not even the resync fits (the shared
        ``max_buffered`` budget is full), the body is ended rather than left
        open and silent: an EventStream cleanly, so the browser reconnects
        and resumes later; any other body as failed. The subscription
        returned is then inactive. By default an :class:`EventStream` uses its own
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
                        resync = Batch([], batch.cursor, True, BACKLOG)
                        body.put_nowait(_resync_chunk(resync, is_sse))
                self._subscribers[sub] = None
            except BodyClosed:
                return sub  # nobody to deliver to; inactive
            except BufferFull as exc:
                unserved: BufferFull | None = exc
            else:
                unserved = None
        if unserved is not None:
            _end_unserved(body, unserved)
            return sub  # inactive
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
        its cursor in the URL); an id that cannot be resumed from gets a
        resync, never an error. ``options`` go to :class:`EventStream`.
        Should subscribing raise, the stream is closed before the error goes
        on, so nothing it was charged stays behind.
        """
        stream = EventStream(environ, start_response, **options)
        try:
            if stream.last_event_id is None:
                stream.last_event_id = last_event_id
            self.subscribe(stream)
        except BaseException:
            stream.close()  # never returned, so nobody else would: give its bytes back
            raise
        return stream

    def poll(self, cursor: str | None, callback: Callable[[Batch], object]) -> Batch | None:
        """Return what is after ``cursor`` now, or arrange ``callback(batch)`` for later.

        If messages after ``cursor`` exist (or it needs a resync), they are
        returned at once and ``callback`` is not registered. Otherwise
        ``callback`` is called once, with the batch, by the next
        :meth:`publish`, in the publisher's greenlet or thread: keep it short
        and non-blocking. Callbacks that waited with the same cursor get the
        same :class:`Batch` object: treat it as read-only. :meth:`cancel_poll`
        withdraws it. This is the
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
        if callback not in self._polls:
            # Answered already (the usual case: every answered poll's body
            # withdraws it on close). A callback taken out is never put back,
            # so this needs no lock.
            return False
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
            f"<Hub cursor={self.cursor} store={self._store!r} subscribers={len(self._subscribers)}>"
        )

    # ------------------------------------------------------------------ internals

    def _is_subscribed(self, sub: Subscription) -> bool:
        return sub in self._subscribers

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.pop(sub, None)

    def _since_locked(self, cursor: str | int | None) -> Batch:
        store = self._store
        now = store.cursor
        cursor = _cursor_text(cursor)
        if not cursor or cursor == now:
            # Nothing after the latest id: the usual long-poll, which comes
            # back with the cursor its last answer gave it, is not resolved.
            return Batch([], now)
        position = store.resolve(cursor)
        if isinstance(position, str):
            return Batch([], now, True, position)
        return Batch(store.read_since(position), now)

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


def _cursor_text(cursor: str | int | None) -> str | None:
    """A cursor as the id text it names: an int is an id the application published as an int."""
    if cursor is None or isinstance(cursor, str):
        return cursor
    if isinstance(cursor, bool) or not isinstance(cursor, int):
        raise TypeError(f"a cursor must be a str (an id), got {type(cursor).__name__}")
    return str(cursor)


def _check_given_id(id: str) -> None:
    """What :func:`check_fields` leaves to the hub: an id a client can hand back."""
    if not id:
        raise ValueError(
            "id must not be empty (it would clear the client's last id); "
            "pass None to let the hub number the message"
        )
    if len(id) > MAX_ID_LENGTH:
        raise ValueError(
            f"id must be at most {MAX_ID_LENGTH} characters (longer ones are not accepted "
            f"back from clients), got {len(id)}"
        )


def _resync_chunk(batch: Batch, is_sse: bool) -> bytes:
    data = {"reason": batch.reason, "cursor": batch.cursor}
    notice = Message(0, batch.cursor, data, RESYNC)
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


def _end_unserved(body: DetachedBody, full: BufferFull) -> None:
    """End a body that could be given neither its catch-up nor a resync (no room at all).

    That happens when the shared ``max_buffered`` budget is exhausted by
    other bodies. Left open, the body would get nothing but heartbeats, and
    an EventSource never reconnects from a stream that stays open: it would
    stay silent for good. Forcing the bytes in past the budget would break
    the memory bound the budget exists for. So an :class:`EventStream` ends
    cleanly -- the browser reconnects after its ``retry`` delay with the same
    ``Last-Event-ID`` and gets its catch-up once there is room -- and a plain
    body fails, so that its client sees an incomplete response.
    """
    if isinstance(body, EventStream):
        body.finish()
    else:
        body.fail(full)


def _run(callback: Callable[[Batch], object], batch: Batch) -> None:
    try:
        callback(batch)
    except Exception:
        log.exception("poll callback %r raised; the other callbacks still run", callback)
