"""Recognise detached responses the middleware did not create: the gevent queue of
Bottle's queue-as-body pattern, and bodies hidden inside a framework's own iterator.

Use: :class:`~wsgi_detach.DetachMiddleware` calls :func:`find_inside` on the
iterable an app returned, and :func:`feed` to serve a bare
``gevent.queue.Queue`` through a :class:`~wsgi_detach.DetachedBody`.

Why the queue needs a body in front of it: served as it is, a queue exposes
``__len__`` (pywsgi and waitress then derive a wrong Content-Length), yields
whatever was put (``str``, ``None``), has no ``close()`` and no timeouts
(the server compatibility matrix in the docs shows each server's failure). A pump greenlet
moves each item into a body, so every promise of the body holds, and a
producer that puts a wrong type fails the response instead of corrupting it.
The pump lives in the serving thread's hub, next to the producers of
Bottle's queue-as-body pattern (greenlets spawned by the app); a producer on a plain OS
thread cannot wake a gevent queue at all, and should use ``detach()``.

Why a bounded search of the object graph for framework wrappers: Werkzeug's
``ClosingIterator`` keeps the body behind a ``functools.partial`` around a
generator, Bottle's ``_closeiter`` behind ``itertools.chain``, Django's
``StreamingHttpResponse`` behind ``map``. None exposes the body by a public
attribute, but all of them hold a reference to it, which
``gc.get_referents`` follows. The search skips functions, bound methods,
classes, modules and module globals (a module-level queue is not this
response's body) and gives up after :data:`SEARCH_LIMIT` objects, so an
ordinary response pays a few microseconds. A *queue* counts only when the
path to it runs through containers, ``functools``/``itertools`` objects and
those frameworks' own objects and generators: an app's own generator or
object that drains a private work queue is an ordinary response, not
Bottle's queue-as-body pattern (a raw app returns the queue itself). A :class:`DetachedBody`
counts wherever it is found. A queue found this way is
iterated by the framework, not by us: the middleware can count it, add
streaming headers and end it on a disconnect, but not enforce timeouts or
type checks; return the queue from a raw WSGI app or use ``detach()`` for
those.
"""

from __future__ import annotations

import gc
import types
from collections import deque
from typing import Callable, Final, Union

import gevent
from gevent import GreenletExit
from gevent.queue import Channel, SimpleQueue
from greenlet import getcurrent

from ._body import DetachedBody
from ._wakeup import get_ident, hub_poster, in_hub

__all__ = ["SEARCH_LIMIT", "Found", "feed", "find_inside", "is_queue"]

#: How many objects :func:`find_inside` looks at before it gives up. Werkzeug,
#: Bottle and Django need fewer than 20; the limit only bounds the cost of a
#: large ordinary response (a list of many chunks).
SEARCH_LIMIT: Final = 64

_LEAVES: Final = (
    bytes,
    str,
    int,
    float,
    bytearray,
    memoryview,
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    # A close callback (``response.close``) leads back to the whole response
    # object, its headers and the request's environ: slow to walk, and the
    # body is reached through the iterator anyway.
    types.MethodType,
)

Found = Union[DetachedBody, SimpleQueue, Channel]


def is_queue(obj: object) -> bool:
    """True for the body of Bottle's queue-as-body pattern: any gevent queue (``Queue``...)."""
    return isinstance(obj, (SimpleQueue, Channel))


def find_inside(iterable: object) -> Found | None:
    """A :class:`DetachedBody` or gevent queue that ``iterable`` wraps, if it can be seen.

    A body is found wherever it is (it can only be a response body). A queue
    only through framework plumbing (see :func:`_plumbing`): a queue an
    app's own generator or object consumes is its private business.
    """
    seen = {id(iterable)}
    root_trusted = _plumbing(iterable)
    todo = deque((child, root_trusted) for child in gc.get_referents(iterable))
    budget = SEARCH_LIMIT
    while todo and budget:
        obj, trusted = todo.popleft()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        budget -= 1
        if isinstance(obj, DetachedBody):
            return obj
        if isinstance(obj, (SimpleQueue, Channel)):
            if trusted:
                return obj
            continue  # e.g. a work queue the app's own generator drains
        if isinstance(obj, dict) and "__builtins__" in obj:
            continue  # a module's globals: everything in it, nothing of this response
        inner = trusted and _plumbing(obj)
        todo.extend((child, inner) for child in gc.get_referents(obj))
    return None


#: Modules whose objects may stand between a response and Bottle's queue-as-body pattern:
#: containers and function tools, and the frameworks whose wrappers we know
#: (Werkzeug's ClosingIterator and its encoding generator, Bottle's
#: _closeiter, Django's StreamingHttpResponse and its ``map``, WebOb).
_PLUMBING_MODULES: Final = frozenset(
    {"builtins", "functools", "itertools", "werkzeug", "flask", "bottle", "django", "webob"}
)


def _plumbing(obj: object) -> bool:
    """True if a queue seen through ``obj`` may be the response's own body."""
    if isinstance(obj, types.GeneratorType):  # builtins by type: judge it by its code's module
        frame = obj.gi_frame
        module = frame.f_globals.get("__name__", "") if frame is not None else ""
    else:
        module = type(obj).__module__
    return str(module).partition(".")[0] in _PLUMBING_MODULES


def feed(body: DetachedBody, queue: SimpleQueue | Channel) -> Callable[[], None]:
    """Move what producers put into ``queue`` into ``body``, until ``StopIteration``.

    The pump is a greenlet of the *calling* thread's hub, where the pattern's
    producers live (greenlets the app spawned): a gevent queue cannot wake a
    greenlet of another thread. It finishes the body at ``StopIteration``,
    fails it on a wrong chunk type, and is killed when the body closes, so a
    client that leaves does not leave it blocked on the queue forever.

    On a threaded server the request thread runs its hub only while the
    server iterates the body: once the request ends, a greenlet left in that
    hub would be frozen for good. So when the body is closed on the pump's
    own thread (the server's ``close()``), the kill runs the hub right there
    until the pump is gone. The pattern's own producer greenlets on such a
    thread are frozen all the same -- nothing can run them -- which is why
    ``detach()`` and ``body.spawn()`` are the way to produce on threaded
    servers.

    Returns the stop function, for the caller to call from the server's
    ``close()`` too: when something on another thread (a disconnect
    watcher) closed the body first, the ``on_close`` kill could only be
    scheduled in a hub that may never run again.
    """
    pump = gevent.spawn(_pump, queue, body)
    post = hub_poster()
    assert post is not None  # gevent.spawn just made sure this thread has a hub
    pump_thread = get_ident()

    def stop_pump() -> None:
        if pump.dead:
            return
        if get_ident() != pump_thread:
            # Closed from another thread (a drain, a watcher): schedule the
            # kill in the pump's hub.
            post(pump.kill, GreenletExit, False)
        elif getcurrent().parent is None and not in_hub():
            # The thread's main greenlet -- a threaded server's own close():
            # run the hub here until the pump is gone, since nothing else
            # may ever run it again.
            pump.kill(GreenletExit, block=True, timeout=_KILL_TIMEOUT)
        else:
            # A greenlet the hub runs (pywsgi's handler, a watcher's
            # callback) or a loop callback: the hub is running, so a
            # scheduled kill happens; blocking here could park this greenlet
            # for good once a threaded server's request thread leaves its hub.
            pump.kill(GreenletExit, block=False)

    body.on_close(stop_pump)
    return stop_pump


#: How long ``close()`` may run the request thread's hub to let a pump die.
#: A pump blocked on the queue dies at once; the bound only guards against a
#: producer that ignores GreenletExit.
_KILL_TIMEOUT: Final = 1.0


def _pump(queue: SimpleQueue | Channel, body: DetachedBody) -> None:
    with body:  # finishes the body when the loop ends, fails it if put() raises
        for item in queue:  # a gevent queue's iteration ends at the StopIteration marker
            body.put(item)
