"""The command line: ``python -m wsgi_detach serve module:app``.

``serve`` runs any WSGI app under gevent.pywsgi behind DetachMiddleware, with
the handler that exposes the socket (idle disconnects noticed) and sets
TCP_NODELAY, and drains on SIGTERM/SIGINT. ``demo`` serves the chat demo
(``wsgi_detach/_demo``) the same way.

Monkey-patching comes first, before the app and before the rest of
wsgi_detach is imported: an app module that does ``from socket import
socket`` or ``import requests`` at import time must get gevent's versions.
(Python imports the package's ``__init__`` before this file; it loads only
modules that look names up at call time -- the server helpers are imported
lazily for this reason, and tests/test_cli.py checks the app sees a patched
process.)
"""

from gevent import monkey

monkey.patch_all()

# Everything below comes after the patch, hence no `from __future__` import
# (it would have to be the first statement) and the E402 exemptions.
import argparse  # noqa: E402
import codecs  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable, Final, Optional  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402

__all__ = ["main"]


def _load(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"serve: expected MODULE:APP (like mysite.wsgi:application), got {spec!r}")
    sys.path.insert(0, os.getcwd())  # like gunicorn: the app's package is in the current directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"serve: cannot import {module_name!r}: {exc}") from exc
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise SystemExit(f"serve: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(app):
        raise SystemExit(f"serve: {spec} is {type(app).__name__}, not a WSGI app (a callable)")
    return app


def _parser() -> argparse.ArgumentParser:
    from wsgi_detach import __version__

    parser = argparse.ArgumentParser(prog="python -m wsgi_detach")
    parser.add_argument("--version", action="version", version=f"wsgi_detach {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve a WSGI app under gevent.pywsgi with DetachMiddleware"
    )
    serve.add_argument("app", metavar="MODULE:APP", help="the WSGI app, e.g. chat:app")
    _server_options(serve, grace=10.0)

    demo = commands.add_parser(
        "demo", help="serve the demo chat (rooms; SSE or long-polling) the same way"
    )
    # A short grace: the chat's streams never end by themselves, so Ctrl-C
    # would otherwise wait the whole grace before cutting them.
    _server_options(demo, grace=1.0)
    demo.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        default=[],
        help="a host name the chat is reached by through a reverse proxy, e.g. "
        "chat.example.com: answered to, and its pages may post (repeatable)",
    )
    # Explicit, never from the environment alone: a REDIS_URL set for some
    # other program must not turn the in-process demo into one that needs
    # redis-py and a Redis server.
    demo.add_argument(
        "--redis",
        metavar="URL",
        nargs="?",
        const=_FROM_ENVIRONMENT,
        help="share the rooms through Redis with every process using it, e.g. "
        "redis://localhost:6379/0; --redis alone takes $REDIS_URL (default: rooms in "
        "this process)",
    )
    return parser


#: ``--redis`` given without a URL: the URL is $REDIS_URL.
_FROM_ENVIRONMENT: Final = "$REDIS_URL"


def _redis_url(value: Optional[str]) -> Optional[str]:
    """The demo's Redis URL from its ``--redis`` option (None: rooms in this process)."""
    if value != _FROM_ENVIRONMENT:
        return value
    url = os.environ.get("REDIS_URL")
    if not url:
        raise SystemExit("demo: --redis without a URL takes $REDIS_URL, which is not set")
    return url


def _where(url: Optional[str]) -> str:
    """Where the demo keeps its rooms, for its start-up line (no password shown)."""
    if url is None:
        return "rooms in this process"
    parts = urlsplit(url)
    return f"rooms in Redis at {parts.scheme}://{parts.hostname or ''}" + (
        f":{parts.port}" if parts.port else "") + parts.path


def _server_options(command: argparse.ArgumentParser, *, grace: float) -> None:
    command.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    command.add_argument(
        "--port", type=int, default=8000, help="port; 0 picks one (default: %(default)s)"
    )
    command.add_argument(
        "--grace",
        type=float,
        default=grace,
        help="seconds open streams get to end on SIGTERM/SIGINT (default: %(default)s)",
    )
    command.add_argument(
        "--farewell",
        help="last chunk sent as is to every open stream on shutdown, so only for apps "
        "whose streams share one format; backslash escapes are decoded, e.g. "
        "'retry: 1000\\n\\n' when every stream is server-sent events",
    )
    command.add_argument("--idle-timeout", type=float, help="default idle_timeout of bodies")
    command.add_argument("--heartbeat", type=float, help="default heartbeat of bodies (seconds)")
    command.add_argument("--max-open", type=int, help="most detached responses open at once")
    command.add_argument("--max-buffered", type=int, help="most bytes buffered across all bodies")
    _timeout_options(command)
    command.add_argument("--no-access-log", action="store_true", help="do not log each request")
    command.add_argument(
        "--no-nodelay",
        action="store_true",
        help="leave TCP_NODELAY off (only to measure what it costs)",
    )


def _timeout_options(command: argparse.ArgumentParser) -> None:
    """The HTTP-layer limits (make_server's head_timeout, body_timeout, max_connections)."""
    from wsgi_detach._server import BODY_TIMEOUT, HEAD_TIMEOUT  # after the patch, as all else

    command.add_argument(
        "--head-timeout", type=float, default=HEAD_TIMEOUT, metavar="S",
        help="seconds a connection may take to send a request head, or stay idle between "
        "requests; 0: no limit (default: %(default)s)",
    )
    command.add_argument(
        "--body-timeout", type=float, default=BODY_TIMEOUT, metavar="S",
        help="seconds one read of a request body may wait; 0: no limit (default: %(default)s)",
    )
    command.add_argument(
        "--max-connections", type=int, metavar="N",
        help="most connections open at once, more wait in the backlog; 0: no cap "
        "(default: the open-files limit less 64, or half of it under 128)",
    )


def _timeout_settings(args: argparse.Namespace) -> dict[str, Any]:
    cap = args.max_connections
    return {
        "head_timeout": args.head_timeout or None,
        "body_timeout": args.body_timeout or None,
        "max_connections": "auto" if cap is None else (cap or None),
    }


def _serve(
    args: argparse.Namespace,
    app: Any = None,
    label: str = "",
    before_stop: Optional[Callable[[], object]] = None,
) -> int:
    from wsgi_detach import make_server

    if app is None:
        app = _load(args.app)
        label = args.app
    options = {
        name: value
        for name, value in (
            ("idle_timeout", args.idle_timeout),
            ("heartbeat", args.heartbeat),
            ("max_open", args.max_open),
            ("max_buffered", args.max_buffered),
        )
        if value is not None
    }
    server = make_server(
        app,
        args.host,
        args.port,
        nodelay=not args.no_nodelay,
        grace=args.grace,
        farewell=codecs.decode(args.farewell, "unicode_escape") if args.farewell else None,
        log=None if args.no_access_log else "default",
        **_timeout_settings(args),
        **options,
    )
    try:
        server.start()
    except (OSError, OverflowError) as exc:  # a busy port, an unknown host, a port > 65535
        raise SystemExit(
            f"{args.command}: cannot listen on {args.host}:{args.port}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    # Handlers first: whoever reads the line below may signal at once.
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, _stopper(server, before_stop))
    print(
        f"wsgi_detach: serving {label} on http://{args.host}:{server.server_port} "
        f"(gevent.pywsgi; SIGTERM drains for {args.grace}s)",
        flush=True,
    )
    server.serve_forever()
    return 0


def _stopper(server: Any, before_stop: Optional[Callable[[], object]]) -> Callable[[], None]:
    def stop() -> None:  # runs in a new greenlet: it may block
        if before_stop is not None:
            before_stop()
        server.stop()

    return stop


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from wsgi_detach._demo import ChatApp, loopback_hosts

        url = _redis_url(args.redis)
        try:
            chat = ChatApp(
                redis_url=url, hosts=loopback_hosts(args.host), proxied_hosts=args.allow_host
            )
            where = _where(url)
        except (ValueError, ImportError) as exc:  # a bad --redis URL, or no redis-py
            raise SystemExit(f"demo: {exc}") from None
        # On SIGTERM the chat ends its streams and polls cleanly first, so
        # the drain has nothing to cut.
        return _serve(args, chat, f"the demo chat ({where})", before_stop=chat.disconnect_all)
    return _serve(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the server's own handler is in place
        sys.exit(130)
