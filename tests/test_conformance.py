"""What a client receives, and what the app observes, are what plain gevent.pywsgi gives.

Every case is a sequence of requests sent on one connection (pipelined, so
keep-alive and pipelining are part of every case) to each of these servers,
child processes (tests/servers.py) serving tests/wire_apps.py:

* ``plain``: gevent.pywsgi as it comes, the app alone -- the reference;
* ``middleware``: gevent.pywsgi with ``DetachMiddleware`` in front;
* ``handler``: ``DetachHandler`` with the middleware (what ``make_server``
  builds), speed-ups on;
* ``stock``: the same with the speed-ups off (``handler_class(speedups=False)``).

The bytes on the wire are compared (``Date`` normalised), and so is what
the app saw: ``/environ`` answers with the environ and the request body it
read, ``/refused`` with the exception ``start_response`` raised in the app.
Detached responses (which need the middleware) are compared among our three.
Only the differences in :data:`DIFFERENCES` are allowed; docs/servers.md lists
each with its reason. Every response from our side is also parsed by h11 as a
strict client, which must raise nothing except where the response is
deliberately aborted.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import pytest
from gevent.pywsgi import WSGIHandler
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import wire_apps
from tests.servers import ServerProcess
from wsgi_detach import DetachHandler, DetachMiddleware

SERVERS = {
    "plain": ("pywsgi-plain", "tests.wire_apps:plain"),
    "middleware": ("pywsgi-plain", "tests.wire_apps:app"),
    "handler": ("detach-handler", "tests.wire_apps:app"),
    "stock": ("detach-handler-stock", "tests.wire_apps:app"),
}
OURS = ("middleware", "handler", "stock")
HANDLERS = ("handler", "stock")

#: The deliberate differences from plain pywsgi (docs/servers.md, "Deliberate differences").
DIFFERENCES = {
    "head": "DetachHandler answers HEAD with the head a GET gets and no body; pywsgi sends "
    "the body (for an endless stream, for ever), which breaks keep-alive",
    "reset": "DetachHandler ends an aborted close-delimited response with a reset, not the "
    "FIN that makes it look complete",
    "twice": "DetachMiddleware refuses a second start_response without exc_info (PEP 3333), "
    "as every server but pywsgi does; pywsgi silently replaces the first",
}


@dataclass(frozen=True)
class Req:
    """One request: what goes on the wire, and the same for h11."""

    method: str
    path: str
    version: str = "1.1"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""  # sent with a Content-Length header unless raw is set
    raw: bytes | None = None  # a body sent as it is (chunked, malformed...)

    def all_headers(self) -> list[tuple[str, str]]:
        headers = [("Host", "127.0.0.1"), *self.headers]
        if self.body and self.raw is None:
            headers.append(("Content-Length", str(len(self.body))))
        return headers

    def wire(self) -> bytes:
        head = f"{self.method} {self.path} HTTP/{self.version}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in self.all_headers()
        )
        return (head + "\r\n").encode("latin-1") + (self.body if self.raw is None else self.raw)


def get(path: str, version: str = "1.1", **kw: object) -> Req:
    return Req("GET", path, version, **kw)  # type: ignore[arg-type]


CLOSE = (("Connection", "close"),)
LAST = get("/list", headers=CLOSE)  # ends every keep-alive case


def exchange(port: int, requests: list[Req]) -> tuple[bytes, str]:
    """Send ``requests`` on one connection; what came back (Date normalised) and how the
    connection ended: ``"eof"`` or ``"reset"``."""
    ending = "eof"
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(request.wire() for request in requests))
        while True:
            try:
                more = sock.recv(1 << 20)
            except ConnectionResetError:
                ending = "reset"
                break
            if not more:
                break
            received += more
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", received), ending


def strict_parse(requests: list[Req], received: bytes) -> list[int]:
    """Parse ``received`` as h11, a strict client, would for ``requests``: the statuses.

    Raises h11's ``RemoteProtocolError`` for anything malformed, including a
    response cut short.
    """
    conn = h11.Connection(our_role=h11.CLIENT)
    conn.receive_data(received)
    conn.receive_data(b"")  # the connection ended after it
    statuses: list[int] = []
    for request in requests:
        # h11 sends HTTP/1.1 only; it reads an HTTP/1.0 answer by its own headers.
        conn.send(h11.Request(method=request.method, target=request.path,
                              headers=request.all_headers()))
        if request.raw is None:
            if request.body:
                conn.send(h11.Data(data=request.body))
            conn.send(h11.EndOfMessage())
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                statuses.append(event.status_code)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return statuses
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return statuses  # the server closes after this one (Connection: close, 400...)
        conn.start_next_cycle()
    return statuses


# ---------------------------------------------------------------------- the corpus

#: Ordinary responses: every shape PEP 3333 allows, served by all four servers.
ORDINARY = ["/list", "/gen", "/write", "/empty", "/clen", "/file", "/nocontent",
            "/notmodified", "/fail_first", "/fail_after", "/liar", "/big", "/missing",
            "/twice", *(f"/refused?{what}" for what in sorted(wire_apps.REFUSED))]
#: Detached responses, which need the middleware: compared among our three.
DETACHED = ["/poll", "/body_done", "/body_later", "/body_empty_end", "/body_fail"]

#: Responses cut off on purpose: h11 must see them as incomplete.
ABORTED = {"/fail_after", "/liar", "/body_fail"}


def _shapes(path: str) -> dict[str, list[Req]]:
    """The ways each path is asked for: GET kept alive, HTTP/1.0, HEAD kept alive."""
    return {
        f"GET {path}": [get(path), LAST],
        f"GET {path} HTTP/1.0": [get(path, "1.0")],
        f"HEAD {path}": [Req("HEAD", path), LAST],
    }


CHUNKED = (("Transfer-Encoding", "chunked"),)
#: Requests with bodies, and what the app saw of them (``/environ``).
BODIES: dict[str, list[Req]] = {
    "content-length body": [Req("POST", "/environ", body=b"hello"), LAST],
    "chunked body": [Req("POST", "/environ", headers=CHUNKED, raw=b"3\r\nabc\r\n2;x=y\r\nde\r\n"
                         b"0\r\n\r\n"), LAST],
    "chunked body, trailer": [Req("POST", "/environ", headers=CHUNKED,
                                  raw=b"1\r\na\r\n0\r\nX-T: 1\r\n\r\n"), LAST],
    "malformed chunk: no CRLF": [Req("POST", "/environ", headers=CHUNKED,
                                     raw=b"3\r\nabcX0\r\n\r\n")],
    "malformed chunk: size": [Req("POST", "/environ", headers=CHUNKED, raw=b"zz\r\nabc\r\n")],
    "malformed chunk: extension": [Req("POST", "/environ", headers=CHUNKED,
                                       raw=b"3;" + b"x" * 20000 + b"\r\nabc\r\n0\r\n\r\n")],
    "expect 100-continue": [Req("PUT", "/environ", headers=(("Expect", "100-continue"),),
                                body=b"continued"), LAST],
    "expect 100-continue, body unread": [Req("PUT", "/list", headers=(("Expect",
                                                                       "100-continue"),),
                                             body=b"never read"), LAST],
    "pipelined": [get("/list"), get("/gen"), get("/write"), get("/clen"), get("/empty"),
                  Req("POST", "/environ", body=b"x"), get("/nocontent"), get("/notmodified"),
                  LAST],
    "http/1.0 keep-alive": [get("/list", "1.0", headers=(("Connection", "keep-alive"),)),
                            get("/clen", "1.0", headers=(("Connection", "keep-alive"),)),
                            get("/environ", "1.0")],
    "environ": [get("/environ?a=1&b=%20?c", headers=(("X-Y", "a  b"), ("Cookie", "a=1"),
                                                     ("cookie", "b=2"), ("X_Spoof", "no"))),
                LAST],
}

CASES = {name: requests for path in ORDINARY for name, requests in _shapes(path).items()}
CASES.update(BODIES)
DETACHED_CASES = {name: requests for path in DETACHED
                  for name, requests in _shapes(path).items()}


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    processes = {name: ServerProcess(*spec) for name, spec in SERVERS.items()}
    try:
        yield {name: process.start().port for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.stop()


def _head_only(port: int, requests: list[Req]) -> tuple[bytes, str]:
    """What the reference sends when the HEAD comes back as GET's head alone: its GET's
    head, then (unless that closes the connection) the rest of the case."""
    head, rest = requests[0], requests[1:]
    received, _ = exchange(port, [get(head.path, head.version, headers=CLOSE)])
    expected = received.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    if rest and b"\r\nConnection: close\r\n" not in expected:
        more, ending = exchange(port, rest)
        expected += more
    else:
        ending = "eof"
    return expected, ending


def _expected(ports: dict[str, int], reference: str, server: str,
              requests: list[Req]) -> tuple[bytes, str, set[str]]:
    """What ``server`` must send for the case: the reference's answer, changed only by
    the deliberate differences that apply (returned by name)."""
    applied: set[str] = set()
    if reference == "plain" and requests[0].path == "/twice":
        reference = "middleware"
        applied.add("twice")
        assert exchange(ports[reference], requests)[0].startswith(b"HTTP/1.1 500 ")
    received, ending = exchange(ports[reference], requests)
    if server in HANDLERS and requests[0].method == "HEAD" and reference != server:
        received, ending = _head_only(ports[reference], requests)
        applied.add("head")
    if server in HANDLERS and requests[0].version == "1.0" and ending == "eof" \
            and requests[0].path in ABORTED:
        ending = "reset"
        applied.add("reset")
    return received, ending, applied


def _check_ours(server: str, requests: list[Req], received: bytes) -> None:
    if server == "middleware" and any(request.method == "HEAD" for request in requests):
        return  # plain pywsgi's own HEAD answer has a body: h11 rightly refuses it
    aborted = any(request.path in ABORTED and request.method != "HEAD"
                  and request.version == "1.1" for request in requests)
    if aborted:
        with pytest.raises(h11.RemoteProtocolError):
            strict_parse(requests, received)
    else:
        assert strict_parse(requests, received), received


#: (reference, server, case): ordinary responses against plain pywsgi; detached ones
#: (which need the middleware) against plain pywsgi with the middleware.
COMPARISONS = [("plain", server, name) for name in sorted(CASES) for server in OURS] + [
    ("middleware", server, name) for name in sorted(DETACHED_CASES) for server in HANDLERS
]


@pytest.mark.parametrize(("reference", "server", "name"), COMPARISONS)
def test_the_wire_is_what_plain_pywsgi_sends(
    ports: dict[str, int], reference: str, server: str, name: str
) -> None:
    requests = CASES[name] if reference == "plain" else DETACHED_CASES[name]
    expected, ending, applied = _expected(ports, reference, server, requests)
    got = exchange(ports[server], requests)
    assert got == (expected, ending), f"{name} on {server}; differences applied: {applied}"
    _check_ours(server, requests, got[0])


@pytest.mark.parametrize("what", sorted(wire_apps.REFUSED))
def test_a_refused_head_raises_in_the_app_where_it_can_be_caught(
    ports: dict[str, int], what: str
) -> None:
    """Regression: behind DetachMiddleware the server's checks ran only after the app
    returned, so the app could not catch them and the client got a 500."""
    requests = [get(f"/refused?{what}", headers=CLOSE)]
    expected = exchange(ports["plain"], requests)
    assert expected[0].startswith(b"HTTP/1.1 500 Fallback\r\n"), expected
    for name in OURS:
        assert exchange(ports[name], requests) == expected, name


def test_every_difference_is_exercised_and_documented(ports: dict[str, int]) -> None:
    from pathlib import Path

    servers_md = (Path(__file__).resolve().parent.parent / "docs" / "servers.md").read_text()
    for name in DIFFERENCES:
        assert f"<!-- difference: {name} -->" in servers_md, name


# ---------------------------------------------------------------------- start_response, in process

_HEADS = {"ok": ("200 OK", [("X-A", "1")]), "other": ("201 Created", [("X-B", "2")]),
          **wire_apps.REFUSED}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(_HEADS)), st.booleans()), min_size=1,
                max_size=4),
       st.sampled_from([WSGIHandler, DetachHandler]))
def test_the_app_sees_what_the_server_raises_from_start_response(
    calls: list[tuple[str, bool]], handler_class: type
) -> None:
    """Each start_response call of an app raises behind DetachMiddleware what the server's
    raises without it, and the head that reaches the server is the same; except a second
    call without exc_info, which the middleware refuses (the "twice" difference)."""
    def run(wrap: bool) -> tuple[list[Any], Any]:
        handler = handler_class.__new__(handler_class)
        handler.request_version, handler.close_connection = "HTTP/1.1", False
        seen: list[Any] = []

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            for name, with_exc_info in calls:
                status, headers = _HEADS[name]
                try:
                    start_response(status, list(headers), (None, None, None) if with_exc_info
                                   else None)
                except Exception as exc:
                    seen.append((type(exc).__name__, exc.args))
                else:
                    seen.append(None)
            return [b"x"]

        served = DetachMiddleware(app) if wrap else app
        try:
            served({}, handler.start_response)
        except Exception as exc:  # the held head refused when passed on: never expected
            seen.append(("when passed on", type(exc).__name__))
        final = tuple(getattr(handler, name, None) for name in ("status", "response_headers"))
        return seen, final

    direct, direct_final = run(wrap=False)
    wrapped, wrapped_final = run(wrap=True)
    accepted_before = False
    for index, (_, with_exc_info) in enumerate(calls):
        if accepted_before and not with_exc_info:
            assert wrapped[index][0] == "UsageError"  # the "twice" difference
            return  # pywsgi took that head; the middleware kept the earlier one
        assert wrapped[index] == direct[index], (calls, index)
        accepted_before = accepted_before or direct[index] is None
    assert len(wrapped) == len(direct)
    if direct[-1] is None:
        # The app's last call was accepted (an app answers a refused head with a call that
        # is): the server gets that head. After a refused last call pywsgi may keep part
        # of the refused head (it sets a 204/304 status before refusing its length);
        # the middleware keeps the last accepted head.
        assert wrapped_final == direct_final
