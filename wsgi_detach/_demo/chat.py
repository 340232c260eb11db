"""The demo chat: rooms, nicknames, SSE or long-polling, in plain WSGI on the public API.

It is the example the README runs (``python -m wsgi_detach demo``), so it
lives in the package, with its page as package data, to work from an
installed wheel. Everything it uses is public: a :class:`~wsgi_detach.Hub`
per room, :meth:`Hub.event_stream` for SSE, :func:`~wsgi_detach.long_poll`
for long-polling. No framework, no monkey-patching.

HTTP API (``<room>``: 1--32 of ``a-z 0-9 - _``):

=======================================  =========================================
``GET /``                                the page (``?room=&nick=&mode=sse|poll``)
``GET /api/rooms/<room>/history``        ``{"messages": [...], "cursor": ...}``
``POST /api/rooms/<room>/messages``      JSON ``{"nick", "text"}`` -> 201 ``{"id"}``
``GET /api/rooms/<room>/events``         SSE; resumes from ``Last-Event-ID``, or
                                         from ``?after=<cursor>`` on a first connect
``GET /api/rooms/<room>/poll?cursor=``   long-poll (JSON, empty after ``timeout``)
=======================================  =========================================

Each message is published as event ``chat`` with data
``{"nick", "text", "ts"}`` and the app's own id (microseconds since the
epoch, made unique per room: what a database row id would be), which the
browser keeps as ``lastEventId`` and resumes from; a client whose id fell
out of the room's history gets a ``resync`` and reloads the history.
"""

from __future__ import annotations

import json
import re
import threading
import time
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

from wsgi_detach import BrokerUnavailable, Hub, RedisBroker, long_poll

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["ChatApp"]

_ROOM: Final = re.compile(r"^/api/rooms/([a-z0-9_-]{1,32})/(history|messages|events|poll)$")
_MAX_NICK: Final = 32
_MAX_TEXT: Final = 2000
_MAX_POST: Final = 16 * 1024
_MAX_ROOMS: Final = 1000  # rooms live in memory; refuse to grow without bound
_POLL_TIMEOUT: Final = 20.0  # under the common 30 s proxy idle limit
_RETRY_MS: Final = 1000
_UNAVAILABLE: Final = "503 Service Unavailable"  # how soon a dropped EventSource comes back


class ChatApp:
    """The chat as a WSGI application; one instance holds all its rooms.

    Args:
        history: messages kept per room, for late joiners and resuming clients.
        retry_ms: the reconnection delay sent to EventSource clients.
        redis_url: share the rooms with every process that uses the same
            Redis (``gunicorn -w 4``): each room is a channel of a
            :class:`~wsgi_detach.RedisBroker`. ``None``: rooms live in this
            process only.
    """

    def __init__(
        self, *, history: int = 200, retry_ms: int = _RETRY_MS, redis_url: str | None = None
    ) -> None:
        self._history = history
        self._broker = None if redis_url is None else RedisBroker(redis_url, history=history)
        self._retry_ms = retry_ms
        self._rooms: dict[str, Hub] = {}
        self._last_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._page = resources.files(__package__).joinpath("chat.html").read_bytes()

    def room(self, name: str) -> Hub:
        """The hub of room ``name``, made on first use."""
        with self._lock:
            hub = self._rooms.get(name)
            if hub is None:
                if len(self._rooms) >= _MAX_ROOMS:
                    raise _HTTPError("503 Service Unavailable", "too many rooms")
                if self._broker is not None:
                    hub = self._rooms[name] = self._broker.hub(name)
                else:
                    hub = self._rooms[name] = Hub(history=self._history)
            return hub

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
            hubs = list(self._rooms.values())
        return sum(hub.disconnect_all() for hub in hubs)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self._route(environ, start_response)
        except _HTTPError as error:
            return _json(start_response, {"error": error.message}, error.status)
        except BrokerUnavailable as error:  # Redis mode: down or frozen; not the client's fault
            return _json(start_response, {"error": f"chat unavailable: {error}"}, _UNAVAILABLE)

    def _route(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ["REQUEST_METHOD"]
        if path == "/":
            _allow(method, "GET")
            headers = [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(self._page))),
                ("Cache-Control", "no-cache"),
            ]
            start_response("200 OK", headers)
            return [self._page]
        match = _ROOM.match(path)
        if match is None:
            raise _HTTPError("404 Not Found", f"no such page: {path}")
        name, action = match.groups()
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if action == "messages":
            _allow(method, "POST")
            hub = self.room(name)
            # Through Redis the channel numbers the messages itself: two
            # workers could make the same microsecond id, and Redis's order is
            # the one every process delivers anyway.
            own_id = None if self._broker is not None else self._new_id(name)
            message = hub.publish(_read_message(environ), event="chat", id=own_id)
            return _json(start_response, {"id": message.id}, "201 Created")
        _allow(method, "GET")
        hub = self.room(name)
        if action == "history":
            return _json(start_response, hub.recent(50).as_dict())
        if action == "events":
            return hub.event_stream(
                environ, start_response, last_event_id=query.get("after"), retry=self._retry_ms
            )
        try:
            timeout = min(max(float(query.get("timeout", _POLL_TIMEOUT)), 0.1), _POLL_TIMEOUT)
        except ValueError:
            raise _HTTPError("400 Bad Request", "timeout must be a number of seconds") from None
        return long_poll(hub, query.get("cursor"), start_response, timeout=timeout)


class _HTTPError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _HTTPError("405 Method Not Allowed", f"use {allowed}")


def _read_message(environ: WSGIEnvironment) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 < length <= _MAX_POST:
        raise _HTTPError("400 Bad Request", f"send a JSON body of 1 to {_MAX_POST} bytes")
    try:
        posted = json.loads(environ["wsgi.input"].read(length))
    except ValueError:
        raise _HTTPError("400 Bad Request", "the body is not JSON") from None
    if not isinstance(posted, dict):
        raise _HTTPError("400 Bad Request", 'send {"nick": ..., "text": ...}')
    nick = str(posted.get("nick", "")).strip()[:_MAX_NICK]
    text = str(posted.get("text", "")).strip()
    if not nick or not text:
        raise _HTTPError("400 Bad Request", "nick and text must not be empty")
    if len(text) > _MAX_TEXT:
        raise _HTTPError("400 Bad Request", f"text is longer than {_MAX_TEXT} characters")
    return {"nick": nick, "text": text, "ts": time.time()}


def _json(start_response: StartResponse, obj: object, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]
