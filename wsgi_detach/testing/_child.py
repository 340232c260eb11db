"""A server subprocess of :class:`~wsgi_detach.testing.ProcessServer`.

Run as ``python -m wsgi_detach.testing._child CONFIG`` (CONFIG: JSON with
``server``, ``app``, ``wrap``, ``grace``, ``monkey_patch``): imports the app,
wraps it (observer outermost), serves it on 127.0.0.1 with the same runners
a :class:`~wsgi_detach.testing.ThreadServer` uses, prints ``LISTENING
<port>`` once it accepts connections, and serves until SIGTERM (gunicorn:
SIGINT, its quick shutdown). Its log goes to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    if config["monkey_patch"]:
        from gevent import monkey

        monkey.patch_all()
    import logging

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    kind = config["server"]
    if kind.startswith("gunicorn-"):
        _serve_gunicorn(config)
    else:
        _serve(config)


def _listening(port: int) -> None:
    print(f"LISTENING {port}", flush=True)


def _wrapped(config: dict[str, Any]) -> Any:
    from ._servers import _observed, load

    return _observed(load(config["app"]), config["server"], [load(w) for w in config["wrap"]])[0]


def _serve(config: dict[str, Any]) -> None:
    import os
    import signal
    import threading
    import traceback

    from ._servers import _RUNNERS

    kind = config["server"]
    runner = _RUNNERS[kind](_wrapped(config), kind, sys.stderr, config["grace"],
                            config.get("send_buffer", 0))
    patched = config["monkey_patch"]
    if not patched:
        # Every thread the server starts inherits the mask, so SIGTERM is
        # left to sigwait below, in the main thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    started = threading.Event()
    crashed = threading.Event()

    def ready(port: int) -> None:
        _listening(port)
        started.set()

    def run() -> None:
        try:
            runner.run(ready)
        except BaseException:
            # Before listening or after: either way the process must end now,
            # with the error in its log, not wait for a SIGTERM.
            traceback.print_exc()
            crashed.set()
            os.kill(os.getpid(), signal.SIGTERM)  # wakes the main thread's wait below

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if patched:
        import gevent

        stopping = gevent.event.Event()
        gevent.signal_handler(signal.SIGTERM, stopping.set)
        gevent.signal_handler(signal.SIGINT, stopping.set)
        stopping.wait()
    else:
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    if crashed.is_set():
        sys.exit("the server thread failed (its traceback is above)")
    # Stopped while it was starting: give it a bounded moment to get ready,
    # since only a started runner can be stopped.
    if not started.wait(10):
        sys.exit("stopped before the server was listening")
    runner.stop()
    thread.join(config["grace"] + 10)


def _serve_gunicorn(config: dict[str, Any]) -> None:
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    from ._servers import THREADS

    def post_worker_init(worker: Any) -> None:
        # The worker (not the arbiter) says where it listens once it has
        # loaded the app: a request sent after that line is served at once.
        _listening(worker.sockets[0].getsockname()[1])

    options: dict[str, Any] = {
        "bind": "127.0.0.1:0",
        "workers": 1,
        "worker_class": config["server"].split("-")[1],
        "threads": THREADS,
        "graceful_timeout": max(1, round(config["grace"])),
        "loglevel": "warning",
        "accesslog": None,
        "post_worker_init": post_worker_init,
    }

    class Application(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
        def load_config(self) -> None:
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            # In the worker, after the gevent worker monkey-patched.
            return _wrapped(config)

    Application().run()


if __name__ == "__main__":
    main(sys.argv[1:])
