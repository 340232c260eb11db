"""Serve an example from the command line: ``--host``, ``--port``, a clean stop on Ctrl-C.

Not an example itself (the leading underscore keeps it out of
tests/test_examples.py). gevent.pywsgi serves: one greenlet per request, so
an open stream costs no thread.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any


def main(app: Any, *, path: str = "/", description: str | None = None) -> None:
    """Parse ``--host``/``--port`` and serve ``app`` until SIGINT or SIGTERM."""
    import gevent
    from gevent.pywsgi import WSGIServer

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    args = parser.parse_args()
    server = WSGIServer((args.host, args.port), app)
    try:
        server.start()
    except (OSError, OverflowError) as exc:  # a busy port, an unknown host, a bad number
        sys.exit(f"{parser.prog}: cannot listen on {args.host}:{args.port}: "
                 f"{getattr(exc, 'strerror', None) or exc}")
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, server.stop)
    print(f"serving http://{args.host}:{server.server_port}{path}  (Ctrl-C to stop)", flush=True)
    server.serve_forever()
