"""The registry of benchmark targets: one server module per target.

Each target is a small server process on 127.0.0.1 started by
``python -m bench.server NAME``. This module only *names* them (it imports
none of their frameworks), so the orchestrator stays light and a missing
framework fails one target, not the run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

THROUGHPUT, FANOUT, IDLE, LONGPOLL, XTHREAD = "throughput", "fanout", "idle", "longpoll", "xthread"
PUSH = frozenset({THROUGHPUT, FANOUT, IDLE, LONGPOLL})


@dataclass(frozen=True)
class Target:
    """A server the harness can start, and the scenarios it takes part in."""

    name: str
    module: str
    entry: str
    scenarios: frozenset[str]
    summary: str
    options: tuple[tuple[str, object], ...] = ()  # keyword arguments for its serve()

    def load(self) -> object:
        return getattr(importlib.import_module(self.module), self.entry)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "wsgi_detach",
            "bench.targets.detach",
            "serve",
            PUSH | {XTHREAD},
            "detach() in DetachMiddleware on DetachServer, Hub fan-out (what has landed)",
        ),
        Target(
            "queue_body",
            "bench.targets.queue_body",
            "serve",
            PUSH | {XTHREAD},
            "gevent Queue body in a generator, put(StopIteration) ends it",
        ),
        Target(
            "generator",
            "bench.targets.generator",
            "serve",
            frozenset({THROUGHPUT}),
            "plain generator on gevent.pywsgi: the WSGI throughput ceiling",
        ),
        Target(
            "tornado",
            "bench.targets.tornado_app",
            "serve",
            PUSH,
            "Tornado RequestHandler.write + await flush()",
        ),
        Target(
            "starlette",
            "bench.targets.starlette_app",
            "serve",
            PUSH,
            "uvicorn (uvloop+httptools) + StreamingResponse from asyncio.Queue",
        ),
        Target(
            "sse_starlette",
            "bench.targets.starlette_app",
            "serve_sse",
            frozenset({FANOUT, IDLE}),
            "uvicorn (uvloop+httptools) + EventSourceResponse",
        ),
        Target(
            "raw_limit",
            "bench.targets.raw_limit",
            "serve",
            PUSH,
            "gevent StreamServer writing chunked HTTP by hand: the stack's limit",
        ),
        # Opt-in probes (not in DEFAULT): each isolates one effect.
        Target(
            "queue_body_nodelay",
            "bench.targets.queue_body",
            "serve",
            PUSH,
            "queue_body with a pywsgi handler that sets TCP_NODELAY",
            (("nodelay", True),),
        ),
        Target(
            "wsgi_detach_bare",
            "bench.targets.detach",
            "serve",
            PUSH | {XTHREAD},
            "bare DetachedBody on plain pywsgi: no middleware, no handler",
            (("bare", True),),
        ),
        Target(
            "wsgi_detach_nohub",
            "bench.targets.detach",
            "serve",
            PUSH | {XTHREAD},
            "wsgi_detach without the broadcast Hub: one put() per stream per message",
            (("hub", False),),
        ),
        Target(
            "wsgi_detach_nowatch",
            "bench.targets.detach",
            "serve",
            PUSH | {XTHREAD},
            "wsgi_detach with DetachMiddleware(watch_disconnects=False)",
            (("watch", False),),
        ),
        Target(
            "wsgi_detach_nodelay",
            "bench.targets.detach",
            "serve",
            PUSH | {XTHREAD},
            "bare DetachedBody, a plain pywsgi handler that only sets TCP_NODELAY",
            (("bare", True), ("nodelay", True)),
        ),
        Target(
            "wsgi_detach_before",
            "bench.targets.detach",
            "serve",
            PUSH | {XTHREAD},
            "wsgi_detach imported from $BENCH_BEFORE (an export of older code): before/after",
        ),
        Target(
            "wsgi_detach_nocoalesce",
            "bench.targets.detach",
            "serve",
            PUSH | {XTHREAD},
            "wsgi_detach with coalesce=0: one server write per put()",
            (("coalesce", 0),),
        ),
    )
}

#: Run when --targets is not given (the *_nodelay and *_nocoalesce probes are opt-in).
DEFAULT = (
    "wsgi_detach",
    "queue_body",
    "generator",
    "tornado",
    "starlette",
    "sse_starlette",
    "raw_limit",
)


def unavailable(name: str) -> str | None:
    """Why target ``name`` cannot run in this checkout, or None if it can."""
    if name.startswith("wsgi_detach"):
        try:
            from wsgi_detach import DetachedBody  # noqa: F401
        except ImportError as exc:
            return f"wsgi_detach.DetachedBody is not importable yet ({exc})"
    return None
