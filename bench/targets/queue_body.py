"""Target ``queue_body``: the Bottle primer's trick on gevent.pywsgi.

A ``gevent.queue.Queue`` is the body; ``put(StopIteration)`` ends it. The
queue is wrapped in a plain generator because pywsgi trusts ``len()`` on a
body (PEP 3333 "Handling the Content-Length Header") and a queue's
``__len__`` is its current size. This is what people do today, so it is
the baseline every ratio is taken against.

Cross-thread puts go through ``hub.loop.run_callback_threadsafe``: a plain
``Queue.put`` from another OS thread does not wake an idle hub. That makes
this target the hand-rolled baseline of the cross-thread scenario.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import gevent
from gevent.queue import Queue

from bench.targets import _pywsgi


class QueueStream:
    """A queue body (Bottle's queue-as-body pattern) plus the hooks the shared app needs."""

    def __init__(self, maxsize: int | None) -> None:
        self.queue: Queue = Queue(maxsize)
        self.loop = gevent.get_hub().loop
        self.callbacks: list[Callable[[], None]] = []
        self.body = self._iterate()

    def _iterate(self) -> Iterator[bytes]:
        # The generator hides the queue's __len__, and its finally is the
        # only close() notification this style of body gets.
        try:
            yield from self.queue
        finally:
            for cb in self.callbacks:
                cb()

    def put(self, data: bytes) -> None:
        self.queue.put(data)

    def finish(self, last: bytes | None = None) -> None:
        if last is not None:
            self.queue.put(last)
        self.queue.put(StopIteration)

    def put_threadsafe(self, data: bytes) -> None:
        self.loop.run_callback_threadsafe(self.queue.put, data)

    def finish_threadsafe(self) -> None:
        self.loop.run_callback_threadsafe(self.queue.put, StopIteration)

    def on_close(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def spawn(self, fn: Callable[..., object], *args: Any) -> None:
        gevent.spawn(fn, *args)


class Adapter:
    def new_stream(
        self, maxsize: int | None, chunk_size: int = 0, environ: object = None
    ) -> QueueStream:
        return QueueStream(maxsize)


def serve(announce: Callable[[int, dict[str, object]], None], nodelay: bool = False) -> NoReturn:
    handler = _pywsgi.NoDelayHandler if nodelay else None
    _pywsgi.serve(_pywsgi.App(Adapter()), announce, handler)
