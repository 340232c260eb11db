"""Target ``tornado``: ``RequestHandler.write`` + ``await self.flush()``.

Tornado is the non-WSGI server people reach for when they want to push to
a client later; it runs on asyncio's default loop and sets TCP_NODELAY.
Held streams get an ``asyncio.Queue`` each, which the handler drains with
write + flush, so the publisher is the same as everyone else's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NoReturn

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from bench import producer

Queue = asyncio.Queue  # of bytes | None; None ends the stream


Hub = producer.AsyncioHub


class Base(tornado.web.RequestHandler):
    hub: Hub

    def initialize(self, hub: Hub) -> None:
        self.hub = hub
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Cache-Control", "no-cache")

    def int_arg(self, name: str, default: int | None = None) -> int:
        value = self.get_query_argument(name, None)
        if value is None:
            if default is None:
                raise tornado.web.MissingArgumentError(name)
            return default
        return int(value)

    async def drain(self, q: asyncio.Queue[bytes | None]) -> None:
        while (item := await q.get()) is not None:
            self.write(item)
            await self.flush()


class StreamHandler(Base):
    async def get(self) -> None:
        chunk = producer.payload(self.int_arg("size"))
        for _ in range(self.int_arg("n")):
            self.write(chunk)
            await self.flush()


class FanoutHandler(Base):
    async def get(self) -> None:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        q.put_nowait(producer.HELLO)
        self.hub.streams.add(q)
        try:
            await self.drain(q)
        finally:
            self.hub.streams.discard(q)


class PollHandler(Base):
    async def get(self) -> None:
        # Tornado's idiom for "held until the next message": await it, then
        # finish() with it (Content-Length, no chunking).
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.hub.polls.append(q)
        self.finish(await q.get())


class JsonPollHandler(Base):
    async def get(self) -> None:
        # The same, answered with the message as JSON (the burst scenario).
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.hub.polls.append(q)
        msg = await q.get()
        assert msg is not None
        self.finish(producer.poll_answer(msg))


class StartHandler(Base):
    def get(self) -> None:
        interval = self.int_arg("interval_ms", 100) / 1000.0
        coro = producer.publish_loop_async(
            self.hub.publish, self.hub.end, self.int_arg("n"), interval
        )
        task = asyncio.get_running_loop().create_task(coro)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        self.set_header("Content-Type", "text/plain")
        self.finish(b"ok\n")


_tasks: set[asyncio.Task[None]] = set()


async def main(announce: Callable[[int, dict[str, object]], None]) -> None:
    hub = Hub()
    routes = [
        (path, handler, {"hub": hub})
        for path, handler in (
            ("/stream", StreamHandler),
            ("/fanout", FanoutHandler),
            ("/poll", PollHandler),
            ("/lpoll", JsonPollHandler),
            ("/start", StartHandler),
        )
    ]
    app = tornado.web.Application(routes)  # type: ignore[arg-type]
    sockets = bind_sockets(0, "127.0.0.1", backlog=4096)
    server = HTTPServer(app)
    server.add_sockets(sockets)
    announce(sockets[0].getsockname()[1], {"server": f"tornado {tornado.version} (asyncio)"})
    await asyncio.Event().wait()


def serve(announce: Callable[[int, dict[str, object]], None]) -> NoReturn:
    asyncio.run(main(announce))
    raise SystemExit(0)
