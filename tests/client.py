"""A raw HTTP/1.1 client on blocking sockets that records when each chunk arrived.

The integration tests need what ordinary clients hide: arrival times of
chunks, whether a chunked response ended with its terminating zero chunk (the
only way a client can tell a complete stream from an aborted one over
HTTP/1.1), and the ability to leave abruptly. Every read is bounded by a
socket timeout.

Also the test side of the scenario apps' endpoints (:func:`get_json`,
:func:`events`, :func:`wait_event`) and :func:`wait_until`, the one bounded
poll for conditions in another process.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (monotonic, data)
    complete: bool = False  # terminating chunk seen, or Content-Length satisfied
    started: float = 0.0

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)


class Stream:
    """One request on its own connection; read the response step by step."""

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
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.response = Response(started=time.monotonic())
        self._buf = b""
        version = "HTTP/1.0" if http10 else "HTTP/1.1"
        lines = [f"GET {path} {version}", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self._mode = ""
        self._remaining = 0

    # -- low-level reading
    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self._buf += data
        return True

    def _line(self) -> bytes | None:
        while b"\r\n" not in self._buf:
            if not self._fill():
                return None
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def read_head(self) -> Response:
        status = self._line()
        if status is None:
            raise ConnectionError("connection closed before a status line")
        self.response.status = int(status.split()[1])
        while True:
            line = self._line()
            if line is None:
                raise ConnectionError("connection closed inside the headers")
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.response.headers[name.strip().lower()] = value.strip()
        headers = self.response.headers
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self._mode = "chunked"
        elif "content-length" in headers:
            self._mode = "length"
            self._remaining = int(headers["content-length"])
            if self._remaining == 0:
                self.response.complete = True
        else:
            self._mode = "close"
        return self.response

    def read_chunk(self) -> bytes | None:
        """The next piece of body as it arrived; None at the end (complete or not)."""
        if not self._mode:
            self.read_head()
        if self.response.complete:
            return None
        if self._mode == "chunked":
            size_line = self._line()
            if size_line is None:
                return None  # aborted: no terminating chunk
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                self._line()
                self.response.complete = True
                return None
            while len(self._buf) < size + 2:
                if not self._fill():
                    return None
            data, self._buf = self._buf[:size], self._buf[size + 2 :]
        else:
            if not self._buf and not self._fill():
                if self._mode == "close":
                    self.response.complete = True  # indistinguishable, HTTP/1.0 style
                return None
            data, self._buf = self._buf, b""
            if self._mode == "length":
                data = data[: self._remaining]
                self._remaining -= len(data)
                if self._remaining == 0:
                    self.response.complete = True
        self.response.chunks.append((time.monotonic(), data))
        return data

    def read_all(self) -> Response:
        if not self._mode:
            self.read_head()
        while self.read_chunk() is not None:
            pass
        return self.response

    def reset(self) -> None:
        """Leave abruptly: RST instead of FIN (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


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
    """Poll a cross-process condition, bounded; returns whether it came true."""
    give_up = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= give_up:
            return False
        time.sleep(interval)


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
