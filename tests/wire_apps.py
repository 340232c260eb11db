"""Apps for comparing, byte for byte, what DetachHandler and plain gevent.pywsgi send.

Served without ``wsgiref.validate`` in front (tests/servers.py kinds
``pywsgi-plain`` and ``detach-handler``): the validator wraps the body
iterable, which would hide the body from the handler and so skip the very
write paths under test. Each route is one shape of response PEP 3333 allows.
``/_sends`` answers how many sends the handler made so far (only
``detach-handler`` counts them; see tests/servers.py).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from typing import Any, Callable

import gevent

from wsgi_detach import DetachedBody, DetachMiddleware, detach

Start = Callable[..., Any]

#: Sends made by the counting handler in this process (the server fills it in).
SENDS = [0]

TEXT = [("Content-Type", "text/plain")]


def _gen(*chunks: bytes) -> Iterator[bytes]:
    yield from chunks


def _fail_after(chunk: bytes) -> Iterator[bytes]:
    yield chunk
    raise RuntimeError("deliberate failure after the first chunk")


def _fail_first() -> Iterator[bytes]:
    raise RuntimeError("deliberate failure before the first chunk")
    yield b""  # pragma: no cover - makes this a generator


class _Liar:
    """Claims to be exhausted after its first chunk, then raises: the chunk must still go out."""

    def __init__(self) -> None:
        self.sent = False

    def __iter__(self) -> _Liar:
        return self

    def __next__(self) -> bytes:
        if self.sent:
            raise RuntimeError("deliberate failure where the body said it had ended")
        self.sent = True
        return b"before the failure"

    def _exhausted(self) -> bool:
        return self.sent


class _CloseRaises:
    def __iter__(self) -> Iterator[bytes]:
        yield b"all of the body"

    def close(self) -> None:
        raise RuntimeError("close() failed after the whole body (expected by the test)")


def _later(body: DetachedBody, chunks: list[bytes], last: bytes | None) -> None:
    for chunk in chunks:
        gevent.sleep(0.01)
        body.put(chunk)
    gevent.sleep(0.01)
    body.finish(last)


def plain(environ: dict[str, Any], start_response: Start) -> Any:
    path = environ["PATH_INFO"]
    if path == "/_sends":
        count = str(SENDS[0]).encode()
        start_response("200 OK", [*TEXT, ("Content-Length", str(len(count)))])
        return [count]
    if path.startswith("/environ"):  # what the server told the app, and the request body it read
        shown = {k: v for k, v in environ.items() if type(v) in (str, bool, tuple)
                 and k not in ("REMOTE_PORT", "SERVER_PORT")}
        # An upgrade request gets the raw stream, which would read to the end.
        shown["body"] = environ["wsgi.input"].read() if environ["wsgi.input_terminated"] else b""
        shown["input"] = type(environ["wsgi.input"]).__name__
        text = "".join(f"{k}={shown[k]!r}\n" for k in sorted(shown)).encode()
        start_response("200 OK", [*TEXT, ("Content-Length", str(len(text)))])
        return [text]
    if path == "/list":  # has len(): pywsgi derives Content-Length
        start_response("200 OK", TEXT)
        return [b"a", b"", b"bc"]
    if path == "/gen":  # no len(): chunked on HTTP/1.1, close-delimited on 1.0
        start_response("200 OK", TEXT)
        return _gen(b"one", b"", b"two")
    if path == "/empty":
        start_response("200 OK", TEXT)
        return _gen()
    if path == "/clen":
        start_response("200 OK", [*TEXT, ("Content-Length", "6")])
        return _gen(b"abc", b"def")
    if path == "/write":  # PEP 3333's write() callable, then the iterable
        write = start_response("200 OK", TEXT)
        write(b"written;")
        write(b"")
        return _gen(b"yielded")
    if path == "/file":
        wrapper = environ.get("wsgi.file_wrapper")
        data = io.BytesIO(b"file contents " * 1000)
        start_response("200 OK", TEXT)
        return wrapper(data, 4096) if wrapper else iter(lambda: data.read(4096), b"")
    if path == "/nocontent":
        start_response("204 No Content", [])
        return _gen()
    if path == "/notmodified":
        start_response("304 Not Modified", [("ETag", '"x"')])
        return []
    if path == "/fail_after":
        start_response("200 OK", TEXT)
        return _fail_after(b"partial")
    if path == "/fail_first":
        start_response("200 OK", TEXT)
        return _fail_first()
    if path == "/liar":
        start_response("200 OK", TEXT)
        return _Liar()
    if path == "/big":  # larger than a socket buffer: the send cannot fit at once
        start_response("200 OK", TEXT)
        return _gen(b"x" * 3_000_000, b"y" * 100)
    if path == "/body_done":  # every chunk waiting and the body finished before return
        start_response("200 OK", TEXT)
        body = DetachedBody(coalesce=0)
        body.put(b"first;")
        body.finish(b"last")
        return body
    if path == "/body_later":  # chunks and the last one put later, by a greenlet
        start_response("200 OK", TEXT)
        body = DetachedBody(coalesce=0)
        gevent.spawn(_later, body, [b"one;", b"two;"], b"last")
        return body
    if path == "/body_empty_end":  # finished later without a last chunk
        start_response("200 OK", TEXT)
        body = DetachedBody()
        gevent.spawn(_later, body, [b"only"], None)
        return body
    if path == "/body_fail":
        start_response("200 OK", TEXT)
        body = DetachedBody()
        body.put(b"partial")
        body.fail(RuntimeError("deliberate failure of a detached body"))
        return body
    if path == "/poll":  # a long-poll through the middleware: one chunk, then the end
        start_response("200 OK", TEXT)
        body = detach(environ)
        gevent.spawn(_later, body, [], b"message")
        return body
    if path == "/close_raises":  # the whole body, then its close() fails
        start_response("200 OK", TEXT)
        return _CloseRaises()
    if path == "/twice":  # a second start_response without exc_info (PEP 3333: an error)
        start_response("200 OK", TEXT)
        start_response("201 Created", TEXT)
        return [b"twice"]
    if path == "/refused":  # a head the server refuses, caught by the app: its fallback answer
        what = environ["QUERY_STRING"]
        status, headers = REFUSED[what]
        try:
            start_response(status, headers)
        except Exception as exc:  # what the server raised, shown to the client
            shown = f"{type(exc).__name__}: {exc.args!r}".encode()
            start_response("500 Fallback", [*TEXT, ("Content-Length", str(len(shown)))],
                           sys.exc_info())
            return [shown]
        return [b"accepted"]
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


#: Heads gevent.pywsgi refuses when start_response is called (PEP 3333: the server
#: checks there, so that the app can answer otherwise).
REFUSED: dict[str, tuple[Any, list[tuple[Any, Any]]]] = {
    "crlf-value": ("200 OK", [("X-Split", "a\r\nSet-Cookie: evil=1")]),
    "crlf-name": ("200 OK", [("X-A\nB", "v")]),
    "crlf-status": ("200 OK\r\nX: y", []),
    "latin1": ("200 OK", [("X-Name", "\u4e2d")]),
    "bytes-name": ("200 OK", [(b"X-Bytes", "v")]),
    "bytes-status": (b"200 OK", []),
    "304-length": ("304 Not Modified", [("Content-Length", "5")]),
    "204-length": ("204 No Content", [("Content-Length", "3")]),
    "bad-code": ("OK 200", []),
}


app = DetachMiddleware(plain)
