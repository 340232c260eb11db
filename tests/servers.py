"""Real WSGI servers in subprocesses on 127.0.0.1, for the integration tests.

Run as ``python -m tests.servers SERVER MODULE:APP``: the child imports the app,
wraps it in ``wsgiref.validate.validator`` (PEP 3333 conformance is checked on
every request; a violation raises in the server and breaks the test), binds an
ephemeral port on 127.0.0.1, prints ``LISTENING <port>`` and serves until
SIGTERM. The parent side is :class:`ServerProcess`, which starts the child,
waits (bounded) for that line and stops it by its PID.

Servers: ``pywsgi`` (gevent.pywsgi, unpatched), ``pywsgi-patched`` (after
``gevent.monkey.patch_all()``, done before anything else is imported),
``pywsgi-detach`` (pywsgi with wsgi_detach's ``DetachHandler``, which
exposes the socket to the disconnect watcher and sets ``TCP_NODELAY``),
``wsgiref`` (stdlib, one thread per request), ``gunicorn-gevent`` and
``gunicorn-gthread`` (one worker; the child is the arbiter, which forks the
worker that loads the app and prints the port), ``waitress`` (with
``channel_request_lookahead=1``, without which waitress never sets
``waitress.client_disconnected``), ``cheroot``.

Besides the app, every child serves ``/_server`` (outside the validator): its
PID (the worker's, under gunicorn), RSS, live greenlets and threads, unclosed
``DetachedBody`` objects, and every PEP 3333 violation ``wsgiref.validate``
reported so far, plus hop-by-hop response headers, which the validator lets
through. Violations are caught wherever they surface: raised from the
app call, from iteration or ``close()``, as warnings (made errors), or from ``__del__`` (an
iterator collected unclosed), so a server that swallows them cannot hide them.
The validator's wrapper hides the app iterable's ``len()``; the server still
sees it, so a lying ``len()`` breaks here as it would in production.
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

SERVERS = (
    "pywsgi",
    "pywsgi-patched",
    "pywsgi-detach",
    "gunicorn-gevent",
    "gunicorn-gthread",
    "waitress",
    "wsgiref",
    "cheroot",
)

#: How many requests a threaded server handles at once: enough for the
#: matrix's concurrent cases and for the soak test's bursts.
THREADS = 64


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

    def info(self) -> dict[str, Any]:
        """The child's ``/_server`` report (see the module docstring)."""
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/_server", timeout=10) as response:
                result: dict[str, Any] = json.load(response)
        except OSError as exc:
            raise RuntimeError(self.post_mortem(f"/_server failed: {exc}")) from exc
        return result

    def post_mortem(self, what: str) -> str:
        """``what``, with the child's exit status and the end of its stderr."""
        code = None if self.proc is None else self.proc.poll()
        tail = "\n".join(self.stderr_text().splitlines()[-30:])
        return f"{what}; {self.server} exit status {code}; its stderr ends:\n{tail}"

    def stop(self) -> None:
        """Stop the child by its PID; keep what it printed to stderr, close the files."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # gunicorn's arbiter stops gracefully on SIGTERM, waiting for open
            # streams to end; SIGINT is its quick shutdown.
            quick = signal.SIGINT if self.server.startswith("gunicorn-") else signal.SIGTERM
            proc.send_signal(quick)
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
        """Lines where wsgiref.validate objected (AssertionError) or warned (WSGIWarning).

        Also the child's own ``WSGI VIOLATION`` lines (see ``/_server``).
        """
        return [
            line
            for line in self.stderr_text().splitlines()
            if "AssertionError" in line or "WSGIWarning" in line or "WSGI VIOLATION" in line
        ]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _load(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


_violations: list[str] = []


def _violation(message: str) -> None:
    _violations.append(message)
    print(f"WSGI VIOLATION: {message}", file=sys.stderr, flush=True)


def _describe(glet: Any) -> str:
    """What a live greenlet runs, for telling a leak from the server's own."""
    run = getattr(glet, "_run", None) or getattr(glet, "run", None)
    name = getattr(run, "__qualname__", None) or type(glet).__name__
    frame = glet.gr_frame
    return f"{name} at {frame.f_code.co_name}" if frame is not None else name


def _server_report() -> dict[str, Any]:
    import gc
    import threading

    import psutil
    from greenlet import greenlet

    gc.collect()
    objects = gc.get_objects()
    live = [o for o in objects if isinstance(o, greenlet) and bool(o)]
    try:
        from wsgi_detach import DetachedBody
    except ImportError:  # pragma: no cover - the package is always importable here
        open_bodies = -1
    else:
        open_bodies = sum(1 for o in objects if isinstance(o, DetachedBody) and not o.closed)
    return {
        "pid": os.getpid(),
        "rss": psutil.Process().memory_info().rss,
        # A greenlet that is neither dead nor never started is parked somewhere.
        "greenlets": len(live),
        "greenlet_kinds": sorted(_describe(g) for g in live),
        "threads": threading.active_count(),
        "open_bodies": open_bodies,
        "violations": list(_violations),
    }


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def _hop_by_hop_checked(start_response: Any) -> Any:
    def start_checked(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        # wsgiref.validate lets hop-by-hop headers through; PEP 3333 does not
        # ("Other HTTP Features"), and a server may or may not complain.
        for name, _ in headers:
            if name.lower() in _HOP_BY_HOP:
                _violation(f"hop-by-hop header {name!r} in the response")
        return start_response(status, headers, *exc_info)

    return start_checked


def _instrument(app: Any) -> Any:
    """Wrap ``app`` in wsgiref.validate, record its complaints, serve ``/_server``."""
    import json
    import warnings
    from wsgiref.validate import WSGIWarning, validator

    # A validator warning becomes an exception in the server, so that it
    # cannot pass unnoticed; it is recorded like an AssertionError.
    warnings.simplefilter("error", WSGIWarning)
    problems = (AssertionError, WSGIWarning)

    def unraisable(info: Any) -> None:
        if isinstance(info.exc_value, problems):
            _violation(f"{info.exc_value!r} in {info.object!r}")
        else:
            sys.__unraisablehook__(info)

    sys.unraisablehook = unraisable

    class Checked:
        """Passes the validator's iterator through, noting what it objects to."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self._it = iter(inner)

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> bytes:
            try:
                chunk: bytes = next(self._it)
            except problems as exc:
                _violation(f"{exc!r} while iterating")
                raise
            return chunk

        def close(self) -> None:
            try:
                self._inner.close()
            except problems as exc:
                _violation(f"{exc!r} in close()")
                raise

    class CheckedSized(Checked):
        """For an app iterable with ``__len__``, which the validator's wrapper hides.

        pywsgi, waitress and wsgiref derive Content-Length from ``len()``
        (PEP 3333 "Handling the Content-Length Header"); a test harness that
        hid it would hide exactly the bug a lying ``len()`` causes.
        """

        def __init__(self, inner: Any, original: Any) -> None:
            super().__init__(inner)
            self._original = original

        def __len__(self) -> int:
            return len(self._original)

    def instrumented(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/_server":
            data = json.dumps(_server_report()).encode()
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
            )
            return [data]
        returned: list[Any] = []

        def capture(environ: dict[str, Any], start_response: Any) -> Any:
            result = app(environ, start_response)
            returned.append(result)
            return result

        try:
            result = validator(capture)(environ, _hop_by_hop_checked(start_response))
        except problems as exc:
            _violation(f"{exc!r} calling the app")
            raise
        if hasattr(returned[0], "__len__"):
            return CheckedSized(result, returned[0])
        return Checked(result)

    return instrumented


def _listening(port: int) -> None:
    print(f"LISTENING {port}", flush=True)


def _serve_pywsgi(app: Any, handler: str) -> None:
    from gevent.pywsgi import WSGIHandler, WSGIServer

    handler_class = WSGIHandler
    if handler == "detach":
        from wsgi_detach import DetachHandler as handler_class

    server = WSGIServer(("127.0.0.1", 0), app, log=None, handler_class=handler_class)
    server.start()
    _listening(server.server_port)

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
    _listening(server.server_port)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever(poll_interval=0.05)


def _serve_waitress(app: Any) -> None:
    import waitress

    server = waitress.create_server(
        app,
        host="127.0.0.1",
        port=0,
        threads=THREADS,
        # Without lookahead waitress never reads from a busy channel, so it
        # cannot see the client leave and never sets client_disconnected.
        channel_request_lookahead=1,
        connection_limit=2000,
        backlog=2048,
    )
    _listening(server.effective_port)  # type: ignore[union-attr]
    server.run()  # SIGTERM's default action ends the process


def _serve_cheroot(app: Any) -> None:
    from cheroot import wsgi

    server = wsgi.Server(
        ("127.0.0.1", 0), app, numthreads=THREADS, max=THREADS, request_queue_size=2048
    )
    server.prepare()
    _listening(server.bind_addr[1])
    server.serve()  # SIGTERM's default action ends the process


def _serve_gunicorn(spec: str, worker: str) -> None:
    from gunicorn.app.base import BaseApplication

    options: dict[str, Any] = {
        "bind": "127.0.0.1:0",
        "workers": 1,
        "worker_class": worker,
        "threads": THREADS,
        "worker_connections": 4096,
        "backlog": 2048,
        "graceful_timeout": 2,
        "loglevel": "warning",
        "accesslog": None,
        # The worker (not the arbiter) says where it listens once it has
        # loaded the app: a request sent after that line is served at once.
        "post_worker_init": lambda w: _listening(w.sockets[0].getsockname()[1]),
    }

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            # In the worker, after the gevent worker monkey-patched.
            return _instrument(_load(spec))

    Application().run()


def main(argv: list[str]) -> None:
    server, spec = argv
    if server == "pywsgi-patched":
        from gevent import monkey

        monkey.patch_all()
    if server.startswith("gunicorn-"):
        _serve_gunicorn(spec, server.partition("-")[2])
        return
    if server not in SERVERS:
        raise SystemExit(f"unknown server {server!r}; choose from {', '.join(SERVERS)}")
    app = _instrument(_load(spec))
    if server.startswith("pywsgi"):
        _serve_pywsgi(app, server.partition("-")[2])
    elif server == "wsgiref":
        _serve_wsgiref(app)
    elif server == "waitress":
        _serve_waitress(app)
    else:
        _serve_cheroot(app)


if __name__ == "__main__":
    main(sys.argv[1:])
