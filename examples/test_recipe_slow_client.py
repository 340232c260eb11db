"""Recipe: a slow client gets dropped while fast ones keep up, tested with wsgi_detach.testing.

The guarantee: one client that stops reading costs the others nothing.
The hub caps what may wait for one subscriber (``max_pending``); the
stalled client is dropped once it is that far behind, while the fast
clients get every message, in order, and the server's buffers stay
bounded. The ``unbounded`` variant sets a cap larger than anything the test
publishes, so the stalled client is never dropped; the test is expected to
fail on it.

Run it: ``python -m pytest -p wsgi_detach_pytest.plugin
examples/test_recipe_slow_client.py``. As an app it serves its feed on
http://127.0.0.1:8000/feed.
"""

from __future__ import annotations

from typing import Any

import pytest

from wsgi_detach import DetachMiddleware, Hub
from wsgi_detach.testing import SMALL_SNDBUF, wait_until

SMOKE_PATHS = ["/feed"]

#: What one subscriber may have waiting before it is dropped.
MAX_PENDING = 64 * 1024
#: Each message: 4 KiB, so that a stalled client falls behind quickly.
PAYLOAD = "x" * 4096
#: Published before the stalled client must be dropped: the cap, the ~14 KiB
#: the socket buffers hold (``send_buffer=SMALL_SNDBUF``, ``small_buffer``),
#: and room for a message more.
BOUND = MAX_PENDING + 32 * 1024


def make_app(hub: Hub) -> DetachMiddleware:
    def feed(environ: dict[str, Any], start_response: Any) -> Any:
        return hub.event_stream(environ, start_response)

    return DetachMiddleware(feed)


app = make_app(Hub(max_pending=MAX_PENDING))


@pytest.mark.parametrize("max_pending", [
    MAX_PENDING,
    pytest.param(1 << 30, id="unbounded", marks=pytest.mark.xfail(
        strict=True, reason="without a cap, a stalled client is never dropped")),
])
def test_a_stalled_client_is_dropped_and_the_fast_ones_get_everything(
    max_pending: int, serve_app: Any, open_stream: Any, event_source: Any
) -> None:
    hub = Hub(max_pending=max_pending)
    # Small socket buffers on both sides (the client's receive buffer, the
    # server's send buffer), so that the stalled client holds the server's
    # writes up after about 14 KiB: what waits for it beyond that is the hub's.
    server = serve_app(make_app(hub), send_buffer=SMALL_SNDBUF)
    slow = open_stream(server, "/feed", small_buffer=True).stall()
    fast = [event_source(server, "/feed") for _ in range(2)]
    wait_until(lambda: hub.subscribers == 3, 5)

    # Publish, the fast clients reading each message, until the hub lets go
    # of the stalled client. It must within BOUND: its cap plus what the
    # socket buffers took (about 14 KiB), with room for one more message.
    published: list[str] = []
    while hub.subscribers == 3 and len(published) * len(PAYLOAD) < BOUND:
        published.append(hub.publish(f"{len(published)} {PAYLOAD}").id)
        for source in fast:
            source.take(1)
    assert hub.subscribers == 2, (
        f"the stalled client was not dropped after {len(published)} messages of "
        f"{len(PAYLOAD)} bytes")

    # The fast clients got every message, in order, over one connection each.
    for source in fast:
        assert [e.last_event_id for e in source.events] == published
        assert len(source.connections) == 1
    # The stalled client, once it reads again, finds a stream that ended
    # cleanly after what was queued for it: an EventSource would reconnect
    # and resume from its Last-Event-ID.
    slow.read_all(timeout=10)
    assert slow.complete
    assert len(slow.parser.events) < len(published)
