"""A streaming HTTP/1.1 client on plain sockets, for tests of streaming responses.

What ordinary clients hide and a test of a streaming app needs: the status
and headers as soon as they arrive, each chunk with its arrival time, whether
a chunked response ended with its terminating zero chunk (the only way a
client tells a complete stream from an aborted one), and the ability to
misbehave -- stop reading, half-close, reset, vanish -- at a chosen moment.

It uses the standard library's sockets only: a test process that gevent has
monkey-patched gets cooperative sockets, one that it has not gets blocking
ones, and both work. Every read is bounded: a wait that runs out raises
:class:`WaitTimeout`, whose message says what was awaited and what had
arrived.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union
from urllib.parse import urlsplit

from ._sse import SSEEvent, SSEParser

__all__ = [
    "CLIENT_ID_HEADER",
    "Arrival",
    "EventSource",
    "Stream",
    "WaitTimeout",
    "get",
    "get_json",
    "wait_until",
]

#: A header every :class:`Stream` sends with a number unique in the process,
#: so that a served app's records (``LiveServer.exchange``) can be matched to
#: the stream that made them.
CLIENT_ID_HEADER = "X-Wsgi-Detach-Testing-Id"

#: The receive buffer of a stream opened with ``small_buffer=True`` (Linux
#: doubles it). It bounds only the client's side: the server's send buffer
#: grows by itself to megabytes on loopback (about 2.7 MiB is written to a
#: stalled reader before the server's writes block) unless the server sets
#: it, as ``serve(..., send_buffer=SMALL_SNDBUF)`` does (then about 14 KiB).
SMALL_RCVBUF = 4096

_next_id = iter(range(1, 1 << 62))


class WaitTimeout(AssertionError, TimeoutError):
    """A bounded wait of the testing kit ran out.

    Caused by the server side (or the app) not doing in time what the test
    expected. An ``AssertionError``, because in a test that is what it is: a
    failed expectation, reported with what was awaited and what was seen;
    also a ``TimeoutError``, for code that expects a socket's timeout.
    """


class _HasURL(Protocol):
    @property
    def url(self) -> str: ...


#: Where a request goes: a base URL (``"http://127.0.0.1:8000"``), a port on
#: 127.0.0.1, or anything with a ``url`` (a served app).
Target = Union[str, int, _HasURL]


def _address(target: Target) -> tuple[str, int]:
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        url = getattr(target, "url", None)
        if not isinstance(url, str):
            raise TypeError(f"expected a URL, a port or a served app, got {target!r}")
        target = url
    if isinstance(target, int):
        return "127.0.0.1", target
    parts = urlsplit(target)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"expected a URL like 'http://127.0.0.1:8000', got {target!r}")
    return parts.hostname, parts.port


@dataclass(frozen=True)
class Arrival:
    """A piece of the body and when it arrived (``time.monotonic()``)."""

    data: bytes
    at: float


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    message: str | Callable[[], str] = "the condition did not come true",
) -> None:
    """Poll ``predicate`` until it returns true; :class:`WaitTimeout` after ``timeout`` s.

    For conditions in another thread or process that nothing signals.
    ``message`` (or what it returns, evaluated at the timeout) says what was
    awaited.
    """
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= give_up:
            text = message() if callable(message) else message
            raise WaitTimeout(f"{text} (waited {timeout}s)")
        time.sleep(interval)


class Stream:
    """One request on its own connection; the head at once, then the body piece by piece.

    Construction connects, sends the request and reads the status line and
    headers (bounded by ``timeout``): :attr:`status` and :attr:`headers` are
    there when it returns, before any of the body. Then
    :meth:`next_chunk` / :meth:`chunks` / :meth:`read_all` read the body,
    :meth:`next_event` / :meth:`events` parse it as SSE, :meth:`json`
    decodes it whole.

    Each chunk is one HTTP chunk of a chunked response (one ``recv()`` for
    other framings), recorded with its arrival time in :attr:`arrivals`.
    The end of the body is reported, never guessed: :attr:`complete` is true
    only after the terminating zero chunk, all of ``Content-Length``, or the
    head of a response that has no body (to ``HEAD``, a 1xx, 204 or 304);
    :attr:`ending` says how it ended (``"complete"``; ``"closed"``: the
    server closed the connection early; ``"reset"``: it reset it; ``"eof"``:
    a body delimited by the end of the connection ended with a FIN -- all the
    client can see of a whole body, and of one the server gave up on, so
    not ``complete``).

    Misbehaving on purpose: :meth:`stall`, :meth:`half_close`, :meth:`reset`,
    :meth:`vanish`. Use as a context manager, or :meth:`close` it.

    Args:
        target: a base URL, a port on 127.0.0.1, or a served app.
        path: the request target, with its query string.
        method: the request method.
        headers: extra request headers.
        body: a request body (sent with ``Content-Length``).
        timeout: the default bound, in seconds, of every wait on this stream.
        small_buffer: shrink the receive buffer (:data:`SMALL_RCVBUF`) before
            connecting. The server's writes to a stalled reader back up after
            a few kilobytes only if the server's send buffer is small too
            (``serve(..., send_buffer=SMALL_SNDBUF)``); else after megabytes.
        http10: send an HTTP/1.0 request (no chunked encoding in the answer).
        wait_head: ``False``: return once the request is sent, and read the
            head with :meth:`read_head` (or the first read of the body).

    Example::

        with Stream(server, "/events", timeout=5) as stream:
            assert stream.status == 200
            event = stream.next_event()
    """

    def __init__(
        self,
        target: Target,
        path: str = "/",
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        timeout: float = 5.0,
        small_buffer: bool = False,
        http10: bool = False,
        wait_head: bool = True,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        host, port = _address(target)
        self.timeout = timeout
        self.what = f"{method} {path}"
        self._method = method
        self.client_id = str(next(_next_id))
        #: Every piece of the body so far, with its arrival time.
        self.arrivals: list[Arrival] = []
        #: When the request was sent, and when the head arrived (monotonic).
        self.started = time.monotonic()
        self.head_at = 0.0
        self.status = 0
        self.reason = ""
        #: Response headers, names lower-cased (a repeated header: the last value).
        self.headers: dict[str, str] = {}
        self.complete = False
        #: ``""`` while the body is being read; then ``"complete"``, ``"closed"``,
        #: ``"reset"`` or ``"eof"`` (see the class docs), or ``"left"`` after the
        #: client closed it.
        self.ending = ""
        self.parser = SSEParser()
        self._events_seen = 0
        self._buf = b""
        self._mode = ""
        self._remaining = 0
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            if small_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
            sock.settimeout(timeout)
            sock.connect((host, port))
            version = "HTTP/1.0" if http10 else "HTTP/1.1"
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            lines = [f"{method} {path} {version}", f"Host: {authority}",
                     f"{CLIENT_ID_HEADER}: {self.client_id}"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if body:
                lines.append(f"Content-Length: {len(body)}")
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            sock.sendall(head + body)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        if wait_head:
            try:
                self.read_head()
            except BaseException:
                self.sock.close()
                raise

    # ------------------------------------------------------------------ reading

    def __repr__(self) -> str:
        return (f"<Stream {self.what} {self.status or 'no status'}, "
                f"{len(self.arrivals)} chunks, {self.ending or 'open'}>")

    @property
    def body(self) -> bytes:
        """The body received so far."""
        return b"".join(a.data for a in self.arrivals)

    @property
    def ended(self) -> bool:
        """True once the body ended, however it ended."""
        return bool(self.ending)

    def _seen(self) -> str:
        last = (f", the last {self.arrivals[-1].at - self.started:.3f}s after the request"
                if self.arrivals else "")
        return (f"{self.what} (status {self.status or 'not yet received'}): "
                f"{len(self.arrivals)} chunks / {len(self.body)} bytes so far{last}")

    def _fill(self, give_up: float, awaiting: str) -> bool:
        """Receive more into the buffer; False at the end of the connection."""
        left = give_up - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"{awaiting} did not arrive within the bound; {self._seen()}")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise WaitTimeout(
                f"{awaiting} did not arrive within {left:.2f}s; {self._seen()}"
            ) from None
        except ConnectionResetError:
            self.ending = "reset"
            return False
        if not data:
            return False
        self._buf += data
        return True

    def _line(self, give_up: float, awaiting: str) -> bytes | None:
        while b"\r\n" not in self._buf:
            if not self._fill(give_up, awaiting):
                return None
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def read_head(self, timeout: float | None = None) -> Stream:
        """Read the status line and headers, if not read yet (see ``wait_head``)."""
        if not self._mode:
            self._read_head(time.monotonic() + (self.timeout if timeout is None else timeout))
        return self

    def _read_head(self, give_up: float) -> None:
        # A WSGI server sends the head with the first non-empty chunk of the
        # body (PEP 3333 "Buffering and Streaming"): a response that never
        # sends anything never sends its status either.
        status = self._line(give_up, "the status line (sent with the first non-empty chunk)")
        if status is None:
            raise ConnectionError(f"{self.what}: the connection ended before a status line")
        parts = status.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"{self.what}: not an HTTP status line: {status!r}")
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        while True:
            line = self._line(give_up, "the response headers")
            if line is None:
                raise ConnectionError(f"{self.what}: the connection ended inside the headers")
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.head_at = time.monotonic()
        if self._method == "HEAD" or self.status in (204, 304) or self.status < 200:
            # RFC 9112 section 6.3: these responses end with their head,
            # whatever their headers say.
            self._mode = "none"
            self._end("complete")
        elif self.headers.get("transfer-encoding", "").lower() == "chunked":
            self._mode = "chunked"
        elif "content-length" in self.headers:
            self._mode = "length"
            self._remaining = int(self.headers["content-length"])
            if self._remaining == 0:
                self._end("complete")
        else:
            self._mode = "close"

    def _end(self, how: str) -> None:
        if not self.ending:
            self.ending = how
        self.complete = self.ending == "complete"

    def next_chunk(self, timeout: float | None = None) -> bytes | None:
        """The next piece of the body as it arrived; ``None`` once the body ended.

        Check :attr:`complete` (or :attr:`ending`) after ``None``: a stream
        the server aborted ends too, but not complete.

        Raises:
            WaitTimeout: nothing arrived within ``timeout`` (default: the
                stream's); the message says what had arrived.
        """
        if not self._mode:
            self.read_head(timeout)
        if self.ending:
            return None
        give_up = time.monotonic() + (self.timeout if timeout is None else timeout)
        data = self._next(give_up)
        if data is None:
            return None
        self.arrivals.append(Arrival(data, time.monotonic()))
        self.parser.feed(data)
        return data

    def _next(self, give_up: float) -> bytes | None:
        if self._mode == "chunked":
            size_line = self._line(give_up, "the next chunk")
            if size_line is None:
                self._end("closed")  # no terminating chunk: aborted
                return None
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                raise ConnectionError(f"{self.what}: bad chunk size line {size_line!r}") from None
            if size == 0:
                self._line(give_up, "the end of the terminating chunk")
                self._end("complete")
                return None
            while len(self._buf) < size + 2:
                if not self._fill(give_up, f"the rest of a {size}-byte chunk"):
                    self._end("closed")  # cut off mid-chunk
                    return None
            data, self._buf = self._buf[:size], self._buf[size + 2:]
            return data
        if not self._buf and not self._fill(give_up, "the next piece of the body"):
            # Without a length, the end of the connection is the end of the
            # body (HTTP/1.0 style), whether the server finished it or gave
            # up on it: "eof", which proves nothing, unless it was a reset.
            self._end("eof" if self._mode == "close" else "closed")
            return None
        data, self._buf = self._buf, b""
        if self._mode == "length":
            data = data[: self._remaining]
            self._remaining -= len(data)
            if self._remaining == 0:
                self._end("complete")
        return data

    def chunks(self, timeout: float | None = None) -> Iterator[bytes]:
        """Each piece of the body until it ends (each wait bounded by ``timeout``)."""
        while True:
            data = self.next_chunk(timeout)
            if data is None:
                return
            yield data

    def read_all(self, timeout: float | None = None) -> bytes:
        """Read until the body ends (within ``timeout`` in all); returns the whole body."""
        bound = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + bound
        while not self.ending:
            left = give_up - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"the end of the body did not come within {bound}s; "
                                  f"{self._seen()}")
            self.next_chunk(left)
        return self.body

    def json(self, timeout: float | None = None) -> Any:
        """The whole body, decoded as JSON (a long-poll answer, say).

        Raises:
            AssertionError: the body did not end complete, or is not JSON.
        """
        data = self.read_all(timeout)
        # A close-delimited body ("eof") is taken: a cut one fails to parse.
        if not self.complete and self.ending != "eof":
            raise AssertionError(f"{self.what}: the body ended {self.ending}, not complete: "
                                 f"{data[:200]!r}")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise AssertionError(f"{self.what}: not JSON ({exc}): {data[:200]!r}") from None

    # ------------------------------------------------------------------ SSE

    def next_event(self, timeout: float | None = None) -> SSEEvent | None:
        """The next server-sent event (WHATWG parsing); ``None`` if the body ends first.

        Comments (heartbeats) are not events; they are in ``parser.comments``.

        Raises:
            WaitTimeout: no complete event within ``timeout``.
        """
        bound = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + bound
        while self._events_seen >= len(self.parser.events):
            if self.ending:
                return None
            left = give_up - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"no event within {bound}s; {self._seen()}; "
                                  f"events so far: {self.parser.events}")
            self.next_chunk(left)
        self._events_seen += 1
        return self.parser.events[self._events_seen - 1]

    def events(self, count: int, timeout: float | None = None) -> list[SSEEvent]:
        """The next ``count`` events, within ``timeout`` in all.

        Raises:
            WaitTimeout: fewer arrived in time.
            AssertionError: the body ended before ``count`` events.
        """
        bound = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + bound
        got: list[SSEEvent] = []
        while len(got) < count:
            event = self.next_event(max(give_up - time.monotonic(), 1e-3))
            if event is None:
                raise AssertionError(f"the body ended ({self.ending}) after {len(got)} of "
                                     f"{count} events: {got}")
            got.append(event)
        return got

    # ------------------------------------------------------------------ misbehaving

    def stall(self) -> Stream:
        """Stop reading: from now on the client reads nothing until the test reads again.

        Nothing is sent; the connection stays open and the server's writes
        back up once the socket buffers are full: about 14 KiB with
        ``small_buffer=True`` and a server started with
        ``send_buffer=SMALL_SNDBUF``, about 2.7 MiB with ``small_buffer`` alone
        (Linux, loopback). Returns the stream, for ``Stream(...).stall()``.
        """
        self.stalled_at = time.monotonic()
        return self

    def half_close(self) -> None:
        """Send FIN (``shutdown(SHUT_WR)``) but keep reading, like a client done uploading.

        A server that takes the end of the request stream for a departed
        client ends a response the client still wants.
        """
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Leave abruptly: close with ``SO_LINGER`` 0, which sends RST instead of FIN."""
        if self.sock.fileno() != -1:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def vanish(self) -> None:
        """Leave without a word, as a closed browser tab does: close, whatever is unread.

        The kernel sends FIN, or RST when received data was left unread.
        """
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent); an unfinished body counts as ``"left"``."""
        if not self.ending:
            self.ending = "left"
        self.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get(target: Target, path: str = "/", *, timeout: float = 5.0, **kwargs: Any) -> Stream:
    """One request on its own connection, read to its end (bounded); the closed stream."""
    with Stream(target, path, timeout=timeout, **kwargs) as stream:
        stream.read_all()
    return stream


def get_json(target: Target, path: str = "/", *, timeout: float = 5.0, **kwargs: Any) -> Any:
    """GET ``path`` (a long-poll, a status endpoint) and decode its JSON body.

    Raises:
        AssertionError: the status is not 200, the body did not end complete
            or is not JSON.
    """
    with Stream(target, path, timeout=timeout, **kwargs) as stream:
        if stream.status != 200:
            raise AssertionError(f"{stream.what} answered {stream.status} {stream.reason}: "
                                 f"{stream.read_all()[:200]!r}")
        return stream.json()


class EventSource:
    """An SSE client that reconnects as a browser's ``EventSource`` does.

    It opens a :class:`Stream`, parses events exactly, and when the stream
    ends (completely or not) it waits the server's ``retry`` time (capped by
    ``max_retry``; ``default_retry`` until the server sets one) and
    reconnects with ``Last-Event-ID`` set to the last id it saw. A 204
    answer stops it for good, as it stops a browser; any other status but
    200, or a Content-Type other than ``text/event-stream``, raises.

    Use :attr:`stream` to misbehave on the current connection (``reset()`` it,
    ``stall()`` it), :attr:`connections` to see each connection's head.

    Args:
        target: a base URL, a port on 127.0.0.1, or a served app.
        path: the stream's path.
        last_event_id: sent on the first connect too (a resumed page).
        timeout: the default bound of every wait.
        default_retry: the reconnection delay (ms) until the server sends ``retry:``.
        max_retry: the longest delay (s) honoured, so that a test stays fast.
        headers: extra headers for every connection.
    """

    def __init__(
        self,
        target: Target,
        path: str = "/",
        *,
        last_event_id: str | None = None,
        timeout: float = 5.0,
        default_retry: int = 100,
        max_retry: float = 2.0,
        headers: Mapping[str, str] | None = None,
        small_buffer: bool = False,
    ) -> None:
        self._target = target
        self._path = path
        self.timeout = timeout
        self.default_retry = default_retry
        self.max_retry = max_retry
        self._headers = dict(headers or {})
        self._small_buffer = small_buffer
        self.parser = SSEParser()
        if last_event_id is not None:
            self.parser.last_event_id = last_event_id
            self.parser._id_buffer = last_event_id
        #: Every event received, across connections.
        self.events: list[SSEEvent] = []
        #: Every connection made, in order (the last one is :attr:`stream`).
        self.connections: list[Stream] = []
        #: ``Last-Event-ID`` sent with each connection (``None``: not sent).
        self.sent_ids: list[str | None] = []
        self.closed = False
        self._returned = 0  # events handed out by next_event()
        self._connect(time.monotonic() + timeout)

    @property
    def stream(self) -> Stream:
        """The current connection."""
        return self.connections[-1]

    @property
    def retry(self) -> float:
        """The reconnection delay in seconds: the server's, capped by ``max_retry``."""
        ms = self.parser.retry if self.parser.retry is not None else self.default_retry
        return min(ms / 1000, self.max_retry)

    def _connect(self, give_up: float) -> None:
        if self.connections:
            self.stream.close()  # it ended; its socket is no longer needed
        headers = dict(self._headers, Accept="text/event-stream", **{"Cache-Control": "no-cache"})
        last_id = self.parser.last_event_id or None
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        left = max(give_up - time.monotonic(), 1e-3)
        stream = Stream(self._target, self._path, headers=headers, timeout=left,
                        small_buffer=self._small_buffer)
        stream.timeout = self.timeout
        self.connections.append(stream)
        self.sent_ids.append(last_id)
        if stream.status == 204:
            self.closed = True
            stream.close()
            return
        kind = stream.headers.get("content-type", "").split(";")[0].strip()
        if stream.status != 200 or kind != "text/event-stream":
            body = stream.read_all()[:200] if stream.status != 200 else b""
            stream.close()
            raise AssertionError(f"{stream.what} answered {stream.status} {kind!r}, not an "
                                 f"event stream: {body!r}")
        self.parser.reconnected()

    def next_event(self, timeout: float | None = None) -> SSEEvent | None:
        """The next event, reconnecting as needed; ``None`` once a 204 closed the source.

        Raises:
            WaitTimeout: none arrived within ``timeout`` (reconnections included).
        """
        bound = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + bound
        why = ""
        while not self.closed and len(self.events) <= self._returned:
            stream = self.stream
            if not stream.ending:
                left = give_up - time.monotonic()
                if left <= 0:
                    break
                try:
                    data = stream.next_chunk(left)
                except WaitTimeout:
                    break
                if data is not None:
                    self.events.extend(self.parser.feed(data))
                continue
            # The stream ended: wait the reconnection time, then resume.
            wait = self.retry
            left = give_up - time.monotonic()
            if wait >= left:
                why = (f"; the stream ended and the reconnection delay ({wait}s) was longer "
                       f"than the {max(left, 0):.2f}s left, so it did not reconnect")
                break
            time.sleep(wait)
            self._connect(give_up)
        if len(self.events) > self._returned:
            self._returned += 1
            return self.events[self._returned - 1]
        if self.closed:
            return None
        raise WaitTimeout(f"no event within {bound:.3g}s over {len(self.connections)} connections"
                          f"{why}; the current one: {self.stream._seen()}; events so far: "
                          f"{self.events}")

    def take(self, count: int, timeout: float | None = None) -> list[SSEEvent]:
        """The next ``count`` events, within ``timeout`` in all (reconnecting as needed).

        Raises:
            WaitTimeout: fewer arrived in time; the message says how many, and why.
        """
        bound = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + bound
        got: list[SSEEvent] = []
        while len(got) < count:
            try:
                event = self.next_event(max(give_up - time.monotonic(), 0.0))
            except WaitTimeout as exc:
                raise WaitTimeout(f"{len(got)} of {count} events within {bound:.3g}s: {got}; "
                                  f"then {exc}") from None
            if event is None:
                raise AssertionError(f"the source was closed (204) after {len(got)} of "
                                     f"{count} events: {got}")
            got.append(event)
        return got

    def close(self) -> None:
        """Close the current connection and stop reconnecting."""
        self.closed = True
        self.stream.close()

    def __enter__(self) -> EventSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
