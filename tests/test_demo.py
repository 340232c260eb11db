"""The demo chat's HTTP API on a real server (the browser tests cover the page)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.client import Stream
from tests.servers import ServerProcess
from tests.sse_reference import Parser


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
    start = requests.get(f"{room}/history", timeout=5).json()["cursor"]  # before any message
    with Stream(int(chat.rsplit(":", 1)[1]), "/api/rooms/agree/events", timeout=5) as sse:
        parser = Parser()
        sent = requests.post(f"{room}/messages", json={"nick": "ann", "text": " hi\n"}, timeout=5)
        assert sent.status_code == 201
        while not parser.events:
            parser.feed(sse.read_chunk() or b"")
    history = requests.get(f"{room}/history", timeout=5).json()
    (message,) = history["messages"]
    assert message["id"] == sent.json()["id"] == history["cursor"] == parser.last_event_id
    assert message["event"] == parser.events[0].type == "chat"
    assert message["data"]["nick"] == "ann" and message["data"]["text"] == "hi"
    polled = requests.get(f"{room}/poll?cursor={start}", timeout=5).json()
    assert polled["messages"] == history["messages"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/api/rooms/r/messages", b"not json", 400, "the body is not JSON"),
        ("POST", "/api/rooms/r/messages", b"[1]", 400, 'send {"nick": ..., "text": ...}'),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "  "}', 400,
         "nick and text must not be empty"),
        ("POST", "/api/rooms/r/messages", b'{"nick": "a", "text": "' + b"x" * 2001 + b'"}',
         400, "text is longer than 2000 characters"),
        ("GET", "/api/rooms/r/messages", None, 405, "use POST"),
        ("POST", "/api/rooms/r/history", b"{}", 405, "use GET"),
        ("GET", "/api/rooms/BAD/history", None, 404, "no such page: /api/rooms/BAD/history"),
        ("GET", "/api/rooms/r/poll?timeout=soon", None, 400, "timeout must be a number of seconds"),
    ],
)
def test_bad_requests_get_a_json_error(
    chat: str, method: str, path: str, body: bytes | None, status: int, error: str
) -> None:
    response = requests.request(method, chat + path, data=body, timeout=5)
    assert response.status_code == status
    assert response.json() == {"error": error}
