"""Recipe: a producer that learns its client left, tested with wsgi_detach.testing.

The guarantee: when the client goes away (a closed tab, a reset
connection), the body's ``on_close`` runs and the producer stops -- no
thread left writing into a dead response. The ``deaf-producer`` variant
ignores ``on_close`` and the errors of its writes; the test is expected to
fail on it.

Run it: ``python -m pytest -p wsgi_detach_pytest.plugin
examples/test_recipe_client_left.py``. As an app it serves a counter on
http://127.0.0.1:8000/count.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from wsgi_detach import DetachError, DetachMiddleware, detach
from wsgi_detach.testing import wait_until

SMOKE_PATHS = ["/count"]


class Counter:
    """Streams a count every 20 ms from a thread; remembers which producers are running."""

    def __init__(self, listens: bool = True) -> None:
        self.listens = listens
        self.running: set[int] = set()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        body = detach(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        stop = threading.Event()
        if self.listens:
            body.on_close(stop.set)  # the whole recipe: stop when the response ends
        threading.Thread(target=self.produce, args=(body, stop), daemon=True).start()
        return body

    def produce(self, body: Any, stop: threading.Event) -> None:
        me = threading.get_ident()
        self.running.add(me)
        count = 0
        try:
            while not stop.wait(0.02):
                count += 1
                try:
                    body.put(f"{count}\n".encode())
                except DetachError:
                    if self.listens:
                        return
                if count > 1000:  # a bound, so that the broken variant ends by itself
                    return
        finally:
            self.running.discard(me)


counter = Counter()
app = DetachMiddleware(counter)


@pytest.mark.parametrize("listens", [
    True,
    pytest.param(False, id="deaf-producer", marks=pytest.mark.xfail(
        strict=True, reason="a producer that ignores on_close keeps writing to nobody")),
])
@pytest.mark.parametrize("leave", ["vanish", "reset"])
def test_the_producer_stops_when_its_client_leaves(
    listens: bool, leave: str, serve_app: Any, open_stream: Any
) -> None:
    producer = Counter(listens)
    server = serve_app(DetachMiddleware(producer))
    stream = open_stream(server, "/count")
    assert stream.next_chunk() == b"1\n"
    assert producer.running

    getattr(stream, leave)()  # the client goes away
    closed = server.wait_closed(stream, outcome="disconnected")
    assert closed.on_close_at is not None
    wait_until(lambda: not producer.running, 2,
               message="the producer is still writing after its client left")
    server.wait_idle()
