"""Serve a WSGI app on a real server on 127.0.0.1 for the duration of a test.

:func:`serve` starts the server of your choice (:data:`SERVERS`) on a free
loopback port, in a thread of the test process or in a subprocess, waits
(bounded) until it accepts connections, and stops it when the block ends --
a subprocess by its PID. The app is wrapped in an
:class:`~wsgi_detach.testing.Observer`, so that the test can ask what the
server side saw (:meth:`LiveServer.wait_closed`, :meth:`LiveServer.stats`).
What the server logged is kept (:meth:`LiveServer.log`) and shown when it
does not start (:class:`ServerDidNotStart`) or, under the pytest plugin,
when a test that used it fails.

Thread or subprocess: a thread starts in milliseconds and lets the test
reach the app's objects (a hub to publish to); a subprocess isolates the
server (its own gevent hub, its own monkey-patching, gunicorn's
arbiter/worker split) and is the only way to run gunicorn. In a thread, a
gevent server gets a gevent hub of its own, so the test process needs no
monkey-patching; in a monkey-patched test process the "thread" is a
greenlet, which works the same.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import IO, TYPE_CHECKING, Any, Callable, ClassVar, Union

from .._middleware import DetachMiddleware, DetachStats
from ._client import CLIENT_ID_HEADER, Stream, get_json, wait_until
from ._observe import CONTROL_PREFIX, Exchange, Observer

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

__all__ = [
    "SERVERS",
    "LiveServer",
    "ProcessServer",
    "ServerDidNotStart",
    "ThreadServer",
    "serve",
]

#: Every server the kit runs, and what it is.
SERVERS: dict[str, str] = {
    "pywsgi-detach": "gevent.pywsgi.WSGIServer with wsgi_detach.DetachHandler (disconnects "
    "noticed at once, TCP_NODELAY); the app served as it is",
    "detach-server": "wsgi_detach.make_server: DetachHandler, the app behind DetachMiddleware "
    "(unless it is one), a stop() that drains for `grace` seconds",
    "pywsgi": "gevent.pywsgi.WSGIServer as it comes",
    "gunicorn-gevent": "gunicorn, one gevent worker (subprocess only)",
    "gunicorn-gthread": "gunicorn, one gthread worker (subprocess only)",
    "waitress": "waitress, with channel_request_lookahead=1 (without which it never notices "
    "a client that left)",
    "wsgiref": "the standard library's wsgiref.simple_server, one thread per request",
}

#: Servers that only run in a subprocess: gunicorn forks its worker.
PROCESS_ONLY = frozenset({"gunicorn-gevent", "gunicorn-gthread"})

#: Worker threads of the threaded servers: enough for a test's concurrent streams.
THREADS = 32

#: The line a server subprocess prints once it accepts connections.
_READY = re.compile(r"^LISTENING (\d+)\s*$")

#: An app for a server: the app itself, or ``"module:name"`` to import.
AppSpec = Union[str, "WSGIApplication"]


#: A small ``send_buffer`` for :func:`serve` (Linux doubles it): with a client
#: that stalls with ``small_buffer=True``, about 14 KiB reach the socket
#: buffers before the server's writes block.
SMALL_SNDBUF = 4096


class ServerDidNotStart(RuntimeError):
    """The server did not accept connections within the bound, or exited first.

    Caused by the app or the server (an import error, a port, a crash); the
    message carries the server's log.
    """


def load(spec: str) -> Any:
    """``"package.module:name"`` -> the object (``name`` may be dotted)."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expected 'module:name', got {spec!r}")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class LiveServer:
    """A running server: where it listens, what it saw, what it logged.

    Made by :func:`serve`; :class:`ThreadServer` and :class:`ProcessServer`
    are the two kinds. Every ``wait_*`` is bounded and raises
    :class:`~wsgi_detach.testing.WaitTimeout` with what it saw.
    """

    #: Every server started in this process, in order; the pytest plugin
    #: empties it before each test (so that a long suite does not keep every
    #: server and its log) and shows the logs of those a failed test started.
    launched: ClassVar[list[LiveServer]] = []
    #: The server kinds this class runs.
    KINDS: ClassVar[Mapping[str, str]] = SERVERS

    def __init__(self, server: str, app: AppSpec) -> None:
        if server not in self.KINDS:
            raise ValueError(f"unknown server {server!r}; choose from {', '.join(self.KINDS)}")
        self.server = server
        self.app = app
        self.host = "127.0.0.1"
        self.port = 0
        self.running = False

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> LiveServer:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log(self) -> str:
        """What the server logged so far (its errors, tracebacks, warnings)."""
        raise NotImplementedError

    def post_mortem(self, what: str) -> str:
        """``what``, followed by the end of the server's log."""
        tail = "\n".join(self.log().splitlines()[-40:]) or "(nothing)"
        return f"{what}; {self.server} serving {self._app_name()} logged:\n{tail}"

    def _app_name(self) -> str:
        return self.app if isinstance(self.app, str) else repr(self.app)

    # ------------------------------------------------------------------ what it saw

    def exchanges(self, path: str | None = None) -> list[Exchange]:
        """Every request the app got so far (optionally only for ``path``), oldest first."""
        raise NotImplementedError

    def stats(self) -> DetachStats:
        """The app's :meth:`DetachMiddleware.stats` (the app, or detach-server's middleware).

        Raises:
            LookupError: the app is not behind a DetachMiddleware.
        """
        raise NotImplementedError

    def exchange(self, stream: Stream | str, timeout: float = 5.0) -> Exchange:
        """The exchange a :class:`~wsgi_detach.testing.Stream` (or its ``client_id``) made."""
        client_id = stream if isinstance(stream, str) else stream.client_id
        found: list[Exchange] = []

        def seen() -> bool:
            found[:] = [e for e in self.exchanges() if e.client_id == client_id]
            return bool(found)

        wait_until(seen, timeout, message=lambda: self.post_mortem(
            f"the app got no request from stream {client_id} ({CLIENT_ID_HEADER})"))
        return found[0]

    def wait_closed(
        self,
        target: Stream | str | None = None,
        *,
        timeout: float = 5.0,
        outcome: str | None = None,
    ) -> Exchange:
        """Wait until the server closed a response and every body behind it closed.

        ``target``: a :class:`~wsgi_detach.testing.Stream` (its own exchange),
        a path (its oldest exchange not yet closed when the wait began, or its
        last one), or ``None`` (the latest exchange). With ``outcome``, also
        assert the body's outcome (``"finished"``, ``"failed"``,
        ``"timed_out"``, ``"disconnected"``).

        Returns the closed :class:`Exchange` (``closed_at``, ``outcome``,
        ``on_close_at``...).
        """
        exchange = self._pick(target, timeout)
        number = exchange.number
        latest: list[Exchange] = [exchange]

        def closed() -> bool:
            latest[:] = [e for e in self.exchanges() if e.number == number]
            return latest[0].closed

        wait_until(closed, timeout, message=lambda: self.post_mortem(
            f"{exchange.method} {exchange.path} was not closed: {latest[0]}"))
        done = latest[0]
        if outcome is not None and done.outcome != outcome:
            raise AssertionError(f"{done.method} {done.path} ended {done.outcome!r}, "
                                 f"expected {outcome!r}: {done}")
        return done

    def _pick(self, target: Stream | str | None, timeout: float) -> Exchange:
        if isinstance(target, Stream):
            return self.exchange(target, timeout)
        found: list[Exchange] = []

        def seen() -> bool:
            found[:] = [e for e in self.exchanges() if target is None or e.path == target]
            return bool(found)

        wait_until(seen, timeout, message=lambda: self.post_mortem(
            f"the app got no request for {target or 'any path'}"))
        open_ones = [e for e in found if not e.closed]
        if target is None:
            return found[-1]
        return open_ones[0] if open_ones else found[-1]

    def wait_idle(self, timeout: float = 5.0) -> DetachStats:
        """Wait until ``stats()`` shows no open detached response and no buffered byte.

        Returns the last stats; :class:`~wsgi_detach.testing.WaitTimeout` shows them.
        """
        last: list[DetachStats] = [self.stats()]

        def idle() -> bool:
            last[0] = self.stats()
            return last[0].open == 0 and last[0].buffered == 0

        wait_until(idle, timeout, message=lambda: self.post_mortem(
            f"stats() did not return to zero: {last[0]}"))
        return last[0]

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"on {self.url}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.server} {self._app_name()} {state}>"


# ---------------------------------------------------------------------- in a thread


class _LogBuffer(logging.Handler):
    """A thread-safe text buffer: the server's error stream and a logging handler."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._parts: list[str] = []
        self._guard = threading.Lock()

    def write(self, text: str) -> int:
        with self._guard:
            self._parts.append(text)
        return len(text)

    def writelines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record) + "\n")

    def text(self) -> str:
        with self._guard:
            return "".join(self._parts)


#: The loggers whose records a thread server's log collects.
_LOGGERS = ("wsgi_detach", "waitress", "gunicorn.error")


class _Runner:
    """Runs one server kind: ``run`` serves in the calling thread, ``stop`` from any other."""

    def __init__(self, app: WSGIApplication, kind: str, log: Any, grace: float,
                 send_buffer: int = 0) -> None:
        self.app = app
        self.kind = kind
        self.log = log
        self.grace = grace
        self.send_buffer = send_buffer

    def limit(self, listener: socket.socket) -> None:
        """Set ``SO_SNDBUF`` on the listening socket; accepted connections inherit it.

        Set, it also stops the kernel from growing the buffer by itself: on
        loopback an unset send buffer grows to megabytes under a reader that
        stalls.
        """
        if self.send_buffer:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)

    def run(self, ready: Callable[[int], None]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _GeventRunner(_Runner):
    def run(self, ready: Callable[[int], None]) -> None:
        import gevent
        from gevent.pool import Pool
        from gevent.pywsgi import WSGIServer

        hub = gevent.get_hub()
        server: Any
        if self.kind == "detach-server":
            from .._server import make_server

            # The observer goes in front of the middleware make_server
            # configures (as the server's application), not around a second one.
            middleware: DetachMiddleware = self.app.middleware  # type: ignore[attr-defined]
            server = make_server(middleware, "127.0.0.1", 0, grace=self.grace, log=self.log)
            server.application = self.app
            server.error_log = self.log
        else:
            kwargs: dict[str, Any] = {}
            if self.kind == "pywsgi-detach":
                from .._server import DetachHandler

                kwargs["handler_class"] = DetachHandler
            # A pool, so that stop() ends the handlers of open streams (their
            # responses are closed) instead of leaving them to a dead loop.
            server = WSGIServer(("127.0.0.1", 0), self.app, log=self.log, error_log=self.log,
                                spawn=Pool(), **kwargs)
            server.stop_timeout = self.grace
        watcher = hub.loop.async_()
        # stop() comes from another thread: an async watcher is the loop's
        # thread-safe door. Its callback runs in the hub, which must not
        # block: the (draining) stop gets a greenlet.
        watcher.start(lambda: gevent.spawn(server.stop))
        self._watcher = watcher
        try:
            server.start()
            try:
                self.limit(server.socket)
                ready(server.server_port)
            except BaseException:
                server.close()
                raise
            server.serve_forever()
        finally:
            watcher.close()

    def stop(self) -> None:
        self._watcher.send()


class _WsgirefRunner(_Runner):
    def run(self, ready: Callable[[int], None]) -> None:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        log = self.log
        connections: set[socket.socket] = set()
        guard = threading.Lock()

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with guard:
                    connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                with guard:
                    connections.discard(request)
                super().shutdown_request(request)

        class Handler(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.write(f"{self.address_string()} - {format % args}\n")

            def get_stderr(self) -> Any:
                return log

        server = make_server("127.0.0.1", 0, self.app, server_class=Server, handler_class=Handler)

        def stop() -> None:
            server.shutdown()
            # Responses still streaming: end their connections, so that the
            # server's next write fails and it closes their bodies.
            with guard:
                for conn in connections:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        self._stop = stop
        try:
            self.limit(server.socket)
            ready(server.server_port)
            server.serve_forever(poll_interval=0.05)
        finally:
            server.server_close()

    def stop(self) -> None:
        self._stop()


class _WaitressRunner(_Runner):
    def run(self, ready: Callable[[int], None]) -> None:
        import waitress  # type: ignore[import-untyped]

        server: Any = waitress.create_server(
            self.app,
            host="127.0.0.1",
            port=0,
            threads=THREADS,
            # Without lookahead waitress never reads from a busy channel, so
            # it cannot see the client leave and never sets
            # waitress.client_disconnected.
            channel_request_lookahead=1,
        )
        self._server = server
        try:
            self.limit(server.socket)
            ready(server.effective_port)
        except BaseException:
            server.close()
            server.task_dispatcher.shutdown(timeout=2)
            raise
        server.run()  # until the map is empty (see stop)
        server.task_dispatcher.shutdown(timeout=2)

    def stop(self) -> None:
        server = self._server

        def close_all() -> None:
            # In the server's own thread: closing every channel (and the
            # listener and trigger) empties the map, which ends run().
            for dispatcher in list(server._map.values()):
                dispatcher.close()

        server.trigger.pull_trigger(close_all)


_RUNNERS: dict[str, type[_Runner]] = {
    "pywsgi-detach": _GeventRunner,
    "detach-server": _GeventRunner,
    "pywsgi": _GeventRunner,
    "waitress": _WaitressRunner,
    "wsgiref": _WsgirefRunner,
}


def _observed(app: Any, kind: str, wrap: Sequence[Callable[[Any], Any]]) -> tuple[Any, Observer]:
    """The app as the server gets it: observer outermost, then ``wrap``, then the app.

    For ``detach-server`` the middleware goes inside the observer, as
    ``make_server`` would put it around the app.
    """
    middleware = app if isinstance(app, DetachMiddleware) else None
    if kind == "detach-server" and middleware is None:
        middleware = app = DetachMiddleware(app)
    inner = app
    for wrapper in reversed(wrap):
        inner = wrapper(inner)
    observer = Observer(inner, middleware)
    return observer, observer


class _Abandoned(Exception):
    """Raised in a server thread that became ready after start() gave up on it."""


class ThreadServer(LiveServer):
    """A server in a thread of the test process (a greenlet, if it is monkey-patched).

    The app is the object itself, so the test shares its state (publish to
    its hub, look at its middleware). Made by :func:`serve`.
    """

    def __init__(
        self,
        server: str,
        app: AppSpec,
        *,
        wrap: Sequence[Callable[[Any], Any]] = (),
        grace: float = 1.0,
        send_buffer: int = 0,
    ) -> None:
        super().__init__(server, app)
        if server in PROCESS_ONLY:
            raise ValueError(f"{server} runs in a subprocess only: serve(..., process=True)")
        self._wrap = list(wrap)
        self._grace = grace
        self._send_buffer = send_buffer
        self._log = _LogBuffer()
        self._thread: threading.Thread | None = None
        self._runner: _Runner | None = None
        self.observer: Observer | None = None

    def start(self, timeout: float = 20.0) -> ThreadServer:
        type(self).launched.append(self)
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # whatever got started, on every way out (an interrupt too)
            raise

    def _start(self, timeout: float) -> ThreadServer:
        for name in _LOGGERS:
            logging.getLogger(name).addHandler(self._log)
        app = load(self.app) if isinstance(self.app, str) else self.app
        served, self.observer = _observed(app, self.server, self._wrap)
        runner = self._runner = _RUNNERS[self.server](served, self.server, self._log, self._grace,
                                                     self._send_buffer)
        started = threading.Event()
        failed: list[BaseException] = []
        guard = threading.Lock()
        abandoned = threading.Event()
        ports: list[int] = []

        def ready(port: int) -> None:
            # Once start() has given up, the server closes instead of serving:
            # nothing would ever stop it.
            with guard:
                if abandoned.is_set():
                    raise _Abandoned
                ports.append(port)
            started.set()

        def run() -> None:
            try:
                runner.run(ready)
            except _Abandoned:
                self._log.write("the server closed: start() had given up on it\n")
            except BaseException as exc:
                failed.append(exc)
                self._log.write(f"the server thread raised {exc!r}\n")
                started.set()
                raise

        self._thread = threading.Thread(target=run, name=f"wsgi_detach.testing {self.server}",
                                        daemon=True)
        self._thread.start()
        try:
            started.wait(timeout)
        finally:
            with guard:
                abandoned.set()
                self.running = bool(ports) and not failed
        if not self.running:
            what = f"raised {failed[0]!r}" if failed else f"did not start within {timeout}s"
            raise ServerDidNotStart(self.post_mortem(f"{self.server} {what}"))
        self.port = ports[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, end the open connections, wait for the server's thread (bounded)."""
        thread, runner = self._thread, self._runner
        try:
            if self.running and thread is not None and runner is not None:
                self.running = False
                runner.stop()
                thread.join(timeout)
                if thread.is_alive():
                    raise RuntimeError(self.post_mortem(
                        f"{self.server} did not stop within {timeout}s"))
        finally:
            self._detach_log()

    def _detach_log(self) -> None:
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(self._log)

    def log(self) -> str:
        return self._log.text()

    def exchanges(self, path: str | None = None) -> list[Exchange]:
        if self.observer is None:
            return []
        return [e for e in self.observer.exchanges() if path is None or e.path == path]

    def stats(self) -> DetachStats:
        stats = None if self.observer is None else self.observer.stats()
        if stats is None:
            raise LookupError(f"{self._app_name()} is not a DetachMiddleware; serve it wrapped "
                              "in one (or on detach-server) to read stats()")
        return stats


# ---------------------------------------------------------------------- in a subprocess


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a server subprocess: this process's import path, unbuffered output."""
    paths = [os.path.abspath(p or os.curdir) for p in sys.path if os.path.isdir(p or os.curdir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


class ProcessServer(LiveServer):
    """A server in a child process, started with the test's import path; stopped by its PID.

    The app must be importable in the child: pass ``"module:name"`` (or a
    module-level app, which is turned into that). What the server saw and
    its stats are read over HTTP from the observer (:data:`CONTROL_PREFIX`);
    its stdout and stderr are its log. Made by :func:`serve`.

    Subclasses may override :meth:`command` to start another child that
    prints a line matching :attr:`READY` once it accepts connections.
    """

    #: The line the child prints once it accepts connections; group 1: the port.
    READY: ClassVar[re.Pattern[str]] = _READY
    #: The child's working directory (``None``: this process's).
    cwd: str | None = None

    def __init__(
        self,
        server: str,
        app: AppSpec,
        *,
        wrap: Sequence[str] = (),
        grace: float = 1.0,
        monkey_patch: bool = False,
        env: dict[str, str] | None = None,
        send_buffer: int = 0,
    ) -> None:
        if not isinstance(app, str):
            app = _spec_of(app)
        if send_buffer and server.startswith("gunicorn-"):
            raise ValueError("send_buffer is not available on gunicorn (its workers listen)")
        super().__init__(server, app)
        self._wrap = list(wrap)
        self._grace = grace
        self._send_buffer = send_buffer
        self._monkey_patch = monkey_patch
        self._env = env
        self.proc: subprocess.Popen[str] | None = None
        self._output: IO[str] | None = None  # the log file, from start() to stop()
        self._output_guard = threading.Lock()
        self._final_output = ""
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The child's PID (under gunicorn: the arbiter's)."""
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def command(self) -> list[str]:
        """The child's command line."""
        config = {"server": self.server, "app": self.app, "wrap": self._wrap,
                  "grace": self._grace, "monkey_patch": self._monkey_patch,
                  "send_buffer": self._send_buffer}
        return [sys.executable, "-m", "wsgi_detach.testing._child", json.dumps(config)]

    def start(self, timeout: float = 20.0) -> ProcessServer:
        type(self).launched.append(self)
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # the child, on every way out (an interrupt too)
            raise

    def _start(self, timeout: float) -> ProcessServer:
        # Appending (O_APPEND), so that the child's stderr and the stdout
        # lines copied here never overwrite each other whatever the offset.
        output = self._output = tempfile.TemporaryFile(mode="a+", prefix="wsgi-detach-server-")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=child_environment(self._env),
            stdout=subprocess.PIPE,
            stderr=output,
            text=True,
        )
        stdout = self.proc.stdout
        assert stdout is not None
        port: list[int] = []
        ready = threading.Event()

        def read_output() -> None:
            # In a thread: readline() has no timeout of its own. After the
            # ready line it goes on copying stdout into the log, so that a
            # chatty app never blocks on a full pipe.
            for line in stdout:
                found = None if port else self.READY.match(line)
                if found:
                    port.append(int(found.group(1)))
                    ready.set()
                    continue
                with self._output_guard:
                    if not output.closed:
                        output.write(line)
                        output.flush()
            ready.set()  # the output ended: the child exited (or is about to)

        reader = self._reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        ready.wait(timeout)
        if port:
            self.port = port[0]
            self.running = True
            return self
        if not ready.is_set():
            what = f"did not start within {timeout}s"
        else:  # its output ended: it exited, or is about to
            try:
                what = f"exited with {self.proc.wait(timeout=5)}"
            except subprocess.TimeoutExpired:
                what = "closed its output without starting"
        raise ServerDidNotStart(self.post_mortem(f"{self.server} {what}"))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child by its PID (SIGTERM; gunicorn: SIGINT), SIGKILL after ``timeout``."""
        self.running = False
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # gunicorn's arbiter stops gracefully on SIGTERM, waiting for open
            # streams to end; SIGINT is its quick shutdown.
            quick = signal.SIGINT if self.server.startswith("gunicorn-") else signal.SIGTERM
            proc.send_signal(quick)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(5)  # the child's stdout ends with it
        if proc is not None and proc.stdout is not None and not (
                self._reader is not None and self._reader.is_alive()):
            proc.stdout.close()
        final = self.log()
        with self._output_guard:
            if self._output is not None and not self._output.closed:
                self._final_output = final
                self._output.close()

    def log(self) -> str:
        """What the child printed to stderr (and stdout) so far."""
        with self._output_guard:
            if self._output is None or self._output.closed:
                return self._final_output
            self._output.flush()
            self._output.seek(0)
            return self._output.read()

    def post_mortem(self, what: str) -> str:
        code = None if self.proc is None else self.proc.poll()
        state = "running" if code is None else f"exit status {code}"
        return super().post_mortem(f"{what} ({state})")

    def _control(self, what: str) -> Any:
        try:
            return get_json(self, CONTROL_PREFIX + what, timeout=5.0,
                            headers={"Connection": "close"})
        except (OSError, AssertionError) as exc:
            raise RuntimeError(self.post_mortem(f"reading {what} failed: {exc!r}")) from exc

    def exchanges(self, path: str | None = None) -> list[Exchange]:
        found = [Exchange.from_dict(e) for e in self._control("exchanges")]
        return [e for e in found if path is None or e.path == path]

    def stats(self) -> DetachStats:
        data = self._control("stats")
        if data is None:
            raise LookupError(f"{self.app} is not a DetachMiddleware; serve it wrapped in one "
                              "(or on detach-server) to read stats()")
        names = {f.name for f in fields(DetachStats)}
        return DetachStats(**{k: v for k, v in data.items() if k in names})


def _spec_of(app: Any) -> str:
    module = getattr(app, "__module__", None)
    name = getattr(app, "__qualname__", None) or getattr(app, "__name__", None)
    if module and name and module != "__main__" and "<" not in name:
        try:
            if load(f"{module}:{name}") is app:
                return f"{module}:{name}"
        except (ImportError, AttributeError, ValueError):
            pass
    raise TypeError(f"a server subprocess imports its app: pass 'module:name', not {app!r}")


# ---------------------------------------------------------------------- the entry point


@contextmanager
def serve(
    app: AppSpec,
    server: str = "pywsgi-detach",
    *,
    process: bool | None = None,
    timeout: float = 20.0,
    grace: float = 1.0,
    wrap: Sequence[Any] = (),
    monkey_patch: bool = False,
    env: dict[str, str] | None = None,
    send_buffer: int = 0,
) -> Iterator[LiveServer]:
    """Serve ``app`` on ``server`` on a free port of 127.0.0.1 while the block runs.

    Args:
        app: a WSGI app, or ``"module:name"`` to import (in the child, for a subprocess).
        server: one of :data:`SERVERS`.
        process: run the server in a subprocess; default: only for gunicorn.
        timeout: seconds to wait for it to accept connections;
            :class:`ServerDidNotStart` (with its log) after that.
        grace: seconds stopping lets open responses end: ``detach-server``
            drains for that long, the other gevent servers then end their
            handlers, gunicorn gets it as its graceful timeout.
        wrap: WSGI middleware to put around the app, inside the observer
            (callables in a thread, ``"module:name"`` strings in a subprocess).
        monkey_patch: subprocess only: ``gevent.monkey.patch_all()`` in the
            child before anything else is imported.
        env: extra environment variables for the subprocess.
        send_buffer: ``SO_SNDBUF`` of the server's connections, in bytes (the
            kernel doubles it; 0: the system's, which on loopback grows to
            megabytes). With :data:`SMALL_SNDBUF` and a client that stalls
            with ``small_buffer=True``, the server's writes block after
            about 14 KiB on Linux instead of about 2.7 MiB, so a test of what
            the app does with a slow client is bounded by the app's own
            limits. Not on gunicorn; waitress takes it but buffers what the
            app writes itself, so nothing holds its app up.

    Example::

        with serve(app, "waitress") as server:
            with Stream(server, "/events") as stream:
                assert stream.next_event().data == "hello"
    """
    if not isinstance(send_buffer, int) or send_buffer < 0:
        raise ValueError(f"send_buffer must be a number of bytes >= 0, got {send_buffer!r}")
    if process is None:
        process = server in PROCESS_ONLY or monkey_patch
    live: LiveServer
    if process:
        live = ProcessServer(server, app, wrap=wrap, grace=grace, monkey_patch=monkey_patch,
                             env=env, send_buffer=send_buffer)
    else:
        if monkey_patch or env:
            raise ValueError("monkey_patch and env are for a server subprocess (process=True)")
        live = ThreadServer(server, app, wrap=wrap, grace=grace, send_buffer=send_buffer)
    live.start(timeout)  # on failure (an interrupt too) it stops what it started
    try:
        yield live
    finally:
        live.stop()

