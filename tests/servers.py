"""Real WSGI servers in subprocesses on 127.0.0.1: the one launcher every server test uses.

Run as ``python -m tests.servers KIND MODULE:APP``: the child imports the app,
wraps it in ``wsgiref.validate.validator`` (PEP 3333 conformance is checked on
every request; a violation raises in the server and breaks the test), binds an
ephemeral port on 127.0.0.1, prints ``LISTENING <port>`` once a request sent
after it is served at once, and serves until SIGTERM. The parent side is
:class:`ServerProcess` (or :func:`serve`, which also asserts at the end that
the validator objected to nothing): the public testing kit's
``ProcessServer``, which starts the child, waits (bounded) for that line and
stops it by its PID.

Server kinds (:data:`SERVERS`): gevent.pywsgi plain, monkey-patched, with
``DetachHandler`` and as ``wsgi_detach.make_server`` builds it (with and
without ``TCP_NODELAY``); gunicorn's gevent and gthread workers (one worker:
the child is the arbiter, which forks the worker that loads the app and
prints the port), each also with ``-drain`` (a ``post_worker_init`` hook
calls ``drain_on_signal(0.5, b"bye")`` on the app, which must be a
``DetachMiddleware``); waitress (with ``channel_request_lookahead=1``,
without which waitress never sets ``waitress.client_disconnected``);
threaded wsgiref; cheroot.

Besides the app, every child (but the bare and the command kinds below) serves
``/_server`` (outside the validator): its PID (the worker's, under gunicorn),
RSS, live greenlets and threads, unclosed ``DetachedBody`` objects, how many
unreachable objects a ``gc.collect()`` freed (the reference cycles left since
the last report), and every PEP 3333 violation ``wsgiref.validate`` reported
so far, plus hop-by-hop response headers, which the validator lets through.
Violations are caught wherever they surface: raised from the app call, from
iteration or ``close()``, as warnings (made errors), or from ``__del__`` (an
iterator collected unclosed), so a server that swallows them cannot hide them.
The validator's wrapper hides the app iterable's ``len()``; the server still
sees it, so a lying ``len()`` breaks here as it would in production.

Two kinds are served bare, for the byte-for-byte comparison of the write
path (tests/wire_apps.py): ``pywsgi-plain`` and ``detach-handler`` have no
validator and no ``/_server``, because the validator wraps the body iterable
and so would hide it from the handler, skipping the very write paths under
test.

Two kinds are not ours: ``serve-command`` and ``demo-command`` run ``python
-m wsgi_detach serve`` and ``... demo`` themselves (the CLI under test,
tests/test_cli.py), so they have no validator and no ``/_server``;
ServerProcess only starts them, reads the port from their ``wsgi_detach:
serving ... on http://127.0.0.1:PORT`` line and stops them.

Not for in-process tests, which call the app directly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from tests.client import get_json
from wsgi_detach.testing import ProcessServer

ROOT = Path(__file__).resolve().parent.parent

#: Every server kind, and what it is.
SERVERS: dict[str, str] = {
    "pywsgi": "gevent.pywsgi, not monkey-patched",
    "pywsgi-patched": "gevent.pywsgi after gevent.monkey.patch_all(), done before any import",
    "pywsgi-detach": "gevent.pywsgi with wsgi_detach.DetachHandler (socket in the environ, "
    "TCP_NODELAY); the app served as it is",
    "detach-server": "wsgi_detach.make_server(app, grace=0.5): DetachHandler, TCP_NODELAY, "
    "a stop() (on SIGTERM) that drains, then serve_forever() returns; the app wrapped in "
    "DetachMiddleware unless it is one; env TEST_GRACE sets another grace, env "
    "TEST_SERVER_OPTIONS more make_server options (JSON)",
    "detach-server-delay": "detach-server without TCP_NODELAY, for the comparison",
    "pywsgi-plain": "gevent.pywsgi as it comes, WITHOUT the validator and /_server (the "
    "validator would hide the body iterable from the handler): tests/wire_apps.py's reference",
    "detach-handler": "pywsgi-plain with wsgi_detach.DetachHandler, counting its sends into "
    "tests.wire_apps.SENDS; also WITHOUT the validator and /_server",
    "detach-handler-stock": "detach-handler with the speed-ups off (pywsgi's own request path)",
    "gunicorn-gevent": "gunicorn, one gevent worker",
    "gunicorn-gthread": "gunicorn, one gthread worker",
    "gunicorn-gevent-drain": "gunicorn-gevent; the worker calls app.drain_on_signal(0.5, b'bye')",
    "gunicorn-gthread-drain": "gunicorn-gthread; the worker calls app.drain_on_signal(0.5, b'bye')",
    "waitress": "waitress with channel_request_lookahead=1",
    "wsgiref": "wsgiref.simple_server, one thread per request",
    "cheroot": "cheroot's thread-pool server",
    "serve-command": "python -m wsgi_detach serve APP --port 0 --no-access-log ARGS: the CLI "
    "under test, as a user runs it (not instrumented: no validator, no /_server)",
    "demo-command": "python -m wsgi_detach demo --port 0 --no-access-log ARGS (app: ''): the "
    "chat demo as a user runs it, likewise not instrumented",
}

#: The environment of every child: this checkout importable, output unbuffered.
CHILD_ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

#: The line a child prints once it serves: ours, or the serve command's.
_READY = re.compile(r"^(?:LISTENING |wsgi_detach: serving .+? on http://127\.0\.0\.1:)(\d+)\b")

#: How many requests a threaded server handles at once: enough for the
#: matrix's concurrent cases and for the soak test's bursts.
THREADS = 64


class ServerProcess(ProcessServer):
    """A WSGI server of kind ``server`` (see :data:`SERVERS`) in a child process.

    The public testing kit's :class:`~wsgi_detach.testing.ProcessServer`
    (start, bounded wait for the ready line, stop by PID, the child's log),
    with this suite's own children: ``python -m tests.servers KIND APP``, or
    the CLI under test for the ``*-command`` kinds. Use as a context
    manager, or ``start()`` and ``stop()``; ``port`` and ``url`` say where it
    listens, ``proc`` is the child (to signal it). ``args`` are command-line
    arguments for the ``*-command`` kinds.
    """

    #: Every ServerProcess started in this test process, in order (for the
    #: failure reports in tests/conftest.py, which show their stderr).
    launched: ClassVar[list[ServerProcess]] = []  # type: ignore[assignment]
    KINDS = SERVERS
    READY = _READY
    cwd = str(ROOT)

    def __init__(
        self,
        server: str,
        app: str,
        *,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        if args and not server.endswith("-command"):
            raise ValueError(f"args are for the *-command kinds, not {server!r}")
        if (server == "demo-command") != (app == ""):
            raise ValueError("the demo-command kind, and only it, takes no app: pass ''")
        super().__init__(server, app, env=dict(CHILD_ENV, **(env or {})))
        self._args = list(args)

    def command(self) -> list[str]:
        if self.server.endswith("-command"):
            command = self.server.removesuffix("-command")
            app = [self.app] if self.app else []
            return [sys.executable, "-m", "wsgi_detach", command, *app, *self._args,
                    "--port", "0", "--no-access-log"]
        return [sys.executable, "-m", "tests.servers", self.server, str(self.app)]

    def info(self) -> dict[str, Any]:
        """The child's ``/_server`` report (see the module docstring)."""
        try:
            result: dict[str, Any] = get_json(self.port, "/_server")
        except (OSError, AssertionError) as exc:
            raise RuntimeError(self.post_mortem(f"/_server failed: {exc!r}")) from exc
        return result

    def stderr_text(self) -> str:
        """What the server printed to stderr so far (its tracebacks, warnings)."""
        return self.log()

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

    def start(self, timeout: float = 20.0) -> ServerProcess:
        super().start(timeout)
        return self


@contextmanager
def serve(
    server: str, app: str, *, env: dict[str, str] | None = None, args: Sequence[str] = ()
) -> Iterator[ServerProcess]:
    """A started :class:`ServerProcess`; on leaving, stopped, and its validation checked.

    For module-scoped fixtures: after the last test of the module (the block
    left without an exception), asserts that ``wsgiref.validate`` objected to
    nothing the whole time the server ran.
    """
    with ServerProcess(server, app, env=env, args=args) as process:
        yield process
    problems = process.validation_problems()
    assert not problems, f"wsgiref.validate objected on {server} serving {app}: {problems}"


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

    # Unreachable objects the collector freed since the last report: what
    # reference cycles the requests in between left behind.
    garbage = gc.collect()
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
        "garbage": garbage,
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


def _serve_pywsgi(app: Any, kind: str) -> None:
    import gevent
    from gevent.pywsgi import WSGIHandler, WSGIServer

    if kind.startswith("detach-server"):
        from wsgi_detach import make_server

        grace = float(os.environ.get("TEST_GRACE", "0.5"))
        options = json.loads(os.environ.get("TEST_SERVER_OPTIONS", "{}"))
        server = make_server(
            app, "127.0.0.1", 0, nodelay=kind == "detach-server", grace=grace, log=None,
            **options,
        )
        # The validator goes in front of the middleware (it checks what the
        # server gets), not between make_server and the app it configures.
        server.application = _instrument(server.middleware)
    else:
        handler_class = WSGIHandler
        if kind == "pywsgi-detach":
            from wsgi_detach import DetachHandler as handler_class
        server = WSGIServer(
            ("127.0.0.1", 0), _instrument(app), log=None, handler_class=handler_class
        )
    server.start()
    _listening(server.server_port)
    gevent.signal_handler(signal.SIGTERM, server.stop)  # DetachServer.stop drains first
    server.serve_forever()


def _serve_wire(app: Any, kind: str) -> None:
    """``pywsgi-plain`` or ``detach-handler``: no validator, no ``/_server`` (see above)."""
    import gevent
    from gevent.pywsgi import WSGIServer

    from tests import wire_apps
    from wsgi_detach._server import handler_class

    class CountingHandler(handler_class(speedups=kind == "detach-handler")):  # type: ignore[misc]
        def _sendall(self, data: bytes) -> None:
            wire_apps.SENDS[0] += 1
            super()._sendall(data)

        # Any chunk takes the direct path, so that the corpus' huge chunk
        # exercises a partial direct send.
        direct_max = 1 << 30

        def _send_for(self, body: Any) -> None:  # the direct path's sends
            before = self.response_length
            super()._send_for(body)
            if self.response_length != before:
                wire_apps.SENDS[0] += 1

    kwargs: dict[str, Any] = {} if kind == "pywsgi-plain" else {"handler_class": CountingHandler}
    server = WSGIServer(("127.0.0.1", 0), app, log=None, **kwargs)
    server.start()
    _listening(server.server_port)
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


def _serve_gunicorn(spec: str, kind: str) -> None:
    from gunicorn.app.base import BaseApplication

    def post_worker_init(worker: Any) -> None:
        if kind.endswith("-drain"):
            # What README.md shows (there worker.wsgi is the middleware; here
            # the validator wraps it, so it is looked up by name).
            _load(spec).drain_on_signal(0.5, b"bye")
        # The worker (not the arbiter) says where it listens once it has
        # loaded the app: a request sent after that line is served at once.
        _listening(worker.sockets[0].getsockname()[1])

    options: dict[str, Any] = {
        "bind": "127.0.0.1:0",
        # One worker unless the test asks for more (the scale-out tests).
        "workers": int(os.environ.get("WSGI_DETACH_TEST_WORKERS", "1")),
        "worker_class": kind.split("-")[1],
        "threads": THREADS,
        "worker_connections": 4096,
        "backlog": 2048,
        "graceful_timeout": 2,
        "loglevel": "warning",
        "accesslog": None,
        "post_worker_init": post_worker_init,
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
    kind, spec = argv
    if "TEST_LOG_LEVEL" in os.environ:  # wsgi_detach's log lines on stderr, for the test to read
        import logging

        logging.basicConfig(level=os.environ["TEST_LOG_LEVEL"],
                            format="%(levelname)s %(name)s: %(message)s")
    if kind.endswith("-command"):
        raise SystemExit(f"{kind} is python -m wsgi_detach itself; ServerProcess runs it")
    if kind not in SERVERS:
        raise SystemExit(f"unknown server {kind!r}; choose from {', '.join(SERVERS)}")
    if kind == "pywsgi-patched":
        from gevent import monkey

        monkey.patch_all()
    if kind in ("pywsgi-plain", "detach-handler", "detach-handler-stock"):
        _serve_wire(_load(spec), kind)
    elif kind.startswith("gunicorn-"):
        _serve_gunicorn(spec, kind)
    elif kind.startswith(("pywsgi", "detach-server")):
        _serve_pywsgi(_load(spec), kind)
    elif kind == "wsgiref":
        _serve_wsgiref(_instrument(_load(spec)))
    elif kind == "waitress":
        _serve_waitress(_instrument(_load(spec)))
    else:
        _serve_cheroot(_instrument(_load(spec)))


if __name__ == "__main__":
    main(sys.argv[1:])
