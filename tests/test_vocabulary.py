"""Hub.publish's whole vocabulary over real sockets, read back by the reference SSE parser.

Explicit ids, per-event retry, comments, data edge cases, and every refused
field: each published through a real server (POST /hub/publish in
tests/pattern_apps.py), each read back from an open stream by
tests/sse_reference.py, the parser written from the WHATWG standard.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.client import Stream, get_json
from tests.servers import ServerProcess
from tests.sse_reference import Event, Parser


@pytest.fixture(scope="module", params=["pywsgi", "detach-server", "gunicorn-gevent"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with ServerProcess(request.param, "tests.pattern_apps:app") as proc:
        yield proc


class Reader:
    """An SSE stream on its own connection, parsed as a browser would."""

    def __init__(self, server: ServerProcess, path: str, headers: dict[str, str] | None = None):
        self.stream = Stream(server.port, path, headers=headers, timeout=10)
        self.parser = Parser()
        head = self.stream.read_head()
        assert head.status == 200, head.status
        opening = self.stream.read_chunk()  # the stream is subscribed once this arrives
        assert opening is not None
        self.parser.feed(opening)

    def events(self, n: int) -> list[Event]:
        """Wait (bounded by the socket timeout) until ``n`` events arrived; all of them."""
        while len(self.parser.events) < n:
            chunk = self.stream.read_chunk()
            assert chunk is not None, f"the stream ended after {self.parser.events}"
            self.parser.feed(chunk)
        return self.parser.events

    def close(self) -> None:
        self.stream.close()


def publish(server: ServerProcess, hub: str, data: Any, **fields: Any) -> requests.Response:
    return requests.post(
        f"{server.url}/hub/publish?hub={hub}", json={"data": data, **fields}, timeout=10
    )


def cursor(server: ServerProcess, hub: str) -> str:
    return str(get_json(server.port, f"/hub/stats?hub={hub}")["cursor"])


def test_explicit_ids_arrive_verbatim_and_a_reconnect_resumes_exactly_after_them(
    server: ServerProcess,
) -> None:
    hub = f"ids-{time.monotonic_ns()}"
    first = Reader(server, f"/hub/events?hub={hub}")
    for n in (1, 2, 3):
        answer = publish(server, hub, f"row {n}", id=f"row-{n}")
        assert answer.json()["id"] == f"row-{n}"
    got = first.events(3)
    assert [(e.data, e.last_event_id) for e in got] == [
        ("row 1", "row-1"),
        ("row 2", "row-2"),
        ("row 3", "row-3"),
    ]
    first.close()
    assert publish(server, hub, "row 4", id=4).json()["id"] == "4"
    # A reconnecting EventSource sends its last id as a header...
    again = Reader(server, f"/hub/events?hub={hub}", headers={"Last-Event-ID": "row-2"})
    assert [(e.data, e.last_event_id) for e in again.events(2)] == [
        ("row 3", "row-3"),
        ("row 4", "4"),
    ]
    publish(server, hub, "live", id="row-5")
    assert [e.data for e in again.events(3)] == ["row 3", "row 4", "live"]
    again.close()
    # ...a first connect passes it in the URL; a long-poll cursor takes it too.
    after = Reader(server, f"/hub/events?hub={hub}&after=4")
    assert [e.data for e in after.events(1)] == ["live"]
    after.close()
    polled = get_json(server.port, f"/hub/poll?hub={hub}&cursor=row-3&timeout=5")
    assert [m["id"] for m in polled["messages"]] == ["4", "row-5"]


def test_retry_goes_out_in_its_events_block(server: ServerProcess) -> None:
    hub = f"retry-{time.monotonic_ns()}"
    reader = Reader(server, f"/hub/events?hub={hub}&retry=3000")
    assert reader.parser.retry == 3000  # the stream's own, at the start
    publish(server, hub, "slower", retry=12345, id="r")
    assert [e.data for e in reader.events(1)] == ["slower"]
    assert reader.parser.retry == 12345
    reader.close()


#: Data that must arrive exactly (CR and CRLF arrive as LF: SSE has one line break).
EDGE_DATA = {
    "empty": "",
    "one LF": "\n",
    "CR, LF, CRLF mixed": "a\r\nb\rc\nd\r\n\re",
    "only breaks": "\r\n\r\n\n\r",
    "NUL inside": "nul\0inside\0",
    "100 KB line": "x" * 100_000,
    "2 000 lines": "\n".join(f"line {i}" for i in range(2000)),
    "U+2028/2029/0085 kept inside a line": "before\u2028after\u2029x\u0085y",
    "leading and trailing spaces": "  two leading, one trailing ",
    "colon first": ": not a comment",
    "non-BMP": "\u00e9\u4e2d\U0001f600",
}


def expected(data: str) -> str:
    return re.sub(r"\r\n|\r", "\n", data)


def test_data_edge_cases_arrive_exactly(server: ServerProcess) -> None:
    hub = f"edge-{time.monotonic_ns()}"
    reader = Reader(server, f"/hub/events?hub={hub}")
    for data in EDGE_DATA.values():
        assert publish(server, hub, data).status_code == 200
    got = reader.events(len(EDGE_DATA))
    for (name, data), event in zip(EDGE_DATA.items(), got):
        assert event.data == expected(data), name
    reader.close()


#: Every refused field: (fields, the start of the message naming the argument).
REFUSED = [
    ({"event": "a\nb"}, "event must be a single line"),
    ({"event": "a\rb"}, "event must be a single line"),
    ({"event": 5}, "event must be a str, got int"),
    ({"id": "a\r\nb"}, "id must be a single line"),
    ({"id": "a\nb"}, "id must be a single line"),
    ({"id": "a\0b"}, "id must not contain NUL"),
    ({"id": ""}, "id must not be empty"),
    ({"id": "x" * 300}, "id must be at most 256 characters"),
    ({"id": True}, "id must be a str or int, got bool"),
    ({"id": 1.5}, "id must be a str or int, got float"),
    ({"id": "taken"}, "id 'taken' was already published"),
    ({"retry": -1}, "retry must be >= 0 milliseconds, got -1"),
    ({"retry": True}, "retry must be an int of milliseconds, got bool"),
    ({"retry": 2.5}, "retry must be an int of milliseconds, got float"),
    ({"retry": "100"}, "retry must be an int of milliseconds, got str"),
]


def test_every_refused_field_is_a_400_with_nothing_sent_or_stored(server: ServerProcess) -> None:
    hub = f"refused-{time.monotonic_ns()}"
    publish(server, hub, "kept", id="taken")
    reader = Reader(server, f"/hub/events?hub={hub}")
    before = cursor(server, hub)
    for fields, message in REFUSED:
        answer = publish(server, hub, "never", **fields)
        assert (answer.status_code, answer.text[: len(message)]) == (400, message), fields
    assert cursor(server, hub) == before
    publish(server, hub, "sentinel", id="s")
    # The first thing the open stream gets after its opening is the sentinel.
    assert [(e.data, e.last_event_id) for e in reader.events(1)] == [("sentinel", "s")]
    assert reader.parser.comments == [" stream open"]
    reader.close()
    polled = get_json(server.port, f"/hub/poll?hub={hub}&cursor=taken&timeout=5")
    assert [m["data"] for m in polled["messages"]] == ["sentinel"]


def test_a_comment_reaches_every_open_stream_as_comment_lines_only(server: ServerProcess) -> None:
    hub = f"comment-{time.monotonic_ns()}"
    readers = [Reader(server, f"/hub/events?hub={hub}") for _ in range(2)]
    text = "first\nevent: injected\r\ndata: not an event"
    answer = get_json(server.port, f"/hub/comment?hub={hub}&text={quote(text)}")
    assert answer == {"reached": 2}
    publish(server, hub, "after the comment")
    for reader in readers:
        assert [e.data for e in reader.events(1)] == ["after the comment"]
        assert reader.parser.comments[1:] == [" first", " event: injected", " data: not an event"]
        reader.close()
    assert get_json(server.port, f"/hub/poll?hub={hub}&timeout=0.1")["messages"] == []


def test_the_resync_reason_reaches_the_client(server: ServerProcess) -> None:
    hub = f"reason-{time.monotonic_ns()}"
    publish(server, hub, "x")
    epoch = cursor(server, hub).split("-")[0]
    for bad, reason in [
        (f"{epoch}-\u00b2", "unknown id"),
        ("0a0a0a-1", "from another epoch"),
        (f"{epoch}-" + "9" * 5000, "unknown id"),
    ]:
        header = bad.encode("utf-8").decode("latin-1")  # UTF-8 bytes, as a browser sends
        reader = Reader(server, f"/hub/events?hub={hub}", headers={"Last-Event-ID": header})
        (event,) = reader.events(1)
        assert event.type == "resync"
        assert json.loads(event.data) == {"reason": reason, "cursor": cursor(server, hub)}
        reader.close()
