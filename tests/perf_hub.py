"""Manual measurement (not collected by pytest): Hub fan-out latency and publish cost.

Run: ``python -m tests.perf_hub [clients] [messages] [server]`` (defaults 1000,
30, ``pywsgi``; ``detach-server`` serves through ``make_server`` and the middleware).

1. In-process: the cost of one ``publish`` to N subscribed EventStreams
   (encoding once, ``put_nowait`` into each).
2. Over loopback: N SSE clients (gevent sockets in this process) held by
   gevent.pywsgi serving tests/pattern_apps.py in a subprocess; a message is
   published every 100 ms through ``/hub/publish``; latency is the time from
   sending that request to each client reading the event.
"""

from __future__ import annotations

import sys
import time

import gevent
from gevent import socket

from tests.servers import ServerProcess
from wsgi_detach import EventStream, Hub


def publish_cost(n: int) -> float:
    hub = Hub(max_pending=1 << 30)
    streams = [EventStream(heartbeat=None) for _ in range(n)]
    for stream in streams:
        hub.subscribe(stream)
    rounds = 20
    started = time.perf_counter()
    for i in range(rounds):
        hub.publish(f"message {i}")
    per_publish = (time.perf_counter() - started) / rounds
    for stream in streams:
        stream.close()
    return per_publish


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def fanout(port: int, n: int, messages: int) -> list[float]:
    arrivals: dict[int, list[float]] = {i: [] for i in range(messages)}

    def client() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /hub/events?hub=perf HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        seen = 0
        while seen < messages:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while b"data: m" in buf:
                _, _, buf = buf.partition(b"data: m")
                index, _, buf = buf.partition(b"\n")
                arrivals[int(index)].append(time.monotonic())
                seen += 1
        sock.close()

    clients = [gevent.spawn(client) for _ in range(n)]
    publisher = socket.create_connection(("127.0.0.1", port))
    for _ in range(200):  # until every client is subscribed, at most 10 s
        publisher.sendall(b"GET /hub/stats?hub=perf HTTP/1.1\r\nHost: x\r\n\r\n")
        if b'"subscribers": %d,' % n in publisher.recv(65536):
            break
        gevent.sleep(0.05)
    else:
        raise RuntimeError("the clients did not all subscribe within 10 s")
    sent: list[float] = []
    for i in range(messages):
        sent.append(time.monotonic())
        request = f"GET /hub/publish?hub=perf&data=m{i} HTTP/1.1\r\nHost: x\r\n\r\n"
        publisher.sendall(request.encode())
        publisher.recv(65536)
        gevent.sleep(0.1)
    gevent.joinall(clients, timeout=10)
    publisher.close()
    return [(t - sent[i]) * 1000 for i, times in arrivals.items() for t in times]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    cost = publish_cost(n)
    print(f"publish to {n} in-process EventStreams: {cost * 1e3:.2f} ms "
          f"({cost / n * 1e6:.2f} us per subscriber)")
    kind = sys.argv[3] if len(sys.argv) > 3 else "pywsgi"
    with ServerProcess(kind, "tests.pattern_apps:app") as server:
        latencies = fanout(server.port, n, messages)
    expected = n * messages
    print(f"fan-out over loopback on {kind}, {n} SSE clients x {messages} messages: "
          f"{len(latencies)}/{expected} delivered; latency ms p50 {percentile(latencies, 50):.1f} "
          f"p99 {percentile(latencies, 99):.1f} max {max(latencies):.1f}")


if __name__ == "__main__":
    main()
