"""Target ``generator``: a plain generator on gevent.pywsgi.

Nothing is handed between greenlets: the server pulls each chunk from the
generator it is iterating. That makes it the ceiling a WSGI body can reach
on pywsgi, so it only runs the throughput scenario (a generator cannot be
written to later, which is the whole point of the other targets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NoReturn

from bench import producer
from bench.targets import _pywsgi


class Adapter:
    def new_stream(
        self, maxsize: int | None, chunk_size: int = 0, environ: object = None
    ) -> _pywsgi.Stream:
        raise NotImplementedError("the generator target only streams /stream")

    def direct_stream(self, n: int, size: int) -> Iterator[bytes]:
        chunk = producer.payload(size)
        for _ in range(n):
            yield chunk


def serve(announce: Callable[[int, dict[str, object]], None]) -> NoReturn:
    _pywsgi.serve(_pywsgi.App(Adapter()), announce)
