"""The demo chat: rooms, nicknames, SSE or long-polling, in plain WSGI on the public API.

It is the example the README runs (``python -m wsgi_detach demo``), so it
lives in the package, with its page as package data, to work from an
installed wheel. Everything it uses is public: a :class:`~wsgi_detach.Hub`
per room, :meth:`Hub.event_stream` for SSE, :func:`~wsgi_detach.long_poll`
for long-polling. No framework, no monkey-patching.

HTTP API (``<room>``: 1--32 of ``a-z 0-9 - _``):

=======================================  =========================================
``GET /``                                the page (``?room=&nick=&mode=sse|poll``;
                                         ``HEAD`` too)
``GET /api/rooms/<room>/history``        ``{"messages": [...], "cursor": ...}``; a
                                         room nobody posted to: no messages,
                                         cursor ``null``
``POST /api/rooms/<room>/messages``      JSON ``{"nick", "text"}`` -> 201 ``{"id"}``;
                                         the first post makes the room
``GET /api/rooms/<room>/events``         SSE; resumes from ``Last-Event-ID``, or
                                         from ``?after=<cursor>`` on a first connect
``GET /api/rooms/<room>/poll?cursor=``   long-poll (JSON, empty after ``timeout``)
=======================================  =========================================

Each message is published as event ``chat`` with data
``{"nick", "text", "ts"}`` and the app's own id (microseconds since the
epoch, made unique per room: what a database row id would be), which the
browser keeps as ``lastEventId`` and resumes from; a client whose id fell
out of the room's history gets a ``resync`` and reloads the history. Errors are JSON
``{"error": ...}`` with a 4xx status.

Safe to leave running where others can reach it
-----------------------------------------------
The demo is the first thing people run, and it is easy to leave exposed, so
its memory is bounded by design rather than by the good manners of clients:

* Only a post makes a room; reading, streaming or polling a room nobody
  posted to creates nothing (``lobby`` exists from the start). In Redis mode
  (``redis_url``) the rooms live in Redis, and a stream or a poll takes a
  room up here before its first post, which any process may make.
* A room with no stream and no poll for ``room_idle`` seconds is evicted.
* Every room and every kept message is charged its size (for a message: text,
  nick, the encoded copies the hub keeps) against ``max_bytes``. A post that would go
  over it first evicts the least recently used rooms nobody is watching; if
  that is not enough it gets ``503``. A room's history is a ring of
  ``history`` messages, so a room that is full costs no more as it goes on.
  In Redis mode this process keeps a copy of a room's history only while it
  streams or polls the room (and the broker's ``linger`` after), filled by
  every process's posts: a watched room is charged what its copy holds,
  measured when it is taken up and at each request to it here.
* Bodies are read only up to ``_MAX_POST`` bytes (``413`` beyond), JSON is
  parsed with a nesting limit, every field has a type and a size.

Posting is same-origin only: a browser posting from another site's page (or
a plain HTML form) is refused with ``403``, and a body that is not
``application/json`` with ``415``, which also makes a cross-site ``fetch``
need a CORS preflight that the chat never grants.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections import OrderedDict, deque
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from wsgi_detach import BrokerUnavailable, Hub, Message, RedisBroker, long_poll

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["ChatApp"]

# fullmatch, not match with "$": "$" also matches before a final "\n", which
# would route "/history%0A".
_ROOM: Final = re.compile(r"/api/rooms/([a-z0-9_-]{1,32})/(history|messages|events|poll)")
_ALLOW: Final = {"history": "GET", "messages": "POST", "events": "GET", "poll": "GET"}
#: Cursors and event ids are short printable ASCII; anything else is refused
#: before it reaches the hub.
_CURSOR: Final = re.compile(r"[!-~]{1,128}")
_MAX_NICK: Final = 32
_MAX_TEXT: Final = 2000
#: A 2000-character message and a 32-character nick fit, JSON-escaped at 12
#: bytes a character (a character beyond the BMP, an emoji, is a surrogate
#: pair: ``\ud83d\ude00``), as ``JSON.stringify`` does not but other clients may.
_MAX_POST: Final = 32 * 1024
#: Deeper JSON than a message needs is refused before it is parsed: Python's
#: parser recurses once per level.
_MAX_DEPTH: Final = 8
_POLL_TIMEOUT: Final = 20.0  # under the common 30 s proxy idle limit
_RETRY_MS: Final = 1000  # how soon a dropped EventSource comes back
#: What a kept message costs besides its strings: the Message, its data dict,
#: the timestamp, the id, the history slots (measured with tracemalloc by
#: tests/test_demo.py, which pins that the charge covers the real cost).
_MESSAGE_OVERHEAD: Final = 700
#: What a room costs before its messages: its hub, the history ring, our record.
_ROOM_OVERHEAD: Final = 4096
_LOBBY: Final = "lobby"
_UNAVAILABLE: Final = "503 Service Unavailable"


class _HTTPError(Exception):
    def __init__(self, status: str, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class _Room:
    """A hub and what its kept messages cost (``sizes`` mirrors the hub's history ring).

    In Redis mode the hub's history is the channel's, posted to by every
    process: ``costs`` then holds what each message in it was charged (by
    id), measured from the hub when this process takes the room up to watch
    it, and at each request to the room while it is watched here.
    """

    __slots__ = ("bytes", "costs", "hub", "sizes", "used")

    def __init__(self, hub: Hub, history: int) -> None:
        self.hub = hub
        self.sizes: deque[int] = deque(maxlen=history)
        self.costs: dict[str, int] = {}
        self.bytes = _ROOM_OVERHEAD
        self.used = time.monotonic()

    @property
    def watched(self) -> bool:
        return bool(self.hub.subscribers or self.hub.pending_polls)


class ChatApp:
    """The chat as a WSGI application; one instance holds all its rooms.

    Args:
        history: messages kept per room, for late joiners and resuming clients.
        retry_ms: the reconnection delay sent to EventSource clients.
        max_rooms: rooms kept at once (``lobby`` included).
        max_bytes: what all rooms and their kept messages may cost, in bytes
            (see the module docs).
        room_idle: seconds a room nobody streams or polls is kept.
        redis_url: share the rooms with every process that uses the same
            Redis (``gunicorn -w 4``): each room is a channel of a
            :class:`~wsgi_detach.RedisBroker`. ``None``: rooms live in this
            process only.
        hosts: the host names the chat answers to (the ``Host`` header, port
            aside); ``None``: any. Served on a loopback address, the demo
            commands pass the loopback names, so that a web page whose own
            name was made to point at 127.0.0.1 (DNS rebinding) cannot use
            the chat as its same origin.
        proxied_hosts: names the chat is reached by through a reverse proxy
            (``chat.example.com``): answered to whatever ``hosts`` says, and
            a page served under one of them, on any port or scheme, may post
            (the proxy's ``Host`` and the browser's ``Origin`` then differ
            only by the port the proxy listens on).
    """

    def __init__(
        self,
        *,
        history: int = 200,
        retry_ms: int = _RETRY_MS,
        max_rooms: int = 1000,
        max_bytes: int = 32 << 20,
        room_idle: float = 900.0,
        redis_url: str | None = None,
        hosts: Iterable[str] | None = None,
        proxied_hosts: Iterable[str] = (),
    ) -> None:
        self._proxied = frozenset(h.lower() for h in proxied_hosts)
        self._hosts = None if hosts is None else frozenset(h.lower() for h in hosts) | self._proxied
        self._history = history
        self._broker = None if redis_url is None else RedisBroker(redis_url, history=history)
        self._retry_ms = retry_ms
        self._max_rooms = max_rooms
        self._max_bytes = max_bytes
        self._room_idle = room_idle
        self._rooms: OrderedDict[str, _Room] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._last_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._page = resources.files(__package__).joinpath("chat.html").read_bytes()
        self._rooms[_LOBBY] = _Room(self._new_hub(_LOBBY), history)
        self._bytes = _ROOM_OVERHEAD

    @property
    def rooms(self) -> int:
        """How many rooms are kept."""
        return len(self._rooms)

    @property
    def kept_bytes(self) -> int:
        """What all rooms and their kept messages are charged, in bytes."""
        return self._bytes

    def room(self, name: str, *, watch: bool = False) -> Hub | None:
        """The hub of room ``name``, or None if nobody posted to it (or it was evicted).

        In Redis mode the rooms live in Redis, shared by every process: a room
        another process made is taken up here, and ``watch=True`` (a stream or
        a long-poll) takes a room up before its first post, which may come
        from any process.
        """
        with self._lock:
            room = self._rooms.get(name)
            if room is not None:
                room.used = time.monotonic()
                self._rooms.move_to_end(name)
            elif self._broker is None:
                return None
        if room is not None:
            if self._broker is not None and (watch or room.watched):
                self._measure(name, room.hub)
            return room.hub
        # Asked outside our lock: a real lock must not be held across network I/O.
        assert self._broker is not None
        hub = self._broker.hub(name)
        kept = hub.recent(None if watch else 1).messages
        if not watch and not kept:
            return None
        # Watched, this process keeps a copy of the room's history: charged now.
        costs = {message.id: _message_cost(message) for message in kept} if watch else {}
        with self._lock:
            room = self._rooms.get(name)
            if room is None:
                self._make_room_for(_ROOM_OVERHEAD + sum(costs.values()), keep=name, new=True)
                room = self._rooms[name] = _Room(hub, self._history)
                self._bytes += _ROOM_OVERHEAD
            self._charge(room, costs)
        return hub

    def _new_hub(self, name: str) -> Hub:
        """The hub of a new room: the one place that decides where rooms live."""
        if self._broker is not None:
            return self._broker.hub(name)
        return Hub(history=self._history)

    def _new_id(self, room: str) -> str:
        """The app's own id of a new message: microseconds since the epoch, unique per room.

        Increasing across restarts (unlike a counter in memory), so a browser's
        ``Last-Event-ID`` from before a restart is never taken for a new message.
        """
        with self._lock:
            last = self._last_ids[room] = max(
                time.time_ns() // 1000, self._last_ids.get(room, 0) + 1
            )
        return str(last)

    def disconnect_all(self) -> int:
        """End every room's streams and polls cleanly (before a shutdown); returns how many."""
        with self._lock:
            hubs = [room.hub for room in self._rooms.values()]
        return sum(hub.disconnect_all() for hub in hubs)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self._route(environ, start_response)
        except _HTTPError as error:
            return _json(start_response, {"error": error.message}, error.status, error.headers)
        except BrokerUnavailable as error:  # Redis mode: down or frozen; not the client's fault
            return _json(start_response, {"error": f"chat unavailable: {error}"}, _UNAVAILABLE)

    def _route(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ["REQUEST_METHOD"]
        if self._hosts is not None and _host_name(environ) not in self._hosts:
            raise _HTTPError("421 Misdirected Request", "this chat does not answer to that host")
        if path == "/":
            if method != "HEAD":  # HEAD: GET's head, no body
                _allow(method, "GET", "GET, HEAD")
            headers = [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(self._page))),
                ("Cache-Control", "no-cache"),
                ("X-Content-Type-Options", "nosniff"),
            ]
            start_response("200 OK", headers)
            return [] if method == "HEAD" else [self._page]
        match = _ROOM.fullmatch(path)
        if match is None:
            raise _HTTPError("404 Not Found", f"no such page: {path!r}")
        name, action = match.groups()
        _allow(method, _ALLOW[action])
        if action == "messages":
            _check_same_origin(environ, self._proxied)
            message = self._post(name, _read_message(environ))
            return _json(start_response, {"id": message}, "201 Created")
        query = _query(environ)
        hub = self.room(name, watch=action != "history")
        if action == "history":
            if hub is None:
                return _json(start_response, {"messages": [], "cursor": None})
            return _json(start_response, hub.recent().as_dict())
        if hub is None:
            raise _HTTPError(
                "404 Not Found", f"no room {name!r} yet: posting a message to it makes it"
            )
        if action == "events":
            return hub.event_stream(
                environ,
                start_response,
                last_event_id=_cursor(query, "after"),
                retry=self._retry_ms,
            )
        return long_poll(
            hub, _cursor(query, "cursor"), start_response, timeout=_timeout(query), environ=environ
        )

    def _post(self, name: str, data: dict[str, Any]) -> str:
        # In Redis mode the post is charged when the room is measured after it.
        cost = _cost(data) if self._broker is None else 0
        with self._lock:
            now = time.monotonic()
            self._evict_idle(now)
            room = self._rooms.get(name)
            freed = 0
            if cost and room is not None and len(room.sizes) == room.sizes.maxlen:
                freed = room.sizes[0]  # the oldest message falls out of the ring
            new = _ROOM_OVERHEAD if room is None else 0
            self._make_room_for(cost - freed + new, keep=name, new=room is None)
            if room is None:
                room = self._rooms[name] = _Room(self._new_hub(name), self._history)
                self._bytes += _ROOM_OVERHEAD
            room.used = now
            self._rooms.move_to_end(name)
            room.bytes += cost - freed
            self._bytes += cost - freed
            if cost:
                room.sizes.append(cost)
            hub = room.hub
        # Outside our lock: publish answers long-polls in this thread, and a
        # real lock must not be held across anything that may yield.
        # Through Redis the channel numbers the messages itself: two workers
        # could make the same microsecond id, and Redis's order is the one
        # every process delivers anyway.
        own_id = None if self._broker is not None else self._new_id(name)
        message = hub.publish(data, event="chat", id=own_id)
        if self._broker is not None and (hub.subscribers or hub.pending_polls):
            self._measure(name, hub)
        return message.id

    def _measure(self, name: str, hub: Hub) -> None:
        """Redis mode: charge a watched room for what its hub keeps, whoever posted it.

        While a room is watched here, this process keeps a copy of its history,
        which every process's posts fill. Measured outside our lock (it may
        read Redis), charged under it; a room that grew through other
        processes' posts makes way by evicting rooms nobody watches.
        """
        with self._lock:
            room = self._rooms.get(name)
            known = {} if room is None else room.costs
        costs = {}
        try:
            kept = hub.recent().messages  # the local copy, or Redis before it is filled
        except BrokerUnavailable:
            return  # Redis is down: measured at the next request (a post already went)
        for message in kept:
            cost = known.get(message.id)
            costs[message.id] = _message_cost(message) if cost is None else cost
        with self._lock:
            room = self._rooms.get(name)
            if room is None or room.hub is not hub:
                return  # evicted meanwhile
            grown = sum(costs.values()) - sum(room.costs.values())
            if grown > 0:
                try:
                    self._make_room_for(grown, keep=name, new=False)
                except _HTTPError:
                    pass  # only watched rooms left: charged anyway, the next post gets 503
            self._charge(room, costs)

    def _charge(self, room: _Room, costs: dict[str, int]) -> None:
        """Replace a Redis-mode room's charge for its messages by ``costs`` (under our lock)."""
        delta = sum(costs.values()) - sum(room.costs.values())
        room.costs = costs
        room.bytes += delta
        self._bytes += delta

    def _evict_idle(self, now: float) -> None:
        for name, room in list(self._rooms.items()):
            if now - room.used < self._room_idle:
                break  # least recently used first: the rest are newer
            if name != _LOBBY and not room.watched:
                self._evict(name)

    def _make_room_for(self, cost: int, *, keep: str, new: bool) -> None:
        """Evict unwatched rooms, least recently used first, until ``cost`` fits."""
        for name, room in list(self._rooms.items()):
            fits = self._bytes + cost <= self._max_bytes
            if fits and (not new or len(self._rooms) < self._max_rooms):
                return
            if name not in (keep, _LOBBY) and not room.watched:
                self._evict(name)
        if self._bytes + cost > self._max_bytes:
            raise _HTTPError("503 Service Unavailable", "the chat is full: try again later")
        if new and len(self._rooms) >= self._max_rooms:
            raise _HTTPError("503 Service Unavailable", "too many rooms: try an existing one")

    def _evict(self, name: str) -> None:
        room = self._rooms.pop(name)
        self._last_ids.pop(name, None)
        self._bytes -= room.bytes
        room.hub.disconnect_all()  # nobody is watching; a poll racing in gets an empty answer


def _allow(method: str, allowed: str, allow_header: str | None = None) -> None:
    if method != allowed:
        raise _HTTPError(
            "405 Method Not Allowed", f"use {allowed}", [("Allow", allow_header or allowed)]
        )


def _check_same_origin(environ: WSGIEnvironment, proxied: frozenset[str]) -> None:
    """Refuse a post a browser sends from another site's page.

    Browsers send ``Origin`` with every cross-origin POST and
    ``Sec-Fetch-Site`` with every request; tools such as curl send neither
    and are let through (they could forge both anyway). ``proxied``: host
    names whose pages may post whatever the ``Host`` header (a reverse proxy
    may rewrite it, or drop the port it listens on).
    """
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if site not in (None, "same-origin", "none"):
        raise _HTTPError("403 Forbidden", "post from the chat's own page")
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None:
        host = environ.get("HTTP_HOST", "")
        try:
            parts = urlsplit(origin)
            origin_host, origin_name = parts.netloc, parts.hostname
        except ValueError:
            origin_host = origin_name = ""
        if origin_name and origin_name.lower() in proxied:
            pass  # one of our public names, seen through a proxy
        elif not host or origin_host.lower() != host.lower():
            raise _HTTPError("403 Forbidden", "post from the chat's own page")
    content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise _HTTPError("415 Unsupported Media Type", "send Content-Type: application/json")


def _host_name(environ: WSGIEnvironment) -> str:
    """The ``Host`` header's name, without the port (an IPv6 literal keeps its brackets)."""
    host = str(environ.get("HTTP_HOST") or environ.get("SERVER_NAME", ""))
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower()


#: The names a loopback-bound chat answers to.
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]")


def _read_message(environ: WSGIEnvironment) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise _HTTPError("400 Bad Request", "Content-Length is not a number") from None
    if length > _MAX_POST:
        raise _HTTPError("413 Content Too Large", f"send a JSON body of at most {_MAX_POST} bytes")
    if length <= 0:
        raise _HTTPError("411 Length Required", "send a JSON body with a Content-Length")
    raw = environ["wsgi.input"].read(length)
    if _too_deep(raw):
        raise _HTTPError("400 Bad Request", 'send {"nick": ..., "text": ...}')
    try:
        posted = json.loads(raw)
    except (ValueError, RecursionError):
        raise _HTTPError("400 Bad Request", "the body is not JSON") from None
    if not isinstance(posted, dict):
        raise _HTTPError("400 Bad Request", 'send {"nick": ..., "text": ...}')
    nick, text = posted.get("nick"), posted.get("text")
    if not isinstance(nick, str) or not isinstance(text, str):
        raise _HTTPError("400 Bad Request", "nick and text must be strings")
    nick, text = nick.strip(), text.strip()
    if not nick or not text:
        raise _HTTPError("400 Bad Request", "nick and text must not be empty")
    if len(nick) > _MAX_NICK:
        raise _HTTPError("400 Bad Request", f"nick is longer than {_MAX_NICK} characters")
    if len(text) > _MAX_TEXT:
        raise _HTTPError("400 Bad Request", f"text is longer than {_MAX_TEXT} characters")
    return {"nick": nick, "text": text, "ts": time.time()}


def _too_deep(raw: bytes) -> bool:
    """True if arrays and objects nest deeper than ``_MAX_DEPTH`` (outside strings)."""
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > _MAX_DEPTH:
                return True
        elif byte in b"]}":
            depth -= 1
    return False


def _cost(data: dict[str, Any]) -> int:
    """What keeping ``data`` in a hub's history costs: its strings, the JSON text and
    the SSE bytes the hub keeps encoded, and a fixed overhead."""
    encoded = len(json.dumps(data, separators=(",", ":")))
    return (
        sys.getsizeof(data["nick"]) + sys.getsizeof(data["text"])
        + 2 * (encoded + 50) + _MESSAGE_OVERHEAD
    )


def _message_cost(message: Message) -> int:
    """What a message a Redis-mode hub keeps costs: its strings (the data parsed from
    the JSON text, which is kept too), the SSE bytes, and a fixed overhead."""
    data = message.data
    strings = sum(sys.getsizeof(v) for v in data.values() if isinstance(v, str)) if isinstance(
        data, dict) else sys.getsizeof(data)
    return strings + 2 * (len(message.text) + 50) + _MESSAGE_OVERHEAD


def _query(environ: WSGIEnvironment) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _cursor(query: dict[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is not None and not _CURSOR.fullmatch(value):
        raise _HTTPError("400 Bad Request", f"{name} must be a cursor from this chat")
    return value


def _timeout(query: dict[str, str]) -> float:
    try:
        timeout = float(query.get("timeout", _POLL_TIMEOUT))
    except ValueError:
        timeout = math.nan
    if not math.isfinite(timeout):
        raise _HTTPError("400 Bad Request", "timeout must be a number of seconds")
    return min(max(timeout, 0.1), _POLL_TIMEOUT)


def _json(
    start_response: StartResponse,
    obj: object,
    status: str = "200 OK",
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(extra or []),
        ],
    )
    return [body]
