"""The demo chat's HTTP API on a real server (the browser tests cover the page)."""

from __future__ import annotations

import gc
import io
import json
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.client import Stream
from tests.redis_server import RedisServer
from tests.servers import ServerProcess
from tests.sse_reference import Parser
from wsgi_detach import DetachedBody
from wsgi_detach._demo import ChatApp


@pytest.fixture(scope="module")
def chat() -> Iterator[str]:
    with ServerProcess("pywsgi", "examples.chat:app") as server:
        yield server.url


def test_the_page_is_served_from_package_data(chat: str) -> None:
    page = requests.get(f"{chat}/", timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "new EventSource(" in page.text and "/poll?cursor=" in page.text


def test_post_then_history_sse_and_poll_agree(chat: str) -> None:
    room = f"{chat}/api/rooms/agree"
    made = requests.post(f"{room}/messages", json={"nick": "ann", "text": "made"}, timeout=5)
    assert made.status_code == 201  # the first post makes the room
    with Stream(int(chat.rsplit(":", 1)[1]), "/api/rooms/agree/events", timeout=5) as sse:
        parser = Parser()
        sent = requests.post(f"{room}/messages", json={"nick": "ann", "text": " hi\n"}, timeout=5)
        assert sent.status_code == 201
        while not parser.events:
            parser.feed(sse.read_chunk() or b"")
    history = requests.get(f"{room}/history", timeout=5).json()
    first, message = history["messages"]
    assert first["id"] == made.json()["id"]
    assert message["id"] == sent.json()["id"] == history["cursor"] == parser.last_event_id
    assert message["event"] == parser.events[0].type == "chat"
    assert message["data"]["nick"] == "ann" and message["data"]["text"] == "hi"
    polled = requests.get(f"{room}/poll?cursor={first['id']}", timeout=5).json()
    assert polled["messages"] == [message]


JSON = {"Content-Type": "application/json"}
DEEP = b'{"nick": "a", "text": ' + b"[" * 3000 + b"]" * 3000 + b"}"


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "error"),
    [
        ("POST", "/api/rooms/r/messages", b"not json", JSON, 400, "the body is not JSON"),
        ("POST", "/api/rooms/r/messages", b"[1]", JSON, 400, 'send {"nick": ..., "text": ...}'),
        ("POST", "/api/rooms/r/messages", DEEP, JSON, 400, 'send {"nick": ..., "text": ...}'),
        ("POST", "/api/rooms/r/messages", b'{"nick": null, "text": "hi"}', JSON, 400,
         "nick and text must be strings"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": 5}', JSON, 400,
         "nick and text must be strings"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "  "}', JSON, 400,
         "nick and text must not be empty"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "' + b"n" * 33 + b'", "text": "hi"}', JSON,
         400, "nick is longer than 32 characters"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "' + b"x" * 2001 + b'"}',
         JSON, 400, "text is longer than 2000 characters"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "' + b"x" * 100_000 + b'"}',
         JSON, 413, "send a JSON body of at most 32768 bytes"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "hi"}', {}, 415,
         "send Content-Type: application/json"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "hi"}',
         {**JSON, "Origin": "https://elsewhere.example"}, 403, "post from the chat's own page"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "hi"}',
         {**JSON, "Sec-Fetch-Site": "cross-site"}, 403, "post from the chat's own page"),
        ("GET", "/api/rooms/r/messages", None, {}, 405, "use POST"),
        ("POST", "/api/rooms/r/history", b"{}", JSON, 405, "use GET"),
        ("DELETE", "/", None, {}, 405, "use GET"),
        ("GET", "/api/rooms/BAD/history", None, {}, 404,
         "no such page: '/api/rooms/BAD/history'"),
        ("GET", "/api/rooms/r/history%0A", None, {}, 404,
         "no such page: '/api/rooms/r/history\\n'"),
        ("GET", "/api/rooms/never-posted/events", None, {}, 404,
         "no room 'never-posted' yet: posting a message to it makes it"),
        ("GET", "/api/rooms/never-posted/poll", None, {}, 404,
         "no room 'never-posted' yet: posting a message to it makes it"),
        ("GET", "/api/rooms/lobby/poll?timeout=soon", None, {}, 400,
         "timeout must be a number of seconds"),
        ("GET", "/api/rooms/lobby/poll?timeout=nan", None, {}, 400,
         "timeout must be a number of seconds"),
        ("GET", "/api/rooms/lobby/poll?timeout=inf", None, {}, 400,
         "timeout must be a number of seconds"),
        ("GET", "/api/rooms/lobby/poll?cursor=abc-%C2%B2", None, {}, 400,
         "cursor must be a cursor from this chat"),
        ("GET", "/api/rooms/lobby/events?after=a%0Ab", None, {}, 400,
         "after must be a cursor from this chat"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(
    chat: str,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    response = requests.request(method, chat + path, data=body, headers=headers, timeout=5)
    assert (response.status_code, response.json()) == (status, {"error": error})
    if status == 405:
        allowed = "POST" if "messages" in path else "GET, HEAD" if path == "/" else "GET"
        assert response.headers["Allow"] == allowed


def test_a_same_origin_post_from_a_browser_is_accepted(chat: str) -> None:
    host = chat.split("//", 1)[1]
    headers = {**JSON, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}
    sent = requests.post(f"{chat}/api/rooms/same/messages", json={"nick": "a", "text": "hi"},
                         headers=headers, timeout=5)
    assert sent.status_code == 201


def test_reading_a_room_nobody_posted_to_makes_no_room(chat: str) -> None:
    for n in range(200):
        history = requests.get(f"{chat}/api/rooms/junk{n}/history", timeout=5)
        assert history.json() == {"messages": [], "cursor": None}
    # Rooms are still there for whoever posts first, the lobby included.
    for room in ("lobby", "fresh"):
        sent = requests.post(f"{chat}/api/rooms/{room}/messages",
                             json={"nick": "a", "text": "first"}, timeout=5)
        assert sent.status_code == 201


def _post(app: ChatApp, room: str, text: str) -> str:
    body = json.dumps({"nick": "flood", "text": text}, ensure_ascii=False).encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST", "PATH_INFO": f"/api/rooms/{room}/messages",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    statuses: list[str] = []
    b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    return statuses[0]


@pytest.mark.parametrize(
    ("rooms", "per_room", "text"),
    [
        (3000, 1, "hi"),  # a flood of rooms
        (20, 60, "\U0001f600" * 2000),  # a flood of the costliest messages
    ],
    ids=["rooms", "messages"],
)
def test_memory_stays_under_the_cap_under_a_flood(rooms: int, per_room: int, text: str) -> None:
    cap = 4 << 20
    gc.collect()
    tracemalloc.start()
    try:
        app = ChatApp(max_bytes=cap, max_rooms=500, history=50)
        before = tracemalloc.get_traced_memory()[0]
        statuses = {_post(app, f"room{n}", text) for n in range(rooms) for _ in range(per_room)}
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Old rooms nobody watches made way; a room's ring (50 messages) fits in the cap.
    assert statuses == {"201 Created"}
    assert app.rooms <= 500 and app.kept_bytes <= cap
    # The charge covers what the rooms and messages really cost.
    assert used <= cap, (used, app.rooms)


def test_the_longest_message_fits_however_it_is_escaped(chat: str) -> None:
    # 2000 emoji, JSON-escaped as surrogate pairs (12 bytes each), and the longest nick.
    text = "\U0001f600" * 2000
    for ensure_ascii in (True, False):
        body = json.dumps({"nick": "\U0001f600" * 32, "text": text}, ensure_ascii=ensure_ascii)
        sent = requests.post(f"{chat}/api/rooms/emoji/messages", data=body.encode(),
                             headers={"Content-Type": "application/json"}, timeout=5)
        assert sent.status_code == 201, (ensure_ascii, len(body), sent.text)


def test_head_of_the_page_is_its_get_without_the_body(chat: str) -> None:
    page = requests.get(f"{chat}/", timeout=5)
    head = requests.head(f"{chat}/", timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == page.headers["content-length"]
    assert head.headers["content-type"] == page.headers["content-type"]
    refused = requests.delete(f"{chat}/", timeout=5)
    assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD")


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition not met in time"
        time.sleep(0.01)


def _get(app: ChatApp, path: str) -> str:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.input": io.BytesIO(),
    }
    statuses: list[str] = []
    b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    return statuses[0]


def _watch_once(app: ChatApp, room: str) -> None:
    """A stream takes ``room`` up, gets what it missed (the copy is filled), goes away."""
    hub = app.room(room, watch=True)
    assert hub is not None
    body = DetachedBody()
    hub.subscribe(body, last_event_id=hub.recent(2).messages[0].id)
    _wait(lambda: body.buffered)
    assert app.kept_bytes >= 50 * 2 * 12_000  # charged, though another process posted
    body.close()


def test_redis_mode_memory_stays_under_the_cap(redis_server: RedisServer) -> None:
    """Rooms filled by another process and watched here are charged here: this
    process keeps a copy of a watched room's history; rooms and broker hubs
    it only read leave nothing behind."""
    cap = 4 << 20
    other = ChatApp(redis_url=redis_server.url, history=50, max_bytes=1 << 30)
    text = "\u00e9" * 2000  # 12 000 bytes of JSON: 50 of them, ~1.3 MiB a room
    for n in range(8):
        assert {_post(other, f"full{n}", text) for _ in range(50)} == {"201 Created"}
    gc.collect()
    tracemalloc.start()
    try:
        app = ChatApp(redis_url=redis_server.url, history=50, max_bytes=cap)
        broker = app._broker
        assert broker is not None
        broker.linger = 0.2  # how long a channel nobody watches is still followed
        before = tracemalloc.get_traced_memory()[0]
        assert {_get(app, f"/api/rooms/junk{n}/history") for n in range(300)} == {"200 OK"}
        assert app.rooms == 1 and len(broker._hubs) <= 1  # the lobby's
        for n in range(8):
            _watch_once(app, f"full{n}")
            assert app.kept_bytes <= cap
        _wait(lambda: broker.stats()["channels"] == 0)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        other._broker.close()  # type: ignore[union-attr]
    assert app.rooms < 8 and app.kept_bytes <= cap  # rooms nobody watched made way
    assert len(broker._hubs) <= app.rooms  # evicted rooms' hubs are gone
    assert used <= cap, (used, app.rooms)
    broker.close()


def test_idle_rooms_are_evicted_and_the_lobby_stays() -> None:
    app = ChatApp(room_idle=0.0)
    assert _post(app, "lobby", "hi") == _post(app, "first", "hi") == "201 Created"
    assert app.room("first") is not None
    assert _post(app, "second", "hi") == "201 Created"
    assert app.room("first") is None  # nobody watched it for room_idle seconds
    assert app.room("lobby") is not None and app.rooms == 2


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS"]),
    room=st.sampled_from(["lobby", "r", "BAD", "a" * 33, "x\n", "ü", ""]),
    action=st.sampled_from(["history", "messages", "events", "poll", "", "poll/", "x"]),
    query=st.one_of(st.text(max_size=40), st.sampled_from(
        ["timeout=nan", "timeout=inf", "timeout=-1e999", "cursor=abc-%C2%B2", "after=a%0Ab",
         "cursor=" + "9" * 200, "after=%00"])),
    body=st.one_of(st.binary(max_size=200), st.just(DEEP), st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
            st.sampled_from(["nick", "text", "x"]), inner, max_size=3),
        max_leaves=8,
    ).map(lambda v: json.dumps(v).encode())),
    headers=st.dictionaries(
        st.sampled_from(["CONTENT_TYPE", "HTTP_ORIGIN", "HTTP_HOST", "HTTP_SEC_FETCH_SITE",
                         "CONTENT_LENGTH"]),
        st.text(max_size=30), max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_no_request_gets_a_5xx(
    method: str, room: str, action: str, query: str, body: bytes, headers: dict[str, str]
) -> None:
    app = _FUZZED
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": f"/api/rooms/{room}/{action}",
        "QUERY_STRING": query, "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), **headers,
    }
    statuses: list[str] = []
    result = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    try:
        if not statuses:  # a stream or a long-poll: its 200 goes out with its first chunk
            assert isinstance(result, DetachedBody), (result, environ)
        else:
            assert int(statuses[0][:3]) < 500, (statuses, environ)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


#: One app for every example: rooms made by earlier examples make later ones reach further.
_FUZZED = ChatApp()
