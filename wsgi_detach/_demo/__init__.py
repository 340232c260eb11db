"""The demo: a chat with rooms over SSE or long-polling, served by gevent.pywsgi.

Run it with ``python -m wsgi_detach demo`` (the CLI, with all of ``serve``'s
options) or ``python -m wsgi_detach._demo``, and open http://127.0.0.1:8000/
in two windows. Not part of the API: the package ships it so that the
README's demo command works from an install.
"""

from __future__ import annotations

import argparse
import sys

from .chat import LOOPBACK_HOSTS, ChatApp

__all__ = ["ChatApp", "loopback_hosts", "main", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def loopback_hosts(host: str) -> tuple[str, ...] | None:
    """The host names to accept when bound to ``host``: the loopback names if it is a
    loopback address (see :class:`ChatApp`'s ``hosts``), else any."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return LOOPBACK_HOSTS if loopback else None


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the chat until interrupted: gevent.pywsgi through ``make_server``.

    That is DetachMiddleware in front, TCP_NODELAY, idle disconnects noticed,
    a short drain on stop.
    """
    import signal

    import gevent

    from wsgi_detach import make_server

    chat = ChatApp(hosts=loopback_hosts(host))
    server = make_server(chat, host, port, grace=1.0, log=None)
    try:
        server.start()
    except (OSError, OverflowError) as exc:  # a busy port, an unknown host, a port > 65535
        sys.exit(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}")

    def stop() -> None:  # in a new greenlet: the drain may block
        chat.disconnect_all()  # streams end cleanly, polls get an empty answer
        server.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop)  # before the line: a reader may signal at once
    print(
        f"wsgi_detach demo chat on http://{host}:{server.server_port}/  (Ctrl-C to stop)",
        flush=True,
    )
    server.serve_forever()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse ``--host``/``--port`` and serve; ``prog`` names the command in ``--help``
    (by default the script's own file name)."""
    parser = argparse.ArgumentParser(prog=prog, description="Serve the demo chat.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    serve(args.host, args.port)
