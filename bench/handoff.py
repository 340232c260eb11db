"""In-process hand-off cost, no sockets: ``python -m bench.handoff [--profile]``.

The server scenarios measure a body together with pywsgi's write path,
which costs far more than the hand-off itself, so a few microseconds in
the body hide in the noise. This isolates them: C greenlets iterate C
bodies (as pywsgi would) while one publisher puts a message into every
body, N times. It prints microseconds per put and per put-plus-delivery,
for ``DetachedBody`` (default and ``coalesce=0``) and for the
``gevent.queue.Queue`` of Bottle's queue-as-body pattern; ``--profile`` adds a
cProfile of the body's run sorted by own time, to show where the difference goes.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent.queue import Queue

MESSAGE = b"12345 1764000000000000000\n"


def make(kind: str) -> tuple[Any, Callable[[Any], None], Callable[[Any], Iterable[bytes]]]:
    """(body, end, iterable) for one stream of ``kind``."""
    if kind == "queue_body":
        q: Queue = Queue()
        return q, lambda b: b.put(StopIteration), lambda b: b
    from wsgi_detach import DetachedBody

    options = {"coalesce": 0} if kind == "wsgi_detach_nocoalesce" else {}
    body = DetachedBody(**options)
    return body, lambda b: b.finish(), lambda b: b


def run(kind: str, c: int, n: int) -> dict[str, float]:
    """Per stream and message: microseconds to put, and to put and deliver."""
    made = [make(kind) for _ in range(c)]
    got = [0]

    def consume(iterable: Iterable[bytes]) -> None:
        for _ in iterable:
            got[0] += 1

    consumers = [gevent.spawn(consume, it(body)) for body, _, it in made]
    gevent.sleep(0.05)  # every consumer is now waiting on its empty body
    put_s = all_s = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        for body, _, _ in made:
            body.put(MESSAGE)
        t1 = time.perf_counter()
        deadline = t1 + 10
        while got[0] < (i + 1) * c and time.perf_counter() < deadline:
            gevent.sleep(0)
        put_s += t1 - t0
        all_s += time.perf_counter() - t0
    for body, end, _ in made:
        end(body)
    gevent.joinall(consumers, timeout=10)
    return {"put_us": put_s / n / c * 1e6, "put_and_deliver_us": all_s / n / c * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handoff", description=__doc__)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    kinds = ("queue_body", "wsgi_detach", "wsgi_detach_nocoalesce")
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:  # interleaved, like the server scenarios
            rows[kind].append(run(kind, args.streams, args.messages))
    print(f"C={args.streams} streams, {args.messages} messages, median of {args.repeats}")
    print(f"{'body':<24}{'put us':>10}{'put+deliver us':>16}")
    for kind, runs in rows.items():
        put = sorted(r["put_us"] for r in runs)[len(runs) // 2]
        both = sorted(r["put_and_deliver_us"] for r in runs)[len(runs) // 2]
        print(f"{kind:<24}{put:>10.2f}{both:>16.2f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run("wsgi_detach", args.streams, args.messages)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
