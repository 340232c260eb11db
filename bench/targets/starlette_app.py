"""Targets ``starlette`` and ``sse_starlette``: uvicorn (uvloop + httptools).

``starlette`` streams a ``StreamingResponse`` fed from an
``asyncio.Queue``; ``sse_starlette`` wraps the same queue in
sse-starlette's ``EventSourceResponse`` (fan-out and idle only: it is the
SSE library asyncio users pick). uvicorn without uvloop and httptools is
about half as fast, so :func:`serve` refuses to run unless both are what
uvicorn actually loaded, and says so in the ready line.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from bench import producer

MEDIA = "application/octet-stream"
#: sse-starlette pings every 15 s by default; no scenario lasts that long
#: between messages, and a ping would be counted as traffic, so push it out.
NO_PING = 3600


class Hub(producer.AsyncioHub):
    """Subscribers of the publisher, plus the tasks the target keeps alive."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def drain(
    q: asyncio.Queue[bytes | None], on_exit: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    try:
        while (item := await q.get()) is not None:
            yield item
    finally:
        if on_exit is not None:
            on_exit()


async def drain_sse(
    q: asyncio.Queue[bytes | None], on_exit: Callable[[], None]
) -> AsyncIterator[dict[str, str]]:
    async for item in drain(q, on_exit):
        yield {"data": item.decode().rstrip("\n")}


def make_app(sse: bool) -> Starlette:
    hub = Hub()

    def arg(request: Request, name: str, default: int | None = None) -> int:
        value = request.query_params.get(name)
        return int(value) if value is not None else int(default)  # type: ignore[arg-type]

    async def stream(request: Request) -> Response:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(producer.QUEUE_CHUNKS)
        end = lambda: q.put(None)  # noqa: E731 - a bounded queue's end must wait too
        hub.spawn(producer.produce_async(q.put, end, arg(request, "n"), arg(request, "size")))
        return StreamingResponse(drain(q), media_type=MEDIA)

    async def fanout(request: Request) -> Response:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        q.put_nowait(producer.HELLO)
        hub.streams.add(q)

        def leave() -> None:
            hub.streams.discard(q)

        if sse:
            return EventSourceResponse(drain_sse(q, leave), ping=NO_PING)
        return StreamingResponse(drain(q, leave), media_type=MEDIA)

    async def poll(request: Request) -> Response:
        # Starlette's idiom for "held until the next message": await it, then
        # return an ordinary response (Content-Length, no chunking).
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        hub.polls.append(q)
        return Response(await q.get(), media_type=MEDIA)

    async def json_poll(request: Request) -> Response:
        # The same, answered with the message as JSON (the burst scenario).
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        hub.polls.append(q)
        msg = await q.get()
        assert msg is not None
        return JSONResponse(producer.poll_answer(msg))

    async def start(request: Request) -> Response:
        interval = arg(request, "interval_ms", 100) / 1000.0
        hub.spawn(producer.publish_loop_async(hub.publish, hub.end, arg(request, "n"), interval))
        return PlainTextResponse("ok\n")

    routes = [Route("/fanout", fanout), Route("/start", start)]
    if not sse:
        routes += [Route("/stream", stream), Route("/poll", poll), Route("/lpoll", json_poll)]
    return Starlette(routes=routes)


def serve_variant(announce: Callable[[int, dict[str, object]], None], sse: bool) -> NoReturn:
    config = uvicorn.Config(
        make_app(sse),
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )
    config.load()
    protocol = config.http_protocol_class.__name__
    # The whole point of this target is the fast configuration: refuse a
    # silent fallback to asyncio's loop or h11.
    assert protocol == "HttpToolsProtocol", protocol
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    port = sock.getsockname()[1]

    original = server.startup

    async def startup(sockets: list[socket.socket] | None = None) -> None:
        await original(sockets=sockets)
        loop = type(asyncio.get_running_loop())
        assert loop.__module__.startswith("uvloop"), loop
        info = {
            "server": f"uvicorn {uvicorn.__version__}",
            "loop": f"{loop.__module__}.{loop.__name__}",
            "http": protocol,
        }
        announce(port, info)

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
    raise SystemExit(0)


def serve(announce: Callable[[int, dict[str, object]], None]) -> NoReturn:
    serve_variant(announce, sse=False)


def serve_sse(announce: Callable[[int, dict[str, object]], None]) -> NoReturn:
    serve_variant(announce, sse=True)
