"""Hub: fan-out, ids and history, resume and resync, slow subscribers, publishing from anywhere."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.client import Stream, wait_until
from tests.servers import ServerProcess
from tests.sse_reference import Parser, parse
from wsgi_detach import (
    Batch,
    BufferFull,
    ByteBudget,
    DetachedBody,
    EventStream,
    Hub,
    Message,
    SlowSubscriber,
    UsageError,
)


def drain(body: DetachedBody) -> bytes:
    """Everything the body has buffered now, without waiting for more."""
    out = b""
    while body.buffered:
        out += next(body)
    return out


def sse_events(stream: EventStream) -> list[tuple[str, str, str]]:
    return [(e.type, e.data, e.last_event_id) for e in parse(drain(stream)).events]


def test_every_subscriber_gets_every_message_in_order() -> None:
    hub = Hub()
    streams = [EventStream(heartbeat=None) for _ in range(3)]
    plain = DetachedBody()
    for body in [*streams, plain]:
        hub.subscribe(body)
    sent = [hub.publish(f"m{i}", event="tick" if i % 2 else None) for i in range(5)]
    want = [("tick" if i % 2 else "message", f"m{i}", m.id) for i, m in enumerate(sent)]
    for stream in streams:
        assert sse_events(stream) == want
    lines = [json.loads(line) for line in drain(plain).splitlines()]
    assert lines == [{"id": m.id, "event": m.event, "data": m.data} for m in sent]
    assert [m.seq for m in sent] == [1, 2, 3, 4, 5]
    assert hub.cursor == sent[-1].id


def test_objects_go_out_as_json_text() -> None:
    hub = Hub()
    stream = EventStream(heartbeat=None)
    hub.subscribe(stream)
    message = hub.publish({"nick": "ann", "text": "hi\nthere"})
    assert sse_events(stream) == [("message", '{"nick":"ann","text":"hi\\nthere"}', message.id)]


def test_resume_replays_exactly_what_was_missed_then_goes_live() -> None:
    hub = Hub()
    sent = [hub.publish(f"m{i}") for i in range(5)]
    stream = EventStream({"HTTP_LAST_EVENT_ID": sent[1].id}, heartbeat=None)
    hub.subscribe(stream)
    live = hub.publish("live")
    assert [e[1] for e in sse_events(stream)] == ["m2", "m3", "m4", "live"]
    assert parse(b"").last_event_id == ""  # sanity: the parser starts empty
    assert live.seq == 6


def test_resume_at_the_latest_id_replays_nothing() -> None:
    hub = Hub()
    last = [hub.publish(f"m{i}") for i in range(3)][-1]
    stream = EventStream(heartbeat=None, last_event_id=last.id)
    hub.subscribe(stream)
    assert sse_events(stream) == []


#: Client-chosen ids that cannot be resumed from, and the reason the resync gives.
BAD_IDS = [
    ("{epoch}-2", "older than the history"),
    ("0a0a0a-9", "from another epoch"),
    ("{epoch}-99", "unknown id"),  # ahead of the hub
    ("garbage", "unknown id"),
    ("{epoch}-\u00b2", "unknown id"),  # str.isdigit() says yes, int() says no
    ("{epoch}-\u0663", "unknown id"),  # Arabic-Indic 3: int() would take it as 3
    ("{epoch}-" + "9" * 5000, "unknown id"),  # past int()'s digit limit
    ("{epoch}-", "unknown id"),
    ("{epoch}-08", "unknown id"),  # not canonical: never an id we sent
    ("{epoch}--8", "unknown id"),
    ("{epoch}-+8", "unknown id"),
    ("{epoch}- 8", "unknown id"),
    ("-8", "unknown id"),
    ("{epoch}-8" + "x" * 300, "unknown id"),
    ("\x00", "unknown id"),
    ("\ufffd\ufffd", "unknown id"),
]


@pytest.mark.parametrize(("last_id", "reason"), BAD_IDS)
def test_an_id_that_cannot_be_resumed_gets_one_resync_event_with_its_reason(
    last_id: str, reason: str
) -> None:
    hub = Hub(history=3)
    for i in range(10):
        hub.publish(f"m{i}")
    epoch = hub.cursor.split("-")[0]
    stream = EventStream(heartbeat=None, last_event_id=last_id.format(epoch=epoch))
    hub.subscribe(stream)
    after = hub.publish("after")
    events = sse_events(stream)
    assert events[0] == (
        "resync",
        json.dumps({"reason": reason, "cursor": f"{epoch}-10"}, separators=(",", ":")),
        f"{epoch}-10",
    )
    assert events[1:] == [("message", "after", after.id)]
    batch = hub.since(last_id.format(epoch=epoch))
    assert (batch.messages, batch.resync, batch.reason) == ([], True, reason)


def test_the_oldest_message_in_history_is_still_resumable() -> None:
    hub = Hub(history=3)
    sent = [hub.publish(f"m{i}") for i in range(10)]
    # m7, m8, m9 are kept: a client that saw m6 missed nothing that is gone.
    stream = EventStream(heartbeat=None, last_event_id=sent[6].id)
    hub.subscribe(stream)
    assert [e[1] for e in sse_events(stream)] == ["m7", "m8", "m9"]


def test_a_slow_event_stream_is_dropped_and_the_others_are_not_held_back() -> None:
    hub = Hub(max_pending=1000)
    slow, fast = EventStream(heartbeat=None), EventStream(heartbeat=None)
    hub.subscribe(slow)
    hub.subscribe(fast)
    got = []
    started = time.monotonic()
    for i in range(100):
        hub.publish(f"{i:03d}" + "x" * 90)
        got += sse_events(fast)
    elapsed = time.monotonic() - started
    assert len(got) == 100
    assert hub.subscribers == 1
    assert slow.state == "finished"  # ends cleanly: EventSource reconnects and resumes
    assert slow.buffered <= 1000
    delivered = parse(drain(slow)).events
    assert 5 < len(delivered) < 12  # what fit under max_pending, no more
    assert elapsed < 1.0


def test_a_slow_plain_body_fails_with_slow_subscriber() -> None:
    hub = Hub(max_pending=300)
    body = DetachedBody()
    hub.subscribe(body)
    for i in range(10):
        hub.publish(f"message {i}")
    assert hub.subscribers == 0
    drain(body)
    with pytest.raises(SlowSubscriber, match=r"more than max_pending=300 bytes behind; dropped"):
        next(body)
    body.close()


def test_the_body_s_own_max_buffer_also_drops_it() -> None:
    hub = Hub()
    stream = EventStream(heartbeat=None, max_buffer=100)
    hub.subscribe(stream)
    hub.publish("x" * 60)
    hub.publish("y" * 60)
    assert hub.subscribers == 0
    assert stream.state == "finished"


def test_a_closed_body_is_unsubscribed() -> None:
    hub = Hub()
    stream = EventStream(heartbeat=None)
    sub = hub.subscribe(stream)
    assert sub.active
    stream.close()
    assert not sub.active
    assert hub.subscribers == 0
    hub.publish("nobody listens")  # must not raise


def test_subscribing_an_already_closed_body_is_harmless() -> None:
    hub = Hub()
    stream = EventStream(heartbeat=None)
    stream.close()
    assert not hub.subscribe(stream).active


def test_a_bad_publish_raises_at_the_call_and_uses_no_id() -> None:
    hub = Hub()
    before = hub.cursor
    with pytest.raises(ValueError, match="event must be a single line"):
        hub.publish("x", event="two\nlines")
    with pytest.raises(TypeError, match="not JSON serializable"):
        hub.publish(object())
    assert hub.cursor == before
    assert hub.publish("ok").seq == 1


def test_publishers_on_many_threads_keep_one_order_for_everyone() -> None:
    hub = Hub(history=5000, max_pending=10 << 20)
    streams = [EventStream(heartbeat=None) for _ in range(2)]
    for stream in streams:
        hub.subscribe(stream)

    def publish(tag: int) -> None:
        for i in range(250):
            hub.publish(f"{tag}:{i}")

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    seen = [sse_events(stream) for stream in streams]
    assert seen[0] == seen[1]
    seqs = [int(e[2].split("-")[1]) for e in seen[0]]
    assert seqs == list(range(1, 1001))
    for t in range(4):  # each thread's own messages in its own order
        mine = [e[1] for e in seen[0] if e[1].startswith(f"{t}:")]
        assert mine == [f"{t}:{i}" for i in range(250)]


def test_poll_returns_now_or_calls_back_once() -> None:
    hub = Hub()
    first = hub.publish("a")
    batch = hub.poll("", lambda b: None)
    assert batch is None  # "" is "from now": nothing yet
    calls: list[list[str]] = []
    assert hub.poll(hub.cursor, lambda b: calls.append([m.data for m in b.messages])) is None
    hub.publish("b")
    hub.publish("c")
    assert calls == [["b"]]  # once, with what was there when it fired
    now = hub.poll(first.id, lambda b: None)
    assert now is not None and [m.data for m in now.messages] == ["b", "c"]


def test_cancel_poll() -> None:
    hub = Hub()
    calls: list[object] = []
    callback = calls.append
    assert hub.poll(None, callback) is None
    assert hub.cancel_poll(callback) is True
    assert hub.cancel_poll(callback) is False
    hub.publish("x")
    assert calls == []


def test_recent() -> None:
    hub = Hub(history=3)
    for i in range(5):
        hub.publish(i)
    assert [m.data for m in hub.recent().messages] == [2, 3, 4]
    assert [m.data for m in hub.recent(2).messages] == [3, 4]
    assert hub.recent(2).cursor == hub.cursor


@pytest.mark.parametrize(("option", "value"), [("history", 0), ("max_pending", -1)])
def test_bad_options(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{option} must be a positive int, got {value}"):
        Hub(**{option: value})


# -- on a real server ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["pywsgi", "pywsgi-patched", "wsgiref"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with ServerProcess(request.param, "tests.pattern_apps:app") as proc:
        yield proc


def read_events(stream: Stream, parser: Parser, n: int) -> None:
    while len(parser.events) < n:
        chunk = stream.read_chunk()
        assert chunk is not None, f"stream ended after {len(parser.events)} of {n} events"
        parser.feed(chunk)


@pytest.mark.parametrize("via", ["direct", "thread", "callback"])
def test_publishing_from_anywhere_reaches_a_held_stream_at_once(
    server: ServerProcess, via: str
) -> None:
    if via == "callback" and server.server == "wsgiref":
        pytest.skip("a loop callback needs a running gevent hub; wsgiref threads have none")
    hub = f"via-{via}"
    with Stream(server.port, f"/hub/events?hub={hub}", timeout=5) as stream:
        assert (stream.read_chunk() or b"").startswith(b": stream open\n")
        parser = Parser()
        for i in range(3):
            started = time.monotonic()
            requests.get(f"{server.url}/hub/publish?hub={hub}&via={via}&data=n{i}", timeout=5)
            read_events(stream, parser, i + 1)
            assert time.monotonic() - started < 0.5
        assert [e.data for e in parser.events] == ["n0", "n1", "n2"]


def test_reconnecting_with_last_event_id_resumes_without_loss(server: ServerProcess) -> None:
    publish = f"{server.url}/hub/publish?hub=resume&data="
    with Stream(server.port, "/hub/events?hub=resume", timeout=5) as stream:
        parser = Parser()
        for word in ("one", "two"):
            requests.get(publish + word, timeout=5)
        read_events(stream, parser, 2)
    for word in ("three", "four"):  # published while nobody is connected
        requests.get(publish + word, timeout=5)
    headers = {"Last-Event-ID": parser.last_event_id}
    with Stream(server.port, "/hub/events?hub=resume", timeout=5, headers=headers) as stream:
        again = Parser()
        read_events(stream, again, 2)
        requests.get(publish + "five", timeout=5)
        read_events(stream, again, 3)
    assert [e.data for e in again.events] == ["three", "four", "five"]


def test_disconnect_all_ends_streams_cleanly(server: ServerProcess) -> None:
    with Stream(server.port, "/hub/events?hub=bye", timeout=5) as stream:
        assert (stream.read_chunk() or b"").startswith(b": stream open\n")
        ended = requests.get(f"{server.url}/hub/disconnect?hub=bye", timeout=5).json()
        assert ended == {"ended": 1}
        assert stream.read_chunk() is None
        assert stream.response.complete or server.server == "wsgiref"


def test_a_client_that_stops_reading_is_dropped_not_waited_for() -> None:
    # One server is enough: the policy lives in the hub, not the server.
    with ServerProcess("pywsgi", "tests.pattern_apps:app") as server:
        _slow_client_scenario(server)


def _slow_client_scenario(server: ServerProcess) -> None:
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", server.port))
    slow.sendall(b"GET /hub/events?hub=slow&max_pending=262144 HTTP/1.1\r\nHost: x\r\n\r\n")
    with slow, Stream(server.port, "/hub/events?hub=slow", timeout=10) as fast:
        stats = f"{server.url}/hub/stats?hub=slow"
        assert wait_until(lambda: requests.get(stats, timeout=5).json()["subscribers"] == 2)
        # Bursts of 200 KB (under max_pending: a burst published without
        # yielding sits in every body at once), 5 MB in all: more than
        # max_pending plus what loopback socket buffers absorb (~2.8 MB).
        tail = b""
        blocks = 0  # blank-line-terminated blocks: the opening retry block, then events
        for burst in range(1, 26):
            requests.get(f"{server.url}/hub/publish?hub=slow&n=100&data={'z' * 2000}", timeout=10)
            while blocks < 1 + 100 * burst:
                chunk = fast.read_chunk()
                assert chunk is not None, f"the fast client was dropped after {blocks} blocks"
                blocks += (tail + chunk).count(b"\n\n")
                tail = chunk[-1:]
        assert blocks == 1 + 2500
        assert requests.get(stats, timeout=5).json()["subscribers"] == 1


# -- property: resume is exact against a simple model -------------------------------

@settings(max_examples=60, deadline=None)
@given(
    history=st.integers(min_value=1, max_value=6),
    script=st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(min_value=1, max_value=4)),
            st.tuples(st.just("join"), st.integers(min_value=-1, max_value=12)),
        ),
        max_size=12,
    ),
)
def test_every_joiner_gets_exactly_what_the_model_says(
    history: int, script: list[tuple[str, int]]
) -> None:
    """Join at any past id (or none): replay iff the id is still in the history, else resync."""
    hub = Hub(history=history)
    published: list[str] = []  # ids, in order
    joined: list[tuple[EventStream, int]] = []  # (stream, index of its first expected message)
    resynced: list[EventStream] = []
    for op, arg in script:
        if op == "publish":
            published += [hub.publish(f"m{len(published)}").id for _ in range(arg)]
            continue
        if arg < 0 or not published:  # a first connect: from now on
            stream, start = EventStream(heartbeat=None), len(published)
        else:
            seen = min(arg, len(published) - 1)  # the client saw published[seen]
            stream = EventStream(heartbeat=None, last_event_id=published[seen])
            start = seen + 1
            if len(published) - start > history:  # the next one it needs fell out
                resynced.append(stream)
                start = len(published)
        hub.subscribe(stream)
        joined.append((stream, start))
    for stream, start in joined:
        events = parse(drain(stream)).events
        if stream in resynced:
            assert events[0].type == "resync"
            events = events[1:]
        assert [e.last_event_id for e in events] == published[start:]


def test_behind_the_middleware_a_departed_idle_client_is_unsubscribed_at_once() -> None:
    # make_server's handler lets the middleware watch the socket: no publish,
    # no heartbeat needed to notice the client left.
    with ServerProcess("detach-server", "tests.pattern_apps:app") as server:
        stats = f"{server.url}/hub/stats?hub=watched"
        with Stream(server.port, "/hub/events?hub=watched", timeout=5) as stream:
            assert (stream.read_chunk() or b"").startswith(b": stream open\n")
            assert requests.get(stats, timeout=5).json()["subscribers"] == 1
        assert wait_until(lambda: requests.get(stats, timeout=5).json()["subscribers"] == 0,
                          timeout=2)


def test_a_subscriber_whose_encoder_raises_is_dropped_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub()
    broken, fine = DetachedBody(), EventStream(heartbeat=None)

    def encode(message: object) -> bytes:
        raise RuntimeError("broken encoder (expected by the test)")

    hub.subscribe(broken, encode=encode)
    hub.subscribe(fine)
    message = hub.publish("still delivered")
    assert hub.subscribers == 1
    assert sse_events(fine) == [("message", "still delivered", message.id)]
    assert "that subscriber is dropped" in caplog.text
    with pytest.raises(UsageError, match=r"the subscription's encode\(\) raised"):
        next(broken)
    broken.close()


@pytest.mark.parametrize("kind", ["gunicorn-gevent", "gunicorn-gthread", "waitress"])
def test_streams_open_at_once_and_thread_publishes_arrive_on_other_servers(kind: str) -> None:
    with ServerProcess(kind, "tests.pattern_apps:app") as server:
        with Stream(server.port, "/hub/events?hub=other", timeout=5) as stream:
            head = stream.read_head()
            assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert (stream.read_chunk() or b"").startswith(b": stream open\n")
            parser = Parser()
            started = time.monotonic()
            requests.get(f"{server.url}/hub/publish?hub=other&via=thread&data=hi", timeout=5)
            read_events(stream, parser, 1)
            assert time.monotonic() - started < 0.5
            assert parser.events[0].data == "hi"
        # End the stream so the server stops at once (gthread waits for its threads).
        requests.get(f"{server.url}/hub/disconnect?hub=other", timeout=5)


def test_encoders_and_logging_run_outside_the_hub_lock() -> None:
    """publish() ran the subscribers' encode() and log.exception under the
    hub's real lock; under gevent, an encoder or a logging handler that yields let
    another greenlet block the OS thread on that lock: the process froze. Run in a
    child so that a regression is a timeout, not a frozen test run."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import logging
        import gevent
        from wsgi_detach import DetachedBody, Hub

        class Yielding(logging.Handler):  # a socket handler under gevent
            def emit(self, record):
                gevent.sleep(0)

        log = logging.getLogger("wsgi_detach")
        log.addHandler(Yielding())
        log.propagate = False

        def slow_first(message):  # message 1 is still encoding when 2 is published
            if message.seq == 1:
                gevent.sleep(0.05)
            return message.text.encode() + b";"

        hub = Hub()
        broken = DetachedBody()
        hub.subscribe(broken, encode=lambda message: 1 / 0)
        ordered = DetachedBody()
        hub.subscribe(ordered, encode=slow_first)
        first = gevent.spawn(hub.publish, "m1")
        second = gevent.spawn_later(0.01, hub.publish, "m2")
        print(len(gevent.joinall([first, second], timeout=2)), flush=True)
        out = b""
        while ordered.buffered:
            out += next(ordered)
        print(out.decode(), broken.state, hub.subscribers, flush=True)
    """)
    try:
        result = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=8
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the child froze: a yielding encoder or log handler ran under the hub lock")
    assert (result.stdout, result.stderr) == ("2\nm1;m2; failed 1\n", "")


# ---------------------------------------------------------------- the publishing vocabulary


def test_an_explicit_id_goes_out_verbatim_and_resumes_exactly_after_itself() -> None:
    hub = Hub()
    sent = [hub.publish(f"row {n}", id=f"row-{n}") for n in (17, 18, 19)]
    assert [m.id for m in sent] == ["row-17", "row-18", "row-19"]
    assert hub.cursor == "row-19"
    stream = EventStream(heartbeat=None, last_event_id="row-17")
    hub.subscribe(stream)
    live = hub.publish("live", id=4242)
    assert live.id == "4242"
    assert sse_events(stream) == [
        ("message", "row 18", "row-18"),
        ("message", "row 19", "row-19"),
        ("message", "live", "4242"),
    ]
    assert [m.data for m in hub.since("4242").messages] == []
    assert [m.data for m in hub.since("row-18").messages] == ["row 19", "live"]


def test_explicit_and_assigned_ids_mix_in_one_order() -> None:
    hub = Hub()
    a = hub.publish("a")
    b = hub.publish("b", id="b-1")
    c = hub.publish("c")
    assert [a.seq, b.seq, c.seq] == [1, 2, 3]
    assert [m.data for m in hub.since(a.id).messages] == ["b", "c"]
    assert [m.data for m in hub.since("b-1").messages] == ["c"]


def test_an_explicit_id_resolves_like_a_hub_id_at_the_edge_of_the_history() -> None:
    # The message that just fell out is still a place to resume from (nothing
    # after it was lost), whoever chose its id; one further back is a resync.
    for ids in (["a", "b", "c", "d"], [None, None, None, None]):
        hub = Hub(history=2)
        sent = [hub.publish(f"m{i}", id=ids[i]) for i in range(3)]
        assert [m.data for m in hub.since(sent[0].id).messages] == ["m1", "m2"]
        assert [m.data for m in hub.since(sent[1].id).messages] == ["m2"]
        hub.publish("m3", id=ids[3])
        assert [m.data for m in hub.since(sent[1].id).messages] == ["m2", "m3"]
        assert hub.since(sent[0].id).resync


def test_a_caught_up_long_poll_with_an_explicit_id_and_a_history_of_one_gets_the_next() -> None:
    for make in (lambda i: None, lambda i: f"row-{i}"):
        hub = Hub(history=1)
        first = hub.publish("a", id=make(0))
        got: list[Batch] = []
        assert hub.poll(first.id, got.append) is None
        hub.publish("b", id=make(1))
        assert [(m.data, got[0].resync) for m in got[0].messages] == [("b", False)]


def test_an_id_reused_after_it_fell_out_of_the_history_is_still_refused() -> None:
    # A client that last saw the first "x" would resume after the second one
    # and silently skip everything in between: the hub refuses the reuse as
    # long as it remembers the id, and answers that client with the reason.
    hub = Hub(history=3)
    hub.publish("old x", id="x")
    for i in range(5):
        hub.publish(f"missed {i}")
    with pytest.raises(ValueError, match=r"id 'x' was already published"):
        hub.publish("new x", id="x")
    assert [m.data for m in hub.recent().messages] == ["missed 2", "missed 3", "missed 4"]
    batch = hub.since("x")
    assert (batch.messages, batch.resync, batch.reason) == ([], True, "older than the history")


def test_application_ids_are_remembered_for_a_bounded_window_beyond_the_history() -> None:
    # history + max(history, REMEMBERED_IDS) messages: then forgotten, and
    # memory stays bounded however many ids are published.
    hub = Hub(history=2)
    hub.publish("first", id="first")
    for i in range(1001):
        hub.publish(i, id=f"n{i}")
    assert hub.since("first").reason == "older than the history"
    with pytest.raises(ValueError, match="already published"):
        hub.publish("again", id="first")
    hub.publish("one more")
    assert hub.since("first").reason == "unknown id"
    hub.publish("first, reused", id="first")  # forgotten: the application's own lookout
    assert len(hub._store._given) == 1001  # type: ignore[attr-defined]


def test_a_resuming_stream_with_no_room_at_all_is_ended_not_left_silent() -> None:
    # Other bodies' unsent bytes fill the shared budget: neither the catch-up
    # nor a resync fits. An EventSource never reconnects from a stream that
    # stays open, so the stream ends (cleanly: the browser comes back with the
    # same Last-Event-ID); a plain body fails (its client sees it incomplete).
    hub = Hub()
    first = hub.publish("x" * 50)
    hub.publish("y" * 50)
    budget = ByteBudget(300)
    hog = DetachedBody(budget=budget)
    hog.put_nowait(b"h" * 280)
    stream = EventStream(heartbeat=None, budget=budget, last_event_id=first.id)
    assert not hub.subscribe(stream).active
    assert stream.state == "finished"
    assert list(stream) == [b": stream open\n"]
    plain = DetachedBody(budget=budget)
    assert not hub.subscribe(plain, last_event_id=first.id).active
    with pytest.raises(BufferFull, match="shared budget of 300 bytes"):
        next(plain)
    assert hub.subscribers == 0
    hog.close()
    again = EventStream(heartbeat=None, budget=budget, last_event_id=first.id)
    assert hub.subscribe(again).active  # room again: the reconnect gets its catch-up
    assert [e.data for e in parse(drain(again)).events] == ["y" * 50]
    for body in (stream, plain, again):
        body.close()
    assert budget.used == 0


def test_retry_goes_out_with_its_event() -> None:
    hub = Hub()
    stream = EventStream(heartbeat=None)
    hub.subscribe(stream)
    hub.publish("slow down", retry=7000, id="r1")
    parser = parse(drain(stream))
    assert parser.retry == 7000
    assert [(e.data, e.last_event_id) for e in parser.events] == [("slow down", "r1")]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"event": "a\nb"}, ValueError, r"event must be a single line"),
        ({"event": "a\rb"}, ValueError, r"event must be a single line"),
        ({"event": 3}, TypeError, r"event must be a str, got int"),
        ({"id": "a\nb"}, ValueError, r"id must be a single line"),
        ({"id": "a\r"}, ValueError, r"id must be a single line"),
        ({"id": "a\0b"}, ValueError, r"id must not contain NUL"),
        ({"id": "row-2 "}, ValueError, r"id must not start or end with whitespace"),
        ({"id": ""}, ValueError, r"id must not be empty"),
        ({"id": "x" * 257}, ValueError, r"id must be at most 256 characters"),
        ({"id": True}, TypeError, r"id must be a str or int, got bool"),
        ({"id": 1.5}, TypeError, r"id must be a str or int, got float"),
        ({"id": "dup"}, ValueError, r"id .dup. was already published \(within the last 2000 "),
        ({"id": "{epoch}-77"}, ValueError, r"has the form of the ids this hub assigns itself"),
        ({"retry": -1}, ValueError, r"retry must be >= 0 milliseconds, got -1"),
        ({"retry": 10**5000}, ValueError, r"retry must be at most 2147483647 ms"),
        ({"retry": True}, TypeError, r"retry must be an int of milliseconds, got bool"),
        ({"retry": 1.0}, TypeError, r"retry must be an int of milliseconds, got float"),
        ({"retry": "10"}, TypeError, r"retry must be an int of milliseconds, got str"),
    ],
)
def test_a_bad_field_is_refused_before_anything_is_numbered_kept_or_sent(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    hub = Hub()
    epoch = hub.cursor.split("-")[0]
    hub.publish("first", id="dup")
    stream = EventStream(heartbeat=None)
    hub.subscribe(stream)
    plain = DetachedBody()
    hub.subscribe(plain)
    polled: list[object] = []
    assert hub.poll(hub.cursor, polled.append) is None
    if kwargs.get("id") == "{epoch}-77":
        kwargs = {"id": f"{epoch}-77"}
    with pytest.raises(error, match=match):
        hub.publish("x", **kwargs)  # type: ignore[arg-type]
    assert hub.cursor == "dup"
    assert [m.data for m in hub.recent().messages] == ["first"]
    assert stream.buffered == len(b": stream open\n")
    assert plain.buffered == 0
    assert polled == [] and hub.pending_polls == 1
    assert hub.publish("ok").seq == 2


def test_comment_reaches_every_event_stream_and_is_never_an_event() -> None:
    hub = Hub()
    streams = [EventStream(heartbeat=None) for _ in range(2)]
    plain = DetachedBody()
    for body in [*streams, plain]:
        hub.subscribe(body)
    assert hub.comment("line one\r\nevent: injected\rdata: no") == 2
    for stream in streams:
        parser = parse(drain(stream))
        assert parser.events == []
        assert parser.comments[-3:] == [" line one", " event: injected", " data: no"]
    assert plain.buffered == 0
    assert hub.recent().messages == []
    with pytest.raises(TypeError, match="a comment must be a str, got bytes"):
        hub.comment(b"x")  # type: ignore[arg-type]


def test_comment_goes_to_exactly_the_subscribers_encoded_as_sse() -> None:
    # By encoding, not by type: a comment line in an NDJSON body would be a
    # line that is not JSON, and a plain body carrying SSE is an event stream.
    hub = Hub()
    ndjson_stream = EventStream(heartbeat=None)
    hub.subscribe(ndjson_stream, encode=lambda m: (json.dumps(m.as_dict()) + "\n").encode())
    sse_plain = DetachedBody()
    hub.subscribe(sse_plain, encode=Message.sse)
    assert hub.comment("hello") == 1
    assert drain(ndjson_stream) == b": stream open\n"
    assert drain(sse_plain) == b": hello\n"


def test_a_comment_over_max_pending_drops_that_subscriber_like_a_message() -> None:
    hub = Hub(max_pending=100)
    stream = EventStream(heartbeat=None)
    hub.subscribe(stream)
    assert hub.comment("x" * 200) == 0
    assert hub.subscribers == 0
    assert stream.state == "finished"


@settings(max_examples=300, deadline=None)
@given(
    client_id=st.one_of(
        st.text(max_size=40),
        st.text(alphabet="0123456789-abcdef\u00b2\u0663 +", max_size=30),
        st.integers(min_value=-5, max_value=40).map(str),
    ),
    published=st.integers(min_value=0, max_value=12),
    use_epoch=st.booleans(),
)
def test_any_client_id_resolves_to_a_position_in_the_history_or_a_reason(
    client_id: str, published: int, use_epoch: bool
) -> None:
    """Whatever a client sends, resolve() answers; it never raises (no 500)."""
    hub = Hub(history=5)
    sent = [hub.publish(f"m{i}", id=f"app-{i}" if i % 3 == 0 else None) for i in range(published)]
    if use_epoch:
        client_id = hub.cursor.rsplit("-", 1)[0] + "-" + client_id
    batch = hub.since(client_id)
    if batch.resync:
        assert batch.reason in ("unknown id", "from another epoch", "older than the history")
        assert batch.messages == []
    else:
        kept = [m.id for m in sent[-5:]]
        got = [m.id for m in batch.messages]
        assert got == kept[len(kept) - len(got) :]  # a suffix of the history, in order
        known = {m.id: i for i, m in enumerate(sent)}
        if client_id in known:
            assert got == [m.id for m in sent[known[client_id] + 1 :]]


def test_a_cursor_may_be_an_int_id_as_published() -> None:
    hub = Hub()
    hub.publish("a", id=7)
    hub.publish("b", id=8)
    assert [m.data for m in hub.since(7).messages] == ["b"]
    with pytest.raises(TypeError, match="a cursor must be a str \\(an id\\), got float"):
        hub.since(7.0)  # type: ignore[arg-type]


class _Log:
    """A MessageStore written from the protocol alone: keeps every message, ids are ``n<seq>``."""

    def __init__(self) -> None:
        self.items: list[Message] = []
        self.ids: dict[str, int] = {}

    @property
    def cursor(self) -> str:
        return self.items[-1].id if self.items else "n0"

    @property
    def last_seq(self) -> int:
        return len(self.items)

    def append(
        self, data: object, text: str, *, event: str | None, id: str | None, retry: int | None
    ) -> Message:
        seq = len(self.items) + 1
        id = f"n{seq}" if id is None else id
        if id in self.ids:
            raise ValueError(f"id {id!r} was already published")
        message = Message(seq, id, data, event, retry, text)
        self.items.append(message)
        self.ids[id] = seq
        return message

    def resolve(self, client_id: str) -> int | str:
        return self.ids.get(client_id, "unknown id") if client_id != "n0" else 0

    def read_since(self, seq: int) -> list[Message]:
        return self.items[seq:]

    def recent(self, n: int | None) -> list[Message]:
        return self.items if n is None else self.items[max(len(self.items) - n, 0) :]


def test_a_store_of_its_own_sits_behind_the_same_hub_api() -> None:
    store = _Log()
    hub = Hub(store=store)
    first = hub.publish("a")
    hub.publish({"b": 1}, id="mine", event="e")
    stream = EventStream(heartbeat=None, last_event_id=first.id)
    hub.subscribe(stream)
    live = hub.publish("c", retry=10)
    assert [(e.data, e.last_event_id) for e in parse(drain(stream)).events] == [
        ('{"b":1}', "mine"),
        ("c", live.id),
    ]
    assert [m.id for m in hub.since("mine").messages] == [live.id]
    assert hub.since("elsewhere").reason == "unknown id"
    with pytest.raises(ValueError, match="already published"):
        hub.publish("again", id="mine")
    assert hub.cursor == live.id == "n3" and len(store.items) == 3
