"""``SomeAsyncWorker``: the primer's stand-in for any callback-style data source.

It calls ``on_data`` callbacks with a few chunks, then ``on_finish``, from a
plain OS thread -- the hardest case for a WSGI body, and the common one for
client libraries with their own I/O thread. Not an example itself (the
leading underscore keeps it out of tests/test_examples.py).
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class SomeAsyncWorker:
    """Produces ``count`` chunks, ``interval`` seconds apart, once a callback is set."""

    def __init__(self, count: int = 3, interval: float = 0.5) -> None:
        self._count = count
        self._interval = interval
        self._data: list[Callable[[str], object]] = []
        self._finish: list[Callable[[], object]] = []
        self._started = False

    def on_data(self, callback: Callable[[str], object]) -> None:
        self._data.append(callback)
        self._start()

    def on_finish(self, callback: Callable[[], object]) -> None:
        self._finish.append(callback)

    def _start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for i in range(self._count):
            for callback in self._data:
                callback(f"chunk {i}\n")
            time.sleep(self._interval)
        for done in self._finish:
            done()
