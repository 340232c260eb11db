"""What the server side saw: a WSGI wrapper that records every exchange.

:class:`Observer` wraps the app a test serves (the kit's servers put it
outermost). For each request it records the path, the status the app chose,
when the server called the response's ``close()`` (PEP 3333: the server's
promise for every response it started iterating), and for each
:class:`~wsgi_detach.DetachedBody` behind the response -- found in
``environ["wsgi_detach.bodies"]``, where :func:`~wsgi_detach.detach` and
:class:`~wsgi_detach.DetachMiddleware` register them, or returned as the
body itself -- its :attr:`~wsgi_detach.DetachedBody.outcome` and when its
``on_close`` callbacks ran. Times are ``time.monotonic()``, which on Linux
and macOS is one clock for every process of the machine, so a record from a
server subprocess compares with the client's arrival times.

A served app's records are read in the test through the
:class:`~wsgi_detach.testing.LiveServer` (``exchanges()``,
``wait_closed()``); a server in a subprocess serves them as JSON under
:data:`CONTROL_PREFIX`, which the observer answers itself.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .._body import DetachedBody
from .._middleware import BODIES_KEY, DetachMiddleware, DetachStats
from ._client import CLIENT_ID_HEADER

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CONTROL_PREFIX", "BodyRecord", "Exchange", "Observer"]

#: Requests under this path go to the observer, not to the app (server
#: subprocesses answer ``exchanges`` and ``stats`` there).
CONTROL_PREFIX = "/_wsgi_detach_testing/"

_CLIENT_ID_KEY = "HTTP_" + CLIENT_ID_HEADER.upper().replace("-", "_")


@dataclass
class BodyRecord:
    """One body behind a response, as the server side saw it end."""

    #: The body's class name (``"DetachedBody"``, ``"EventStream"``...).
    kind: str
    #: Its ``outcome`` once closed (``"finished"``, ``"failed"``,
    #: ``"timed_out"``, ``"disconnected"``); ``None`` while open.
    outcome: str | None = None
    #: When its ``on_close`` callbacks ran (monotonic), ``None`` while open.
    closed_at: float | None = None


@dataclass
class Exchange:
    """One request and its response, as the app and the server handled them."""

    #: The order of arrival, from 1.
    number: int
    method: str
    path: str
    query: str
    #: The :class:`~wsgi_detach.testing.Stream` that sent it (its ``client_id``), if one did.
    client_id: str | None
    #: The ``Last-Event-ID`` request header, if any.
    last_event_id: str | None
    #: When the app was called (monotonic).
    started: float
    #: The status the app passed to ``start_response`` (``None``: not yet).
    status: str | None = None
    #: When the server called ``close()`` on the response (``None``: not yet).
    closed_at: float | None = None
    #: What the app raised (``repr``), calling it or iterating its body.
    error: str | None = None
    bodies: list[BodyRecord] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        """True once the server closed the response and every body behind it closed."""
        return self.closed_at is not None and all(b.closed_at is not None for b in self.bodies)

    @property
    def outcome(self) -> str | None:
        """The first body's outcome (``None``: no body, or still open)."""
        return self.bodies[0].outcome if self.bodies else None

    @property
    def on_close_at(self) -> float | None:
        """When the first body's ``on_close`` callbacks ran."""
        return self.bodies[0].closed_at if self.bodies else None

    def as_dict(self) -> dict[str, Any]:
        """The record as plain data (JSON-ready); :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Exchange:
        """An :class:`Exchange` from :meth:`as_dict`'s output."""
        data = dict(data)
        bodies = [BodyRecord(**b) for b in data.pop("bodies")]
        return cls(**data, bodies=bodies)


class Observer:
    """Wrap ``app``; record an :class:`Exchange` for every request it answers.

    ``middleware`` is the :class:`~wsgi_detach.DetachMiddleware` whose
    :meth:`~wsgi_detach.DetachMiddleware.stats` :meth:`stats` reports
    (default: ``app`` itself, if it is one). Safe from any thread or greenlet.
    """

    def __init__(self, app: WSGIApplication, middleware: DetachMiddleware | None = None) -> None:
        self.app = app
        self.middleware = middleware if middleware is not None else (
            app if isinstance(app, DetachMiddleware) else None)
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []

    def exchanges(self) -> list[Exchange]:
        """Every exchange so far, oldest first (copies of the live records)."""
        with self._lock:
            return [Exchange.from_dict(e.as_dict()) for e in self._exchanges]

    def stats(self) -> DetachStats | None:
        """The middleware's stats, or ``None`` without a middleware."""
        return None if self.middleware is None else self.middleware.stats()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL_PREFIX):
            return self._control(path[len(CONTROL_PREFIX):], start_response)
        with self._lock:
            exchange = Exchange(
                number=len(self._exchanges) + 1,
                method=environ.get("REQUEST_METHOD", ""),
                path=path,
                query=environ.get("QUERY_STRING", ""),
                client_id=environ.get(_CLIENT_ID_KEY),
                last_event_id=environ.get("HTTP_LAST_EVENT_ID"),
                started=time.monotonic(),
            )
            self._exchanges.append(exchange)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            exchange.status = status
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, start)
        except BaseException as exc:
            exchange.error = repr(exc)
            exchange.closed_at = time.monotonic()
            raise
        bodies: list[Any] = list(environ.get(BODIES_KEY) or ())
        if isinstance(result, DetachedBody) and not any(b is result for b in bodies):
            bodies.append(result)
        for body in bodies:
            if isinstance(body, DetachedBody):
                record = BodyRecord(type(body).__name__)
                exchange.bodies.append(record)
                body.on_close(_Closed(record, body))
        return _Watched(result, exchange)

    def _control(self, what: str, start_response: StartResponse) -> list[bytes]:
        if what == "exchanges":
            data: Any = [e.as_dict() for e in self.exchanges()]
        elif what == "stats":
            stats = self.stats()
            data = None if stats is None else asdict(stats)
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"unknown testing endpoint\n"]
        body = json.dumps(data).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]


class _Closed:
    """A body's on_close: note the time and the outcome."""

    def __init__(self, record: BodyRecord, body: DetachedBody) -> None:
        self.record = record
        self.body = body

    def __call__(self) -> None:
        self.record.outcome = self.body.outcome
        self.record.closed_at = time.monotonic()
        del self.body  # no reference kept from the record to the body


class _Watched:
    """The response, passed through; notes errors and when the server closed it.

    Keeps ``len()`` when the inner iterable has one (a server derives
    Content-Length from it, PEP 3333 "Handling the Content-Length Header").
    """

    def __init__(self, inner: Iterable[bytes], exchange: Exchange) -> None:
        self._inner = inner
        self._it: Iterator[bytes] | None = None
        self._exchange = exchange
        if callable(getattr(inner, "_exhausted", None)):
            # DetachHandler's hint that a body has no more (it then sends
            # the terminating chunk with the last one): passed through, so
            # that observing changes nothing on the wire.
            self._exhausted = inner._exhausted  # type: ignore[attr-defined]
        if hasattr(inner, "__len__"):
            self.__class__ = _WatchedSized

    def __iter__(self) -> _Watched:
        return self

    def __next__(self) -> bytes:
        if self._it is None:
            self._it = iter(self._inner)
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException as exc:
            self._exchange.error = repr(exc)
            raise

    def close(self) -> None:
        try:
            close: Callable[[], object] | None = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            if self._exchange.closed_at is None:
                self._exchange.closed_at = time.monotonic()


class _WatchedSized(_Watched):
    """A sized response (a list, say): a server may iterate it twice.

    gevent.pywsgi sums the chunks' lengths for Content-Length after it took
    the first one, so each ``iter()`` must start afresh rather than share
    one position.
    """

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[bytes]:  # type: ignore[override]
        return iter(self._inner)
