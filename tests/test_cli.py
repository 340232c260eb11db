"""python -m wsgi_detach serve: patches first, serves behind the middleware, drains on SIGTERM."""

from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from tests.client import Stream, events, get, get_json, wait_until
from tests.servers import CHILD_ENV, ROOT, ServerProcess


def _serve_command() -> ServerProcess:
    args = ["--grace", "0.5", "--farewell", "bye\\n"]
    return ServerProcess("serve-command", "tests.mw_apps:app", args=args)


@pytest.fixture(scope="module")
def serve() -> Iterator[ServerProcess]:
    with _serve_command() as server:
        yield server


def test_serve_patches_before_importing_the_app(serve: ServerProcess) -> None:
    assert get_json(serve.port, "/_patched") == {"at_import": True}


def test_serve_puts_the_middleware_and_the_watching_handler_in_front(
    serve: ServerProcess,
) -> None:
    response = get(serve.port, "/detached?n=2")
    assert (response.body, response.headers["cache-control"]) == (b"chunk 0;chunk 1;", "no-cache")
    stream = Stream(serve.port, "/idle?key=cli-idle")
    assert wait_until(lambda: events(serve.port, "cli-idle") == ["opened"])
    stream.close()
    assert wait_until(lambda: events(serve.port, "cli-idle") == ["opened", "outcome disconnected"])


def test_sigterm_sends_the_farewell_and_exits() -> None:
    with _serve_command() as serve, Stream(serve.port, "/idle?key=cli-term") as stream:
        assert wait_until(lambda: events(serve.port, "cli-term") == ["opened"])
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        response = stream.read_all()
        assert serve.proc.wait(timeout=10) == 0
    assert (response.status, response.body, response.complete) == (200, b"bye\n", True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "no_colon"], "serve: expected MODULE:APP (like mysite.wsgi:application), "
                                "got 'no_colon'"),
        (["serve", "tests.no_such_module:app"], "serve: cannot import 'tests.no_such_module'"),
        (["serve", "tests.mw_apps:nothing"], "serve: module 'tests.mw_apps' has no attribute "
                                             "'nothing'"),
        (["demo", "--port", "x"], "usage: python -m wsgi_detach demo"),
    ],
)
def test_mistakes_are_explained(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wsgi_detach", *args],
        cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0
    assert done.stderr.startswith(message)


def test_demo_serves_the_chat_behind_the_middleware() -> None:
    with ServerProcess("demo-command", "") as demo:
        page = get(demo.port, "/")
        assert page.status == 200 and b"new EventSource(" in page.body
        with Stream(demo.port, "/api/rooms/lobby/events") as stream:
            head = stream.read_head()
            assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert (stream.read_chunk() or b"").startswith(b": stream open\n")
            # SIGTERM: the chat ends its streams cleanly before the drain.
            assert demo.proc is not None
            demo.proc.send_signal(signal.SIGTERM)
            assert stream.read_all().complete
        assert demo.proc.wait(timeout=10) == 0


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsgi_detach", *args],
        cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=30,
    )


def test_version() -> None:
    from wsgi_detach import __version__

    done = _run("--version")
    assert (done.returncode, done.stdout) == (0, f"wsgi_detach {__version__}\n")


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_busy_port_is_one_line_not_a_traceback(command: str) -> None:
    with ServerProcess("demo-command", "") as busy:
        app = ["tests.mw_apps:app"] if command == "serve" else []
        done = _run(command, *app, "--port", str(busy.port))
    assert done.returncode == 1
    assert done.stderr == (
        f"{command}: cannot listen on 127.0.0.1:{busy.port}: Address already in use: "
        f"('127.0.0.1', {busy.port})\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "cannot listen on 127.0.0.1:70000: bind(): port must be 0-65535.\n"),
        (["--host", "host.invalid"], "cannot listen on host.invalid:8000: "),
    ],
)
def test_other_start_up_failures_are_one_line(args: list[str], message: str) -> None:
    done = _run("demo", *args)
    assert done.returncode == 1
    assert done.stderr.startswith(f"demo: {message}") and done.stderr.count("\n") == 1


def _start_up_line(*args: str, env: dict[str, str]) -> str:
    """The demo's first line on stdout (it is then stopped)."""
    with subprocess.Popen(
        [sys.executable, "-m", "wsgi_detach", "demo", "--port", "0", "--no-access-log", *args],
        cwd=ROOT, env=dict(CHILD_ENV, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            return proc.stdout.readline() if ready else ""
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def test_redis_mode_is_asked_for_never_taken_from_the_environment() -> None:
    # REDIS_URL set for another program leaves the in-process demo as it is;
    # the start-up line says where the rooms are.
    nowhere = {"REDIS_URL": "redis://user:secret@127.0.0.1:1/0"}
    line = _start_up_line(env=nowhere)
    assert line.startswith("wsgi_detach: serving the demo chat (rooms in this process) on ")
    line = _start_up_line("--redis", env=nowhere)  # alone: REDIS_URL
    assert line.startswith(
        "wsgi_detach: serving the demo chat (rooms in Redis at redis://127.0.0.1:1/0) on "
    )
    done = subprocess.run(
        [sys.executable, "-m", "wsgi_detach", "demo", "--redis", "--port", "0"], cwd=ROOT,
        env={k: v for k, v in CHILD_ENV.items() if k != "REDIS_URL"}, capture_output=True,
        text=True, timeout=30, check=False,
    )
    assert (done.returncode, done.stderr) == (
        1, "demo: --redis without a URL takes $REDIS_URL, which is not set\n"
    )


def test_ctrl_c_stops_the_demo_quietly() -> None:
    with ServerProcess("demo-command", "") as demo:
        assert demo.proc is not None
        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(timeout=10) == 0
        assert demo.stderr_text() == ""


def test_the_demo_on_loopback_answers_only_to_loopback_names() -> None:
    # A page whose own name was made to resolve to 127.0.0.1 (DNS rebinding)
    # would otherwise be the chat's "same origin".
    with ServerProcess("demo-command", "") as demo:
        for host, status in [("127.0.0.1", 200), ("localhost", 200), ("[::1]", 200),
                             ("rebound.example", 421)]:
            headers = {"Host": f"{host}:{demo.port}"}
            response = requests.get(f"{demo.url}/api/rooms/lobby/history", headers=headers,
                                    timeout=5)
            assert response.status_code == status, host


def _nginx_recipe() -> tuple[str, str]:
    """docs/deployment.md's demo command behind nginx, and its nginx block."""
    page = (ROOT / "docs" / "deployment.md").read_text()
    command = re.search(r"^python -m wsgi_detach demo .*$", page, re.MULTILINE)
    block = re.search(r"```nginx\n(.*?)```", page, re.DOTALL)
    assert command is not None and block is not None
    return command.group(0), block.group(1)


def test_the_demo_behind_the_documented_nginx_recipe() -> None:
    # What nginx sends upstream with the recipe's "proxy_set_header Host
    # $host": the public name without the port it listens on, and the
    # browser's Origin as is (with that port when it is not 443).
    command, nginx = _nginx_recipe()
    assert "proxy_set_header Host $host;" in nginx
    args = command.split()[4:]
    assert args[args.index("--allow-host") + 1] == "chat.example.com"
    args[args.index("--port") + 1] = "0"
    with ServerProcess("demo-command", "", args=args) as demo:
        post = f"{demo.url}/api/rooms/lobby/messages"
        for origin, status in [
            ("https://chat.example.com", 201),
            ("https://chat.example.com:8443", 201),
            ("https://evil.example", 403),
        ]:
            headers = {"Host": "chat.example.com", "Origin": origin,
                       "Sec-Fetch-Site": "same-origin" if status == 201 else "cross-site"}
            sent = requests.post(post, json={"nick": "a", "text": "hi"}, headers=headers,
                                 timeout=5)
            assert sent.status_code == status, origin
        # A page on another name the proxy does not serve still gets 421.
        response = requests.get(f"{demo.url}/", headers={"Host": "rebound.example"}, timeout=5)
        assert response.status_code == 421
        page = requests.get(f"{demo.url}/", headers={"Host": "chat.example.com"}, timeout=5)
        assert page.status_code == 200


def test_ctrl_c_during_start_up_exits_without_a_traceback() -> None:
    # The signal lands before Python has its handler (the default action ends
    # the process), while it imports gevent and the package (130), or once the
    # server is up (0): a quiet exit every time, never a traceback.
    with subprocess.Popen(
        [sys.executable, "-m", "wsgi_detach", "demo", "--port", "0", "--no-access-log"],
        cwd=ROOT, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) in (0, 130, -signal.SIGINT)
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_serve_honours_a_grace_above_one_second() -> None:
    from tests.test_server import check_grace

    args = ["--grace", "3"]
    with ServerProcess("serve-command", "tests.mw_apps:app", args=args) as server:
        check_grace(server, 3.0)


def _post_head(port: int, length: int) -> socket.socket:
    """A POST whose app is reading its body: the server said ``100 Continue``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST /api/rooms/grace/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 f"application/json\r\nExpect: 100-continue\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
    return sock


def test_demo_honours_a_grace_above_one_second() -> None:
    """A request still arriving when SIGTERM comes gets the whole grace, not one second."""
    body = b'{"nick": "n", "text": "sent late"}'
    with ServerProcess("demo-command", "", args=["--grace", "3"]) as demo, \
            _post_head(demo.port, len(body)) as late, _post_head(demo.port, 100) as never:
        late.sendall(body[:5])
        never.sendall(body[:5])
        assert demo.proc is not None
        signalled = time.monotonic()
        demo.proc.send_signal(signal.SIGTERM)
        time.sleep(2)  # the rest of the body arrives 2 s after SIGTERM
        late.sendall(body[5:])
        assert late.recv(65536).startswith(b"HTTP/1.1 201 Created\r\n")
        assert never.recv(65536) == b""  # closed at the grace
        cut_at = time.monotonic() - signalled
        assert 2.8 < cut_at < 4.0, cut_at
        assert demo.proc.wait(timeout=10) == 0
        assert time.monotonic() - signalled < cut_at + 0.8


def test_serve_takes_the_http_timeouts() -> None:
    args = ["--head-timeout", "0.5", "--body-timeout", "0.5", "--max-connections", "50"]
    with ServerProcess("serve-command", "tests.mw_apps:app", args=args) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert 0.4 < time.monotonic() - started < 2.0
