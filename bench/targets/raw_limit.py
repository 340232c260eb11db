"""Target ``raw_limit``: chunked HTTP written straight to a gevent socket.

No WSGI, no queue, no per-request objects: a ``StreamServer`` reads the
request line, and the producer writes pre-framed chunks with ``sendall``.
It is the practical limit of this stack (gevent + CPython), so the other
targets are reported as a ratio of it. TCP_NODELAY is set like any server
meant for streaming should.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import NoReturn
from urllib.parse import parse_qs, urlsplit

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from bench import producer

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
    b"Content-Length: %d\r\n\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
LAST = b"0\r\n\r\n"
MAX_HEAD = 16384


def frame(data: bytes) -> bytes:
    """One chunk of chunked transfer coding (RFC 9112 section 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Subscriber:
    """A held connection and the event its handler greenlet sleeps on."""

    __slots__ = ("done", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done = Event()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.done.set()


class Raw:
    """Request loop and publisher over bare sockets."""

    def __init__(self) -> None:
        self.streams: list[Subscriber] = []
        self.polls: list[Subscriber] = []
        self.json_polls: list[Subscriber] = []

    def publish(self, msg: bytes) -> None:
        data = frame(msg)
        for sub in self.streams:
            sub.send(data)
        waiting, self.polls = self.polls, []
        whole = HEAD + data + LAST
        for sub in waiting:
            sub.send(whole)
            sub.done.set()
        waiting, self.json_polls = self.json_polls, []
        if waiting:
            body = json.dumps(producer.poll_answer(msg), separators=(",", ":")).encode()
            answer = JSON_HEAD % len(body) + body
            for sub in waiting:
                sub.send(answer)
                sub.done.set()

    def end(self) -> None:
        streams, self.streams = self.streams, []
        for sub in streams:
            sub.send(LAST)
            sub.done.set()

    def handle(self, sock: socket.socket, _addr: object) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:  # keep-alive: one request per iteration
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data or len(buf) > MAX_HEAD:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                target = head.split(b" ", 2)[1].decode("latin-1")
                self.route(sock, target)
        except OSError:
            return
        finally:
            sock.close()

    def route(self, sock: socket.socket, target: str) -> None:
        url = urlsplit(target)
        q = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
        if url.path == "/stream":
            data = frame(producer.payload(q["size"]))
            sock.sendall(HEAD)
            for _ in range(q["n"]):
                sock.sendall(data)
            sock.sendall(LAST)
        elif url.path in ("/fanout", "/poll", "/lpoll"):
            sub = Subscriber(sock)
            if url.path == "/fanout":
                sock.sendall(HEAD + frame(producer.HELLO))
                self.streams.append(sub)
            elif url.path == "/lpoll":
                self.json_polls.append(sub)
            else:
                self.polls.append(sub)
            sub.done.wait()
        elif url.path == "/start":
            interval = q.get("interval_ms", 100) / 1000.0
            gevent.spawn(
                producer.publish_loop, self.publish, self.end, q["n"], interval, gevent.sleep
            )
            sock.sendall(OK)
        else:
            sock.sendall(NOT_FOUND)


def serve(announce: Callable[[int, dict[str, object]], None]) -> NoReturn:
    raw = Raw()
    server = StreamServer(("127.0.0.1", 0), raw.handle, backlog=4096)
    server.start()
    announce(server.server_port, {"server": "gevent.server.StreamServer"})
    server.serve_forever()
    raise SystemExit(0)
