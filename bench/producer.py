"""The producer logic every target is fed by.

Why one module: a benchmark that lets each target invent its own message
format or publishing schedule measures the authors, not the servers. Every
target builds its chunks and messages here and publishes on the schedule
below, so the only thing that differs between targets is how a chunk gets
from the producer to the socket.

Messages are ``b"<seq> <time_ns>\\n"``: ``time.time_ns()`` is a wall clock
shared by all processes on the machine, so the client (another process)
computes delivery latency as its own ``time.time_ns()`` at ``recv`` minus
the stamp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

#: First chunk of every held stream: it makes the server send the headers
#: (PEP 3333 "Specification Details": headers go out with the first
#: non-empty chunk), which tells the client the subscription is registered.
HELLO = b"hello\n"

#: Backpressure bound for the throughput producer, in chunks. Without one a
#: producer greenlet that never blocks would queue the whole transfer in
#: memory before the server wrote a byte.
QUEUE_CHUNKS = 64


def payload(size: int) -> bytes:
    """Return the throughput chunk of ``size`` bytes (no newline inside)."""
    return b"x" * size


def message(seq: int) -> bytes:
    """Return broadcast message ``seq`` stamped with the wall clock now."""
    return b"%d %d\n" % (seq, time.time_ns())


def produce(
    put: Callable[[bytes], object], finish: Callable[[], object], n: int, size: int
) -> None:
    """Push ``n`` chunks of ``size`` bytes, then end the stream (blocking sinks)."""
    chunk = payload(size)
    for _ in range(n):
        put(chunk)
    finish()


async def produce_async(
    put: Callable[[bytes], Awaitable[object]],
    finish: Callable[[], Awaitable[object]],
    n: int,
    size: int,
) -> None:
    """Asyncio twin of :func:`produce` (ending a bounded queue may wait too)."""
    chunk = payload(size)
    for _ in range(n):
        await put(chunk)
    await finish()


#: How many publish loops run in this process now (``BENCH_GC`` tells the
#: collections made while one runs, which are those a fan-out's latency sees).
PUBLISHING = [0]


def publish_loop(
    publish: Callable[[bytes], object],
    end: Callable[[], object],
    n: int,
    interval: float,
    sleep: Callable[[float], object],
) -> None:
    """Broadcast ``n`` messages every ``interval`` s on absolute deadlines, then end.

    Deadlines are absolute (start + k * interval) so that a slow broadcast
    delays only itself and the rate stays what the scenario promised.
    ``sleep`` is the runtime's cooperative sleep (``gevent.sleep``).
    """
    start = time.monotonic()
    PUBLISHING[0] += 1
    try:
        for seq in range(n):
            publish(message(seq))
            sleep(max(0.0, start + (seq + 1) * interval - time.monotonic()))
    finally:
        PUBLISHING[0] -= 1
    end()


async def publish_loop_async(
    publish: Callable[[bytes], object],
    end: Callable[[], object],
    n: int,
    interval: float,
) -> None:
    """Asyncio twin of :func:`publish_loop`."""
    import asyncio

    start = time.monotonic()
    for seq in range(n):
        publish(message(seq))
        await asyncio.sleep(max(0.0, start + (seq + 1) * interval - time.monotonic()))
    end()


def thread_producer(
    put: Callable[[bytes], object], finish: Callable[[], object], n: int, sleep_s: float
) -> None:
    """Body of the plain OS thread in the cross-thread scenario.

    It stamps each message just before ``put`` so the measured latency is
    the wake-up cost: from the thread's call to the byte reaching the client.
    """
    for seq in range(n):
        if sleep_s > 0:
            time.sleep(sleep_s)
        put(message(seq))
    finish()


def poll_answer(msg: bytes) -> dict[str, object]:
    """A long-poll answer carrying ``msg``, shaped like ``wsgi_detach.long_poll``'s JSON.

    For the peers of the burst scenario, which answer with this as their
    framework's JSON response: the same fields, about the same size.
    """
    seq = msg.split(b" ", 1)[0].decode("ascii")
    return {
        "messages": [{"id": seq, "event": None, "data": msg.decode("ascii")}],
        "cursor": seq,
        "resync": False,
    }


class AsyncioHub:
    """Subscribers of the publisher on an asyncio server: an ``asyncio.Queue`` each.

    ``None`` in a queue ends that response. Shared by the Tornado and
    Starlette targets, so both peers fan out exactly alike.
    """

    def __init__(self) -> None:
        self.streams: set[asyncio.Queue[bytes | None]] = set()
        self.polls: list[asyncio.Queue[bytes | None]] = []

    def publish(self, msg: bytes) -> None:
        for q in self.streams:
            q.put_nowait(msg)
        waiting, self.polls = self.polls, []
        for q in waiting:
            q.put_nowait(msg)
            q.put_nowait(None)

    def end(self) -> None:
        streams, self.streams = self.streams, set()
        for q in streams:
            q.put_nowait(None)
