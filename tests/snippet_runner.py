"""Run one code block of the docs as a program: ``python -m tests.snippet_runner FILE``.

The block runs as a module. If it leaves a WSGI callable named ``app``, the
runner serves it with :func:`wsgi_detach.make_server` on 127.0.0.1:0 (the
middleware in front, as ``python -m wsgi_detach serve`` would) and prints
``LISTENING <port>``; it serves until SIGTERM. Otherwise it prints ``DONE``
and exits 0 once the block ran. tests/test_docs_snippets.py removes a
block's own closing ``serve_forever()``/``run()`` line first and serves the
app here instead, on a free port.
"""

from __future__ import annotations

import runpy
import signal
import sys


def main(path: str) -> None:
    namespace = runpy.run_path(path, run_name="__snippet__")
    app = namespace.get("app")
    if not callable(app):
        print("DONE", flush=True)
        return
    import gevent

    from wsgi_detach import make_server

    server = make_server(app, "127.0.0.1", 0, grace=0.5, log=None)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.stop)
    print(f"LISTENING {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
