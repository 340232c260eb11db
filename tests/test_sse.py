"""The SSE encoder and EventStream: a WHATWG reference parser, sseclient-py, real servers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import sseclient
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.client import Stream
from tests.pattern_apps import TICKER
from tests.servers import ServerProcess
from tests.sse_reference import parse
from wsgi_detach import BufferFull, DetachMiddleware, EventStream, encode_comment, encode_event

# -- strategies: any text for data, weighted toward what the format gives meaning
# to (line breaks, colons, spaces, NUL, a BOM); single-line text for event; id
# without NUL too, nor whitespace at either end (refused: it would not come
# back as Last-Event-ID).
tricky = st.sampled_from(["\r", "\n", "\r\n", ":", " ", "\0", "\ufeff", "data:", "\u2028"])
any_text = st.lists(st.one_of(tricky, st.text(max_size=5)), max_size=8).map("".join)
single_line = any_text.map(lambda s: s.replace("\r", "").replace("\n", ""))
an_id = single_line.map(lambda s: s.replace("\0", "").strip())
events = st.lists(
    st.fixed_dictionaries(
        {"data": any_text},
        optional={
            "event": single_line,
            "id": an_id,
            "retry": st.integers(min_value=0, max_value=2**31 - 1),
        },
    ),
    max_size=8,
)


def _normalised(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


@settings(deadline=None)  # timing is not the property; a loaded CI box must not flake
@given(events, st.lists(st.integers(min_value=0, max_value=4000), max_size=6))
def test_round_trip_through_the_whatwg_reference_parser(
    sent: list[dict[str, object]], cuts: list[int]
) -> None:
    wire = encode_comment("stream open") + b"".join(encode_event(**e) for e in sent)  # type: ignore[arg-type]
    parser = parse(wire, [c for c in cuts if c <= len(wire)])
    assert len(parser.events) == len(sent)
    last_id = ""
    for got, want in zip(parser.events, sent):
        last_id = str(want.get("id", last_id))
        assert got.data == _normalised(str(want["data"]))
        assert got.type == (want.get("event") or "message")
        assert got.last_event_id == last_id
    retries = [e["retry"] for e in sent if "retry" in e]
    assert parser.retry == (retries[-1] if retries else None)
    assert parser.comments == [" stream open"]


@settings(deadline=None)
@given(events)
def test_round_trip_through_sseclient_py(sent: list[dict[str, object]]) -> None:
    wire = b"".join(encode_event(**e) for e in sent)  # type: ignore[arg-type]
    got = list(sseclient.SSEClient(io.BytesIO(wire).readlines()).events())
    assert [e.data for e in got] == [_normalised(str(e["data"])) for e in sent]
    assert [e.event for e in got] == [e.get("event") or "message" for e in sent]
    assert [e.id for e in got] == [e.get("id") for e in sent]


def test_multiline_unicode_and_fields_on_the_wire() -> None:
    assert encode_event("a\r\nb\rc\nd", event="t\u00e9", id=7, retry=1500) == (
        "id: 7\nevent: t\u00e9\nretry: 1500\ndata: a\ndata: b\ndata: c\ndata: d\n\n".encode()
    )
    assert encode_event("") == b"data: \n\n"
    assert encode_comment("one\ntwo") == b": one\n: two\n"
    assert encode_comment() == b":\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"event": "a\nb"}, ValueError, r"event must be a single line: a CR or LF in 'a\\nb'"),
        ({"event": "a\rb"}, ValueError, r"event must be a single line"),
        ({"id": "1\r\n2"}, ValueError, r"id must be a single line"),
        ({"id": "a\0b"}, ValueError, r"id must not contain NUL: the client ignores such an id"),
        ({"id": " row-1"}, ValueError, r"id must not start or end with whitespace: .*' row-1'"),
        ({"id": "row-1\t"}, ValueError, r"id must not start or end with whitespace"),
        ({"id": "\u3000"}, ValueError, r"id must not start or end with whitespace"),
        ({"retry": -1}, ValueError, r"retry must be >= 0 milliseconds, got -1"),
        ({"retry": 2**31}, ValueError, r"retry must be at most 2147483647 ms.*, got 2147483648"),
        ({"retry": 10**5000}, ValueError, r"at most 2147483647 ms.*, got an int of 16610 bits"),
        ({"retry": 1.5}, TypeError, r"retry must be an int of milliseconds, got float"),
        ({"retry": True}, TypeError, r"retry must be an int of milliseconds, got bool"),
        ({"id": 1.0}, TypeError, r"id must be a str or int, got float"),
        ({"id": True}, TypeError, r"id must be a str or int, got bool"),
        ({"event": 5}, TypeError, r"event must be a str, got int"),
        ({"retry": "100"}, TypeError, r"retry must be an int of milliseconds, got str"),
    ],
)
def test_bad_fields_are_refused_at_the_call(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    stream = EventStream(heartbeat=None)
    with pytest.raises(error, match=match):
        stream.send("x", **kwargs)  # type: ignore[arg-type]
    stream.send("still usable", id=1)
    assert next(stream) == b": stream open\nid: 1\ndata: still usable\n\n"
    stream.close()


def test_data_must_be_text() -> None:
    with pytest.raises(TypeError, match=r"data must be a str \(serialise objects first"):
        encode_event(b"bytes")  # type: ignore[arg-type]


def test_event_stream_fixes_encoding_and_heartbeat_chunk() -> None:
    with pytest.raises(TypeError, match="EventStream fixes encoding; do not pass it"):
        EventStream(encoding="latin-1")


def test_send_nowait_raises_buffer_full() -> None:
    stream = EventStream(max_buffer=64, heartbeat=None)
    stream.send_nowait("x" * 40)
    with pytest.raises(BufferFull, match="max_buffer=64 bytes reached"):
        stream.send_nowait("y" * 40)
    stream.close()


def test_last_event_id_is_an_attribute_you_may_set_later() -> None:
    """EventStream adds its one attribute as a slot of its own (DetachedBody has slots)."""
    stream = EventStream({}, last_event_id="7")
    stream.last_event_id = "8"  # what Hub.event_stream does when the header was absent
    assert stream.last_event_id == "8"
    assert not hasattr(stream, "__dict__")
    stream.close()


def test_last_event_id_is_read_from_the_header_as_utf8() -> None:
    # WSGI passes header bytes as latin-1 text; the browser sent UTF-8.
    raw = "r\u00e9sum\u00e9-1".encode().decode("latin-1")
    assert EventStream({"HTTP_LAST_EVENT_ID": raw}).last_event_id == "r\u00e9sum\u00e9-1"
    assert EventStream({}).last_event_id is None
    assert EventStream({}, last_event_id="q").last_event_id == "q"


# -- on real servers -------------------------------------------------------------------


@pytest.fixture(scope="module", params=["pywsgi", "wsgiref"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with ServerProcess(request.param, "tests.pattern_apps:app") as proc:
        yield proc


def test_headers_go_out_before_the_first_event(server: ServerProcess) -> None:
    # A stream with nothing to say: an EventSource would stay "connecting"
    # if the headers waited for the first event.
    with Stream(server.port, "/sse/idle", timeout=2) as stream:
        head = stream.read_head()
        assert head.status == 200
        assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert head.headers["cache-control"] == "no-cache"
        assert stream.read_chunk() == b": stream open\n"


def test_heartbeat_is_a_comment_line(server: ServerProcess) -> None:
    with Stream(server.port, "/sse/idle?heartbeat=0.05", timeout=2) as stream:
        chunks = [stream.read_chunk() for _ in range(3)]
    assert chunks == [b": stream open\n", b":\n", b":\n"]


def test_sseclient_reads_the_ticker_over_http(server: ServerProcess) -> None:
    with requests.get(f"{server.url}/sse/ticker", stream=True, timeout=5) as response:
        got = list(sseclient.SSEClient(response.iter_content(chunk_size=None)).events())
    assert [(e.event, e.data, e.id) for e in got] == [
        (e.get("event", "message"), _normalised(e["data"]), e["id"]) for e in TICKER
    ]


def test_reference_parser_reads_the_ticker_over_http(server: ServerProcess) -> None:
    with Stream(server.port, "/sse/ticker", timeout=5) as stream:
        response = stream.read_all()
    parser = parse(response.body)
    assert [(e.type, e.data, e.last_event_id) for e in parser.events] == [
        (e.get("event", "message"), _normalised(e["data"]), e["id"]) for e in TICKER
    ]
    assert parser.retry == 50


def test_last_event_id_header_reaches_the_stream(server: ServerProcess) -> None:
    utf8 = "caf\u00e9-42".encode()
    with Stream(server.port, "/sse/echo", timeout=5,
                headers={"Last-Event-ID": utf8.decode("latin-1")}) as stream:
        body = stream.read_all().body
    assert parse(body).events[0].data == repr("caf\u00e9-42")
    with Stream(server.port, "/sse/echo", timeout=5) as stream:
        assert parse(stream.read_all().body).events[0].data == "None"


def test_a_bad_retry_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="retry must be >= 0 milliseconds, got -5"):
        EventStream(retry=-5)
    with pytest.raises(ValueError, match="retry must be at most 2147483647 ms"):
        EventStream(retry=2**31)
    assert b"retry: 2147483647\n" in next(EventStream(retry=2**31 - 1, heartbeat=None))
    assert next(EventStream(retry=0, heartbeat=None)) == b": stream open\nretry: 0\n\n"


_MADE: list[EventStream] = []


def _sse_app(environ: dict[str, object], start_response: object) -> EventStream:
    """An app that builds its EventStream itself from the environ."""
    _MADE.append(EventStream(environ, start_response, idle_timeout=None))  # type: ignore[arg-type]
    return _MADE[-1]


def _request(middleware: DetachMiddleware) -> tuple[EventStream, Any]:
    """One request through ``middleware`` (in-process): the app's stream, the server's result."""
    def start_response(status: str, headers: object, exc_info: object = None) -> object:
        return lambda data: None

    result = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, start_response)
    return _MADE[-1], result


def test_an_event_stream_takes_the_middlewares_budget_and_defaults() -> None:
    middleware = DetachMiddleware(
        _sse_app, max_buffered=100, max_buffer=1000, deadline=30, heartbeat=99, idle_timeout=7,
        timeout_chunk=b"plain text",
    )
    stream, result = _request(middleware)
    try:
        # The shared budget counts (and caps) it like a detach() body.
        assert middleware.stats().buffered == len(encode_comment("stream open"))
        with pytest.raises(BufferFull, match="shared budget of 100 bytes"):
            stream.send_nowait("x" * 200)
        # Its defaults, but for the heartbeat an EventStream sets itself,
        # and what the app passed (idle_timeout=None) wins.
        assert (stream._max_buffer, stream._deadline) == (1000, 30.0)
        assert stream._heartbeat == 15.0 and stream._idle_timeout is None
        assert stream._timeout_chunk is None  # plain text would break the event stream
    finally:
        result.close()
    assert middleware.stats().buffered == 0


def test_an_event_stream_outside_the_middleware_has_no_budget() -> None:
    stream = EventStream({"REQUEST_METHOD": "GET"})
    assert stream._budget is None
    stream.close()


def test_a_new_event_stream_is_not_refused_by_a_used_up_budget() -> None:
    """The opening comment is forced past the shared budget, like a last chunk: a new
    stream must not fail with BufferFull inside the app (max_open turns streams away)."""
    middleware = DetachMiddleware(_sse_app, max_buffered=60)
    first, result = _request(middleware)
    try:
        with pytest.raises(BufferFull, match="shared budget"):
            for _ in range(10):
                first.send_nowait("x" * 10)  # a slow client's unsent bytes use it up
        second, second_result = _request(middleware)
        assert second.buffered == len(encode_comment("stream open"))
        second_result.close()
    finally:
        result.close()
