"""wsgi_detach._speedups: pywsgi's request path re-implemented for speed does what pywsgi does.

Each test feeds the same input to ``DetachHandler`` (which mixes in
``SpeedUps``) and to pywsgi's own ``WSGIHandler`` and compares what each
parsed, set or raised; the wire itself is compared in tests/test_conformance.py.
"""

from __future__ import annotations

import io
import os
import threading
import time
from http.client import HTTPException
from typing import Any

import gevent
import gevent.event
import pytest
from gevent.pywsgi import WSGIHandler, headers_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import wire_apps
from tests.client import get
from wsgi_detach import DetachHandler, make_server

_HEADER_BYTES = st.sampled_from([b"a", b"Host", b"-", b":", b": ", b" ", b"\t", b"\r", b"\n",
                                 b"\r\n", b"\xe9", b"From ", b"x y", b"\x7f", b"!"])


_NAMES = ("host", "HOST", "a", "-", "!", "from", "missing", "content-length")


def _state(message: Any) -> dict[str, Any]:
    """What pywsgi can see of a parsed message: its email attributes (defects by type,
    they compare by identity), the lines it builds the environ from, the answers to
    ``get`` and ``typeheader``."""
    return {
        **vars(message),
        "defects": [type(defect) for defect in message.defects],
        "lines": list(message.headers),
        "get": [message.get(name, "?") for name in _NAMES],
        "typeheader": message.typeheader,
    }


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_HEADER_BYTES, max_size=6).map(b"".join), max_size=6))
def test_request_headers_parse_as_pywsgi_parses_them(lines: list[bytes]) -> None:
    raw = b"".join(line + b"\r\n" for line in lines) + b"\r\nrest"
    handler = DetachHandler.__new__(DetachHandler)  # MessageClass reads nothing of it
    ours, theirs = io.BytesIO(raw), io.BytesIO(raw)
    try:
        expected = headers_factory(theirs)
    except HTTPException as exc:
        with pytest.raises(type(exc)):
            handler.MessageClass(ours, 0)
        return
    parsed = handler.MessageClass(ours, 0)
    assert _state(parsed) == _state(expected)
    assert ours.read() == theirs.read()  # the request body starts where it did
    for message in (parsed, expected):  # what pywsgi does for a chunked request body
        del message["host"]
        message["Content-Type"] = "late"
    assert _state(parsed) == _state(expected)


_REQUEST_LINES = st.tuples(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"", b" GET"]),
    st.sampled_from([b" ", b"  ", b"\t", b""]),
    st.sampled_from([b"/", b"/a?b", b"/a b", b"/\n", b"/\xe9"]),
    st.sampled_from([b" ", b"\t"]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b""]),
    st.sampled_from([b"", b" ", b"\r", b" x", b"\n", b"\r\n", b"\nX: y"]),
).map(b"".join)
_LEAN_HEADERS = st.sampled_from([b"Host: a", b"Content-Length: 3", b"content-length: 0",
                                 b"Content-Length: -1", b"Content-Length: x",
                                 b"Connection: close", b"connection: Keep-Alive",
                                 b"Connection: upgrade", b"Upgrade: websocket",
                                 b"Transfer-Encoding: chunked", b"Expect: 100-continue",
                                 b"X_Y: z", b"Cookie: a", b"A:b", b" folded"])


@settings(max_examples=400, deadline=None)
@given(
    _REQUEST_LINES,
    st.lists(st.one_of(_LEAN_HEADERS, st.lists(_HEADER_BYTES, max_size=4).map(b"".join)),
             max_size=5),
)
def test_the_lean_request_path_parses_what_it_takes_as_pywsgi_does(
    request_line: bytes, lines: list[bytes]
) -> None:
    """Whatever head the lean path takes, pywsgi's read_request takes too, with the same
    result; the lean path declining is always safe (pywsgi then parses it)."""
    raw = request_line + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\nrest"
    end = raw.find(b"\r\n\r\n")
    ours = DetachHandler.__new__(DetachHandler)
    if end <= 0 or not ours._take_lean_head(raw[:end].decode("latin-1")):
        return
    theirs = WSGIHandler.__new__(WSGIHandler)
    theirs.rfile = io.BytesIO(raw)
    requestline = theirs.read_requestline()
    assert theirs.read_request(requestline)  # raises on what pywsgi would answer with a 400
    assert theirs.rfile.tell() == end + 4  # the head ends where the lean path says
    for name in ("requestline", "command", "path", "request_version", "content_length",
                 "close_connection"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.headers._headers == theirs.headers._headers
    # Once the environ is built the handler keeps the head, not the pairs,
    # and parses the head again if asked.
    ours._headers_message, ours._lean_pairs = None, None
    assert ours.headers._headers == theirs.headers._headers
    for name in _NAMES:
        assert ours._header_index.get(name.lower(), "?") == theirs.headers.get(name, "?")


def test_the_lean_request_path_takes_the_everyday_head_and_declines_the_rest() -> None:
    def taken(head: str) -> bool:
        return bool(DetachHandler.__new__(DetachHandler)._take_lean_head(head))

    assert taken("GET /poll?cursor=3 HTTP/1.1\r\nHost: a\r\nAccept: */*")
    assert taken("POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: 5")
    assert taken("GET / HTTP/1.1" + "\r\nX: v" * 99)
    for declined in ("GET /a HTTP/1.1\r\nExpect: 100-continue",
                     "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked",
                     "GET /a HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket",
                     "GET /a HTTP/1.1\r\nX-Folded: a\r\n b",
                     "GET /a HTTP/1.1\r\nContent-Length: -1",
                     "GET /a HTTP/2.0", "GET /a", "GET /a\tb HTTP/1.1",
                     # a bare LF ends pywsgi's request line: here, before the headers
                     "POST / HTTP/1.1\n\r\nContent-Length: 5",
                     # http.client refuses 100 lines (it counts the blank one)
                     "GET / HTTP/1.1" + "\r\nX: v" * 100):
        assert not taken(declined), declined


_HEADER_TEXT = st.lists(st.sampled_from(["a", "Connection", "Date", "content-length", "close",
                                         "7", " ", "\r", "\n", "\xe9", "\u4e2d", ":"]),
                        max_size=3).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["200 OK", "204 No Content", "304 Not Modified", "101 Switching",
                     "x00 Bad", "200 \r\nX: y", b"200 OK", "200 caf\xe9", "200 \u4e2d"]),
    st.lists(st.tuples(st.one_of(_HEADER_TEXT, st.just(b"bytes")), _HEADER_TEXT), max_size=4),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
    st.booleans(),
)
def test_start_response_does_what_pywsgi_does(
    status: Any, headers: list[tuple[Any, str]], version: str, close: bool
) -> None:
    """Same attributes on success, the same error (type and message) on failure; the
    same again when the head comes a second time (from the kept heads), on a request
    of the other version."""
    def run(handler_class: type, version: str = version) -> Any:
        handler = handler_class.__new__(handler_class)
        handler.request_version, handler.close_connection = version, close
        try:
            handler.start_response(status, list(headers))
        except Exception as exc:
            return type(exc), exc.args
        names = ("status", "_orig_status", "response_headers", "code", "provided_date",
                 "provided_content_length", "close_connection")
        return {name: getattr(handler, name) for name in names}

    assert run(DetachHandler) == run(WSGIHandler)
    assert run(DetachHandler) == run(WSGIHandler)
    other = "HTTP/1.0" if version == "HTTP/1.1" else "HTTP/1.1"
    assert run(DetachHandler, other) == run(WSGIHandler, other)


def test_a_kept_head_is_not_changed_by_the_response_that_used_it() -> None:
    """finalize_headers appends Date and the framing to the response's headers: a
    later response with the same head starts from the head as the app gave it."""
    heads = []
    for _ in range(2):
        handler = DetachHandler.__new__(DetachHandler)
        handler.request_version, handler.close_connection = "HTTP/1.1", False
        handler.start_response("200 OK", [("Content-Type", "text/plain")])
        heads.append(list(handler.response_headers))
        handler.response_headers.append((b"Date", b"now"))
    assert heads == [[(b"Content-Type", b"text/plain")]] * 2


def test_the_kept_heads_are_bounded() -> None:
    from wsgi_detach._speedups import _heads

    handler = DetachHandler.__new__(DetachHandler)
    handler.request_version, handler.close_connection = "HTTP/1.1", False
    for n in range(1000):
        handler.start_response("200 OK", [("ETag", f'"{n}"')])
        assert handler.response_headers == [(b"ETag", f'"{n}"'.encode())]
    assert len(_heads._heads) <= 256


def test_handler_headers_are_the_current_requests_on_a_keep_alive_connection() -> None:
    handler = DetachHandler.__new__(DetachHandler)
    handler.headers = handler.MessageClass(io.BytesIO(b"X-Id: one\r\nX: a\r\n b\r\n\r\n"), 0)
    assert handler.headers.get("X-Id") == "one"  # pywsgi's path (a folded line)
    assert handler._take_lean_head("GET / HTTP/1.1\r\nX-Id: two")
    assert handler.headers.get("X-Id") == "two"
    assert handler._take_lean_head("GET / HTTP/1.1\r\nX-Id: three")
    assert handler.headers.get("X-Id") == "three"


def test_start_response_given_an_iterator_still_refuses_an_injected_header() -> None:
    # PEP 3333 asks for a list; an iterator must not slip past pywsgi's checks
    # by being half used up by the one-pass path.
    for handler_class in (WSGIHandler, DetachHandler):
        handler = handler_class.__new__(handler_class)
        handler.request_version, handler.close_connection = "HTTP/1.1", False
        with pytest.raises(ValueError, match="carriage return or newline"):
            handler.start_response("200 OK", iter([("A", "b"), ("X", "y\r\nEvil: 1")]))


def test_request_headers_fast_path_is_taken_for_plain_lines() -> None:
    parsed = DetachHandler.__new__(DetachHandler).MessageClass(
        io.BytesIO(b"Host: a\r\nX-Long:  spaced  \r\n\r\n"), 0
    )
    assert parsed._headers == [("Host", "a"), ("X-Long", "spaced  ")]
    assert parsed.get("host") == "a" and parsed.status == ""


def test_the_access_log_is_still_written_when_one_is_configured() -> None:
    lines = io.StringIO()
    server = make_server(wire_apps.plain, port=0, log=lines)
    server.start()
    try:
        thread = threading.Thread(target=lambda: get(server.server_port, "/list"))
        thread.start()
        give_up = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < give_up:
            gevent.sleep(0.01)  # the server runs in this thread's hub meanwhile
        assert '"GET /list HTTP/1.1" 200 ' in lines.getvalue()
    finally:
        server.stop(timeout=1)


def test_the_date_header_is_formatted_once_a_second_as_pywsgi_formats_it() -> None:
    from gevent.pywsgi import format_date_time

    from wsgi_detach._speedups import _date_now

    for _ in range(3):  # a second may turn between the two readings: bounded retries
        second = int(time.time())
        ours = _date_now()
        if int(time.time()) == second:
            assert ours == format_date_time(second)
            assert _date_now() is ours  # the same second: the cached bytes
            return
    pytest.fail("the second turned during each of three readings")


def test_the_wait_for_the_next_request_leaves_no_watcher_behind() -> None:
    """Keep-alive requests, one sent while the previous answer is still being made (a
    pipelined one), then the clients leave: every answer arrives, and once the
    connections are gone no watcher of theirs is left running in the loop."""
    from gevent import socket as gsocket

    release = gevent.event.Event()

    def app(environ: Any, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            release.wait(5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]

    server = make_server(app, port=0, log=None)
    server.start()
    loop = gevent.get_hub().loop
    try:
        gevent.sleep(0)
        baseline = loop.activecnt
        clients = [gsocket.create_connection(("127.0.0.1", server.server_port)) for _ in range(3)]
        for round_ in range(3):
            for n, client in enumerate(clients):
                client.sendall(b"GET /%d-%d HTTP/1.1\r\nHost: a\r\n\r\n" % (n, round_))
                assert client.recv(4096).endswith(b"/%d-%d" % (n, round_))
        # A request that arrives while the previous one is still being answered.
        clients[0].sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        gevent.sleep(0.05)
        clients[0].sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        gevent.sleep(0.05)
        release.set()
        received = b""
        with gevent.Timeout(5):
            while not received.endswith(b"/after"):
                received += clients[0].recv(4096)
        assert b"/slow" in received, received
        for client in clients:
            client.close()
        give_up = time.monotonic() + 5  # not gevent.Timeout: its timer would count
        while (server.connections or loop.activecnt > baseline) and time.monotonic() < give_up:
            gevent.sleep(0.01)
        assert (len(server.connections), loop.activecnt) == (0, baseline)
    finally:
        server.stop(timeout=1)


def test_a_kept_head_is_used_only_for_plain_tuples_of_plain_str() -> None:
    """An equal str subclass (which may encode otherwise) or a header object that
    iterates to a pair (which may change) gets pywsgi's own pass, kept head or not."""

    class Renamed(str):
        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            return b"X-Other"

    class Changing:
        def __init__(self, value: str) -> None:
            self.value = value

        def __iter__(self) -> Any:
            return iter(("X-Seq", self.value))

    def sent(handler_class: type, headers: list[Any]) -> Any:
        handler = handler_class.__new__(handler_class)
        handler.request_version, handler.close_connection = "HTTP/1.1", False
        handler.start_response("200 OK", headers)
        return handler.response_headers

    sent(DetachHandler, [("X-Name", "v")])  # kept
    assert sent(DetachHandler, [(Renamed("X-Name"), "v")]) == [(b"X-Other", b"v")]
    item = Changing("1")
    assert sent(DetachHandler, [item]) == [(b"X-Seq", b"1")]
    item.value = "2"
    assert sent(DetachHandler, [item]) == sent(WSGIHandler, [item]) == [(b"X-Seq", b"2")]


def test_a_connection_whose_socket_the_app_took_ends_at_once() -> None:
    """The app detaches the socket while closing its second response: the connection
    ends there, quietly, as with pywsgi's own wait -- no wait on a descriptor it no
    longer owns, no traceback."""
    from gevent import socket as gsocket

    from wsgi_detach._watchers import SOCKET_KEY

    taken: list[Any] = []

    class Body(list):  # type: ignore[type-arg]
        def __init__(self, sock: Any, take: bool) -> None:
            super().__init__([b"ok"])
            self.sock, self.take = sock, take

        def close(self) -> None:
            if self.take:
                taken.append(self.sock.detach())

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body(environ[SOCKET_KEY], environ["PATH_INFO"] == "/take")

    hub = gevent.get_hub()
    original, errors = hub.exception_stream, io.StringIO()
    hub.exception_stream = errors  # where a failed greenlet's traceback goes
    server = make_server(app, port=0, log=None, head_timeout=5)
    server.start()
    try:
        client = gsocket.create_connection(("127.0.0.1", server.server_port))
        for path in (b"/", b"/take"):
            client.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
            assert client.recv(4096).endswith(b"ok")
        started = time.monotonic()
        while server.connections and time.monotonic() - started < 5:
            gevent.sleep(0.01)
        assert not server.connections
        assert time.monotonic() - started < 1.0  # not held until head_timeout
        client.close()
    finally:
        server.stop(timeout=1)
        hub.exception_stream = original
        for fd in taken:
            os.close(fd)
    assert errors.getvalue() == ""
