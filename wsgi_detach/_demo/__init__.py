"""The demo: a chat with rooms over SSE or long-polling, served by gevent.pywsgi.

Run it with ``python -m wsgi_detach._demo`` (or the CLI's ``demo`` command)
and open http://127.0.0.1:8000/ in two windows. Not part of the API: the
package ships it so that the README's first command works from an install.
"""

from __future__ import annotations

import argparse
import sys

from .chat import ChatApp

__all__ = ["ChatApp", "main", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the chat on gevent.pywsgi until interrupted.

    Through ``wsgi_detach.make_server`` (DetachMiddleware, TCP_NODELAY,
    disconnect watching, drain on stop) where this build has it; on a plain
    ``gevent.pywsgi.WSGIServer`` otherwise.
    """
    import wsgi_detach

    make_server = getattr(wsgi_detach, "make_server", None)
    if make_server is not None:
        server = make_server(ChatApp(), host, port, grace=2.0, log=None)
    else:
        from gevent.pywsgi import WSGIServer

        server = WSGIServer((host, port), ChatApp())
    server.start()
    print(f"wsgi_detach demo chat on http://{host}:{server.server_port}/  (Ctrl-C to stop)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_detach._demo", description="Serve the demo chat."
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    serve(args.host, args.port)
