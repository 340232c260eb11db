"""Server CPU per delivered fan-out message, in one process: ``python -m bench.fanout_cpu``.

The fan-out scenario's ``srv us/msg`` is taken from a server process on a
shared machine; this isolates the same work where little else can move it.
``make_server`` serves ``detach()`` bodies subscribed to a ``Hub`` (what the
``wsgi_detach`` target does) to C plain sockets of the same process, which
never read: each message is small and the kernel buffers them all. The hub
publishes N messages, ``--interval`` seconds apart (long enough that each
is delivered to every stream before the next: the per-message cost, not
how well a server that falls behind coalesces), and the process CPU time
of that phase is divided by C x N. It includes the kernel's loopback work,
which Linux charges to the sender, as it does for a real server.

``--before`` imports the package from ``$BENCH_BEFORE`` instead (an export
of older code, as for the ``wsgi_detach_before`` target), for a before/after
figure; run each a few times and compare medians. Asserts that every
message arrived.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any


def measure(c: int, n: int, interval: float) -> float:
    """Microseconds of process CPU per (stream x message)."""
    import gevent

    from wsgi_detach import Hub, detach, make_server

    hub = Hub()
    bodies: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = detach(environ)
        body.put(b"hello\n")
        hub.subscribe(body, last_event_id=None, encode=lambda m: m.text.encode())
        bodies.append(body)
        return body

    server = make_server(app, port=0, log=None)
    server.start()
    socks = []
    for i in range(c):  # in steps, so that the listen backlog never overflows
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", server.server_port))
        socks.append(sock)
        if i % 50 == 49:
            gevent.sleep(0.01)
    gevent.sleep(0.2)
    for i, sock in enumerate(socks):
        sock.setblocking(True)
        sock.sendall(b"GET /fanout HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.setblocking(False)
        if i % 50 == 49:
            gevent.sleep(0.005)
    deadline = time.monotonic() + 30
    while len(bodies) < c and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert len(bodies) == c, f"{len(bodies)} of {c} streams held"
    gevent.sleep(0.3)
    _drain(socks)
    gc.collect()
    started = time.process_time()
    for seq in range(n):
        hub.publish(f"{seq} {time.time_ns()}")
        gevent.sleep(interval)
    cpu = time.process_time() - started
    received = _drain(socks)
    assert received == c * n, f"{received} of {c * n} messages arrived"
    return cpu / (c * n) * 1e6


def _drain(socks: list[socket.socket]) -> int:
    """Read what each socket holds; the number of messages in it."""
    count = 0
    for sock in socks:
        try:
            while data := sock.recv(1 << 20):
                count += data.count(b" ")  # one space per message, none in heads or hello
        except BlockingIOError:
            pass
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_cpu")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between messages")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes, median shown")
    parser.add_argument("--before", action="store_true", help="the package from $BENCH_BEFORE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.before:
            sys.path.insert(0, os.environ["BENCH_BEFORE"])
        print(measure(args.streams, args.messages, args.interval))
        return
    if args.before and not os.environ.get("BENCH_BEFORE"):
        sys.exit("--before: set BENCH_BEFORE to a directory holding the older wsgi_detach package")
    command = [sys.executable, "-m", "bench.fanout_cpu", "--child",
               "--streams", str(args.streams), "--messages", str(args.messages),
               "--interval", str(args.interval), *(["--before"] if args.before else [])]
    runs = [float(subprocess.run(command, check=True, capture_output=True, text=True,
                                 timeout=120).stdout) for _ in range(args.repeats)]
    label = "before" if args.before else "now"
    print(f"{label}: {statistics.median(runs):.2f} us of CPU per delivery "
          f"(C={args.streams}, N={args.messages}; runs: {', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
