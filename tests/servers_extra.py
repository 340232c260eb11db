"""More real servers for the middleware's tests, beside tests/servers.py.

Run as ``python -m tests.servers_extra SERVER MODULE:APP`` (by
:class:`ExtraServerProcess`); like tests/servers.py the child wraps the app in
``wsgiref.validate.validator``, binds 127.0.0.1:0, prints ``LISTENING <port>``
and serves until SIGTERM (SIGINT for gunicorn's arbiter).

Servers: ``detach-pywsgi`` (:func:`wsgi_detach.make_server`: our handler,
``TCP_NODELAY``, draining ``stop()``; the app is wrapped in a
``DetachMiddleware`` unless it is one), ``detach-pywsgi-delay`` (the same
without ``TCP_NODELAY``, for the comparison), ``gunicorn-gevent`` and
``gunicorn-gthread`` (one worker, forked by the arbiter, which prints the
port), the same with ``-drain`` (a ``post_worker_init`` hook calls
``drain_on_signal(0.5, b"bye")`` on the middleware), ``waitress``
(``channel_request_lookahead=1``, without which it never sets
``waitress.client_disconnected``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

from tests.servers import ServerProcess, _load

SERVERS = (
    "detach-pywsgi",
    "detach-pywsgi-delay",
    "gunicorn-gevent",
    "gunicorn-gthread",
    "gunicorn-gevent-drain",
    "gunicorn-gthread-drain",
    "waitress",
)


class ExtraServerProcess(ServerProcess):
    """A server from this module in a child process."""

    module = "tests.servers_extra"

    def stop(self) -> None:
        proc = self.proc
        if not self.server.startswith("gunicorn-") or proc is None or proc.poll() is not None:
            super().stop()
            return
        # gunicorn's SIGTERM is a graceful stop that waits for open streams;
        # SIGINT is its quick one.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        super().stop()  # the process is gone: this closes its files


def _serve_detach_pywsgi(app: Any, nodelay: bool) -> None:
    from wsgiref.validate import validator

    import gevent

    from wsgi_detach import make_server

    server = make_server(app, "127.0.0.1", 0, nodelay=nodelay, grace=0.5, log=None)
    # The validator goes in front of the middleware (it checks what the
    # server gets), not between make_server and the app it configures.
    server.application = validator(server.middleware)
    server.start()
    print(f"LISTENING {server.server_port}", flush=True)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def _serve_waitress(app: Any) -> None:
    import waitress

    server = waitress.create_server(
        app, host="127.0.0.1", port=0, threads=16, channel_request_lookahead=1
    )
    print(f"LISTENING {server.effective_port}", flush=True)  # type: ignore[union-attr]
    signal.signal(signal.SIGTERM, lambda *_: server.close())
    try:
        server.run()
    except OSError:  # the socket map closed under the loop by the handler above
        pass


def _serve_gunicorn(app: Any, worker: str, drain: Any = None) -> None:
    from gunicorn.app.base import BaseApplication

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", "127.0.0.1:0")
            self.cfg.set("workers", 1)
            self.cfg.set("threads", 16)
            self.cfg.set("worker_class", worker)
            self.cfg.set("loglevel", "warning")
            self.cfg.set("when_ready", when_ready)
            self.cfg.set("graceful_timeout", 5)
            if drain is not None:
                self.cfg.set("post_worker_init", post_worker_init)

        def load(self) -> Any:
            return app

    def post_worker_init(worker: Any) -> None:
        # What README.md shows (there worker.wsgi is the middleware; here
        # the validator wraps it).
        drain.drain_on_signal(0.5, b"bye")

    def when_ready(arbiter: Any) -> None:
        print(f"LISTENING {arbiter.LISTENERS[0].sock.getsockname()[1]}", flush=True)

    Application().run()


def main(argv: list[str]) -> None:
    server, spec = argv
    if server.startswith("gunicorn-gevent"):
        from gevent import monkey

        monkey.patch_all()
    from wsgiref.validate import validator

    if server in ("detach-pywsgi", "detach-pywsgi-delay"):
        _serve_detach_pywsgi(_load(spec), nodelay=server == "detach-pywsgi")
        return
    app = validator(_load(spec))
    if server == "waitress":
        _serve_waitress(app)
    elif server.endswith("-drain"):  # gunicorn-gevent-drain, gunicorn-gthread-drain
        _serve_gunicorn(app, server.split("-")[1], drain=_load(spec))
    elif server.startswith("gunicorn-"):
        _serve_gunicorn(app, server.partition("-")[2])
    else:
        raise SystemExit(f"unknown server {server!r}; choose from {', '.join(SERVERS)}")


if __name__ == "__main__":
    main(sys.argv[1:])
