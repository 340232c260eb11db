"""Objects a waiting long-poll holds, and the collections they cause.

Run: ``python -m bench.poll_objects [--polls 800] [--before]`` (from the repository root).

Why count them: under hundreds of waiting polls, CPython's garbage collector
runs a young collection every 700 net allocations of tracked objects, and an
object a waiting poll holds is allocated before the collection and freed
after it, so it never pays back its allocation (the count does not go below
zero). Each object a waiting poll holds therefore brings the next young
collection closer, and each collection walks what the waiting polls hold:
the cost grows faster than the count. This measures both, in one process,
where the machine's load cannot move the count:

* ``objects``: ``long_poll`` served by ``make_server`` (``DetachMiddleware``
  on ``DetachServer``), ``--polls`` keep-alive clients (plain sockets of this process,
  one request header: ``Host``) each waiting on a poll; the objects the
  collector tracks that appeared since the same connections were idle
  (``gc.freeze()`` first, then ``gc.get_objects()``), per waiting poll, by
  type (bound methods by function);
* ``collections``: the same server kept busy for ``--seconds`` (every poll
  answered by a publish every 10 ms, each client polling again at once):
  polls answered, young/middle/full collections and their time per poll,
  process CPU per poll (server and clients together).

``--extra N`` makes each waiting poll hold N objects more (through a
callback on its body's ``on_close``): the price of one object, measured.
``--before`` imports the package from ``$BENCH_BEFORE`` (an export of older
code, as for the ``wsgi_detach_before`` target). The figures of one process
move little between runs; the CPU per poll moves with the machine.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import subprocess
import sys
import time
from typing import Any

REQUEST = b"GET /poll HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _serve(extra: int = 0) -> tuple[Any, Any, int]:
    """(the hub, the middleware, the port) of a long-poll server in this process.

    ``extra``: objects more per waiting poll, a chain of them held by its
    body's ``on_close``: what one more object per waiting poll costs.
    """
    import gevent

    from wsgi_detach import Hub, long_poll, make_server

    hub = Hub()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        body = long_poll(hub, None, start_response, environ=environ)
        chain = None
        for _ in range(extra):
            chain = _Held(chain)
        if chain is not None:
            body.on_close(chain)
        return body

    server = make_server(app, "127.0.0.1", 0, log=None)  # DetachMiddleware in front
    server.start()
    gevent.sleep(0)
    return hub, server.middleware, server.server_port


class _Held:
    """An object a waiting poll holds (``--extra``), and the next one; called on close."""

    __slots__ = ("next",)

    def __init__(self, next_one: _Held | None) -> None:
        self.next = next_one

    def __call__(self) -> None:
        pass


def _read_answer(sock: Any) -> None:
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        more = sock.recv(65536)
        if not more:
            raise SystemExit("the server closed a connection")
        data += more


def _kind(obj: object) -> str:
    if type(obj).__name__ == "method":
        return "method " + getattr(obj.__func__, "__qualname__", "?")  # type: ignore[attr-defined]
    return type(obj).__qualname__


def objects(polls: int, extra: int = 0) -> tuple[float, list[tuple[str, float]]]:
    """(tracked objects per waiting poll, the largest kinds per waiting poll)."""
    import gevent
    from gevent import socket as gsocket

    hub, middleware, port = _serve(extra)
    clients = [gsocket.create_connection(("127.0.0.1", port)) for _ in range(polls)]

    def waiting() -> int:
        return int(middleware.stats().open)

    def all_wait() -> None:
        for client in clients:
            client.sendall(REQUEST)
        give_up = time.monotonic() + 10
        while waiting() < polls and time.monotonic() < give_up:
            gevent.sleep(0.01)
        if waiting() < polls:
            raise SystemExit(f"only {waiting()} of {polls} polls waited")

    for _ in range(2):  # every connection served once: what stays per connection is made
        all_wait()
        hub.publish("m")
        for client in clients:
            _read_answer(client)
    gc.collect()
    gc.freeze()
    all_wait()
    found = collections.Counter(_kind(obj) for obj in gc.get_objects())
    gc.unfreeze()
    per_poll = sum(found.values()) / polls
    kinds = [(kind, n / polls) for kind, n in found.most_common() if n >= polls / 2]
    return per_poll, kinds


def collections_per_poll(polls: int, seconds: float, extra: int = 0) -> dict[str, float]:
    """Polls answered and collections made while ``polls`` clients poll for ``seconds``."""
    import gevent
    from gevent import socket as gsocket

    hub, _, port = _serve(extra)
    answered = [0]

    def client() -> None:
        sock = gsocket.create_connection(("127.0.0.1", port))
        while True:
            sock.sendall(REQUEST)
            _read_answer(sock)
            answered[0] += 1

    def ticker() -> None:
        while True:
            gevent.sleep(0.01)
            hub.publish("m")

    for _ in range(polls):
        gevent.spawn(client)
    gevent.spawn(ticker)
    gevent.sleep(1.0)  # every client connected and polling
    stats = {generation: [0, 0.0] for generation in range(3)}
    started = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        entry = stats[info["generation"]]
        entry[0] += 1
        entry[1] += time.perf_counter() - started[0]

    gc.callbacks.append(on_collection)
    answered[0] = 0
    cpu = time.process_time()
    gevent.sleep(seconds)
    cpu = time.process_time() - cpu
    gc.callbacks.remove(on_collection)
    n = max(answered[0], 1)
    return {
        "polls": answered[0],
        "cpu_us_per_poll": cpu / n * 1e6,
        "young": stats[0][0], "middle": stats[1][0], "full": stats[2][0],
        "gc_us_per_poll": sum(entry[1] for entry in stats.values()) / n * 1e6,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.poll_objects")
    parser.add_argument("--polls", type=int, default=800, help="waiting polls")
    parser.add_argument("--seconds", type=float, default=3.0, help="busy phase")
    parser.add_argument("--before", action="store_true", help="the package from $BENCH_BEFORE")
    parser.add_argument("--extra", type=int, default=0, help="objects more per waiting poll")
    parser.add_argument("--phase", choices=("objects", "busy"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.before and not os.environ.get("BENCH_BEFORE"):
        sys.exit("--before: set BENCH_BEFORE to a directory holding the older wsgi_detach package")
    if args.phase is None:  # each phase in a fresh process of its own
        for phase in ("objects", "busy"):
            command = [sys.executable, "-m", "bench.poll_objects", "--phase", phase,
                       "--polls", str(args.polls), "--seconds", str(args.seconds),
                       "--extra", str(args.extra),
                       *(["--before"] if args.before else [])]
            subprocess.run(command, check=True, timeout=args.seconds + 90)
        return
    if args.before:
        sys.path.insert(0, os.environ["BENCH_BEFORE"])
    from bench import system

    system.raise_nofile()
    label = "before" if args.before else "now"
    if args.phase == "objects":
        per_poll, kinds = objects(args.polls, args.extra)
        print(f"{label}: {per_poll:.2f} tracked objects per waiting poll ({args.polls} waiting)")
        for kind, n in kinds:
            print(f"  {n:5.2f}  {kind}")
    else:
        busy = collections_per_poll(args.polls, args.seconds, args.extra)
        print(
            f"{label}: {busy['polls']} polls in {args.seconds:g} s, "
            f"{busy['cpu_us_per_poll']:.1f} us CPU per poll (server and clients); "
            f"collections: {busy['young']} young, {busy['middle']} middle, {busy['full']} full, "
            f"{busy['gc_us_per_poll']:.2f} us per poll"
        )
    sys.stdout.flush()
    os._exit(0)  # the server and its clients: nothing to shut down politely


if __name__ == "__main__":
    main()
