"""The broker's Redis protocol: keys, Lua scripts, the epoch. The only module that imports redis.

:mod:`wsgi_detach._broker` decides *when* to publish, read and subscribe;
this module knows *how*, and nothing else of the package sees a Redis key or
a redis-py object. It speaks to Redis through redis-py's connection classes
directly (not ``redis.Redis``), so that every timeout and every retry is
ours: redis-py's client retries a failed command by default (three times,
with backoff, in recent versions), which for a publish would mean "maybe
twice", and its ``PubSub`` resubscribes silently after a reconnect, losing
what was published in between without a word.

Keys of a channel ``C`` (``P`` is the prefix, ``wsgi_detach`` by default):

==================  =========================================================
``P:{C}:meta``      hash: ``epoch`` (6 hex digits) and ``seq`` (last number)
``P:{C}:log``       stream: one entry per message, entry id ``<seq>-0``;
                    fields ``i`` (the id the application chose, or empty),
                    ``e`` (event), ``j`` (``1``: the text is JSON), ``r``
                    (retry, or empty), ``d`` (the text)
``P:{C}:ids``       hash: application-chosen id -> seq, for those still kept
==================  =========================================================

Every key carries the channel name as its ``{hash tag}``, so that a Redis
Cluster would hold a channel's keys in one slot (the scripts touch only
those). Notifications go out on the Pub/Sub channel ``P:{C}``.

The epoch: the publish script creates ``meta`` with a fresh epoch when it is
missing, that is on the first publish and whenever Redis lost the channel
(a restart without persistence, an eviction, a TTL, a failover to a replica
that was behind), and then drops whatever is left of the old stream. Ids are
``<epoch>-<seq>``, so an id from before the loss names another epoch and
gets a resync, never a replay of different messages under the same numbers.
"""

from __future__ import annotations

import secrets
from typing import Any, Final, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ._errors import BrokerRefused, BrokerUnavailable

__all__ = ["Link", "Record", "Subscriber"]

#: What a failed network step raises in redis-py: the connection is then unusable.
_NETWORK_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)

#: Error replies with which Redis refuses a command before it writes anything:
#: out of memory (in the publish script, at its first write: HINCRBY, or DEL
#: for a new epoch), a read-only replica, loading its data, a replica without
#: its master, an unknown script. redis-py raises its own class for each and
#: strips the code from the text; the rest keep their code.
_REFUSED_CLASSES: Final = (
    OutOfMemoryError, ReadOnlyError, BusyLoadingError, MasterDownError, NoScriptError,
)
_REFUSED_CODES: Final = ("MISCONF", "BUSY", "NOREPLICAS")


def refused(what: str, where: str, error: ResponseError) -> BrokerRefused:
    """The :class:`BrokerRefused` for an error reply of Redis's."""
    reply = str(error)
    before = isinstance(error, _REFUSED_CLASSES) or reply.startswith(_REFUSED_CODES)
    return BrokerRefused(
        f"{what}: Redis at {where} refused ({type(error).__name__}): {reply}",
        reply=reply,
        maybe_applied=not before,
    )

# The publish script. KEYS: meta, log, ids. ARGV: notify channel, maxlen,
# ttl (s, 0: none), a fresh epoch (used only if meta is missing), the
# application's id (or ""), event, is-JSON flag, retry, text.
# Returns {"ok", epoch, seq} or {"dup"|"own", epoch} for a refused id.
_PUBLISH: Final = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local id = ARGV[5]
if id ~= '' then
  if redis.call('HEXISTS', KEYS[3], id) == 1 then return {'dup', epoch} end
  if string.sub(id, 1, #epoch + 1) == epoch .. '-' then return {'own', epoch} end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local maxlen = tonumber(ARGV[2])
local gone = seq - maxlen
if gone > 0 and redis.call('HLEN', KEYS[3]) > 0 then
  local old = redis.call('XRANGE', KEYS[2], gone .. '-0', gone .. '-0')
  if old[1] and old[1][2][2] ~= '' then redis.call('HDEL', KEYS[3], old[1][2][2]) end
end
redis.call('XADD', KEYS[2], 'MAXLEN', maxlen, seq .. '-0',
  'i', id, 'e', ARGV[6], 'j', ARGV[7], 'r', ARGV[8], 'd', ARGV[9])
if id ~= '' then redis.call('HSET', KEYS[3], id, seq) end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
elseif seq == 1 then
  redis.call('PERSIST', KEYS[1])
end
redis.call('PUBLISH', ARGV[1], table.concat(
  {epoch, seq, id, ARGV[6], ARGV[7], ARGV[8], ARGV[9]}, '\\n'))
return {'ok', epoch, seq}
"""

# The read script: the channel's epoch and last seq, and the entries after a
# seq (ARGV[1] >= 0: XRANGE from there; -1: the last ARGV[2] entries), all
# in one atomic step, so that the entries belong to the epoch returned.
# A missing meta is created with the fresh epoch ARGV[3], so that "now" has
# a name before the first publish, and it expires after ARGV[4] seconds
# unless a publish comes (which sets the channel's own ttl, or none): reads
# of names nobody publishes on (client-chosen room names) must not grow Redis
# without bound. KEYS: meta, log, ids.
_READ: Final = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
local seq = redis.call('HGET', KEYS[1], 'seq')
local after = tonumber(ARGV[1])
local entries
if after >= 0 then
  entries = redis.call('XRANGE', KEYS[2], '(' .. after .. '-0', '+', 'COUNT', ARGV[2])
else
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[2])
end
return {epoch, seq, entries}
"""


#: Seconds a channel record made by a read (no publish yet) is kept when the
#: broker has no ``ttl``: a day, far longer than a client waits for a first
#: message in practice; if it expires first, that client gets a resync at the
#: first message (an id of another epoch), never a wrong replay.
READ_TTL: Final = 86400


class Record(NamedTuple):
    """One message as Redis holds it."""

    epoch: str
    seq: int
    id: str  # the application's id, or "" (then the id is "<epoch>-<seq>")
    event: str  # "" for none
    is_json: bool
    retry: int | None
    text: str


class Head(NamedTuple):
    """A channel's epoch and last seq, with entries read at the same instant."""

    epoch: str
    seq: int
    records: list[Record]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_notification(payload: bytes) -> Record:
    """The record a publish script sent on the channel (see ``_PUBLISH``)."""
    epoch, seq, id, event, is_json, retry, text = payload.decode("utf-8").split("\n", 6)
    return Record(epoch, int(seq), id, event, is_json == "1", int(retry) if retry else None, text)


def _record(epoch: str, entry: Any) -> Record:
    entry_id, flat = entry
    fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    retry = _text(fields.get("r", b""))
    return Record(
        epoch,
        int(_text(entry_id).partition("-")[0]),
        _text(fields.get("i", b"")),
        _text(fields.get("e", b"")),
        _text(fields.get("j", b"0")) == "1",
        int(retry) if retry else None,
        _text(fields.get("d", b"")),
    )


class Link:
    """One process's way to a Redis server: the publishing pool, reads, receiving connections.

    Made lazily in the process that uses it (after a fork, a new one): a
    socket inherited across ``fork()`` would be shared by two processes.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://``, as redis-py reads it.
        prefix: the first part of every key.
        maxlen: entries kept per channel stream.
        ttl: seconds after the last publish when a channel's keys expire; 0: never.
        connect_timeout, socket_timeout: see :class:`~wsgi_detach.RedisBroker`.
        pool_size: most publishing connections at once.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        maxlen: int,
        ttl: int,
        connect_timeout: float,
        socket_timeout: float,
        pool_size: int,
    ) -> None:
        self.url = url
        self._prefix = prefix
        self._maxlen = maxlen
        self._ttl = ttl
        self._socket_timeout = socket_timeout
        # No retry anywhere: a command that timed out may have run, and
        # running it again could publish twice. Our callers decide.
        self._kwargs: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),
            "retry_on_timeout": False,
            "health_check_interval": 0,
            "client_name": "wsgi_detach",
            # RESP2: Pub/Sub messages are ordinary replies. Under RESP3 (the
            # default of recent redis-py) they are pushes, which its parser
            # hands to a callback and reads past.
            "protocol": 2,
        }
        self._pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=socket_timeout, **self._kwargs
        )
        self._sha: dict[str, str] = {}

    def close(self) -> None:
        self._pool.disconnect()

    # ------------------------------------------------------------------ names

    def notify_channel(self, channel: str) -> str:
        return f"{self._prefix}:{{{channel}}}"

    def channel_of(self, notify_channel: str) -> str | None:
        head = f"{self._prefix}:{{"
        if notify_channel.startswith(head) and notify_channel.endswith("}"):
            return notify_channel[len(head) : -1]
        return None

    def _keys(self, channel: str) -> tuple[str, str, str]:
        base = f"{self._prefix}:{{{channel}}}"
        return f"{base}:meta", f"{base}:log", f"{base}:ids"

    # ------------------------------------------------------------------ commands

    def _run(self, what: str, *args: Any) -> Any:
        """One command on a pooled connection; never retried. See :meth:`_run_many`.

        Raises:
            NoScriptError: for EVALSHA of a script Redis does not know.
            BrokerRefused: any other error reply.
        """
        (reply,) = self._run_many(what, [args])
        if isinstance(reply, NoScriptError):
            raise reply
        if isinstance(reply, ResponseError):
            raise refused(what, self._where(), reply) from reply
        return reply

    def _run_many(self, what: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands sent together on one pooled connection (pipelined); their replies.

        An error reply is returned as its ``ResponseError``, in its place.

        Raises:
            BrokerUnavailable: no connection within the timeouts, or the
                connection failed while the commands were under way (then
                ``maybe_applied`` is True: Redis may have run some of them).
        """
        try:
            conn = self._pool.get_connection()  # type: ignore[no-untyped-call]
        except _NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"{what}: Redis at {self._where()} unreachable: {exc}") from exc
        sent = False
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            sent = True
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except _NETWORK_ERRORS as exc:
            conn.disconnect()
            raise BrokerUnavailable(
                f"{what}: Redis at {self._where()} failed: {exc}", maybe_applied=sent
            ) from exc
        except BaseException:
            conn.disconnect()  # a half-sent or half-read exchange must not be reused
            raise
        finally:
            self._pool.release(conn)  # type: ignore[no-untyped-call]

    def _script(self, what: str, source: str, keys: tuple[str, ...], *args: Any) -> Any:
        sha = self._sha.get(source)
        if sha is not None:
            try:
                return self._run(what, "EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                pass  # a restarted Redis forgot it; it did not run: send the source
        result = self._run(what, "EVAL", source, len(keys), *keys, *args)
        if sha is None:
            import hashlib

            self._sha[source] = hashlib.sha1(source.encode("utf-8")).hexdigest()
        return result

    def publish(
        self,
        channel: str,
        text: str,
        *,
        is_json: bool,
        event: str | None,
        id: str | None,
        retry: int | None,
    ) -> Record:
        """Number, append and notify, atomically (one script); the record as stored.

        Raises:
            BrokerUnavailable: see :meth:`_run`.
            ValueError: ``id`` is still in the channel's history, or has the
                form of the ids the channel assigns itself.
        """
        reply = self._script(
            "publish",
            _PUBLISH,
            self._keys(channel),
            self.notify_channel(channel),
            self._maxlen,
            self._ttl,
            secrets.token_hex(3),
            id or "",
            event or "",
            "1" if is_json else "0",
            "" if retry is None else retry,
            text,
        )
        status, epoch = _text(reply[0]), _text(reply[1])
        if status == "dup":
            raise ValueError(
                f"id {id!r} was already published and is still in the history: a client "
                f"resuming from it could not tell the two apart"
            )
        if status == "own":
            raise ValueError(
                f"id {id!r} has the form of the ids this channel assigns itself "
                f"({epoch}-<n>); pick another, or let the channel number the message"
            )
        return Record(epoch, int(reply[2]), id or "", event or "", is_json, retry, text)

    def publish_many(
        self, channel: str, items: list[tuple[str, bool]], *, event: str | None
    ) -> list[Record]:
        """Publish ``(text, is_json)`` items in order, pipelined: one round trip for all.

        Each is its own run of the publish script (numbered, appended and
        notified atomically), sent back to back on one connection.

        Raises:
            BrokerUnavailable: see :meth:`_run_many`.
            BrokerRefused: Redis refused some of them (out of memory midway,
                say); its ``published`` holds one record per item, None for
                those not published.
        """
        keys = self._keys(channel)

        def commands(sha: str, which: list[int]) -> list[tuple[Any, ...]]:
            return [
                ("EVALSHA", sha, len(keys), *keys, self.notify_channel(channel), self._maxlen,
                 self._ttl, secrets.token_hex(3), "", event or "", "1" if items[i][1] else "0",
                 "", items[i][0])
                for i in which
            ]

        replies: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        for _ in range(2):
            sha = self._load(_PUBLISH)
            for i, reply in zip(todo, self._run_many("publish", commands(sha, todo))):
                replies[i] = reply
            # Redis forgot the script (a restart, SCRIPT FLUSH) before these
            # ran: they did not run, so they, and only they, are sent again.
            todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
            if not todo:
                break
            self._sha.pop(_PUBLISH, None)
        records: list[Record | None] = []
        error: ResponseError | None = None
        for reply, (text, is_json) in zip(replies, items):
            if isinstance(reply, ResponseError):
                error = error or reply
                records.append(None)
            else:
                epoch, seq = _text(reply[1]), int(reply[2])
                records.append(Record(epoch, seq, "", event or "", is_json, None, text))
        if error is not None:
            exc = refused("publish", self._where(), error)
            done = sum(record is not None for record in records)
            exc.args = (f"{exc.args[0]} ({done} of {len(items)} published)",)
            exc.published = records
            exc.maybe_applied = any(
                isinstance(reply, ResponseError) and refused("", "", reply).maybe_applied
                for reply in replies
            )
            raise exc from error
        return [record for record in records if record is not None]

    def _load(self, source: str) -> str:
        sha = self._sha.get(source)
        if sha is None:
            sha = self._sha[source] = _text(self._run("load", "SCRIPT", "LOAD", source))
        return sha

    def read(self, channel: str, after: int | None, count: int) -> Head:
        """The channel's epoch and last seq, and up to ``count`` records after seq ``after``.

        ``after=None``: the last ``count`` records instead. One round trip.
        """
        reply = self._script(
            "read",
            _READ,
            self._keys(channel),
            -1 if after is None else after,
            count,
            secrets.token_hex(3),
            self._ttl or READ_TTL,
        )
        epoch = _text(reply[0])
        records = [_record(epoch, entry) for entry in reply[2]]
        if after is None:
            records.reverse()
        return Head(epoch, int(reply[1]), records)

    def seq_of(self, channel: str, id: str) -> int | None:
        """The seq of a message published with the application's ``id``, if still kept."""
        found = self._run("read", "HGET", self._keys(channel)[2], id)
        return None if found is None else int(found)

    def publish_probe(self, channel: str, token: str) -> int:
        """PUBLISH ``token`` on ``channel``; how many subscribers got it."""
        return int(self._run("probe", "PUBLISH", channel, token))

    def subscriber(self) -> Subscriber:
        """A new receiving connection (not yet connected)."""
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        return Subscriber(conn, self)

    def _where(self) -> str:
        kw = self._pool.connection_kwargs
        if "path" in kw:
            return f"unix:{kw['path']}"
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"


class Subscriber:
    """One receiving (Pub/Sub) connection, driven by one greenlet or thread.

    It never reconnects or resubscribes by itself: a failure raises
    :class:`BrokerUnavailable`, and the owner decides what to do (see
    :mod:`wsgi_detach._broker`).
    """

    def __init__(self, conn: Any, link: Link) -> None:
        self._conn = conn
        self._link = link

    def connect(self) -> None:
        try:
            self._conn.connect()
        except _NETWORK_ERRORS as exc:
            self._conn.disconnect()
            raise BrokerUnavailable(f"connect to Redis at {self._link._where()}: {exc}") from exc

    def send(self, *args: str) -> None:
        try:
            self._conn.send_command(*args, check_health=False)
        except _NETWORK_ERRORS as exc:
            self._conn.disconnect()
            raise BrokerUnavailable(f"receiving connection: {exc}") from exc

    def read(self, timeout: float) -> tuple[str, str, bytes] | None:
        """The next push (kind, channel, payload), or None after ``timeout`` seconds."""
        try:
            if not self._conn.can_read(timeout):
                return None
            reply = self._conn.read_response(disable_decoding=True)
        except _NETWORK_ERRORS as exc:
            self._conn.disconnect()
            raise BrokerUnavailable(f"receiving connection: {exc}") from exc
        except ResponseError as exc:
            raise refused("receiving connection", self._link._where(), exc) from exc
        kind = _text(reply[0])
        payload = reply[2] if len(reply) > 2 else b""
        return kind, _text(reply[1]), payload if isinstance(payload, bytes) else b""

    def close(self) -> None:
        self._conn.disconnect()
