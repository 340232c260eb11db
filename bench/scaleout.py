"""``python -m bench.scaleout``: the Redis broker across two processes, beside the in-process hub.

```sh
python -m bench.scaleout              # 10 streams, 2 x 2 500 streams, publish rates
python -m bench.scaleout --smoke      # seconds; for tests/test_bench_scaleout.py, not for numbers
```

Setups, each measured on fresh server processes (``python -m wsgi_detach
serve bench.scaleout:app``) and a fresh ``redis-server`` on 127.0.0.1:

| setup | what it is |
| --- | --- |
| ``inprocess`` | one server; a ``Hub`` in its memory (the embedded default) |
| ``redis`` | two servers sharing a ``RedisBroker`` channel: one receiving connection each |
| ``peer`` | two servers in flask-sse's design: one Redis Pub/Sub connection per client |

Latency: the publisher (in the first server, on ``/start``) stamps each
message with ``time.time_ns()``; the clients (this process: gevent, raw
sockets, no monkey-patching) take ``time.time_ns()`` at receipt: one clock for
every process on the machine. p50/p99/max over every (stream, message) but
the first message, which pays one-off costs; ``lost`` counts (stream,
message) pairs never received and must be 0.

Publish rates (``redis`` only): ``ChannelHub.publish`` in a loop (sequential,
one round trip each) and ``publish_many`` in batches of 500 (pipelined),
from this process, which follows no channel; and end to end: a burst
published by the first server in pipelined batches of 100, received by
streams on both servers: messages/s from the start to the last receipt,
nothing lost.

The machine is not assumed to be idle (see bench/README.md): figures from a
loaded machine are only good for comparing setups within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
CHANNEL = "bench"

PROFILES: dict[str, dict[str, Any]] = {
    "full": {"small": 10, "large": 2500, "n": 50, "interval_ms": 100, "rate_n": 5000,
             "burst": 5000, "burst_streams": 10},
    "smoke": {"small": 4, "large": 20, "n": 5, "interval_ms": 20, "rate_n": 200,
              "burst": 200, "burst_streams": 2},
}


# ---------------------------------------------------------------------------- the served app

_state: dict[str, Any] = {}


def _setup() -> dict[str, Any]:
    if not _state:
        mode = os.environ["BENCH_SCALEOUT"]
        _state["mode"] = mode
        if mode == "inprocess":
            from wsgi_detach import Hub

            _state["hub"] = Hub(history=10000)
        elif mode == "redis":
            from wsgi_detach import RedisBroker

            _state["broker"] = broker = RedisBroker(os.environ["REDIS_URL"], history=10000)
            _state["hub"] = broker.hub(CHANNEL)
        else:  # peer: one Redis connection per client, as flask-sse does
            import redis

            # One connection per client: redis-py's pool must not cap them (recent
            # versions bound it by default, which would turn streams into 500s).
            _state["redis"] = redis.Redis.from_url(os.environ["REDIS_URL"], max_connections=2**20)
    return _state


def _publish_loop(n: int, interval_ms: int) -> None:
    import gevent

    state = _setup()
    if not interval_ms and state["mode"] == "redis":  # a burst: pipelined, 100 a round trip
        for first in range(0, n, 100):
            stamp = time.time_ns()
            state["hub"].publish_many(f"{seq} {stamp}" for seq in range(first, min(first + 100, n)))
        return
    start = time.monotonic()
    for seq in range(n):
        if interval_ms:
            gevent.sleep(max(start + seq * interval_ms / 1000 - time.monotonic(), 0))
        data = f"{seq} {time.time_ns()}"
        if state["mode"] == "peer":
            state["redis"].publish(f"{CHANNEL}:peer", data)
        else:
            state["hub"].publish(data)


def _peer_stream(start_response: Callable[..., Any]) -> Any:
    pubsub = _setup()["redis"].pubsub()
    pubsub.subscribe(f"{CHANNEL}:peer")
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])

    def events() -> Any:
        try:
            yield b": open\n\n"
            for item in pubsub.listen():
                if item["type"] == "message":
                    yield b"data: " + item["data"] + b"\n\n"
        finally:
            pubsub.close()

    return events()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """The served side: ``/events`` (SSE), ``/start?n=&interval_ms=``, ``/stats``."""
    import gevent

    state = _setup()
    path = environ["PATH_INFO"]
    query = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
    if path == "/events":
        if state["mode"] == "peer":
            return _peer_stream(start_response)
        return state["hub"].event_stream(environ, start_response)
    if path == "/start":
        gevent.spawn(_publish_loop, int(query["n"]), int(query["interval_ms"]))
        body = b"started"
    elif path == "/stats":
        broker = state.get("broker")
        body = json.dumps(broker.stats() if broker else {}).encode()
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


# ---------------------------------------------------------------------------- the clients


class Streams:
    """C SSE streams over the given ports, read by greenlets; what each received, when."""

    def __init__(self, ports: list[int], count: int, n: int) -> None:
        import gevent

        self.n = n
        self.latencies: list[float] = []
        self.received: list[dict[int, int]] = [{} for _ in range(count)]
        self.duplicates = 0
        self.last_ns = 0
        self._socks = []
        for i in range(count):
            sock = _connect(ports[i % len(ports)])
            self._socks.append(sock)
        self._readers = [gevent.spawn(self._read, i, s) for i, s in enumerate(self._socks)]

    def _read(self, index: int, sock: Any) -> None:
        buf = b""
        got = self.received[index]
        while len(got) < self.n:
            data = sock.recv(262144)
            if not data:
                return
            now = time.time_ns()
            buf += data
            while b"data: " in buf:
                start = buf.index(b"data: ")
                end = buf.find(b"\n", start)
                if end < 0:
                    break
                seq_text, _, stamp = buf[start + 6 : end].partition(b" ")
                buf = buf[end + 1 :]
                seq = int(seq_text)
                if seq in got:
                    self.duplicates += 1
                got[seq] = now
                if seq:
                    self.latencies.append((now - int(stamp)) / 1e6)
                self.last_ns = max(self.last_ns, now)

    def wait(self, timeout: float) -> None:
        import gevent

        gevent.joinall(self._readers, timeout=timeout)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        lost = sum(self.n - len(got) for got in self.received)

        def pct(p: float) -> float | None:
            return round(lat[min(int(len(lat) * p), len(lat) - 1)], 3) if lat else None

        return {
            "streams": len(self.received),
            "messages": self.n,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1], 3) if lat else None,
            "lost": lost,
            "duplicates": self.duplicates,
        }


def _connect(port: int) -> Any:
    from gevent import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:  # the head, then the stream is open
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"port {port} closed the stream")
        buf += data
    assert buf.startswith(b"HTTP/1.1 200"), buf[:100]
    sock.settimeout(None)
    return sock


def _get(port: int, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
        return bytes(answer.read())


# ---------------------------------------------------------------------------- the run


def _servers(mode: str, count: int, redis_url: str) -> list[Any]:
    from tests.servers import ServerProcess

    env = {"BENCH_SCALEOUT": mode, "REDIS_URL": redis_url}
    return [
        ServerProcess("serve-command", "bench.scaleout:app", env=env).start() for _ in range(count)
    ]


def latency(mode: str, redis: Any, per_port: int, n: int, interval_ms: int) -> dict[str, Any]:
    servers = _servers(mode, 1 if mode == "inprocess" else 2, redis.url)
    try:
        ports = [s.port for s in servers]
        streams = Streams(ports, per_port * len(ports), n)
        time.sleep(0.5)  # every server follows the channel (the redis setup's first subscribe)
        _get(ports[0], f"/start?n={n}&interval_ms={interval_ms}")
        streams.wait(timeout=30 + n * interval_ms / 1000)
        result = streams.summary()
        result["receiving_connections"] = sum(
            1 for c in redis.clients() if "P" in c["flags"]
        )
        streams.close()
        return result
    finally:
        for server in servers:
            server.stop()


def publish_rates(redis: Any, n: int, burst: int, burst_streams: int) -> dict[str, Any]:
    from wsgi_detach import RedisBroker

    broker = RedisBroker(redis.url, history=max(n, burst))
    hub = broker.hub("rates")
    started = time.perf_counter()
    for i in range(n):
        hub.publish(i)
    sequential = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for first in range(0, n, 500):
        hub.publish_many(range(first, min(first + 500, n)))
    pipelined = n / (time.perf_counter() - started)
    broker.close()
    servers = _servers("redis", 2, redis.url)
    try:
        ports = [s.port for s in servers]
        streams = Streams(ports, burst_streams, burst)
        time.sleep(0.5)
        started_ns = time.time_ns()
        _get(ports[0], f"/start?n={burst}&interval_ms=0")
        streams.wait(timeout=60)
        summary = streams.summary()
        streams.close()
    finally:
        for server in servers:
            server.stop()
    elapsed = max(streams.last_ns - started_ns, 1) / 1e9
    return {
        "sequential_per_s": round(sequential),
        "pipelined_per_s": round(pipelined),
        "end_to_end_per_s": round(burst / elapsed),
        "end_to_end_lost": summary["lost"],
        "end_to_end_duplicates": summary["duplicates"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaleout", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long sizes; no numbers")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = PROFILES["smoke" if args.smoke else "full"]
    from tests.redis_server import RedisServer

    results: dict[str, Any] = {"profile": "smoke" if args.smoke else "full", "sizes": size}
    with RedisServer() as redis:
        for mode in ("inprocess", "redis", "peer"):
            for label, per_port in (("10 streams", size["small"]), ("2 x large", size["large"])):
                if mode == "inprocess":
                    per_port *= 2 if label != "10 streams" else 1  # the same total on one process
                elif label == "10 streams":
                    per_port = max(per_port // 2, 1)
                key = f"{mode} / {label}"
                results[key] = latency(mode, redis, per_port, size["n"], size["interval_ms"])
                print(f"{key:<28} {results[key]}", flush=True)
        results["publish"] = publish_rates(
            redis, size["rate_n"], size["burst"], size["burst_streams"]
        )
        print(f"{'publish rates':<28} {results['publish']}", flush=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "scaleout-latest.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
