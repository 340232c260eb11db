"""The load generator: ``python -m bench.client --cpu N '<job JSON>'``.

It runs in its own process (pinned to another core than the server) on
gevent with raw sockets and no monkey-patching. Every job has two phases so
the orchestrator can sample the server between them:

1. set up (connect, warm up), then print ``{"event": "ready", ...}``;
2. wait for ``go`` on stdin, measure, print ``{"event": "result", ...}``.

Every wait has a deadline taken from the job; nothing here loops forever.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket

from bench import stats, system, wire
from bench.streams import LAST, MESSAGE, Streams

RECV = 262144


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go(timeout: float) -> None:
    """Block this greenlet (not the hub) until ``go`` arrives on stdin."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no 'go' from the orchestrator")
        socket.wait_read(fd, timeout=left, timeout_exc=TimeoutError("no 'go'"))
        data = os.read(fd, 1024)
        if not data:
            raise EOFError("orchestrator closed stdin")
        buf += data


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


class Reader:
    """One connection's receive side: head, then a body, keeping leftovers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def head(self) -> wire.Head:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(RECV)
            if not data:
                raise wire.ProtocolError("connection closed before the head")
            self.buf += data
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return wire.Head(raw)

    def body(
        self, keep: bool, on_data: Callable[[wire.Dechunker, int], None] | None = None
    ) -> wire.Dechunker:
        """Read a whole body; ``on_data(dechunker, recv_ns)`` runs after each recv."""
        head = self.head()
        if head.status != 200:
            raise wire.ProtocolError(f"status {head.status}")
        d = wire.Dechunker(keep)
        if not head.chunked:  # Content-Length (only our tiny control replies)
            while len(self.buf) < (head.length or 0):
                self.buf += self.sock.recv(RECV)
            length = head.length or 0
            d.out += self.buf[:length]
            self.buf = self.buf[length:]
            d.done = True
            return d
        data, self.buf = self.buf, b""
        now = time.time_ns()
        while True:
            if data:
                finished = d.feed(data)
                if on_data is not None:
                    on_data(d, now)
                if finished:
                    self.buf = d.rest
                    return d
            data = self.sock.recv(RECV)
            now = time.time_ns()
            if not data:
                raise wire.ProtocolError("connection closed mid-body (no last chunk)")


def get(port: int, path: str) -> bytes:
    sock = connect(port)
    try:
        sock.sendall(wire.request(path))
        return bytes(Reader(sock).body(keep=True).out)
    finally:
        sock.close()


# -- jobs ---------------------------------------------------------------------


def throughput(port: int, n: int, size: int, timeout: float) -> dict[str, Any]:
    sock = connect(port)
    reader = Reader(sock)
    sock.sendall(wire.request(f"/stream?n={min(n, 2000)}&size={size}"))  # warm up
    reader.body(keep=False)
    emit({"event": "ready"})
    wait_go(timeout)
    total = n * size
    t_payload: list[float] = []

    def on_data(d: wire.Dechunker, _now: int) -> None:
        if not t_payload and d.payload >= total:
            t_payload.append(time.perf_counter())

    with gevent.Timeout(timeout):
        t0 = time.perf_counter()
        sock.sendall(wire.request(f"/stream?n={n}&size={size}"))
        d = reader.body(keep=False, on_data=on_data)
        t_end = time.perf_counter()
    sock.close()
    # Rates use the time to the last payload byte; the wait from there to the
    # terminating chunk is reported apart (tail_ms), because on a server
    # without TCP_NODELAY it is a fixed ~40 ms delayed-ACK stall, not a rate.
    seconds = (t_payload[0] if t_payload else t_end) - t0
    # Compare payload bytes, not chunk counts: a body may legitimately merge
    # chunks that are already waiting into one write (wire_chunks shows it).
    if d.payload != n * size:
        raise wire.ProtocolError(f"got {d.payload} payload bytes, expected {n * size}")
    return {
        "seconds": seconds,
        "chunks_per_s": n / seconds,
        "mb_per_s": n * size / seconds / 1e6,
        "payload_mb": n * size / 1e6,
        "tail_ms": (t_end - t0 - seconds) * 1000,
        "wire_chunks": d.chunks,
    }


def fanout(port: int, c: int, n: int, interval_ms: int, timeout: float) -> dict[str, Any]:
    streams = Streams(port, c)
    connect_s = streams.open(timeout)
    emit({"event": "ready", "connected": streams.connected, "connect_s": connect_s})
    wait_go(timeout)
    get(port, f"/start?n={n}&interval_ms={interval_ms}")
    streams.wait_done(timeout=n * interval_ms / 1000 + 10 + c / 500)
    expected = c * n
    result = {
        "streams": c,
        "messages": n,
        "connected": streams.connected,
        "connect_s": connect_s,
        "received": streams.received,
        "lost": expected - streams.received,
        "ended": streams.ended,
        "errors": len(streams.errors),
        "first_error": streams.errors[0] if streams.errors else None,
        **stats.latency_summary(streams.latencies),
        "worst_by_seq_ms": [round(streams.worst.get(i, 0) / 1e6, 1) for i in range(n)],
    }
    streams.close()
    return result


def idle(port: int, c: int, timeout: float) -> dict[str, Any]:
    streams = Streams(port, c)
    connect_s = streams.open(timeout)
    emit({"event": "ready", "connected": streams.connected, "connect_s": connect_s})
    wait_go(timeout)
    result = {
        "streams": c,
        "connected": streams.connected,
        "errors": len(streams.errors),
        "first_error": streams.errors[0] if streams.errors else None,
    }
    streams.close()
    return result


#: A message in a JSON long-poll answer: its newline is escaped there.
JSON_MESSAGE = re.compile(rb"(\d+) (\d+)\\n")


def longpoll(
    port: int,
    pollers: int,
    window_s: float,
    warmup_s: float,
    interval_ms: int,
    timeout: float,
    path: str = "/poll",
) -> dict[str, Any]:
    socks = [connect(port) for _ in range(pollers)]
    emit({"event": "ready", "connected": len(socks)})
    wait_go(timeout)
    n = int((warmup_s + window_s + 2) * 1000 / interval_ms)
    get(port, f"/start?n={n}&interval_ms={interval_ms}")
    t0 = time.monotonic()
    w0, w1 = t0 + warmup_s, t0 + warmup_s + window_s
    done: list[int] = []  # polls completed inside the window
    total: list[int] = []  # all polls completed while measuring
    latencies: list[int] = []
    errors: list[str] = []

    request = wire.request(path)
    message = JSON_MESSAGE if path == "/lpoll" else MESSAGE

    def poller(sock: socket.socket) -> None:
        # Lean on purpose (20 k polls/s on one core): one request at a time
        # per connection, so a response is complete when it ends with the
        # last chunk or holds Content-Length bytes after its head.
        try:
            while time.monotonic() < w1:
                sock.sendall(request)
                buf = sock.recv(RECV)
                while not complete(buf):
                    data = sock.recv(RECV)
                    if not data:
                        raise wire.ProtocolError("connection closed mid-response")
                    buf += data
                now_ns, now = time.time_ns(), time.monotonic()
                if not buf.startswith(b"HTTP/1.1 200 "):
                    raise wire.ProtocolError(f"bad response {buf[:40]!r}")
                total.append(1)
                if w0 <= now < w1:
                    done.append(1)
                    found = message.search(buf, buf.find(b"\r\n\r\n"))
                    if found is not None:
                        latencies.append(now_ns - int(found.group(2)))
        except Exception as exc:
            errors.append(repr(exc))

    greenlets = [gevent.spawn(poller, s) for s in socks]
    gevent.joinall(greenlets, timeout=warmup_s + window_s + 5)
    gevent.killall(greenlets, block=True, timeout=5)
    for s in socks:
        s.close()
    return {
        "pollers": pollers,
        "window_s": window_s,
        "polls": len(done),
        "polls_per_s": len(done) / window_s,
        "polls_total": len(total),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        **stats.latency_summary(latencies),
    }


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def complete(buf: bytes) -> bool:
    """Whether ``buf`` holds one whole response (chunked or Content-Length)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    if buf.endswith(LAST):
        return True
    length = CONTENT_LENGTH.search(buf, 0, end + 2)
    return length is not None and len(buf) - end - 4 >= int(length.group(1))


def xthread(port: int, n: int, sleep_ms: float, timeout: float) -> dict[str, Any]:
    sock = connect(port)
    reader = Reader(sock)
    emit({"event": "ready"})
    wait_go(timeout)
    latencies: list[int] = []

    def on_data(d: wire.Dechunker, now: int) -> None:
        for line in d.lines():
            msg = wire.parse_message(line)
            if msg is not None:
                latencies.append(now - msg[1])

    with gevent.Timeout(timeout):
        t0 = time.perf_counter()
        sock.sendall(wire.request(f"/xthread?n={n}&sleep_ms={sleep_ms:g}"))
        reader.body(keep=True, on_data=on_data)
        seconds = time.perf_counter() - t0
    sock.close()
    return {
        "messages": n,
        "received": len(latencies),
        "lost": n - len(latencies),
        "seconds": seconds,
        "chunks_per_s": len(latencies) / seconds,
        **stats.latency_summary(latencies),
    }


JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "throughput": throughput,
    "fanout": fanout,
    "idle": idle,
    "longpoll": longpoll,
    "xthread": xthread,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    parser.add_argument("job", help='JSON: {"kind": ..., "port": ..., ...}')
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    system.raise_nofile()
    system.pin(args.cpu)
    job = json.loads(args.job)
    kind = job.pop("kind")
    try:
        result = JOBS[kind](**job)
    except Exception as exc:
        emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from exc
    emit({"event": "result", **result})


if __name__ == "__main__":
    main()
