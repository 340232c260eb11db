"""The public testing kit's streaming client, as the integration tests call it.

The integration tests need what ordinary clients hide: arrival times of
chunks, whether a chunked response ended with its terminating zero chunk (the
only way a client can tell a complete stream from an aborted one over
HTTP/1.1), and the ability to leave abruptly. :class:`wsgi_detach.testing.Stream`
does all of it; :class:`Stream` here only keeps these tests' calling
conventions (a port, the head read on demand, a :class:`Response`). Every read
is bounded.

Also the test side of the scenario apps' endpoints (:func:`get_json`,
:func:`events`, :func:`wait_event`) and :func:`wait_until`, the one bounded
poll for conditions in another process.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from wsgi_detach import testing


@dataclass
class Response:
    """What a :class:`Stream` received, in the shape these tests read it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (monotonic, data)
    complete: bool = False  # terminating chunk seen, or Content-Length satisfied
    started: float = 0.0

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)


class Stream(testing.Stream):
    """The kit's :class:`wsgi_detach.testing.Stream` with these tests' calling conventions.

    A port (and host) instead of a URL, a 10 s default bound, the head read
    on demand (``read_head()``, or the first ``read_chunk()``), and the
    response as a :class:`Response`.
    """

    def __init__(
        self,
        port: int,
        path: str = "/",
        *,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        http10: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        authority = f"[{host}]" if ":" in host else host
        super().__init__(f"http://{authority}:{port}", path, timeout=timeout, http10=http10,
                         headers=headers, wait_head=False)

    @property
    def response(self) -> Response:
        return Response(
            status=self.status,
            headers=self.headers,
            chunks=[(a.at, a.data) for a in self.arrivals],
            # A close-delimited body that ended with a FIN looks complete to
            # a client, which is what these tests assert on ("eof").
            complete=self.complete or self.ending == "eof",
            started=self.started,
        )

    def read_head(self, timeout: float | None = None) -> Response:  # type: ignore[override]
        super().read_head(timeout)
        return self.response

    def read_chunk(self) -> bytes | None:
        """The next piece of body as it arrived; None at the end (complete or not)."""
        return self.next_chunk()

    def read_all(self, timeout: float | None = None) -> Response:  # type: ignore[override]
        """Read to the end; each wait bounded by the stream's timeout."""
        while self.next_chunk() is not None:
            pass
        return self.response


def get(port: int, path: str = "/", **kwargs: object) -> Response:
    with Stream(port, path, **kwargs) as stream:  # type: ignore[arg-type]
        return stream.read_all()


def get_json(port: int, path: str) -> Any:
    """GET ``path`` and decode its JSON body (``/_events``, ``/_stats``, ``/_server``...).

    With ``Connection: close``, so that the server, not the client, ends the
    connection, as an ordinary HTTP client's one-off request would.
    """
    response = get(port, path, headers={"Connection": "close"})
    assert response.status == 200 and response.complete, response
    return json.loads(response.body)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:  # type: ignore[no-untyped-def]
    """Poll a cross-process condition, bounded; returns whether it came true.

    :func:`wsgi_detach.testing.wait_until` raises instead; these tests
    assert on the result with their own message.
    """
    try:
        testing.wait_until(predicate, timeout, interval=interval)
    except testing.WaitTimeout:
        return False
    return True


def events(port: int, key: str) -> list[str]:
    """The names of the server-side events tests/apps.py filed under ``key``, in order."""
    return [name for name, _ in get_json(port, f"/_events?key={key}")]


def event_times(port: int, key: str) -> dict[str, float]:
    """Server-side events under ``key``: name -> wall-clock time it was filed (last wins)."""
    return {name: when for name, when in get_json(port, f"/_events?key={key}")}


def keepalive_timings(port: int, path: str, count: int) -> list[float]:
    """Seconds each of ``count`` sequential GETs took on one keep-alive connection.

    For small chunked responses (the body must end with the zero chunk): what
    a long-polling client or a chatty API client sees per request.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("latin-1")
    timings = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(request)
            data = b""
            while not data.endswith(b"0\r\n\r\n"):
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("the server closed the keep-alive connection")
                data += more
            timings.append(time.perf_counter() - started)
    return timings


def wait_event(port: int, key: str, name: str, timeout: float) -> float:
    """Wall-clock time at which the server filed event ``name`` under ``key``.

    Polls ``/_events`` (bounded); AssertionError if it did not happen in ``timeout``.
    """
    found: dict[str, float] = {}

    def happened() -> bool:
        found.update(event_times(port, key))
        return name in found

    assert wait_until(happened, timeout=timeout, interval=0.02), (
        f"{name!r} did not happen within {timeout}s (events: {found})"
    )
    return found[name]
