"""What it costs to watch N idle streams for a departing client, four ways, under gevent.

Strategies (each in a fresh process, N loopback TCP connections):
  epoll-thread   wsgi_detach._watchers: one OS thread, epoll on EPOLLRDHUP (what we ship)
  io-watcher     one libev read watcher per socket (hub.loop.io(fd, 1)), MSG_PEEK on wake
  greenlet       one greenlet per socket blocked in gevent.socket.wait_read, then MSG_PEEK
  poll-250ms     one greenlet peeking every socket with MSG_PEEK|MSG_DONTWAIT every 250 ms

Reported: set-up time, RSS added, CPU used while all N sit idle for 3 s, and the
latency from closing 200 clients to the 200th callback.

Run: python -m bench.mw_idle_watch [N]   (from the repository root; needs 2N+50 fds)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

STRATEGIES = ("epoll-thread", "io-watcher", "greenlet", "poll-250ms")
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
CLOSED = 200
IDLE = 3.0


def _gone(sock: socket.socket) -> bool | None:
    """True at EOF or reset, False if bytes wait, None if nothing to read yet."""
    raw = getattr(sock, "_sock", sock)  # gevent's socket would wait on EAGAIN; the real one not
    try:
        return raw.recv(1, PEEK) == b""
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return True


def run(strategy: str, count: int) -> None:
    import gevent
    import psutil
    from gevent import socket as gsocket

    from wsgi_detach._watchers import SOCKET_KEY, watch

    process = psutil.Process()
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    clients: list[Any] = []
    servers: list[Any] = []
    for _ in range(count):
        client = gsocket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        clients.append(client)
        servers.append(server)
    fired: list[float] = []

    def on_gone() -> None:
        fired.append(time.perf_counter())

    rss = process.memory_info().rss
    started = time.perf_counter()
    hub = gevent.get_hub()
    keep: list[Any] = []
    if strategy == "epoll-thread":
        for server in servers:
            keep.append(watch({SOCKET_KEY: server}, on_gone))
    elif strategy == "io-watcher":
        for server in servers:
            io = hub.loop.io(server.fileno(), 1)

            def ready(io: Any = io, server: Any = server) -> None:
                verdict = _gone(server)
                if verdict is not None:
                    io.stop()
                    if verdict:
                        on_gone()

            io.start(ready)
            keep.append(io)
    elif strategy == "greenlet":

        def wait(server: Any) -> None:
            while True:
                gsocket.wait_read(server.fileno())
                verdict = _gone(server)
                if verdict is not None:
                    if verdict:
                        on_gone()
                    return

        keep.extend(gevent.spawn(wait, server) for server in servers)
    else:

        def poll() -> None:
            watched = set(servers)
            while watched:
                for server in list(watched):
                    verdict = _gone(server)
                    if verdict is not None:
                        watched.discard(server)
                        if verdict:
                            on_gone()
                gevent.sleep(0.25)

        keep.append(gevent.spawn(poll))
    gevent.sleep(0)
    set_up = time.perf_counter() - started
    added = process.memory_info().rss - rss

    cpu = time.process_time()
    gevent.sleep(IDLE)
    idle_cpu = time.process_time() - cpu

    closed = time.perf_counter()
    for client in clients[:CLOSED]:
        client.close()
    give_up = time.monotonic() + 10
    while len(fired) < CLOSED and time.monotonic() < give_up:
        gevent.sleep(0.001)
    latency = (max(fired) - closed) * 1000 if len(fired) >= CLOSED else float("nan")
    print(
        f"{strategy:13} N={count}: set-up {set_up * 1000:7.1f} ms, RSS +{added / 2**20:6.1f} MiB "
        f"({added / count:6.0f} B/stream), idle CPU {idle_cpu / IDLE * 100:5.2f} %, "
        f"{CLOSED} leavers noticed within {latency:6.1f} ms ({len(fired)} callbacks)",
        flush=True,
    )


def main() -> None:
    if len(sys.argv) > 2:
        run(sys.argv[1], int(sys.argv[2]))
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for strategy in STRATEGIES:
        subprocess.run(
            [sys.executable, "-m", "bench.mw_idle_watch", strategy, str(count)],
            env=env,
            check=True,
            timeout=120,
        )


if __name__ == "__main__":
    main()
