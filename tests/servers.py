"""Real WSGI servers in subprocesses on 127.0.0.1, for the integration tests.

Run as ``python -m tests.servers SERVER MODULE:APP``: the child imports the app,
wraps it in ``wsgiref.validate.validator`` (PEP 3333 conformance is checked on
every request; a violation raises in the server and breaks the test), binds an
ephemeral port on 127.0.0.1, prints ``LISTENING <port>`` and serves until
SIGTERM. The parent side is :class:`ServerProcess`, which starts the child,
waits (bounded) for that line and stops it by its PID.

Servers: ``pywsgi`` (gevent.pywsgi, unpatched), ``pywsgi-patched`` (after
``gevent.monkey.patch_all()``, done before anything else is imported),
``wsgiref`` (stdlib, one thread per request).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SERVERS = ("pywsgi", "pywsgi-patched", "wsgiref")


class ServerProcess:
    """A WSGI server in a child process; use as a context manager."""

    #: The module run as the child (``python -m MODULE SERVER APP``).
    module = "tests.servers"

    def __init__(self, server: str, app: str, *, env: dict[str, str] | None = None) -> None:
        self.server = server
        self.app = app
        self._env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._stderr = tempfile.TemporaryFile(mode="w+", prefix="wsgi-detach-server-")
        self._final_stderr = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **self._env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, self.server, self.app],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        assert self.proc.stdout is not None
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("LISTENING "):
                self.port = int(line.split()[1])
                return self
        self.stop()
        raise RuntimeError(f"{self.server} serving {self.app} did not start within {timeout}s")

    def stop(self) -> None:
        """Stop the child by its PID; keep what it printed to stderr, close the files."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if not self._stderr.closed:
            self._final_stderr = self.stderr_text()
            self._stderr.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_text(self) -> str:
        """What the server printed to stderr so far (its tracebacks, warnings)."""
        if self._stderr.closed:
            return self._final_stderr
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def validation_problems(self) -> list[str]:
        """Lines where wsgiref.validate objected (AssertionError) or warned (WSGIWarning)."""
        return [
            line
            for line in self.stderr_text().splitlines()
            if "AssertionError" in line or "WSGIWarning" in line
        ]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _load(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve_pywsgi(app: Any) -> None:
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    print(f"LISTENING {server.server_port}", flush=True)

    import gevent

    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def _serve_wsgiref(app: Any) -> None:
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class ThreadingServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server(
        "127.0.0.1", 0, app, server_class=ThreadingServer, handler_class=QuietHandler
    )
    print(f"LISTENING {server.server_port}", flush=True)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever(poll_interval=0.05)


def main(argv: list[str]) -> None:
    server, spec = argv
    if server == "pywsgi-patched":
        from gevent import monkey

        monkey.patch_all()
    import warnings
    from wsgiref.validate import WSGIWarning, validator

    # A validator warning becomes an exception in the server, which logs it
    # to stderr, where ServerProcess.validation_problems() finds it.
    warnings.simplefilter("error", WSGIWarning)
    app = validator(_load(spec))
    if server in ("pywsgi", "pywsgi-patched"):
        _serve_pywsgi(app)
    elif server == "wsgiref":
        _serve_wsgiref(app)
    else:
        raise SystemExit(f"unknown server {server!r}; choose from {', '.join(SERVERS)}")


if __name__ == "__main__":
    main(sys.argv[1:])
