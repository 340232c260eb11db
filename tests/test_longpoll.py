"""long_poll and wait_for_messages: at once, at the next publish, or empty (200) at the timeout."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import requests

from tests.client import Stream, get, wait_until
from tests.servers import ServerProcess
from wsgi_detach import Hub, wait_for_messages


@pytest.fixture(scope="module", params=["pywsgi", "wsgiref"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with ServerProcess(request.param, "tests.pattern_apps:app") as proc:
        yield proc


def poll(server: ServerProcess, hub: str, cursor: str = "", timeout: float = 5) -> dict:  # type: ignore[type-arg]
    response = get(server.port, f"/hub/poll?hub={hub}&cursor={cursor}&timeout={timeout}")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.complete
    return json.loads(response.body)  # type: ignore[no-any-return]


def publish(server: ServerProcess, hub: str, data: str, n: int = 1) -> str:
    url = f"{server.url}/hub/publish?hub={hub}&data={data}&n={n}"
    return str(requests.get(url, timeout=5).json()["cursor"])


def test_nothing_new_is_an_empty_200_at_the_timeout(server: ServerProcess) -> None:
    cursor = publish(server, "quiet", "old")
    started = time.monotonic()
    answer = poll(server, "quiet", cursor, timeout=0.3)
    elapsed = time.monotonic() - started
    assert answer == {"messages": [], "cursor": cursor, "resync": False}
    assert 0.25 < elapsed < 2.0


def test_news_after_the_cursor_comes_back_at_once(server: ServerProcess) -> None:
    cursor = publish(server, "backlog", "seen")
    publish(server, "backlog", "new", n=3)
    started = time.monotonic()
    answer = poll(server, "backlog", cursor, timeout=5)
    assert time.monotonic() - started < 1.0
    assert [m["data"] for m in answer["messages"]] == ["new0", "new1", "new2"]
    assert answer["cursor"] == answer["messages"][-1]["id"]
    assert answer["resync"] is False


def test_a_waiting_poll_is_answered_by_the_next_publish(server: ServerProcess) -> None:
    cursor = publish(server, "live", "before")
    with Stream(server.port, f"/hub/poll?hub=live&cursor={cursor}&timeout=5") as waiting:
        stats = f"{server.url}/hub/stats?hub=live"
        assert wait_until(lambda: requests.get(stats, timeout=5).json()["polls"] == 1)
        published = time.monotonic()
        publish(server, "live", "news")
        response = waiting.read_all()
    assert time.monotonic() - published < 0.5
    answer = json.loads(response.body)
    assert [m["data"] for m in answer["messages"]] == ["news"]
    assert response.status == 200 and response.complete


def test_no_cursor_means_from_now(server: ServerProcess) -> None:
    publish(server, "fresh", "history")
    answer = poll(server, "fresh", "", timeout=0.2)
    assert answer["messages"] == []
    assert answer["cursor"].endswith("-1")


def test_a_cursor_out_of_history_gets_a_resync_at_once(server: ServerProcess) -> None:
    first = get(server.port, "/hub/poll?hub=short&history=2&timeout=0.1")  # makes the hub
    assert first.status == 200
    cursor = publish(server, "short", "a")
    publish(server, "short", "b", n=5)
    answer = poll(server, "short", cursor, timeout=5)
    assert answer["resync"] is True
    assert answer["messages"] == []
    assert answer["cursor"].endswith("-6")


def test_a_cursor_may_be_an_id_the_application_chose(server: ServerProcess) -> None:
    for n in (41, 42, 43):
        requests.get(f"{server.url}/hub/publish?hub=rows&data=row{n}&id=row-{n}", timeout=5)
    answer = poll(server, "rows", "row-41", timeout=5)
    assert [(m["id"], m["data"]) for m in answer["messages"]] == [
        ("row-42", "row42"),
        ("row-43", "row43"),
    ]
    assert answer["cursor"] == "row-43" and answer["resync"] is False
    with Stream(server.port, "/hub/poll?hub=rows&cursor=row-43&timeout=5") as waiting:
        stats = f"{server.url}/hub/stats?hub=rows"
        assert wait_until(lambda: requests.get(stats, timeout=5).json()["polls"] == 1)
        requests.get(f"{server.url}/hub/publish?hub=rows&data=row44&id=row-44", timeout=5)
        response = waiting.read_all()
    assert [m["id"] for m in json.loads(response.body)["messages"]] == ["row-44"]


@pytest.mark.parametrize(
    ("cursor", "reason"),
    [
        ("{epoch}-%C2%B2", "unknown id"),
        ("{epoch}-%D9%A3", "unknown id"),
        ("{epoch}-" + "9" * 5000, "unknown id"),
        ("{epoch}-", "unknown id"),
        ("0a0a0a-1", "from another epoch"),
        ("nonsense", "unknown id"),
    ],
)
def test_a_bad_cursor_is_a_resync_with_its_reason_never_a_500(
    server: ServerProcess, cursor: str, reason: str
) -> None:
    epoch = publish(server, "strict", "x").split("-")[0]
    answer = poll(server, "strict", cursor.format(epoch=epoch), timeout=5)
    assert answer["resync"] is True
    assert answer["reason"] == reason
    assert answer["messages"] == []


def test_disconnect_all_answers_a_waiting_poll_empty(server: ServerProcess) -> None:
    cursor = publish(server, "closing", "x")
    stats = f"{server.url}/hub/stats?hub=closing"
    with Stream(server.port, f"/hub/poll?hub=closing&cursor={cursor}&timeout=5") as waiting:
        assert wait_until(lambda: requests.get(stats, timeout=5).json()["polls"] == 1)
        ended = requests.get(f"{server.url}/hub/disconnect?hub=closing", timeout=5).json()
        response = waiting.read_all()
    assert ended == {"ended": 1}
    assert json.loads(response.body) == {"messages": [], "cursor": cursor, "resync": False}
    assert response.status == 200 and response.complete


def test_a_client_that_leaves_withdraws_its_poll(server: ServerProcess) -> None:
    cursor = publish(server, "leaver", "x")
    stats = f"{server.url}/hub/stats?hub=leaver"
    with Stream(server.port, f"/hub/poll?hub=leaver&cursor={cursor}&timeout=0.3") as waiting:
        assert wait_until(lambda: requests.get(stats, timeout=5).json()["polls"] == 1)
        waiting.reset()
    # The server notices at the timeout, when the empty answer fails to go out.
    assert wait_until(lambda: requests.get(stats, timeout=5).json()["polls"] == 0, timeout=3)


# -- wait_for_messages: blocking, from a greenlet or a plain thread -------------------


def test_wait_for_messages_from_a_thread_woken_by_another_thread() -> None:
    hub = Hub()
    cursor = hub.cursor
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(wait_for_messages(hub, cursor, 5)))
    waiter.start()
    assert wait_until(lambda: hub.pending_polls == 1)
    hub.publish("hello")
    waiter.join(5)
    (batch,) = result
    assert [m.data for m in batch.messages] == ["hello"]  # type: ignore[attr-defined]


def test_wait_for_messages_from_a_greenlet_woken_by_a_thread() -> None:
    hub = Hub()
    cursor = hub.cursor
    greenlet = gevent.spawn(wait_for_messages, hub, cursor, 5)
    gevent.sleep(0)  # let it register
    assert hub.pending_polls == 1
    publisher = threading.Thread(target=hub.publish, args=("from a thread",))
    started = time.monotonic()
    publisher.start()
    batch = greenlet.get(timeout=5)
    publisher.join(5)
    assert time.monotonic() - started < 0.5
    assert [m.data for m in batch.messages] == ["from a thread"]


def test_wait_for_messages_times_out_empty() -> None:
    hub = Hub()
    hub.publish("old")
    started = time.monotonic()
    batch = wait_for_messages(hub, hub.cursor, 0.1)
    assert batch.messages == [] and batch.cursor == hub.cursor and not batch.resync
    # Bounded, not timed: the upper bound only shows the wait ended on its own.
    assert 0.09 < time.monotonic() - started < 5.0
    assert hub.pending_polls == 0



def test_the_polls_one_publish_answers_share_one_rendering() -> None:
    """Polls waiting with the same cursor get the same batch and one render() call
    between them, for the answer and for the empty answer prepared for a timeout."""
    from wsgi_detach import long_poll
    from wsgi_detach._longpoll import render_json

    hub = Hub()
    rendered = []

    def render(batch: Any) -> bytes:
        rendered.append(batch)
        return render_json(batch)

    heads: list[str] = []
    bodies = [long_poll(hub, None, lambda s, h, e=None: heads.append(s), render=render)
              for _ in range(5)]
    assert len(rendered) == 1  # the empty answer, for the timeout
    hub.publish("news")
    assert len(rendered) == 2
    answers = {b"".join(body) for body in bodies}
    (answer,) = answers
    assert json.loads(answer)["messages"][0]["data"] == "news"
    for body in bodies:
        body.close()


def test_polls_between_publishes_share_their_options_and_a_bad_timeout_is_refused() -> None:
    """The options of a poll's body are checked once for the polls that wait with the
    same cursor; a different timeout gets its own, and an invalid one its error --
    also right after a valid one equal to it (1 == True)."""
    from wsgi_detach import long_poll
    from wsgi_detach._longpoll import _options

    empty = b'{"messages":[]}'
    assert _options(1, empty, None) is _options(1, empty, None)
    assert _options(1, empty, None) is not _options(2, empty, None)
    assert _options(1, empty, None) is not _options(1, bytes(bytearray(empty)), None)
    hub = Hub()
    bodies = [long_poll(hub, None, lambda s, h, e=None: None, timeout=t) for t in (1, 1, 2.5)]
    assert [b._idle_timeout for b in bodies] == [1.0, 1.0, 2.5]
    long_poll(hub, None, lambda s, h, e=None: None, timeout=1).close()
    for bad in (True, 0, -1, "1"):
        with pytest.raises(ValueError, match="idle_timeout must be a positive number"):
            long_poll(hub, None, lambda s, h, e=None: None, timeout=bad)  # type: ignore[arg-type]
    for body in bodies:
        body.close()
    assert hub.pending_polls == 0


def test_a_server_that_adds_to_the_head_it_is_given_changes_no_other_poll() -> None:
    """Waiting polls share one header list until their heads go out; wsgiref adds to the
    list it is given (Date, Content-Length), so each head must go out as a copy."""
    from wsgi_detach import long_poll

    hub = Hub()
    heads: list[list[tuple[str, str]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        heads.append(list(headers))
        headers.append(("Date", "now"))  # as wsgiref's handler does to the list it gets
        return lambda data: None

    for n in range(3):
        body = long_poll(hub, hub.cursor, start_response, timeout=5)
        hub.publish(f"message {n}")
        assert json.loads(b"".join(body))["messages"]
    assert heads[0] == heads[1] == heads[2]
    assert ("Date", "now") not in heads[2]
