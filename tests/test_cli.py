"""python -m wsgi_detach serve: patches first, serves behind the middleware, drains on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.client import Stream, events, get, wait_until
from tests.servers import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


class Serve:
    """``python -m wsgi_detach serve ARGS`` in a child process, on an ephemeral port."""

    def __init__(self, *args: str, command: str = "serve") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgi_detach", command, *args, "--port", "0",
             "--no-access-log"],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by pytest-timeout if it never comes
        assert line.startswith("wsgi_detach: serving "), line + self.proc.stderr.read()  # type: ignore[union-attr]
        self.port = int(line.split("http://127.0.0.1:")[1].split()[0])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code


@pytest.fixture
def serve() -> Iterator[Serve]:
    server = Serve("tests.mw_apps:app", "--grace", "0.5", "--farewell", "bye\\n")
    try:
        yield server
    finally:
        server.stop()


def test_serve_patches_before_importing_the_app(serve: Serve) -> None:
    assert json.loads(get(serve.port, "/_patched").body) == {"at_import": True}


def test_serve_puts_the_middleware_and_the_watching_handler_in_front(serve: Serve) -> None:
    response = get(serve.port, "/detached?n=2")
    assert (response.body, response.headers["cache-control"]) == (b"chunk 0;chunk 1;", "no-cache")
    stream = Stream(serve.port, "/idle?key=cli-idle")
    assert wait_until(lambda: events(serve.port, "cli-idle") == ["opened"])
    stream.close()
    assert wait_until(lambda: events(serve.port, "cli-idle") == ["opened", "outcome disconnected"])


def test_sigterm_sends_the_farewell_and_exits(serve: Serve) -> None:
    with Stream(serve.port, "/idle?key=cli-term") as stream:
        assert wait_until(lambda: events(serve.port, "cli-term") == ["opened"])
        serve.proc.send_signal(signal.SIGTERM)
        response = stream.read_all()
    assert (response.status, response.body, response.complete) == (200, b"bye\n", True)
    assert serve.stop() == 0


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
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0
    assert done.stderr.startswith(message)


def test_demo_serves_the_chat_behind_the_middleware() -> None:
    demo = Serve(command="demo")
    try:
        page = get(demo.port, "/")
        assert page.status == 200 and b"new EventSource(" in page.body
        with Stream(demo.port, "/api/rooms/cli/events") as stream:
            head = stream.read_head()
            assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert (stream.read_chunk() or b"").startswith(b": stream open\n")
            # SIGTERM: the chat ends its streams cleanly before the drain.
            demo.proc.send_signal(signal.SIGTERM)
            assert stream.read_all().complete
        assert demo.stop() == 0
    finally:
        demo.stop()
