"""One registration path: every body the library hands out is counted, watched, capped,
drained and given back, whoever built it -- and a body abandoned half-way leaks nothing."""

from __future__ import annotations

import dataclasses
import gc
import json
import time
import weakref
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.client import Stream, event_times, events, get, get_json, wait_until
from tests.hub_apps import MAX_BUFFERED
from tests.servers import ServerProcess, serve
from tests.sse_reference import Parser
from wsgi_detach import (
    BodyOptions,
    ByteBudget,
    DetachedBody,
    DetachMiddleware,
    EventStream,
    History,
    Hub,
    Message,
    Unavailable,
    detach,
    long_poll,
)

# ---------------------------------------------------------------------- in-process


def _environ() -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_PROTOCOL": "HTTP/1.1"}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


class _BrokenStore(History):
    """A store that fails when asked where a client left off: subscribe() raises."""

    def resolve(self, client_id: str) -> int | str:
        raise RuntimeError("the store is down (expected by the test)")


@pytest.mark.parametrize("built_by", ["EventStream", "event_stream", "detach", "long_poll"])
def test_a_body_abandoned_because_a_later_step_raised_gives_its_bytes_back(
    built_by: str,
) -> None:
    """The budget leak: a body built, charged, then never returned because the app raised."""
    hub = Hub(store=_BrokenStore(10))

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if built_by == "EventStream":
            EventStream(environ, start_response)  # charges its opening comment
        elif built_by == "event_stream":
            hub.event_stream(environ, start_response, last_event_id="x")  # subscribe raises
        elif built_by == "detach":
            detach(environ).put(b"x" * 100)
        else:
            long_poll(hub, None, start_response, environ=environ).put(b"x" * 10)
        raise RuntimeError("a later step failed (expected by the test)")

    middleware = DetachMiddleware(app, max_buffered=MAX_BUFFERED)
    for _ in range(200):  # 200 x 27 bytes would be past the 4 KiB budget if any leaked
        with pytest.raises(RuntimeError):
            middleware(_environ(), _start_response)
    stats = middleware.stats()
    assert (stats.buffered, stats.open) == (0, 0)
    assert stats.disconnected == 200  # counted, and released


def test_event_stream_closes_its_stream_when_subscribe_raises_outside_the_middleware() -> None:
    hub = Hub(store=_BrokenStore(10))
    made: list[EventStream] = []

    class Recording(EventStream):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    import wsgi_detach._broadcast as broadcast

    original = broadcast.EventStream
    broadcast.EventStream = Recording  # type: ignore[misc]
    try:
        with pytest.raises(RuntimeError, match="the store is down"):
            hub.event_stream(_environ(), last_event_id="x")
    finally:
        broadcast.EventStream = original  # type: ignore[misc]
    (stream,) = made
    assert stream.closed


def test_an_event_stream_built_from_the_environ_is_capped_by_max_open() -> None:
    opened: list[EventStream] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        stream = EventStream(environ, start_response)
        opened.append(stream)
        return iter([b"not the stream itself"])  # never returned: registration alone counts it

    middleware = DetachMiddleware(app, max_open=1, max_buffered=MAX_BUFFERED, find_wrapped=False)
    first = middleware(_environ(), _start_response)
    assert middleware.stats().open == 1
    refused = middleware(_environ(), _start_response)
    assert b"".join(refused).startswith(b"503 Service Unavailable")
    assert len(opened) == 1  # the second raised Unavailable from its constructor, closed
    assert middleware.stats().buffered == len(b": stream open\n")
    first.close()  # type: ignore[attr-defined]
    stats = middleware.stats()
    assert (stats.open, stats.buffered, stats.refused) == (0, 0, 1)


def test_body_options_are_checked_once_and_merged_in_one_place() -> None:
    options = BodyOptions(idle_timeout=5, timeout_chunk="done", max_buffer=100)
    assert options.idle_timeout == 5.0 and options.timeout_chunk == b"done"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.idle_timeout = 3  # type: ignore[misc]
    assert options.merge({}) is options
    merged = options.merge({"heartbeat": 2}, "detach()")
    assert (merged.heartbeat, merged.idle_timeout, options.heartbeat) == (2.0, 5.0, None)
    with pytest.raises(TypeError, match=r"detach\(\) got unknown options \['idle'\]"):
        options.merge({"idle": 1}, "detach()")
    with pytest.raises(ValueError, match=r"coalesce must be an int >= 0, got -1"):
        options.merge({"coalesce": -1})
    with pytest.raises(TypeError, match=r"either as keywords or as options=, not both"):
        DetachedBody(options=options, idle_timeout=1)
    body = DetachedBody(options=options)
    assert (body._idle_timeout, body._max_buffer, body._timeout_chunk) == (5.0, 100, b"done")


def test_the_middleware_hands_out_one_options_value() -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = detach(environ)
        seen.append(environ["wsgi_detach.detach"].options)
        body.finish(b"x")
        return body

    base = BodyOptions(deadline=60)
    middleware = DetachMiddleware(app, options=base, idle_timeout=9, max_buffered=1000)
    assert middleware.options.deadline == 60.0 and middleware.options.idle_timeout == 9.0
    assert middleware.options.budget is middleware.budget
    for _ in range(2):
        result = middleware(_environ(), _start_response)
        list(result)
        result.close()  # type: ignore[attr-defined]
    assert seen[0] is seen[1] is middleware.options  # shared, never copied per request
    with pytest.raises(TypeError, match="DetachMiddleware takes no budget"):
        DetachMiddleware(app, budget=None)


def test_detach_event_stream_and_hub_event_stream_take_options_and_no_budget() -> None:
    """options=BodyOptions(...) is taken wherever body options are; a budget of
    one's own is refused under the middleware, as keyword or inside options."""
    hub = Hub()
    mine = BodyOptions(idle_timeout=7, max_buffer=5000, timeout_chunk="bye")
    made: list[DetachedBody] = []
    refusals: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        made.append(detach(environ, options=mine, heartbeat=3))
        made.append(EventStream(environ, options=mine))
        made.append(hub.event_stream(environ, options=mine, deadline=60))
        for build in (
            lambda: detach(environ, options=BodyOptions(budget=ByteBudget(10))),
            lambda: EventStream(environ, budget=ByteBudget(10)),
            lambda: EventStream(environ, options=BodyOptions(budget=ByteBudget(10))),
            lambda: hub.event_stream(environ, budget=ByteBudget(10)),
            lambda: detach(environ, options={"idle_timeout": 1}),
        ):
            with pytest.raises(TypeError) as refused:
                build()
            refusals.append(str(refused.value))
        for body in made:
            body.finish()
        return made[0]

    middleware = DetachMiddleware(app, idle_timeout=99, max_buffered=MAX_BUFFERED)
    middleware(_environ(), _start_response).close()  # type: ignore[attr-defined]
    plain, stream, subscribed = made
    assert (plain._idle_timeout, plain._max_buffer, plain._heartbeat) == (7.0, 5000, 3.0)
    assert plain._timeout_chunk == b"bye"
    assert (stream._idle_timeout, stream._max_buffer, stream._timeout_chunk) == (7.0, 5000, None)
    assert stream._encoding == "utf-8" and stream._heartbeat == 15.0
    assert (subscribed._idle_timeout, subscribed._deadline) == (7.0, 60.0)
    assert all(body._budget is middleware.budget for body in made)
    assert refusals == [
        "detach() takes no budget: the middleware's max_buffered is the one budget "
        "shared by its bodies",
        *["EventStream takes no budget: the middleware's max_buffered is the one budget "
          "shared by its bodies"] * 3,
        "options must be a BodyOptions, got dict",
    ]
    assert middleware.stats().buffered == 0


def test_event_stream_options_are_derived_without_keeping_a_middleware_alive() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        stream = EventStream(environ, start_response, heartbeat=None)
        stream.finish()
        return stream

    middleware = DetachMiddleware(app, idle_timeout=5)
    for _ in range(2):
        middleware(_environ(), _start_response).close()  # type: ignore[attr-defined]
    gone = weakref.ref(middleware.options)
    del middleware
    gc.collect()
    assert gone() is None


def test_a_refused_event_stream_is_closed_before_anything_is_charged() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            return EventStream(environ, start_response)
        except Unavailable:
            raise

    middleware = DetachMiddleware(app, max_open=1, max_buffered=MAX_BUFFERED)
    held = middleware(_environ(), _start_response)
    for _ in range(5):
        refused = middleware(_environ(), _start_response)
        assert b"".join(refused).startswith(b"503")
    assert middleware.stats().buffered == len(b": stream open\n")
    held.close()  # type: ignore[attr-defined]
    assert middleware.stats().buffered == 0


def test_message_keeps_its_retry() -> None:
    message = Message(1, "a", "x", None, retry=10)
    assert message.sse() == b"id: a\nretry: 10\ndata: x\n\n"


# ---------------------------------------------------------------------- over real sockets

DIRECT_SERVERS = ["detach-server", "gunicorn-gevent", "gunicorn-gthread"]


@pytest.mark.parametrize("server_kind", DIRECT_SERVERS)
@pytest.mark.parametrize("wrap", [False, True])
def test_an_event_stream_built_directly_is_counted_watched_and_drained(
    server_kind: str, wrap: bool
) -> None:
    suffix = "&wrap=1" if wrap else ""
    with serve(server_kind, "tests.hub_apps:app") as server:
        # Counted by stats() while open, even when the app returns a wrapper.
        leaver = Stream(server.port, f"/sse/direct?key=leaver{suffix}")
        assert wait_until(lambda: events(server.port, "leaver") == ["opened"])
        assert get_json(server.port, "/_stats")["open"] == 1
        # Closed when its client leaves, within the watcher's bound.
        left = time.time()
        leaver.close()
        assert wait_until(lambda: len(events(server.port, "leaver")) == 2, timeout=3)
        times = event_times(server.port, "leaver")
        assert list(times) == ["opened", "outcome disconnected"]
        assert times["outcome disconnected"] - left < 1.0
        assert wait_until(lambda: get_json(server.port, "/_stats")["open"] == 0)
        # Ended by drain(): the farewell, then a clean end.
        with Stream(server.port, f"/sse/direct?key=stayer{suffix}") as stayer:
            assert wait_until(lambda: events(server.port, "stayer") == ["opened"])
            assert get(server.port, "/_drain?grace=2").status == 202
            response = stayer.read_all()
        parser = Parser()
        parser.feed(response.body)
        assert [(e.type, e.data) for e in parser.events] == [("message", "hello"), ("bye", "bye")]
        assert response.complete
        # The server calls close() after it has sent the last chunk, so the
        # client can see the end a moment before the stream is counted closed.
        def settled() -> bool:
            stats = get_json(server.port, "/_stats")
            return (stats["open"], stats["buffered"], stats["draining"]) == (0, 0, True)

        assert wait_until(settled, timeout=3)
        stats = get_json(server.port, "/_stats")
        assert stats["finished"] == 1 and stats["disconnected"] == 1


@pytest.fixture(scope="module", params=["detach-server", "gunicorn-gthread"])
def capped(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with serve(request.param, "tests.hub_apps:app") as server:
        yield server


#: Every kind of id a client may send that cannot be resumed from, and the reason.
BAD_IDS = [
    ("{epoch}-\u00b2", "unknown id"),
    ("{epoch}-\u0663", "unknown id"),
    ("{epoch}-" + "9" * 5000, "unknown id"),
    ("{epoch}-", "unknown id"),
    ("{epoch}-07", "unknown id"),
    ("{epoch}-99999", "unknown id"),
    ("0a0a0a-3", "from another epoch"),
    ("{epoch}-1", "older than the history"),
    ("garbage", "unknown id"),
    ("\u00e9t\u00e9", "unknown id"),
]


def _resync_over_a_socket(port: int, path: str, header: str | None) -> tuple[int, str]:
    """Open the stream, read until the resync event, leave; (status, reason)."""
    headers = {}
    if header is not None:  # as a browser sends it: UTF-8 bytes
        headers["Last-Event-ID"] = header.encode("utf-8").decode("latin-1")
    with Stream(port, path, headers=headers, timeout=10) as stream:
        head = stream.read_head()
        if head.status != 200:
            return head.status, ""
        parser = Parser()
        while not parser.events:
            chunk = stream.read_chunk()
            assert chunk is not None, "the stream ended before the resync"
            parser.feed(chunk)
    event = parser.events[0]
    assert event.type == "resync"
    return 200, str(json.loads(event.data)["reason"])


def test_a_thousand_unresumable_ids_leak_nothing_and_never_500(capped: ServerProcess) -> None:
    port = capped.port
    for n in range(60):  # push the first ids out of the 50-message history
        get(port, f"/hub/publish?data=m{n}")
    epoch = get_json(port, "/hub/cursor")["cursor"].split("-")[0]
    statuses: dict[int, int] = {}
    for i in range(1000):
        bad, reason = BAD_IDS[i % len(BAD_IDS)]
        bad = bad.format(epoch=epoch)
        if i % 2:  # the header a reconnecting EventSource sends
            status, got = _resync_over_a_socket(port, "/hub/events", bad)
        else:  # the first connect's ?after=
            status, got = _resync_over_a_socket(port, f"/hub/events?after={quote(bad)}", None)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            assert got == reason, bad[:40]
        else:
            assert 400 <= status < 500, status
    assert statuses.get(200, 0) + sum(v for k, v in statuses.items() if 400 <= k < 500) == 1000
    # Every stream was left by its client: all closed, every byte given back.
    assert wait_until(lambda: get_json(port, "/_stats")["open"] == 0, timeout=10)
    assert get_json(port, "/_stats")["buffered"] == 0
    # ...and a new stream still receives.
    with Stream(port, "/hub/events") as fresh:
        fresh.read_head()
        opening = fresh.read_chunk()
        assert opening is not None and opening.startswith(b": stream open")
        published = get_json(port, "/hub/publish?data=still+alive")
        assert published["subscribers"] >= 1
        parser = Parser()
        while not parser.events:
            chunk = fresh.read_chunk()
            assert chunk is not None
            parser.feed(chunk)
    assert [(e.data, e.last_event_id) for e in parser.events] == [("still alive", published["id"])]


def test_a_long_poll_under_the_middleware_is_registered_and_budgeted(
    capped: ServerProcess,
) -> None:
    cursor = get_json(capped.port, "/hub/cursor")["cursor"]
    with Stream(capped.port, f"/hub/poll?cursor={quote(cursor)}") as waiting:
        assert wait_until(lambda: get_json(capped.port, "/_stats")["open"] == 1)
        get(capped.port, "/hub/publish?data=polled")
        response = waiting.read_all()
    assert b'"data":"polled"' in response.body
    assert wait_until(lambda: get_json(capped.port, "/_stats")["open"] == 0)
    assert get_json(capped.port, "/_stats")["buffered"] == 0
