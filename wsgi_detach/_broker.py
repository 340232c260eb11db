"""Scale-out: one feed across worker processes and hosts, through Redis.

When to use it: the app runs in more than one process (``gunicorn -w 4``,
several hosts behind a load balancer) and a :class:`~wsgi_detach.Hub`'s
subscribers must see every message, whichever process published it, and
resume on whichever process they reconnect to.

When not to: one process serves everything (the in-process
:class:`~wsgi_detach.Hub` is simpler and has no network in its path), or
messages must survive the loss of Redis's data (they are kept in Redis for
replay, bounded; see docs/scale-out.md for what is and is not guaranteed).

Theory of operation
-------------------
:class:`RedisBroker` hands out one :class:`ChannelHub` per channel name, a
:class:`~wsgi_detach.Hub` with the same API. Its :meth:`~ChannelHub.publish`
runs one Lua script in Redis that numbers the message, appends it to the
channel's stream and notifies the channel (see :mod:`wsgi_detach._redis`);
it does not deliver locally. Every serving process, the publisher's
included, gets the message from its *receiver*: one receiving connection
per process, whatever the number of channels and streams, subscribed to a
channel while the process has a local subscriber (a stream, a pending poll)
for it. The receiver hands each message to the channel's hub, which keeps a
replica of the channel's recent history and fans the message out to its
local subscribers exactly as an in-process hub does.

Order and exactly-once: Redis numbers a channel's messages (``seq``) in one
order; the receiver applies them strictly in that order. A notification
whose ``seq`` is not the next one (one was missed) or a reconnect makes the
receiver read the gap from the stream before going on; a ``seq`` it already
has is dropped. Each subscriber remembers the last ``seq`` it was given, so
that the same message never reaches it twice, whether from its catch-up or
live.

Replay on any process: the replica mirrors the stream (same length), filled
from it when the channel is first subscribed in this process (one read per
channel, however many clients resume at once), so a ``Last-Event-ID`` from
any process resolves locally. A subscriber that arrives before the replica
is in sync waits, registered, and gets its catch-up the moment it is.

The receiver runs in a greenlet when gevent has monkey-patched the process
(gunicorn's gevent worker, ``python -m wsgi_detach serve``), else in a real
OS thread (gunicorn gthread, waitress); either way it hands messages over
through the bodies' thread-safe ``put_nowait``. It makes no Redis call
while a hub's lock is held. It never lets redis-py reconnect behind its
back: on any failure it logs once, waits a capped, jittered backoff,
reconnects, resubscribes and refills every channel's gap. A loop-back probe
(a PUBLISH to its own probe channel that must come back on the receiving
connection) catches a connection that is open but deaf.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import secrets
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Final

from ._body import DetachedBody
from ._broadcast import (
    _FROM_STREAM,
    BACKLOG,
    MAX_ID_LENGTH,
    OTHER_EPOCH,
    TOO_OLD,
    UNKNOWN_ID,
    Batch,
    Hub,
    Message,
    Subscription,
    _check_given_id,
    _cursor_text,
    _drop,
    _end_unserved,
    _ndjson,
    _resync_chunk,
    _run,
)
from ._errors import BodyClosed, BrokerRefused, BrokerUnavailable, BufferFull
from ._sse import EventStream, check_fields
from ._wakeup import allocate_lock, spawn_greenlet, start_real_thread

if TYPE_CHECKING:
    from ._redis import Link, Record, Subscriber

__all__ = ["ChannelHub", "RedisBroker"]

log = logging.getLogger("wsgi_detach")

#: The URL schemes redis-py understands and we accept.
SCHEMES: Final = ("redis://", "rediss://", "unix://")

_HEX: Final = frozenset("0123456789abcdef")

#: How often the receiver looks for channels to (un)subscribe when no
#: message arrives: the wait of a channel's first subscriber in a process.
_TICK: Final = 0.05
#: How often the receiver looks for channels that lost their last local user.
_SCAN: Final = 1.0
#: Most subscribers whose id the receiver asks Redis about per turn (one or
#: two round trips each); the rest wait for its next turn, after a read.
_RESOLVE_PER_TURN: Final = 32

_NOT_YET: Final[Any] = object()  # a resolve that needs the replica (or Redis) to catch up


class _Pending:
    """A subscriber registered before its catch-up could be computed."""

    __slots__ = ("cursor", "epoch", "is_sse", "seq")

    def __init__(self, cursor: str | None, is_sse: bool) -> None:
        self.cursor = cursor
        self.is_sse = is_sse
        self.seq: int | None = None  # resolved by Redis, waiting for the replica to reach it
        self.epoch = ""  # the epoch in which Redis resolved it


class ChannelHub(Hub):
    """A :class:`~wsgi_detach.Hub` whose messages go through Redis (see :meth:`RedisBroker.hub`).

    The API is the hub's, with these differences:

    * :meth:`publish` talks to Redis: it blocks the calling greenlet or
      thread for one round trip (never call it from a loop callback), and
      raises :class:`~wsgi_detach.BrokerUnavailable` within the broker's
      bound when Redis is down or frozen. The message reaches the local
      subscribers through the receiver, like everyone else's.
    * :meth:`recent`, :meth:`since` and :attr:`cursor` read the local replica
      while this process follows the channel, else Redis (one round trip).
    * ids are ``<epoch>-<seq>`` with the channel's epoch, which changes when
      Redis loses the channel's data (so old ids get a resync).
    """

    def __init__(
        self, broker: RedisBroker, channel: str, *, history: int, max_pending: int
    ) -> None:
        super().__init__(history=history, max_pending=max_pending)
        self._broker = broker
        self.channel = channel
        self._size = history
        self._replica: deque[Message] = deque(maxlen=history)
        self._given: dict[str, int] = {}  # application-chosen ids in the replica -> seq
        self._r_epoch = ""
        self._r_seq = 0
        self._synced = False  # the replica follows the stream (the receiver is subscribed)
        self._pending: dict[Subscription, _Pending] = {}
        self._after: dict[Subscription, int] = {}  # the last seq each subscriber was given
        # Bodies given neither catch-up nor resync (the shared budget is
        # full): ended, outside the lock, by _end_unserved (see there).
        self._unserved: list[tuple[DetachedBody, BufferFull]] = []

    # ------------------------------------------------------------------ reading

    @property
    def cursor(self) -> str:
        """The id of the channel's latest message (``"<epoch>-0"`` before the first)."""
        with self._lock:
            if self._synced:
                return f"{self._r_epoch}-{self._r_seq}"
        head = self._broker._link().read(self.channel, None, 1)
        return f"{head.epoch}-{head.seq}"

    @property
    def subscribers(self) -> int:
        return len(self._subscribers) + len(self._pending)

    def recent(self, n: int | None = None) -> Batch:
        with self._lock:
            if self._synced:
                items = list(self._replica)
                picked = items if n is None else items[max(len(items) - n, 0) :]
                return Batch(picked, self._cursor())
        count = self._size if n is None else min(n, self._size)
        head = self._broker._link().read(self.channel, None, max(count, 1))
        records = head.records[-count:] if count else []
        return Batch(_readables(records, self.channel), f"{head.epoch}-{head.seq}")

    def since(self, cursor: str | int | None) -> Batch:
        cursor = _cursor_text(cursor)
        with self._lock:
            if self._synced:
                found = self._resolve_locked(cursor)
                if found is not _NOT_YET:
                    return self._batch_locked(found)
        return self._since_remote(cursor)

    # ------------------------------------------------------------------ writing

    def publish(
        self,
        data: Any,
        *,
        event: str | None = None,
        id: str | int | None = None,
        retry: int | None = None,
    ) -> Message:
        """Publish ``data`` on the channel through Redis; every process's subscribers get it.

        One atomic step in Redis numbers the message, appends it to the
        channel's stream and notifies the channel; it blocks the caller for
        that round trip, and is never retried (a retry after a timeout could
        publish twice). The arguments are :meth:`Hub.publish`'s, checked
        before anything is sent.

        Raises:
            BrokerUnavailable: Redis did not answer within the broker's bound
                (``maybe_applied`` says whether it may have published).
            BrokerRefused: Redis answered with an error (out of memory, a
                read-only replica, still loading): a :class:`BrokerUnavailable`
                too, with Redis's ``reply``.
            TypeError, ValueError: as :meth:`Hub.publish`; an ``id`` still in
                the channel's history is refused by Redis, atomically.
        """
        event, given_id, retry = check_fields(event, id, retry)
        if given_id is not None:
            _check_given_id(given_id)
        is_json = not isinstance(data, str)
        text = json.dumps(data, separators=(",", ":")) if is_json else data
        record = self._broker._link().publish(
            self.channel, text, is_json=is_json, event=event, id=given_id, retry=retry
        )
        return _message(record, data)

    def publish_many(self, items: Iterable[Any], *, event: str | None = None) -> list[Message]:
        """Publish several messages in one round trip (pipelined), in order; their Messages.

        For a batch (a backlog, an import): each is numbered, appended and
        notified atomically as by :meth:`publish`, back to back, without a
        round trip each. The hub numbers them (no ids of your own here).

        Raises:
            BrokerUnavailable: as :meth:`publish`; with ``maybe_applied``
                True, any prefix of the batch may have been published.
            BrokerRefused: Redis refused some items (out of memory midway,
                say): its ``published`` has one entry per item, the
                :class:`~wsgi_detach.Message` of each published one and
                ``None`` for the others, so that a retry sends only those.
            TypeError, ValueError: a bad ``event``, or an item that is
                neither a str nor JSON-serialisable (before anything is sent).
        """
        event, _, _ = check_fields(event)
        data = list(items)
        texts = [
            (d, False) if isinstance(d, str) else (json.dumps(d, separators=(",", ":")), True)
            for d in data
        ]
        if not texts:
            return []
        try:
            records = self._broker._link().publish_many(self.channel, texts, event=event)
        except BrokerRefused as exc:
            if exc.published is not None:
                exc.published = [
                    None if record is None else _message(record, d)
                    for record, d in zip(exc.published, data)
                ]
            raise
        return [_message(record, d) for record, d in zip(records, data)]

    def comment(self, text: str = "") -> int:
        """Send an SSE comment to this process's subscribed streams (not through Redis)."""
        return super().comment(text)

    def subscribe(
        self,
        body: DetachedBody,
        *,
        last_event_id: str | None = _FROM_STREAM,
        encode: Callable[[Message], bytes] | None = None,
    ) -> Subscription:
        if not isinstance(body, DetachedBody):
            raise TypeError(f"subscribe() takes a DetachedBody, got {type(body).__name__}")
        is_sse = isinstance(body, EventStream)
        if last_event_id is _FROM_STREAM:
            last_event_id = body.last_event_id if isinstance(body, EventStream) else None
        if encode is None:
            encode = Message.sse if is_sse else _ndjson
        sub = Subscription(self, body, encode)
        with self._lock:
            synced = self._synced
        if not synced and not last_event_id:
            # "From now" must mean now, not when the receiver catches up:
            # pin the channel's position (one round trip). With Redis down,
            # "now" is when it is back.
            try:
                last_event_id = self.cursor
            except BrokerUnavailable:
                pass
        pending = _Pending(last_event_id, is_sse)
        with self._lock:
            settled = self._synced and self._settle_locked(sub, pending)
            if not settled:
                self._pending[sub] = pending
            # A replica in sync that cannot place the id (an id of the
            # application's older than it, of another epoch, or garbage):
            # Redis says where it resumes, asked here, in the caller, so that
            # many such ids cost their requests a round trip each, not the
            # receiver (and every channel's delivery) a round trip per id.
            ask_here = not settled and self._synced and bool(last_event_id)
        if ask_here:
            try:
                self._resolve_remote([sub])
            except BrokerUnavailable:
                pass  # the receiver asks once Redis is back
            with self._lock:
                held = self._pending.get(sub)
                if held is not None and self._synced and self._settle_locked(sub, held):
                    del self._pending[sub]
                settled = sub not in self._pending
        if not settled:
            self._broker._settle_soon(self)  # the receiver asks Redis where it resumes
        self._broker._follow(self)
        body.on_close(sub.cancel)
        self._end_unserved()
        return sub

    def poll(self, cursor: str | None, callback: Callable[[Batch], object]) -> Batch | None:
        if not cursor:
            cursor = self.cursor
        with self._lock:
            if self._synced:
                found = self._resolve_locked(cursor)
                if found is not _NOT_YET:
                    batch = self._batch_locked(found)
                    if batch.messages or batch.resync:
                        return batch
                    self._polls[callback] = cursor
                    return None
        # Not followed here (yet), or a cursor this replica cannot place (of
        # another epoch, or ahead of it): Redis says, in one round trip.
        try:
            batch = self._since_remote(cursor)
        except BrokerUnavailable:
            pass  # answered once the receiver is back
        else:
            if batch.messages or batch.resync:
                return batch
        with self._lock:
            self._polls[callback] = cursor
        self._broker._follow(self)
        return None

    def disconnect_all(self) -> int:
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
        for sub in pending:
            sub.body.finish()
        return len(pending) + super().disconnect_all()

    def __repr__(self) -> str:
        return (
            f"<ChannelHub {self.channel!r} cursor={self._r_epoch}-{self._r_seq} "
            f"synced={self._synced} replica={len(self._replica)} "
            f"subscribers={len(self._subscribers)} pending={len(self._pending)}>"
        )

    # ------------------------------------------------------------------ internals

    def _is_subscribed(self, sub: Subscription) -> bool:
        return sub in self._subscribers or sub in self._pending

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.pop(sub, None)
            self._pending.pop(sub, None)
            self._after.pop(sub, None)

    def _cursor(self) -> str:
        return f"{self._r_epoch}-{self._r_seq}"

    def _local_users(self) -> int:
        return len(self._subscribers) + len(self._pending) + len(self._polls)

    def _resolve_locked(self, cursor: str | None) -> Any:
        """The seq after which ``cursor`` resumes, a resync reason, or _NOT_YET."""
        if not cursor:
            return self._r_seq
        if len(cursor) > MAX_ID_LENGTH:
            return UNKNOWN_ID
        seq = self._given.get(cursor)
        if seq is None:
            epoch, dash, digits = cursor.rpartition("-")
            if not dash or not _is_seq(digits):
                return _NOT_YET  # an id of the application's not (yet) in the replica
            if epoch != self._r_epoch:
                is_epoch = len(epoch) == 6 and _HEX.issuperset(epoch)
                return _NOT_YET if is_epoch else UNKNOWN_ID
            seq = int(digits)
            if seq > self._r_seq:
                return _NOT_YET  # ahead of this replica: Redis will say
        return self._check_seq_locked(seq)

    def _check_seq_locked(self, seq: int) -> Any:
        if seq > self._r_seq:
            return _NOT_YET
        oldest = self._replica[0].seq if self._replica else self._r_seq + 1
        return TOO_OLD if seq < oldest - 1 else seq

    def _batch_locked(self, found: int | str) -> Batch:
        if isinstance(found, str):
            return Batch([], self._cursor(), True, found)
        oldest = self._replica[0].seq if self._replica else self._r_seq + 1
        return Batch(
            list(itertools.islice(self._replica, max(found - oldest + 1, 0), None)), self._cursor()
        )

    def _settle_locked(self, sub: Subscription, pending: _Pending) -> bool:
        """Queue ``sub``'s catch-up and register it, if its cursor resolves now."""
        if pending.seq is not None:
            found = (
                self._check_seq_locked(pending.seq)
                if pending.epoch == self._r_epoch
                else OTHER_EPOCH  # Redis lost the channel since it placed the cursor
            )
        else:
            found = self._resolve_locked(pending.cursor)
        if found is _NOT_YET:
            return False
        body = sub.body
        batch = self._batch_locked(found)
        if batch.resync:
            catch_up = _resync_chunk(batch._replace(reason=found), pending.is_sse)
        else:
            catch_up = b"".join(sub.encode(m) for m in batch.messages)
        try:
            if catch_up:
                try:
                    body.put_nowait(catch_up)
                except BufferFull:
                    resync = Batch([], batch.cursor, True, BACKLOG)
                    body.put_nowait(_resync_chunk(resync, pending.is_sse))
        except BodyClosed:
            return True  # nobody to deliver to
        except BufferFull as exc:
            self._unserved.append((body, exc))
            return True
        self._subscribers[sub] = None
        self._after[sub] = self._r_seq
        return True

    def _since_remote(self, cursor: str | None) -> Batch:
        """:meth:`since` from Redis, for a process that does not follow the channel."""
        link = self._broker._link()
        if not cursor:
            head = link.read(self.channel, None, 1)
            return Batch([], f"{head.epoch}-{head.seq}")
        found = self._remote_seq(cursor)
        if isinstance(found, str):
            head = link.read(self.channel, None, 1)
            return Batch([], f"{head.epoch}-{head.seq}", True, found)
        epoch, seq = found
        head = link.read(self.channel, seq, self._size)
        now = f"{head.epoch}-{head.seq}"
        if head.epoch != epoch:  # Redis lost the channel in between
            return Batch([], now, True, OTHER_EPOCH)
        first = head.records[0].seq if head.records else head.seq + 1
        if first != seq + 1:
            return Batch([], now, True, TOO_OLD)  # trimmed
        if head.records and head.records[-1].seq < head.seq:
            # More than one read's worth (another process keeps a longer
            # stream): the cursor is the last one returned, not the head, so
            # that the next call gets the rest.
            now = f"{head.epoch}-{head.records[-1].seq}"
        return Batch(_readables(head.records, self.channel), now)

    def _remote_seq(self, cursor: str) -> tuple[str, int] | str:
        """Where ``cursor`` resumes according to Redis: (epoch, seq), or why it cannot."""
        link = self._broker._link()
        if len(cursor) > MAX_ID_LENGTH:
            return UNKNOWN_ID
        head = link.read(self.channel, None, 1)
        epoch, dash, digits = cursor.rpartition("-")
        is_ours = dash and _is_seq(digits) and len(epoch) == 6 and _HEX.issuperset(epoch)
        if is_ours and epoch == head.epoch:
            seq = int(digits)
            return (epoch, seq) if seq <= head.seq else UNKNOWN_ID
        # The ids hash is emptied with every new epoch: an id found there
        # belongs to this epoch or a later one (then the check at settling,
        # against the replica's epoch, turns it into a resync). It is looked
        # up even for an id shaped like ours (<6 hex digits>-<n>) of another
        # epoch: the application may have chosen it.
        found = link.seq_of(self.channel, cursor)
        if found is not None:
            return (head.epoch, found)
        return OTHER_EPOCH if is_ours else UNKNOWN_ID

    # -- called by the receiver only (its greenlet or thread), never under a lock

    def _settle(self) -> list[Subscription]:
        """Register the pending subscribers that can be; answer the polls that can be.

        Returns the pending subscribers whose cursor only Redis can resolve.
        """
        answers: list[tuple[Callable[[Batch], object], Batch]] = []
        ask: list[Subscription] = []
        with self._lock:
            if not self._synced:
                return []
            for sub, pending in list(self._pending.items()):
                if self._settle_locked(sub, pending):
                    del self._pending[sub]
                elif pending.seq is None:
                    ask.append(sub)
            for callback, cursor in list(self._polls.items()):
                found = self._resolve_locked(cursor)
                if found is _NOT_YET:
                    continue
                batch = self._batch_locked(found)
                if batch.messages or batch.resync:
                    del self._polls[callback]
                    answers.append((callback, batch))
        self._end_unserved()
        for callback, batch in answers:
            _run(callback, batch)
        return ask

    def _resolve_remote(self, subs: list[Subscription]) -> None:
        """Ask Redis where the given pending subscribers resume; resync those it does not know."""
        for sub in subs:
            with self._lock:
                pending = self._pending.get(sub)
            if pending is None or pending.cursor is None:
                continue
            found = self._remote_seq(pending.cursor)
            with self._lock:
                if sub not in self._pending:
                    continue
                if not isinstance(found, str):
                    pending.epoch, pending.seq = found
                    continue
                del self._pending[sub]
                self._resync_locked(sub, pending.is_sse, found)
        self._end_unserved()

    def _resync_locked(self, sub: Subscription, is_sse: bool, reason: str) -> None:
        try:
            sub.body.put_nowait(_resync_chunk(Batch([], self._cursor(), True, reason), is_sse))
        except (BodyClosed, BufferFull) as exc:
            self._subscribers.pop(sub, None)
            self._after.pop(sub, None)
            if isinstance(exc, BufferFull):
                self._unserved.append((sub.body, exc))
            return
        self._subscribers[sub] = None
        self._after[sub] = self._r_seq

    def _apply(
        self,
        epoch: str,
        seq: int,
        records: list[Record],
        *,
        restart: bool = False,
        reason: str | None = None,
    ) -> None:
        """Bring the replica to (``epoch``, ``seq``) with ``records`` and deliver what is new.

        By default ``records`` continue the replica. ``restart``: the replica
        starts afresh from them (the latest history), read while nobody here
        was subscribed. ``reason``: the stream no longer continues the replica
        (Redis lost the channel, or trimmed what this process had not read);
        the replica starts afresh just before ``records``, the local
        subscribers get a resync with that cursor, then ``records``.

        Whether anybody gets a resync is decided here, under the lock, from
        the subscribers present now, not when the read began: a request may
        subscribe while the receiver reads Redis, and it is placed against
        the replica as it was. Every subscriber's ``_after`` is a seq of
        ``_r_epoch``: when the epoch changes, each one present gets a resync
        (which resets it), so none compares a new epoch's seqs with an old
        one's and silently skips the new epoch's first messages.
        """
        fresh: list[Message] = []
        answers: list[tuple[Callable[[Batch], object], Batch]] = []
        with self._lock:
            continues = bool(self._r_epoch) and epoch == self._r_epoch and (
                (records[0].seq if records else seq + 1) <= self._r_seq + 1
            )
            if restart and self._subscribers and not continues:
                reason = OTHER_EPOCH if epoch != self._r_epoch else TOO_OLD
            elif restart and self._subscribers:
                restart = False  # subscribed meanwhile; the latest history continues theirs
            if reason is None and not restart and self._r_epoch and epoch != self._r_epoch:
                reason = OTHER_EPOCH  # a replica never continues across epochs
            if self._r_epoch and epoch != self._r_epoch and self._polls:
                # Polls waiting with a cursor of the old epoch: the new epoch
                # cannot place it, so they are answered with a resync now,
                # whose cursor is just before ``records`` (the next poll
                # gets them, as a subscriber gets them after its resync).
                old = self._r_epoch + "-"
                start = f"{epoch}-{records[0].seq - 1 if records else seq}"
                for callback, cursor in list(self._polls.items()):
                    if cursor.startswith(old) or cursor in self._given:
                        del self._polls[callback]
                        answers.append((callback, Batch([], start, True, OTHER_EPOCH)))
            if restart or reason is not None:
                self._replica.clear()
                self._given.clear()
                self._r_epoch = epoch
                self._r_seq = records[0].seq - 1 if records else seq
                if reason is not None:
                    for sub in list(self._subscribers):
                        self._resync_locked(sub, isinstance(sub.body, EventStream), reason)
            for record in records:
                if record.seq <= self._r_seq:
                    continue  # a duplicate
                self._r_seq = record.seq
                message = _readable(record, self.channel)
                if message is not None:
                    self._keep_locked(message)
                    fresh.append(message)
            self._r_seq = max(self._r_seq, seq)
            self._synced = True
            subscribers = [(sub, self._after.get(sub, 0)) for sub in self._subscribers]
        self._end_unserved()
        for callback, batch in answers:
            _run(callback, batch)
        if fresh and subscribers:
            self._deliver_many(fresh, subscribers)

    def _keep_locked(self, message: Message) -> None:
        if len(self._replica) == self._replica.maxlen:
            gone = self._replica[0]
            self._given.pop(gone.id, None)
        self._replica.append(message)
        if not message.id.startswith(self._r_epoch + "-"):
            self._given[message.id] = message.seq

    def _deliver_many(
        self, messages: list[Message], subscribers: list[tuple[Subscription, int]]
    ) -> None:
        """Encode outside the lock, then queue in order for the subscribers taken with them."""
        chunks: list[tuple[Subscription, int, bytes | None]] = []
        broken: list[tuple[Subscription, Exception]] = []
        for sub, after in subscribers:
            parts: list[bytes] = []
            last = after
            try:
                for message in messages:
                    if message.seq > after:
                        parts.append(sub.encode(message))
                        last = message.seq
            except Exception as exc:
                broken.append((sub, exc))
                chunks.append((sub, last, None))
                continue
            if parts:
                chunks.append((sub, last, b"".join(parts)))
        dropped: list[tuple[Subscription, str]] = []
        with self._lock:
            for sub, last, chunk in chunks:
                if sub not in self._subscribers or self._after.get(sub, 0) >= last:
                    continue  # gone, or given these meanwhile (a resync)
                why = "broken" if chunk is None else self._put_locked(sub, chunk)
                if why is None:
                    self._after[sub] = last
                else:
                    del self._subscribers[sub]
                    self._after.pop(sub, None)
                    dropped.append((sub, why))
        for sub, error in broken:
            log.error("encode=%r raised; that subscriber is dropped", sub.encode, exc_info=error)
        for sub, why in dropped:
            _drop(sub.body, why, self._max_pending)

    def _end_unserved(self) -> None:
        """End, outside the lock, the bodies that could be given nothing (see ``_end_unserved``)."""
        with self._lock:
            unserved, self._unserved = self._unserved, []
        for body, full in unserved:
            _end_unserved(body, full)

    def _unsync_if_idle(self) -> bool:
        """Stop following the channel if nobody here needs it; True if stopped.

        The replica goes with it: unfollowed it would only go stale, and a
        process that knows many channels must not keep a history copy of each.
        Followed again, the channel is read afresh from Redis (one read).
        """
        with self._lock:
            if self._local_users():
                return False
            self._synced = False
            self._replica.clear()
            self._given.clear()
            self._r_epoch = ""
            self._r_seq = 0
            return True

    def _unsync(self) -> None:
        with self._lock:
            self._synced = False


#: Entries read per round trip when a gap is filled.
_PAGE: Final = 1000
#: The most entries one gap fill delivers (a process that was away that long
#: gets a resync and the latest history instead): bounds the memory and the
#: time the receiver spends on one channel.
_MAX_GAP: Final = 100 * _PAGE


def _read_gap(
    link: Link, channel: str, epoch: str, seq: int, size: int
) -> tuple[str, int, list[Record], str | None]:
    """Everything the stream holds after (``epoch``, ``seq``): epoch, last seq, records, reason.

    ``reason`` is None when the records continue from ``seq``; otherwise why
    they do not (the subscribers get a resync first): OTHER_EPOCH when Redis
    lost the channel (the new epoch's stream is read from its start), TOO_OLD
    when it trimmed entries not read yet, or the gap is beyond ``_MAX_GAP``
    (then the latest ``size`` records).

    ``_MAX_GAP`` bounds the entries read in all, not only those kept: a
    publisher that trims the stream faster than a page per round trip makes
    each page start over ("trimmed while read"), and the receiver, which
    serves every channel, must not chase it for ever.
    """
    reason: str | None = None
    for _ in range(3):  # a channel lost again while it is read: start over
        head = link.read(channel, seq, _PAGE)
        if head.epoch != epoch:
            epoch, seq, reason = head.epoch, 0, OTHER_EPOCH
            head = link.read(channel, 0, _PAGE)
            if head.epoch != epoch:
                continue
        records = list(head.records)
        if (records[0].seq if records else head.seq + 1) != seq + 1:
            reason = reason or TOO_OLD  # trimmed before this process read it
        last = head.seq
        seen = len(records)  # entries read, kept or not
        while records and records[-1].seq < last:
            if seen >= _MAX_GAP:
                head = link.read(channel, None, size)
                if head.epoch != epoch:
                    break
                return epoch, head.seq, head.records, reason or TOO_OLD
            page = link.read(channel, records[-1].seq, _PAGE)
            if page.epoch != epoch:
                break
            seen += len(page.records)
            if not page.records or page.records[0].seq != records[-1].seq + 1:
                records, reason = page.records, reason or TOO_OLD  # trimmed while read
            else:
                records.extend(page.records)
            last = page.seq
        else:
            return epoch, last, records, reason
    raise BrokerUnavailable(f"Redis lost channel {channel!r} again and again while it was read")


def _is_seq(digits: str) -> bool:
    return 0 < len(digits) <= 19 and digits.isascii() and digits.isdigit() and (
        digits[0] != "0" or digits == "0"
    )


def _readable(record: Record, channel: str) -> Message | None:
    """The record's message, or None (logged) for an entry whose text is not the JSON it claims.

    Our publish script writes only valid entries; a bad one was written by
    something else. It is skipped, never retried: reading it again would
    fail again.
    """
    try:
        return _message(record)
    except ValueError as exc:
        log.error(
            "skipped message %s-%s of channel %r: its text is not JSON (%s)",
            record.epoch, record.seq, channel, exc,
        )
        return None


def _readables(records: list[Record], channel: str) -> list[Message]:
    return [m for m in (_readable(r, channel) for r in records) if m is not None]


def _message(record: Record, data: Any = _NOT_YET) -> Message:
    if data is _NOT_YET:
        data = json.loads(record.text) if record.is_json else record.text
    return Message(
        record.seq,
        record.id or f"{record.epoch}-{record.seq}",
        data,
        record.event or None,
        record.retry,
        record.text,
    )


class RedisBroker:
    """Share :class:`~wsgi_detach.Hub` channels across processes and hosts through Redis.

    ::

        broker = RedisBroker()                # REDIS_URL, e.g. redis://localhost:6379/0
        room = broker.hub("room-1")           # a Hub; one per channel name

        def events(environ, start_response):  # in any worker process
            return room.event_stream(environ, start_response)

        room.publish({"text": "hi"}, event="chat")   # from any process

    Make it at import time (before a fork is fine): connections are made
    lazily in the process that uses them. See docs/scale-out.md for the
    Redis settings it relies on and what it guarantees.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL; default: the
            ``REDIS_URL`` environment variable.
        history: messages kept per channel, in Redis's stream and in each
            process's replica: how far back a client can resume. Give every
            process the same: the stream keeps what its latest publisher
            asked for (a setting changed in a deployment takes effect at
            once). A process whose history is shorter still delivers every
            message after a reconnection; only its replay reaches less far.
        ttl: seconds after a channel's last publish when Redis forgets it
            (its next id then has a new epoch); ``None``: never.
        prefix: the first part of every Redis key and channel name.
        connect_timeout: seconds to open a connection to Redis. 1 s: on a
            LAN a connect takes well under 10 ms; a second means Redis (or
            the route to it) is gone, and a publisher should hear so soon.
        socket_timeout: seconds to wait for a reply. 1 s: the publish script
            runs in microseconds; only a frozen or overloaded Redis takes
            longer. :meth:`ChannelHub.publish` raises
            :class:`~wsgi_detach.BrokerUnavailable` within
            ``connect_timeout + 3 * socket_timeout`` (the pool's wait, one
            round trip, and one more when a restarted Redis no longer knows
            the script), plus the name lookup of a host name in ``url``,
            which the system's resolver bounds, not us.
        pool_size: most publishing connections per process at once.
        probe_interval: seconds between the receiver's loop-back probes.
        probe_timeout: seconds the receiver may wait on its connection for
            a probe to come back before the connection is declared dead and
            replaced. Only the time spent waiting counts, not the time spent
            handing messages to subscribers: a receiver busy with a burst is
            behind (``lag_ms`` says how far), not deaf.
        backoff_max: the cap of the receiver's reconnection backoff, in seconds.
        linger: seconds a process keeps following a channel after its last
            local subscriber left. 10 s: long-poll clients leave between
            polls, and following a channel again costs a read of its stream.
        max_pending: see :class:`~wsgi_detach.Hub`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        history: int = 1000,
        ttl: float | None = None,
        prefix: str = "wsgi_detach",
        connect_timeout: float = 1.0,
        socket_timeout: float = 1.0,
        pool_size: int = 4,
        probe_interval: float = 5.0,
        probe_timeout: float = 2.0,
        backoff_max: float = 2.0,
        linger: float = 10.0,
        max_pending: int = 1 << 20,
    ) -> None:
        if url is None:
            url = os.environ.get("REDIS_URL", "")
            if not url:
                raise ValueError("url: pass a redis:// URL or set REDIS_URL")
        if not isinstance(url, str) or not url.startswith(SCHEMES):
            raise ValueError(f"url must start with one of {', '.join(SCHEMES)}, got {url!r}")
        for name, value in (("history", history), ("pool_size", pool_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, seconds in (
            ("connect_timeout", connect_timeout),
            ("socket_timeout", socket_timeout),
            ("probe_interval", probe_interval),
            ("probe_timeout", probe_timeout),
            ("backoff_max", backoff_max),
            ("linger", linger),
        ):
            if not isinstance(seconds, (int, float)) or not seconds > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix or "\n" in prefix:
            raise ValueError(f"prefix must be a one-line str without '{{' or '}}', got {prefix!r}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        try:
            from . import _redis  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "RedisBroker needs redis-py: pip install 'wsgi_detach[redis]'"
            ) from exc
        self.url = url
        self._history = history
        self._max_pending = max_pending
        self._options: dict[str, Any] = {
            "prefix": prefix,
            "maxlen": history,
            "ttl": 0 if ttl is None else max(int(ttl + 0.999), 1),
            "connect_timeout": float(connect_timeout),
            "socket_timeout": float(socket_timeout),
            "pool_size": pool_size,
        }
        self.prefix = prefix
        self.probe_interval = float(probe_interval)
        self.probe_timeout = float(probe_timeout)
        self.backoff_max = float(backoff_max)
        self.linger = float(linger)
        self._lock = allocate_lock()
        # Hubs are held weakly here: a hub lives while the application holds
        # it or this process follows its channel (``_held``, until ``linger``
        # after its last local user). A process that touches many channels
        # once (a read of each) keeps none of them.
        self._hubs: weakref.WeakValueDictionary[str, ChannelHub] = weakref.WeakValueDictionary()
        self._held: dict[str, ChannelHub] = {}  # channels followed, or asked to be
        self._unsettled: set[str] = set()  # channels with pending subscribers to place
        self._dirty = False  # a channel may want following: the receiver looks now
        self._pid = 0
        self._link_: Link | None = None
        self._receiver: _Receiver | None = None

    def hub(self, channel: str) -> ChannelHub:
        """The hub of ``channel`` in this broker (the same object for the same name).

        The broker keeps a hub only while something uses it: the application
        holds a reference, or this process follows the channel (a local
        subscriber or long-poll, and ``linger`` seconds after the last one).
        Then the hub, its receiving subscription and its local copy of the
        history go away, and a later ``hub(channel)`` makes a fresh one that
        reads the channel from Redis: ids and cursors stay valid across that.
        """
        # Braces are refused: the channel is its keys' {hash tag}, which ends
        # at the first "}", so every key of a channel shares one Cluster slot.
        if (
            not isinstance(channel, str)
            or not 0 < len(channel) <= 200
            or "\n" in channel
            or "{" in channel
            or "}" in channel
        ):
            raise ValueError(
                "channel must be a one-line str of 1 to 200 characters without '{' or '}', "
                f"got {channel!r}"
            )
        with self._lock:
            hub = self._hubs.get(channel)
            if hub is None:
                hub = self._hubs[channel] = ChannelHub(
                    self, channel, history=self._history, max_pending=self._max_pending
                )
            return hub

    def stats(self) -> dict[str, Any]:
        """Whether the receiver is connected, and how far behind it is (this process).

        ``connected``: the receiving connection is up and proved healthy
        (its loop-back probe came back, after the channels' reads);
        ``channels`` followed; ``reconnects`` so far;
        ``last_error``; ``lag_ms``: the last loop-back probe's round trip
        (a probe waits behind every message already on its way, so it
        measures how far behind the receiver is); ``probe_age_s``: how long
        ago that was.
        """
        receiver = self._receiver
        if receiver is None or receiver.pid != os.getpid():
            return {"connected": False, "channels": 0, "reconnects": 0, "last_error": None,
                    "lag_ms": None, "probe_age_s": None, "receiving": False}
        return receiver.stats()

    def close(self) -> None:
        """Stop this process's receiver and close its connections."""
        with self._lock:
            receiver, self._receiver = self._receiver, None
            link, self._link_ = self._link_, None
        if receiver is not None:
            receiver.stop()
        if link is not None:
            link.close()

    def __repr__(self) -> str:
        return f"<RedisBroker {self.url} channels={len(self._hubs)}>"

    # ------------------------------------------------------------------ internals

    def _link(self) -> Link:
        link = self._link_
        if link is None or self._pid != os.getpid():
            with self._lock:
                if self._link_ is None or self._pid != os.getpid():
                    from ._redis import Link

                    self._link_ = Link(self.url, **self._options)
                    self._pid = os.getpid()
                    self._receiver = None  # a parent's receiver does not run here
                link = self._link_
        return link

    def _follow(self, hub: ChannelHub) -> None:
        """Make sure this process's receiver runs, and looks for channels to follow at once.

        ``hub`` has a new local user: it is held until the receiver lets it go.
        """
        with self._lock:
            self._held[hub.channel] = hub
        self._link()
        self._dirty = True
        receiver = self._receiver
        if receiver is not None and receiver.pid == os.getpid():
            return
        with self._lock:
            if self._receiver is None or self._receiver.pid != os.getpid():
                self._receiver = _Receiver(self)
                self._receiver.start()

    def _settle_soon(self, hub: ChannelHub) -> None:
        """Have the receiver settle ``hub``'s pending subscribers at its next turn."""
        with self._lock:
            self._unsettled.add(hub.channel)

    def _take_unsettled(self) -> list[ChannelHub]:
        with self._lock:
            names, self._unsettled = self._unsettled, set()
            hubs = [self._hubs.get(name) for name in names]
            return [hub for hub in hubs if hub is not None]

    def _let_go(self, name: str) -> None:
        """The receiver no longer follows ``name``: the hub lives on only if someone holds it.

        Unless a user came meanwhile: a request may subscribe between the
        receiver's look at the hub and this call. Decided under the lock that
        :meth:`_follow` holds, so such a hub stays held (and is followed
        again at the receiver's next look), never collected while used.
        """
        with self._lock:
            hub = self._held.get(name)
            if hub is None:
                return
            with hub._lock:
                if hub._local_users():
                    return
            del self._held[name]

    def _channels(self) -> list[ChannelHub]:
        with self._lock:
            return list(self._hubs.values())


def _patched() -> bool:
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


class _Receiver:
    """This process's one receiving connection, and the loop that drives it."""

    def __init__(self, broker: RedisBroker) -> None:
        self.pid = os.getpid()
        self._broker = broker
        self._running = True
        self.connected = False
        self.reconnects = 0
        self.last_error: str | None = None
        self.lag_ms: float | None = None
        self._probed_at: float | None = None
        self._followed: set[str] = set()
        self._idle_since: dict[str, float] = {}  # followed channels without local users
        self._confirming: set[str] = set()  # SUBSCRIBE sent, its confirmation not read yet
        self._next_scan = 0.0
        self._sleep: Callable[[float], object] = time.sleep
        self._probe = f"{broker.prefix}:probe:{os.getpid()}:{secrets.token_hex(4)}"

    def start(self) -> None:
        if _patched():
            import gevent

            self._sleep = gevent.sleep
            spawn_greenlet(self._run)
        else:
            start_real_thread(self._run, name="wsgi_detach redis receiver")

    def stop(self) -> None:
        self._running = False

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "channels": len(self._followed),
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "lag_ms": self.lag_ms,
            "probe_age_s": None if self._probed_at is None else time.monotonic() - self._probed_at,
            "receiving": True,
        }

    def _run(self) -> None:
        delay = 0.05
        while self._running:
            try:
                self._session()
            except BrokerUnavailable as exc:
                error = str(exc)
            except Exception as exc:  # a bug, or keys of ours that Redis will not take
                error = repr(exc)
                if error != self.last_error:  # once, not at every attempt
                    log.exception("the Redis receiver failed; reconnecting")
            else:
                return  # stopped
            for hub in self._broker._channels():
                hub._unsync()
            if self.connected:
                # The session had proved healthy (its probe came back, after its
                # refills): this is a new outage, so the backoff starts afresh.
                # A session that failed before that (Redis still loading, a
                # command refused) keeps backing off.
                delay = 0.05
            if self.last_error is None:  # once per outage, not once per attempt
                log.warning(
                    "Redis receiving connection lost (%s); reconnecting with backoff", error
                )
            self.connected = False
            self.last_error = error
            self._followed.clear()
            self._idle_since.clear()
            # Capped, jittered: many workers must not reconnect in lock-step.
            self._sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self._broker.backoff_max)
            self.reconnects += 1
        self.connected = False

    def _session(self) -> None:
        broker = self._broker
        link = broker._link()
        conn = link.subscriber()
        try:
            conn.connect()
            conn.send("SUBSCRIBE", self._probe)
            followed = self._followed
            followed.clear()
            self._confirming.clear()
            self._next_scan = 0.0
            probe_token: str | None = None
            probe_sent = 0.0
            probe_waited = 0.0  # seconds spent waiting for a push since the probe was sent
            next_probe = time.monotonic() + broker.probe_interval
            while self._running:
                self._resubscribe(conn, link, followed)
                self._settle_unsettled()  # not a loop here: its variable would hold a hub
                before = time.monotonic()
                push = conn.read(_TICK)
                if push is None:
                    # The probe's deadline counts the time spent waiting for the
                    # connection, not the time spent handing messages out: a
                    # busy receiver (a burst to many subscribers) is behind,
                    # not deaf, and reconnecting would only make it more so.
                    probe_waited += time.monotonic() - before
                else:
                    kind, name, payload = push
                    if kind == "message" and name == self._probe:
                        if probe_token is not None and payload.decode() == probe_token:
                            self.lag_ms = (time.monotonic() - probe_sent) * 1000
                            self._probed_at = time.monotonic()
                            probe_token = None
                            if not self.connected:
                                self._healthy(link)
                    elif kind == "message":
                        self._on_message(link, name, payload)
                    elif kind == "subscribe" and name == self._probe:
                        # The first probe at once: its return (after the
                        # refills of the channels subscribed before it) is
                        # what proves the session healthy.
                        next_probe = time.monotonic()
                    elif kind == "subscribe":
                        self._confirming.discard(link.channel_of(name) or "")
                        self._refill(link, name)
                now = time.monotonic()
                if probe_token is not None and probe_waited > broker.probe_timeout:
                    raise BrokerUnavailable(
                        f"the loop-back probe did not come back within {broker.probe_timeout}s"
                    )
                if probe_token is None and now >= next_probe:
                    probe_token = secrets.token_hex(4)
                    probe_sent = now
                    probe_waited = 0.0
                    next_probe = now + broker.probe_interval
                    if link.publish_probe(self._probe, probe_token) < 1:
                        raise BrokerUnavailable("Redis lost this process's subscription")
        finally:
            conn.close()

    def _healthy(self, link: Link) -> None:
        """The connection's first probe came back: connected, logged once per transition."""
        if self.last_error is not None:
            log.warning("Redis receiving connection back (%s)", link.url)
        else:
            log.info("Redis receiving connection up (%s)", link.url)
        self.connected = True
        self.last_error = None

    def _resubscribe(self, conn: Subscriber, link: Link, followed: set[str]) -> None:
        """SUBSCRIBE the channels with local users, UNSUBSCRIBE those without.

        A full look at every channel when a hub asked (a new local user) and
        once a second otherwise (for those whose last user left), not at every
        tick: a process may know thousands of channels.
        """
        now = time.monotonic()
        if not self._broker._dirty and now < self._next_scan:
            return
        self._broker._dirty = False
        self._next_scan = now + _SCAN
        with self._broker._lock:  # before ``wanted``: a hub is held only after its user is in
            held = set(self._broker._held)
        wanted = {hub.channel: hub for hub in self._broker._channels() if hub._local_users()}
        for name in wanted.keys() - followed:
            conn.send("SUBSCRIBE", link.notify_channel(name))
            followed.add(name)
            self._confirming.add(name)
        for name in (wanted.keys() & followed) - self._confirming:
            if not wanted[name]._synced:
                # A hub made afresh for a channel followed already (its
                # predecessor was collected): no confirmation will come to
                # fill it, so it is read here.
                self._refill(link, link.notify_channel(name))
        idle = self._idle_since
        for name in followed - wanted.keys():
            since = idle.setdefault(name, now)
            if now - since >= self._broker.linger and self._broker.hub(name)._unsync_if_idle():
                conn.send("UNSUBSCRIBE", link.notify_channel(name))
                followed.discard(name)
                del idle[name]
                self._broker._let_go(name)
        for name in wanted.keys() & idle.keys():
            del idle[name]
        # Asked to be followed, but its users left first (or the connection was lost).
        for name in held - followed - wanted.keys():
            self._broker._let_go(name)

    def _refill(self, link: Link, notify_channel: str) -> None:
        """Subscribed (again), or a gap: read what the replica lacks from the stream, then settle.

        Everything after the last seq delivered here is read (in pages), not
        just this process's ``history``: another process may keep a longer
        stream, and its messages must not be skipped. If the stream no longer
        holds them (trimmed, or Redis lost the channel), the subscribers get
        a resync, then whatever the stream holds from there.
        """
        name = link.channel_of(notify_channel)
        if name is None:
            return
        hub = self._broker.hub(name)
        with hub._lock:
            epoch, seq, followed = hub._r_epoch, hub._r_seq, bool(hub._subscribers)
        if not epoch or not followed:
            # Nobody here to deliver to (yet: ``_apply`` looks again, under
            # the lock, for a request that subscribed during the read).
            head = link.read(name, None, hub._size)
            hub._apply(head.epoch, head.seq, head.records, restart=True)
        else:
            epoch, seq, records, reason = _read_gap(link, name, epoch, seq, hub._size)
            hub._apply(epoch, seq, records, reason=reason)
        self._settle(hub)

    def _on_message(self, link: Link, notify_channel: str, payload: bytes) -> None:
        from ._redis import parse_notification

        name = link.channel_of(notify_channel)
        if name is None:
            return
        hub = self._broker.hub(name)
        try:
            record = parse_notification(payload)
        except ValueError:  # not from our publish script: read the stream instead
            log.warning("ignored a malformed notification on %s: %.80r", notify_channel, payload)
            self._refill(link, notify_channel)
            return
        with hub._lock:
            synced, epoch, seq = hub._synced, hub._r_epoch, hub._r_seq
        if not synced:
            return  # its refill (on the subscribe confirmation) reads it from the stream
        if record.epoch == epoch and record.seq <= seq:
            return  # a duplicate
        if record.epoch == epoch and record.seq == seq + 1:
            hub._apply(epoch, record.seq, [record])
        else:  # a gap (a missed notification) or a new epoch: read it from the stream
            self._refill(link, notify_channel)
            return
        self._settle(hub)

    def _settle_unsettled(self) -> None:
        for hub in self._broker._take_unsettled():
            self._settle(hub)

    def _settle(self, hub: ChannelHub) -> None:
        ask = hub._settle()
        if ask:
            # Bounded per turn: the receiver goes on reading between batches.
            hub._resolve_remote(ask[:_RESOLVE_PER_TURN])
            if len(ask) > _RESOLVE_PER_TURN:
                self._broker._settle_soon(hub)
            hub._settle()
