"""Long-polling: answer as soon as there is news after the client's cursor, or empty at a timeout.

When to use it: clients that cannot hold a stream open (some proxies, old
clients, scripts with a plain HTTP library), or that want one JSON answer per
request. Each request carries the cursor of the last answer; the response
comes at once if something is newer, else when the next message is
published, else after ``timeout`` seconds as a normal ``200`` with an empty
list -- "nothing happened" is not an error, and the client simply asks again.

When not to: high message rates to many clients (every message costs each
client a full request; use :class:`~wsgi_detach.EventStream` with a
:class:`~wsgi_detach.Hub`), or a timeout longer than a proxy's idle limit
(commonly 30--60 s; stay below it).

Two forms: :func:`long_poll` returns a WSGI body and holds no thread while
it waits (the app returns at once; the hub's publisher finishes the body);
:func:`wait_for_messages` blocks the calling greenlet or thread, for code
that must return a value, e.g. a framework view.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, Final

from ._body import REGISTER_KEY, BodyOptions, DetachedBody, register
from ._broadcast import Batch, Hub
from ._errors import BodyClosed
from ._wakeup import make_waiter

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from ._budget import ByteBudget

__all__ = ["long_poll", "wait_for_messages"]

# 25 s: under the 30 s idle limit common to proxies and load balancers.
_DEFAULT_TIMEOUT: Final = 25.0
#: Read only: every waiting poll's body holds this very list (``_start(...,
#: shared=True)``), copied only as its head goes to the server.
_JSON_HEADERS: Final = [
    ("Content-Type", "application/json"),
    # A cached answer would hand the next poll stale news.
    ("Cache-Control", "no-store"),
]


def render_json(batch: Batch) -> bytes:
    """``{"messages": [{"id", "event", "data"}, ...], "cursor": ..., "resync": ...}``."""
    return json.dumps(batch.as_dict(), separators=(",", ":")).encode("utf-8")


#: The last rendering of each kind, ``(render, key, bytes)``: the polls a publish
#: answers share one batch, and the polls waiting meanwhile one empty answer,
#: so each is rendered once rather than once per poll. A race between
#: threads only costs a rendering.
_last_answer: list[tuple[object, object, bytes]] = [(None, None, b"")]
_last_empty: list[tuple[object, object, bytes]] = [(None, None, b"")]


def _render(render: Callable[[Batch], bytes], batch: Batch) -> bytes:
    """``render(batch)``, once for the same batch object."""
    last_render, last_batch, data = _last_answer[0]
    if last_batch is not batch or last_render is not render:
        data = render(batch)
        _last_answer[0] = (render, batch, data)
    return data


def _options(timeout: float, empty: bytes, budget: ByteBudget | None) -> BodyOptions:
    """A poll's body options, checked once for the polls that share them.

    Between two publishes every poll waits with the same cursor, and so the
    same empty answer (``_render_empty``): one set of options serves them all.
    """
    last_timeout, last_empty, last_budget, options = _last_options[0]
    if (
        options is None
        or last_empty is not empty
        or last_budget is not budget
        or last_timeout != timeout
        or type(last_timeout) is not type(timeout)  # 1 == True, and a bool is refused
    ):
        options = BodyOptions(idle_timeout=timeout, timeout_chunk=empty, budget=budget)
        _last_options[0] = (timeout, empty, budget, options)
    return options


_last_options: list[tuple[object, object, object, BodyOptions | None]] = [(None, None, None, None)]


def _render_empty(render: Callable[[Batch], bytes], cursor: str) -> bytes:
    """``render(Batch([], cursor))``, once for the same cursor."""
    last_render, last_cursor, data = _last_empty[0]
    if last_cursor != cursor or last_render is not render:
        data = render(Batch([], cursor))
        _last_empty[0] = (render, cursor, data)
    return data


class _Answer:
    """One waiting poll. Called with a batch (by the hub), it answers; called with
    nothing (its body's ``on_close``), it withdraws the poll from the hub.

    One object for both jobs rather than two closures, or an object and a
    bound method: a waiting poll keeps it alive, and with hundreds of polls
    waiting every object one keeps brings the garbage collector's next young
    collection closer (``python -m bench.poll_objects`` measures it).
    """

    __slots__ = ("body", "hub", "render")

    def __init__(self, hub: Hub, body: DetachedBody, render: Callable[[Batch], bytes]) -> None:
        self.hub = hub
        self.body = body
        self.render = render

    def __call__(self, batch: Batch | None = None) -> None:
        if batch is None:
            self.hub.cancel_poll(self)
            return
        try:
            self.body.finish(_render(self.render, batch))
        except BodyClosed:
            pass  # timed out or the client left as the news came: the next poll gets it


def long_poll(
    hub: Hub,
    cursor: str | None,
    start_response: StartResponse,
    *,
    timeout: float = _DEFAULT_TIMEOUT,
    render: Callable[[Batch], bytes] = render_json,
    environ: WSGIEnvironment | None = None,
) -> DetachedBody:
    """Answer with the messages after ``cursor``: now, at the next publish, or empty at ``timeout``.

    Return the result from the app::

        def poll(environ, start_response):
            cursor = parse_qs(environ["QUERY_STRING"]).get("cursor", [None])[0]
            return long_poll(hub, cursor, start_response, timeout=20, environ=environ)

    The response is always ``200`` with ``render(batch)`` (JSON by default,
    see :func:`render_json`); the client sends the batch's ``cursor`` with its
    next poll. ``cursor=None`` means "from now". A cursor that fell out of the
    history gets an immediate ``resync`` answer. A client that leaves while
    waiting withdraws its poll from the hub (``on_close``).

    The waiting costs no greenlet or thread: the body is finished by whoever
    publishes, from whatever greenlet or thread that is. ``render`` is called
    once per batch, not per poll: the polls one publish answers share it.

    Pass ``environ`` under :class:`~wsgi_detach.DetachMiddleware` and the body
    is registered as it is made, like a ``detach()`` body (counted,
    ``max_open``, drained, closed with the request even if the app does not
    return it), and its bytes count against the middleware's
    ``max_buffered``. It takes none of the middleware's other body defaults:
    a heartbeat or a plain ``timeout_chunk`` would corrupt the JSON. Without
    ``environ`` the middleware registers it when the app returns it.
    """
    if cursor is None or cursor == "":
        cursor = hub.cursor  # pin "now" before waiting, so nothing in between is lost
    empty = _render_empty(render, cursor)
    registrar = None if environ is None else environ.get(REGISTER_KEY)
    budget = None if registrar is None else registrar.options.budget
    body = DetachedBody(start_response=start_response, options=_options(timeout, empty, budget))
    register(body, registrar)
    body._start("200 OK", _JSON_HEADERS, shared=True)  # checked; copied as it is sent

    answer = _Answer(hub, body, render)
    try:
        batch = hub.poll(cursor, answer)
        if batch is not None:
            body.finish(render(batch))
        else:
            body.on_close(answer)  # with no batch: withdraw
    except BaseException:
        body.close()  # never returned, so nobody else would: withdraw it, give its bytes back
        raise
    return body


def wait_for_messages(hub: Hub, cursor: str | None, timeout: float = _DEFAULT_TIMEOUT) -> Batch:
    """Block the calling greenlet or thread until there are messages after ``cursor``.

    Returns at once if there are, else when the next message is published,
    else after ``timeout`` seconds with an empty batch (same cursor). Never
    call it from a loop callback (the gevent hub itself), where it cannot
    block.
    """
    if cursor is None or cursor == "":
        cursor = hub.cursor
    waiter = make_waiter()
    box: list[Batch] = []

    def wake(batch: Batch) -> None:
        box.append(batch)
        waiter.wake()

    batch = hub.poll(cursor, wake)
    if batch is not None:
        return batch
    if not waiter.wait(timeout):
        if hub.cancel_poll(wake):
            return Batch([], cursor)
        # A publisher took the callback just as the time ran out: its wake-up
        # is on the way (it runs right after the hub's lock is released).
        waiter.wait(1.0)
    return box[0] if box else hub.since(cursor)
