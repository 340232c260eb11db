"""The chat in Redis mode across real processes: two ``python -m wsgi_detach demo`` processes
on two ports, and ``gunicorn -w 2`` with gevent and with gthread workers.

Every process has its own memory; only Redis (a real redis-server started by
the test) joins them. SSE streams and long-polls are opened on each process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.client import Stream
from tests.redis_server import RedisServer
from tests.servers import CHILD_ENV, ROOT, ServerProcess
from tests.sse_reference import Event, Parser


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis: RedisServer) -> str:
    return redis.url


@pytest.fixture(
    scope="module",
    params=["two-demo-processes", "gunicorn-gevent", "gunicorn-gthread", "waitress+pywsgi"],
)
def chat(request: pytest.FixtureRequest, redis_url: str) -> Iterator[list[int]]:
    """Ports of the processes serving the chat (the same port twice under gunicorn -w 2)."""
    env = {"REDIS_URL": redis_url}
    if request.param == "two-demo-processes":
        # One takes --redis alone (REDIS_URL), the other --redis URL.
        with ServerProcess("demo-command", "", env=env, args=["--redis"]) as a, ServerProcess(
            "demo-command", "", args=["--redis", redis_url]
        ) as b:
            yield [a.port, b.port]
        return
    if request.param == "waitress+pywsgi":
        # Two kinds side by side: threads (the receiver a real thread) and
        # gevent without monkey-patching (likewise, handing over to greenlets).
        with ServerProcess("waitress", "tests.redis_chat_app:app", env=env) as a, ServerProcess(
            "pywsgi", "tests.redis_chat_app:app", env=env
        ) as b:
            yield [a.port, b.port]
        return
    env["WSGI_DETACH_TEST_WORKERS"] = "2"
    with ServerProcess(request.param, "tests.redis_chat_app:app", env=env) as server:
        # Both workers serving: new connections land on either.
        pids: set[int] = set()
        give_up = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < give_up:
            pids.add(server.info()["pid"])
        assert len(pids) == 2, "the second gunicorn worker did not start"
        yield [server.port, server.port]


class SSE:
    """One EventSource-like client: a stream and the reference parser."""

    def __init__(self, port: int, room: str, last_event_id: str | None = None) -> None:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.stream = Stream(port, f"/api/rooms/{room}/events", timeout=15, headers=headers)
        self.parser = Parser()
        assert self.stream.read_head().status == 200

    def wait(self, n: int) -> list[Event]:
        give_up = time.monotonic() + 15
        while len(self.parser.events) < n:
            assert time.monotonic() < give_up, f"got {len(self.parser.events)} of {n} events"
            chunk = self.stream.read_chunk()
            assert chunk is not None, "the stream ended"
            self.parser.feed(chunk)
        return self.parser.events

    def close(self) -> None:
        self.stream.close()


def post(port: int, room: str, text: str) -> str:
    answer = requests.post(
        f"http://127.0.0.1:{port}/api/rooms/{room}/messages",
        json={"nick": "t", "text": text},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def test_a_post_reaches_every_process_with_one_id(chat: list[int]) -> None:
    room = f"one-{time.monotonic_ns()}"
    streams = [SSE(port, room) for port in chat for _ in range(2)]
    cursor = requests.get(f"http://127.0.0.1:{chat[1]}/api/rooms/{room}/history", timeout=10)
    polls: list[dict[str, object]] = []

    def poll(port: int) -> None:
        url = f"http://127.0.0.1:{port}/api/rooms/{room}/poll"
        polls.append(requests.get(url, params={"cursor": cursor.json()["cursor"], "timeout": 15},
                                  timeout=20).json())

    pollers = [threading.Thread(target=poll, args=(port,)) for port in chat]
    for thread in pollers:
        thread.start()
    time.sleep(0.3)  # the polls are waiting (an early answer is also correct)
    sent = post(chat[0], room, "hello")
    for sse in streams:
        (event,) = sse.wait(1)
        assert event.last_event_id == sent and json.loads(event.data)["text"] == "hello"
    for thread in pollers:
        thread.join(20)
    assert [[m["id"] for m in p["messages"]] for p in polls] == [[sent], [sent]]  # type: ignore[union-attr]
    history = requests.get(f"http://127.0.0.1:{chat[1]}/api/rooms/{room}/history", timeout=10)
    assert [m["id"] for m in history.json()["messages"]] == [sent]
    for sse in streams:
        sse.close()


def test_two_publishers_on_two_processes_one_order(chat: list[int]) -> None:
    room = f"race-{time.monotonic_ns()}"
    streams = [SSE(port, room) for port in chat]
    ids: dict[str, list[str]] = {"a": [], "b": []}

    def hammer(port: int, tag: str) -> None:
        for i in range(40):
            ids[tag].append(post(port, room, f"{tag}{i}"))

    threads = [threading.Thread(target=hammer, args=(p, t)) for p, t in zip(chat, "ab")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    seen = [[e.last_event_id for e in sse.wait(80)] for sse in streams]
    assert seen[0] == seen[1]
    assert sorted(seen[0]) == sorted(ids["a"] + ids["b"])
    assert len(set(seen[0])) == 80
    for sse in streams:
        sse.close()


def test_reconnecting_to_the_other_process_resumes_exactly(chat: list[int]) -> None:
    room = f"resume-{time.monotonic_ns()}"
    first = SSE(chat[0], room)
    before = [post(chat[0], room, f"m{i}") for i in range(3)]
    assert [e.last_event_id for e in first.wait(3)] == before
    first.close()
    missed = [post(chat[1], room, f"m{i}") for i in range(3, 6)]
    again = SSE(chat[1], room, last_event_id=before[-1])
    assert [e.last_event_id for e in again.wait(3)] == missed
    live = post(chat[0], room, "live")
    assert [e.last_event_id for e in again.wait(4)] == [*missed, live]
    again.close()


def test_a_plain_python_process_publishes_to_every_process(chat: list[int], redis_url: str) -> None:
    room = f"script-{time.monotonic_ns()}"
    streams = [SSE(port, room) for port in chat]
    script = (
        "import sys; from wsgi_detach import RedisBroker\n"
        "m = RedisBroker(sys.argv[1]).hub(sys.argv[2]).publish("
        "{'nick': 'cron', 'text': 'nightly', 'ts': 0}, event='chat')\n"
        "print(m.id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, redis_url, room],
        cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=30, check=True,
    )
    sent = done.stdout.strip()
    for sse in streams:
        (event,) = sse.wait(1)
        assert event.last_event_id == sent and event.type == "chat"
        sse.close()


def test_pubsub_connections_killed_during_a_burst(chat: list[int], redis: RedisServer) -> None:
    """Every process's receiving connection dropped by Redis mid-burst: nothing lost or doubled."""
    room = f"kill-{time.monotonic_ns()}"
    streams = [SSE(port, room) for port in chat for _ in range(2)]
    sent = []
    for i in range(60):
        sent.append(post(chat[i % 2], room, f"m{i}"))
        if i == 20:
            assert redis.command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    for sse in streams:
        assert [e.last_event_id for e in sse.wait(60)] == sent
        sse.close()


def test_redis_down_answers_503_and_streams_stay_open(chat: list[int], redis: RedisServer) -> None:
    room = f"down-{time.monotonic_ns()}"
    streams = [SSE(port, room) for port in chat]
    first = post(chat[0], room, "before")
    for sse in streams:
        sse.wait(1)
    redis.freeze()
    try:
        answer = requests.post(
            f"http://127.0.0.1:{chat[1]}/api/rooms/{room}/messages",
            json={"nick": "t", "text": "frozen"},
            timeout=10,
        )
        assert answer.status_code == 503
        assert answer.json()["error"].startswith("chat unavailable:")
    finally:
        redis.thaw()
    later = post(chat[0], room, "after")
    for sse in streams:
        ids = [e.last_event_id for e in sse.wait(2)]
        while later not in ids:  # "frozen" may have been published once thawed
            ids = [e.last_event_id for e in sse.wait(len(ids) + 1)]
        assert ids[0] == first and ids[-1] == later and len(set(ids)) == len(ids)
        sse.close()


def test_one_receiving_connection_per_process(
    chat: list[int], redis: RedisServer, request: pytest.FixtureRequest
) -> None:
    """CLIENT LIST: two serving processes, 200 streams over 5 rooms -> two receiving connections."""
    # gthread and waitress hold a thread per open stream (64 per process here): fewer there.
    threaded = any(kind in request.node.callspec.id for kind in ("gthread", "waitress"))
    count = 60 if threaded else 200
    streams = [SSE(chat[i % 2], f"many{i % 5}") for i in range(count)]
    sent = [post(chat[0], f"many{i}", "x") for i in range(5)]
    for i, sse in enumerate(streams):
        assert [e.last_event_id for e in sse.wait(1)] == [sent[i % 5]]
    receiving = [c for c in redis.clients() if "P" in c["flags"]]
    assert len(receiving) == 2, receiving
    # Each room is subscribed once per process, however many of its streams it serves.
    channels = [f"wsgi_detach:{{many{i}}}" for i in range(5)]
    numsub = redis.command("PUBSUB", "NUMSUB", *channels)
    assert numsub[1::2] == [2] * 5, numsub
    for sse in streams:
        sse.close()


def test_redis_restarted_with_then_without_its_data(chat: list[int], redis: RedisServer) -> None:
    room = f"restart-{time.monotonic_ns()}"
    streams = [SSE(port, room) for port in chat]
    before = [post(chat[0], room, "one"), post(chat[1], room, "two")]
    for sse in streams:
        assert [e.last_event_id for e in sse.wait(2)] == before
    redis.restart(keep_data=True)
    after = _post_when_back(chat[1], room, "three")
    for sse in streams:  # the same streams, still open, go on in order
        assert [e.last_event_id for e in sse.wait(3)] == [*before, after]
    again = SSE(chat[0], room, last_event_id=before[0])  # resume across the restart
    assert [e.last_event_id for e in again.wait(2)] == [before[1], after]
    again.close()
    redis.restart(keep_data=False)
    fresh = _post_when_back(chat[0], room, "four")
    assert fresh.split("-")[0] != after.split("-")[0]  # a new epoch
    for sse in streams:
        events = sse.wait(4)[3:]
        assert events[0].type == "resync"
        if json.loads(events[0].data)["cursor"] != fresh:
            assert [e.last_event_id for e in sse.wait(5)[4:]] == [fresh]
        sse.close()
    stale = SSE(chat[1], room, last_event_id=after)  # an id from before the loss
    (notice,) = stale.wait(1)
    assert notice.type == "resync" and json.loads(notice.data)["reason"] == "from another epoch"
    stale.close()


def _post_when_back(port: int, room: str, text: str) -> str:
    """Post once Redis answers again (503 until then): the id."""
    give_up = time.monotonic() + 15
    while True:
        answer = requests.post(
            f"http://127.0.0.1:{port}/api/rooms/{room}/messages",
            json={"nick": "t", "text": text},
            timeout=10,
        )
        if answer.status_code == 201:
            return str(answer.json()["id"])
        assert answer.status_code == 503 and time.monotonic() < give_up, answer.text
        time.sleep(0.1)


def test_the_documented_gunicorn_command(redis_url: str) -> None:
    """docs/scale-out.md's command (4 gevent workers, the chat in Redis mode), as written there."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = f'wsgi_detach._demo.chat:ChatApp(redis_url="{redis_url}")'
    docs = (ROOT / "docs" / "scale-out.md").read_text()
    assert "gunicorn -k gevent -w 4 -b 127.0.0.1:8000 'wsgi_detach._demo.chat:ChatApp(" in docs
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "4", "-b", f"127.0.0.1:{port}",
         spec],
        cwd=ROOT, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        give_up = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/api/rooms/doc/history", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < give_up, "gunicorn did not start"
                time.sleep(0.1)
        streams = [SSE(port, "doc") for _ in range(8)]  # spread over the workers
        sent = post(port, "doc", "hello")
        for sse in streams:
            assert [e.last_event_id for e in sse.wait(1)] == [sent]
            sse.close()
    finally:
        proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown (SIGTERM waits for streams)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # a worker still booting can miss it: not the point here
            proc.kill()
            proc.wait(timeout=10)


def test_the_demo_refuses_a_url_that_is_not_redis() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wsgi_detach", "demo", "--redis", "http://127.0.0.1:6379",
         "--port", "0"],
        cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "demo: url must start with one of redis://, rediss://, unix://, "
        "got 'http://127.0.0.1:6379'"
    )


def test_the_demo_answers_503_when_redis_refuses_a_post(redis: RedisServer) -> None:
    # Redis full (maxmemory with noeviction): Redis's fault, not the client's.
    import io
    from wsgiref.util import setup_testing_defaults
    from wsgiref.validate import validator

    from wsgi_detach._demo.chat import ChatApp

    chat = ChatApp(redis_url=redis.url)
    app = validator(chat)
    body = b'{"nick":"a","text":"hi"}'

    def post() -> tuple[str, bytes]:
        seen: list[str] = []
        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": "/api/rooms/full/messages",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
            "SCRIPT_NAME": "", "QUERY_STRING": "", "wsgi.input": io.BytesIO(body),
        }
        setup_testing_defaults(environ)
        result = app(environ, lambda status, headers, exc_info=None: seen.append(status))
        try:
            return seen[0], b"".join(result)
        finally:
            result.close()  # type: ignore[attr-defined]

    try:
        assert post()[0] == "201 Created"
        redis.command("CONFIG", "SET", "maxmemory", "1")
        try:
            status, answer = post()
        finally:
            redis.command("CONFIG", "SET", "maxmemory", "0")
        assert status == "503 Service Unavailable"
        assert b"maxmemory" in answer
    finally:
        chat._broker.close()  # type: ignore[union-attr]
