"""Thousands of held streams on one client core: the fan-out and idle client.

Why not a greenlet per stream: with 5 000 streams and a broadcast every
100 ms the client handles 50 000 arrivals a second on one core; a greenlet
switch plus a general chunked parser per arrival (~16 us measured) kept
the client ~80 % busy, so its own queueing showed up as server latency.
Here each stream is a gevent io watcher whose callback runs in the hub:
one non-blocking ``recv``, one regular-expression scan for the producer's
``<seq> <stamp>`` lines, no switch.

The scan works on the raw chunked bytes: chunk-size lines are hex digits
followed by CRLF, never by a space, so they cannot match; a message is
never split across chunks (a server may merge whole messages, not cut
them), only across ``recv`` calls, which the carried tail handles. The end
of a response is the last chunk ``0`` preceded by the previous chunk's
CRLF; no payload line is a bare ``0``.
"""

from __future__ import annotations

import re
import socket as stdsocket
import time
from typing import Any

import gevent
import gevent.event
from gevent import socket
from gevent.pool import Pool

from bench import wire

MESSAGE = re.compile(rb"(\d+) (\d+)\r?\n")
LAST = b"\r\n0\r\n\r\n"
RECV = 65536
#: Messages below this sequence number count for "lost" but not for latency:
#: the first write on each of thousands of fresh connections pays one-off
#: allocations (socket buffers, first-use code paths) that a long-lived
#: stream never sees again. Their worst latency stays visible per message.
WARMUP = 1
#: Concurrent connects while opening thousands of streams: enough to be
#: quick, few enough not to overflow the server's accept backlog.
CONNECT_CONCURRENCY = 200


class Stream:
    """One held response, read by a watcher callback in the hub."""

    __slots__ = ("group", "sock", "tail", "watcher")

    def __init__(self, group: Streams, sock: stdsocket.socket, tail: bytes) -> None:
        self.group = group
        self.sock = sock
        self.tail = tail
        self.watcher: Any = None

    def on_readable(self) -> None:
        now = time.time_ns()
        try:
            data = self.sock.recv(RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            self.group.errors.append(repr(exc))
            self.stop()
            return
        if not data:
            self.group.errors.append("connection closed before the last chunk")
            self.stop()
            return
        self.scan(self.tail + data if self.tail else data, now)

    def scan(self, buf: bytes, now: int) -> None:
        group = self.group
        worst = group.worst
        lat = group.latencies
        found = MESSAGE.findall(buf)
        group.received += len(found)
        for seq_b, stamp_b in found:
            seq = int(seq_b)
            delay = now - int(stamp_b)
            if delay > worst.get(seq, 0):
                worst[seq] = delay
            if seq >= WARMUP:
                lat.append(delay)
        if buf.endswith(LAST):
            group.ended += 1
            self.stop()
            return
        cut = buf.rfind(b"\n")
        # Keep what may be the start of a message or of the last chunk.
        self.tail = buf[cut - 6 :] if cut >= 6 else buf
        if len(self.tail) > 4096:
            self.tail = self.tail[-4096:]

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self.group.open_count -= 1
        if self.group.open_count <= 0:
            self.group.all_done.set()


class Streams:
    """C held streams on /fanout: connect, read head and hello, then watch."""

    def __init__(self, port: int, c: int) -> None:
        self.port, self.c = port, c
        self.latencies: list[int] = []
        self.worst: dict[int, int] = {}  # seq -> worst latency, to spot a slow message
        self.received = 0
        self.ended = 0
        self.connected = 0  # streams past their hello
        self.open_count = 0
        self.errors: list[str] = []
        self.streams: list[Stream] = []
        self.all_done = gevent.event.Event()

    def open(self, timeout: float) -> float:
        """Open all streams, each past its hello; return seconds it took."""
        t0 = time.perf_counter()
        pool = Pool(CONNECT_CONCURRENCY)
        with gevent.Timeout(timeout, False):
            for _ in range(self.c):
                pool.spawn(self.one)
            pool.join()
        pool.kill(block=True, timeout=5)
        return time.perf_counter() - t0

    def one(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            sock.sendall(wire.request("/fanout"))
            buf = b""
            while b"hello" not in buf:
                data = sock.recv(RECV)
                if not data:
                    raise wire.ProtocolError("closed before hello")
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            if wire.Head(head).status != 200:
                raise wire.ProtocolError(f"bad head {head[:60]!r}")
            raw = stdsocket.socket(fileno=sock.detach())
            raw.setblocking(False)
        except Exception as exc:
            self.errors.append(repr(exc))
            return
        stream = Stream(self, raw, rest[rest.find(b"hello") :])
        stream.watcher = gevent.get_hub().loop.io(raw.fileno(), 1)
        stream.watcher.start(stream.on_readable)
        self.streams.append(stream)
        self.connected += 1
        self.open_count += 1

    def wait_done(self, timeout: float) -> None:
        self.all_done.wait(timeout)

    def close(self) -> None:
        for stream in self.streams:
            if stream.watcher is not None:
                stream.watcher.stop()
            stream.sock.close()
