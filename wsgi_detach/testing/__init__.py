"""wsgi_detach.testing: test a streaming WSGI app on a real server with a misbehaving client.

When to use it: your app streams (SSE, long-polling, a detached body) and
you want to test what a user of it sees and what the server does when
clients are slow, leave, reset or come back -- over a real socket, on the
server you deploy on. In-process test clients (Werkzeug's, Django's) read a
body to its end in the calling thread and cannot play a client that stalls
or vanishes.

When not to: an ordinary request/response app; an in-process test client is
faster and enough.

The parts:

* :func:`serve` -- the app on a real server (:data:`SERVERS`) on a free
  port of 127.0.0.1, in a thread or a subprocess, for the duration of a
  ``with`` block; a :class:`LiveServer` that tells what the server side saw
  (:meth:`~LiveServer.wait_closed`, :meth:`~LiveServer.wait_idle`) and what it
  logged.
* :class:`Stream` -- one request whose head is there at once and whose body
  arrives chunk by chunk with arrival times, parsed as SSE
  (:meth:`~Stream.next_event`) or JSON; it can :meth:`~Stream.stall`,
  :meth:`~Stream.half_close`, :meth:`~Stream.reset` or :meth:`~Stream.vanish`.
* :class:`EventSource` -- an SSE client that follows ``retry`` and
  reconnects with ``Last-Event-ID``, as a browser does.
* :class:`SSEParser` -- the WHATWG event-stream parsing rules, literally.
* A pytest plugin (:mod:`wsgi_detach_pytest.plugin`, enabled on request)
  with fixtures for all of it.

Every wait is bounded and fails with :class:`WaitTimeout`, whose message
says what was awaited and what was seen. Standard-library sockets only: the
test process needs no gevent monkey-patching (and may have it).
"""

from __future__ import annotations

from ._client import (
    CLIENT_ID_HEADER,
    SMALL_RCVBUF,
    Arrival,
    EventSource,
    Stream,
    WaitTimeout,
    get,
    get_json,
    wait_until,
)
from ._observe import CONTROL_PREFIX, BodyRecord, Exchange, Observer
from ._servers import (
    PROCESS_ONLY,
    SERVERS,
    SMALL_SNDBUF,
    LiveServer,
    ProcessServer,
    ServerDidNotStart,
    ThreadServer,
    serve,
)
from ._sse import SSEEvent, SSEParser, parse_sse

__all__ = [
    "CLIENT_ID_HEADER",
    "CONTROL_PREFIX",
    "PROCESS_ONLY",
    "SERVERS",
    "SMALL_RCVBUF",
    "SMALL_SNDBUF",
    "Arrival",
    "BodyRecord",
    "EventSource",
    "Exchange",
    "LiveServer",
    "Observer",
    "ProcessServer",
    "SSEEvent",
    "SSEParser",
    "ServerDidNotStart",
    "Stream",
    "ThreadServer",
    "WaitTimeout",
    "get",
    "get_json",
    "parse_sse",
    "serve",
    "wait_until",
]
