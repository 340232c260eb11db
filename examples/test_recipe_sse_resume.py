"""Recipe: an SSE endpoint that resumes after a reconnect, tested with wsgi_detach.testing.

The guarantee: a client whose connection breaks reconnects with
``Last-Event-ID`` and gets exactly the events it missed, no gap, no
duplicate. The ``no-history`` variant serves the same endpoint from a hub
that keeps one message only, and the test is expected to fail on it: that
is the test catching a broken guarantee.

Run it: ``python -m pytest -p wsgi_detach_pytest.plugin
examples/test_recipe_sse_resume.py``. As an app it serves its stream on
http://127.0.0.1:8000/events.
"""

from __future__ import annotations

from typing import Any

import pytest

from wsgi_detach import DetachMiddleware, Hub
from wsgi_detach.testing import wait_until

SMOKE_PATHS = ["/events"]


def make_app(hub: Hub) -> DetachMiddleware:
    def events(environ: dict[str, Any], start_response: Any) -> Any:
        return hub.event_stream(environ, start_response, retry=100)

    return DetachMiddleware(events)


app = make_app(Hub())


@pytest.mark.parametrize("history", [
    1000,
    pytest.param(1, id="no-history", marks=pytest.mark.xfail(
        strict=True, reason="a hub that keeps no history cannot replay what the client missed")),
])
def test_a_reconnecting_client_gets_exactly_what_it_missed(
    history: int, serve_app: Any, event_source: Any
) -> None:
    hub = Hub(history=history)
    server = serve_app(make_app(hub))
    source = event_source(server, "/events")
    wait_until(lambda: hub.subscribers == 1, 5)
    for n in range(3):
        hub.publish(f"before {n}")
    assert [e.data for e in source.take(3)] == ["before 0", "before 1", "before 2"]

    # The connection breaks; the server notices, and events go on without the client.
    first = source.stream
    first.reset()
    server.wait_closed(first, outcome="disconnected")
    for n in range(3):
        hub.publish(f"while away {n}")

    # The client comes back by itself after `retry`, saying what it saw last.
    missed = source.take(3)
    assert source.sent_ids[-1] == source.events[2].last_event_id
    assert [e.data for e in missed] == ["while away 0", "while away 1", "while away 2"]
    hub.publish("after")
    assert source.take(1)[0].data == "after"
