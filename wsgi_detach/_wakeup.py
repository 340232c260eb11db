"""Waiting and waking across greenlets and OS threads: the one module that knows which is which.

Theory of operation
-------------------
A :class:`~wsgi_detach.DetachedBody` has two sides that may live anywhere:

* the *consumer* is the WSGI server iterating the body. On gevent.pywsgi or
  gunicorn's gevent worker it is a greenlet in a gevent hub; on waitress,
  wsgiref, cheroot or gunicorn's gthread worker it is a plain OS thread that
  may never have touched gevent;
* a *producer* is whatever calls ``put()``: a greenlet in the same hub, a loop
  callback, or a plain ``threading.Thread`` in a process that gevent never
  monkey-patched.

Whoever has to block (the consumer on an empty buffer, a producer on a full
one) asks :func:`make_waiter` for a one-shot :class:`Waiter` suited to *its own*
context, registers it with the body under the body's lock, and calls
``wait()``. Whoever changes the state unregisters it under the same lock and
calls ``wake()``; because unregistering happens under the lock, each waiter is
woken at most once.

Why not ``gevent.queue.Queue`` or ``gevent.event.Event``: a greenlet blocked in
a hub that has nothing else to do sleeps in ``epoll_wait``; a plain thread that
calls ``Queue.put()`` changes Python objects but does not wake that system call,
so the greenlet runs only when some unrelated event happens (never, on an idle
pywsgi server). Nor gevent's ``loop.run_callback_threadsafe``: it appends to the
loop's callback list and then adjusts the loop's reference count and prepare
watcher from the calling thread ("XXX: This may not be threadsafe", says its
source). Under a burst of cross-thread wake-ups (a thousand clients leaving
at once, each seen by the disconnect watcher's thread) that count went to -1
and the server's hub left its loop with ``LoopExit``: the soak test caught it
about one run in four. So every hub that is woken from other threads gets one
:class:`_Inbox`: a thread-safe deque of callbacks plus one libev *async
watcher*, whose ``send()`` libev guarantees to be safe from any thread; its
callback, in the hub, runs what was posted.

The rule for choosing the kind of waiter: *if this thread has a gevent hub,
wait cooperatively in it*. That covers pywsgi and gunicorn's gevent worker, and
also a threaded server whose app spawned greenlets on the request thread (they
can only run while that thread's hub runs, so a thread-style wait would
deadlock them). A thread without a hub waits on a real (never monkey-patched)
lock. Calling from inside the hub greenlet itself, where blocking would stop
every greenlet, raises :class:`CannotBlockHere`.

Greenlet producers have the mirror-image problem. A greenlet spawned on a
threaded server's request thread runs only while that thread runs its hub,
that is while the server iterates the body; once the request ends the thread
goes back to the server and the greenlet is frozen forever, never reaching the
``put()`` that would tell it the client left. :func:`spawn_greenlet` therefore
spawns in the caller's hub only when the caller is itself a greenlet run by a
hub (gevent servers), and otherwise in one process-wide *producer hub*: a
daemon OS thread that does nothing but run a gevent loop.

This module imports nothing of ours.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections import deque
from typing import Any, Callable, Final, Protocol

import gevent
from gevent import spawn as _gevent_spawn
from gevent.hub import Waiter as _GeventHubWaiter
from gevent.monkey import get_original
from greenlet import getcurrent

try:  # gevent >= 20: the per-thread hub, without creating one
    from gevent._hub_local import get_hub_if_exists as _get_hub_if_exists
except ImportError:  # pragma: no cover - older gevent
    from gevent.hub import _get_hub as _get_hub_if_exists

__all__ = [
    "CannotBlockHere",
    "RealThread",
    "Waiter",
    "allocate_lock",
    "get_ident",
    "hub_poster",
    "in_hub",
    "make_waiter",
    "reuse_waiter",
    "runner_here",
    "spawn_greenlet",
    "start_beside",
    "start_real_thread",
]

_log = logging.getLogger("wsgi_detach")

#: A real OS lock, even after ``gevent.monkey.patch_all()``. The body holds it
#: only around short, non-switching critical sections, so a real lock is both
#: correct (it excludes real threads) and cheaper than a cooperative one.
allocate_lock: Callable[[], Any] = get_original("_thread", "allocate_lock")

#: The real OS thread id (monkey-patching makes ``threading.get_ident`` return
#: a greenlet id, which would make two greenlets look like two threads).
get_ident: Callable[[], int] = get_original("_thread", "get_ident")


#: How long a waiter without a timeout keeps its hub alive before it returns
#: False and its caller, having no deadline, simply waits again.
_KEEP_ALIVE = 3600.0


class CannotBlockHere(RuntimeError):
    """Raised by :func:`make_waiter` when called from the gevent hub greenlet."""


class Waiter(Protocol):
    """A one-shot wake-up for one blocked caller."""

    def wait(self, timeout: float | None) -> bool:
        """Block until woken (True) or until ``timeout`` seconds pass (False)."""

    def wake(self) -> None:
        """Wake the waiter; callable from any greenlet or thread, at most once."""


class _Inbox:
    """Callbacks posted into one hub from other OS threads, through one async watcher."""

    __slots__ = ("__weakref__", "_async", "_keep_alive", "_pending", "_waiting")

    def __init__(self, hub: Any) -> None:  # in the hub's own thread
        self._pending: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._async = hub.loop.async_()
        self._async.start(self._drain)
        # Not a reason to keep the loop running by itself: whoever waits for
        # a post holds the keep-alive timer below (see _HubWaiter.wait).
        self._async.ref = False
        # One referenced timer, running while any waiter of this hub waits
        # without a timeout: it keeps the loop from deciding that nothing can
        # ever wake them (LoopExit). One for the hub, not one per wait: a
        # libev timer start and stop per delivered chunk is a heap insert and
        # removal among every other stream's timers.
        self._keep_alive = hub.loop.timer(_KEEP_ALIVE, _KEEP_ALIVE)
        self._waiting = 0

    def hold(self) -> None:
        """A waiter of this hub starts waiting (in the hub's thread): keep the loop alive."""
        self._waiting += 1
        if self._waiting == 1:
            self._keep_alive.start(_nothing)

    def release(self) -> None:
        """That waiter stopped waiting (in the hub's thread)."""
        self._waiting -= 1
        if not self._waiting:
            self._keep_alive.stop()

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` in the hub, soon; callable from any thread."""
        self._pending.append((fn, args))  # deque.append is atomic
        self._async.send()  # libev: safe from any thread; sends coalesce

    def spawn(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` in a new greenlet of the hub, soon; callable from any thread."""
        self.post(_gevent_spawn, fn)

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            fn, args = pending.popleft()
            try:
                fn(*args)
            except Exception:
                _log.exception("callback %r posted into the hub raised", fn)


def _nothing() -> None:
    """The keep-alive timer's callback: its only job is to be there."""


_inboxes: weakref.WeakKeyDictionary[Any, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = allocate_lock()


def _nobody() -> None:
    """A dead weak reference's answer."""


def _inbox(hub: Any) -> _Inbox:
    """The hub's inbox; create it only from the hub's own thread."""
    last_hub, last_inbox = _last_inbox[0]
    if last_hub() is hub:
        inbox: _Inbox | None = last_inbox()
        if inbox is not None:
            return inbox
    inbox = _inboxes.get(hub)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.get(hub)
            if inbox is None:
                inbox = _inboxes[hub] = _Inbox(hub)
    _last_inbox[0] = (weakref.ref(hub), weakref.ref(inbox))  # one tuple, replaced whole
    return inbox


#: The last hub asked for and its inbox: a request asks twice for its own
#: hub's (its waiter, its disconnect watch), and a weak dictionary's look-up
#: makes a weak reference each time. Weak too, so that it keeps no hub or
#: inbox alive.
_last_inbox: list[tuple[Callable[[], Any], Callable[[], Any]]] = [(_nobody, _nobody)]


def hub_poster() -> Callable[..., None] | None:
    """A function that runs ``fn(*args)`` in the calling thread's hub, from any thread.

    ``None`` when this thread has no hub. Call it in the hub's thread (it may
    create the inbox there); call what it returns from anywhere.
    """
    hub = _get_hub_if_exists()
    return None if hub is None else _inbox(hub).post


class _HubWaiter:
    """Waits cooperatively in this thread's gevent hub."""

    __slots__ = ("_hub", "_ident", "_inbox", "_switch", "_time_out", "_waiter")

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._ident = hub.thread_ident  # the thread that runs it: this one
        self._waiter = _GeventHubWaiter(hub)
        self._inbox = _inbox(hub)
        # Bound once: a wait then makes no object but its timer (a waiting
        # body's objects are what the collector's young collections walk).
        self._switch = self._waiter.switch
        self._time_out = functools.partial(self._switch, False)

    def wait(self, timeout: float | None) -> bool:
        # Always keep a referenced timer running, even without a timeout: a
        # wake-up from another thread arrives through the loop's unreferenced
        # async watcher, so a hub with nothing else to watch (no listening
        # socket, say) would otherwise decide it can never be woken and raise
        # LoopExit. Without a timeout, that is the hub's shared keep-alive.
        timer = None
        if timeout is None:
            self._inbox.hold()
        else:
            timer = self._hub.loop.timer(max(timeout, 0.0))
            timer.start(self._time_out)
        try:
            return bool(self._waiter.get())
        finally:
            # A wake-up that comes after this (one that lost the race with the
            # timer) only stores its value: the next wait() returns at once,
            # once -- which reuse_waiter's callers accept.
            self._waiter.clear()
            if timer is None:
                self._inbox.release()
            else:
                timer.close()

    def wake(self) -> None:
        # Waiter.switch must run in the hub: a loop callback from this thread,
        # the hub's inbox from another (see the module docstring for why not
        # run_callback_threadsafe).
        if get_ident() == self._ident:
            self._hub.loop.run_callback(self._switch, True)
        else:
            self._inbox.post(self._switch, True)


class _ThreadWaiter:
    """Waits on a real lock; for threads that have no gevent hub."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._lock.acquire()

    def wait(self, timeout: float | None) -> bool:
        # Capped like the hub waiter (a lock cannot wait past TIMEOUT_MAX);
        # a caller without a deadline simply waits again.
        limit = _KEEP_ALIVE if timeout is None else min(max(timeout, 0.0), _KEEP_ALIVE)
        return bool(self._lock.acquire(True, limit))

    def wake(self) -> None:
        self._lock.release()


def in_hub() -> bool:
    """True when the caller runs in the gevent hub greenlet (a loop callback)."""
    hub = _get_hub_if_exists()
    return hub is not None and getcurrent() is hub


def make_waiter() -> Waiter:
    """Return a one-shot waiter suited to the calling greenlet or thread.

    Raises:
        CannotBlockHere: when called from the gevent hub greenlet itself.
    """
    hub = _get_hub_if_exists()
    if hub is None:
        return _ThreadWaiter()
    if getcurrent() is hub:
        raise CannotBlockHere(
            "cannot block in the gevent hub (this is a loop callback): blocking here "
            "would stop every greenlet in the process"
        )
    return _HubWaiter(hub)


def reuse_waiter() -> Waiter:
    """A waiter for a caller that waits over and over and checks again after every wake-up.

    In a greenlet, the one that greenlet keeps for all such waits (a
    server's connection greenlet consumes one body after another, one per
    request), made at its first: it spares a waiter and its bound methods
    per body, objects that every waiting long-poll would otherwise hold for
    the collector's young collections to walk. Only the greenlet's own: a
    body handed from one greenlet to another gets the new one's waiter, so
    two greenlets never share one. The price: a wake-up that arrives after
    its wait already ended (the timeout won the race, or the body it was
    for is gone) makes the *next* wait return True at once, so the caller
    must check again after every wake-up. A greenlet that takes no
    attributes gets a new waiter each time; thread waiters are never
    reused (a late wake-up would release their lock twice).
    """
    hub = _get_hub_if_exists()
    current = getcurrent()
    if hub is None or current is hub:
        return make_waiter()  # a thread waiter; in the hub itself, CannotBlockHere
    kept = getattr(current, _KEPT_WAITER, None)
    if type(kept) is _HubWaiter and kept._hub is hub:
        return kept
    waiter = _HubWaiter(hub)
    try:
        setattr(current, _KEPT_WAITER, waiter)
    except AttributeError:  # a greenlet class without attributes: a waiter per wait
        pass
    return waiter


#: The greenlet attribute where :func:`reuse_waiter` keeps a greenlet's waiter.
_KEPT_WAITER: Final = "_wsgi_detach_waiter"


def hub_of_this_greenlet() -> Any:
    """The running hub that schedules the calling greenlet; None in the hub itself, or in a
    thread whose greenlets no hub runs (a plain thread of a threaded server)."""
    hub = _get_hub_if_exists()
    if hub is None:
        return None
    current = getcurrent()
    if current is hub or current.parent is not hub:
        return None
    return hub


def _run_by_a_hub() -> bool:
    """True when the caller is a greenlet that a running hub schedules (or the hub)."""
    return in_hub() or hub_of_this_greenlet() is not None


class _ProducerHub:
    """A daemon OS thread running a gevent hub forever, for greenlet producers
    spawned from plain threads."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.hub: Any = None
        self.post: Callable[..., None] = _call
        ready = allocate_lock()
        ready.acquire()
        _start_thread(self._run, (ready,))
        if not ready.acquire(True, 10.0):  # pragma: no cover - a machine in trouble
            raise RuntimeError("the wsgi_detach producer hub thread did not start")

    def _run(self, ready: Any) -> None:
        self.hub = gevent.get_hub()
        self.post = _inbox(self.hub).post
        ready.release()
        while True:  # keep a referenced timer so that the loop never exits
            gevent.sleep(3600)

    def spawn(self, fn: Callable[..., object], args: Any, kwargs: Any) -> gevent.Greenlet:
        started: list[gevent.Greenlet] = []
        latch = allocate_lock()
        latch.acquire()

        def start() -> None:
            started.append(gevent.spawn(fn, *args, **kwargs))
            latch.release()

        self.post(start)
        if not latch.acquire(True, 10.0):  # pragma: no cover - a machine in trouble
            raise RuntimeError("the wsgi_detach producer hub did not start the greenlet")
        return started[0]


_producer_hub: _ProducerHub | None = None
_producer_hub_lock = allocate_lock()


def spawn_greenlet(fn: Callable[..., object], *args: Any, **kwargs: Any) -> gevent.Greenlet:
    """Spawn ``fn`` in a greenlet whose hub keeps running after the caller's request ends.

    In the caller's hub when the caller is a greenlet (gevent.pywsgi, gunicorn's
    gevent worker, anything monkey-patched); from a plain thread (waitress,
    wsgiref, gunicorn gthread), in the process-wide producer hub thread. The
    greenlet belongs to that hub: join or kill it from there, or watch it with
    ``link``/``dead`` rather than ``join`` from another thread. All such
    greenlets share that one thread, so a call that blocks without yielding
    to gevent (``time.sleep`` in an unpatched process, a blocking client)
    stalls every one of them: run blocking code with :func:`start_real_thread`.
    """
    if _run_by_a_hub():
        return gevent.spawn(fn, *args, **kwargs)
    global _producer_hub
    with _producer_hub_lock:
        if _producer_hub is None or _producer_hub.pid != os.getpid():  # new after a fork
            _producer_hub = _ProducerHub()
        producer_hub = _producer_hub
    return producer_hub.spawn(fn, args, kwargs)


def runner_here() -> Callable[[Callable[[], object]], None]:
    """Capture where the caller runs; return a function that runs ``fn()`` there, from any thread.

    For code that learns something on one thread (a disconnect watcher's OS
    thread) and must act where the request lives. In a thread with a gevent
    hub, ``fn`` runs in a new greenlet of that hub, so it may block
    cooperatively and may touch greenlet-only objects; it is posted through
    the hub's inbox, which wakes a loop asleep in ``epoll_wait``.
    In a thread without a hub there is nothing to go back to: ``fn`` runs at
    once in whichever thread calls the returned function.
    """
    hub = _get_hub_if_exists()
    if hub is None:
        return _call
    # A bound method (64 bytes) rather than a closure over hub_poster()'s,
    # which cost four times that: every watched stream keeps one.
    return _inbox(hub).spawn


def _call(fn: Callable[..., object], *args: Any) -> None:
    fn(*args)


def start_beside(fn: Callable[[], object]) -> None:
    """Run ``fn()`` beside the caller: in a greenlet if this thread has a hub, else in a thread.

    For work started from a signal handler that must block (a drain): in a
    gevent process a new OS thread could not wait on greenlets, and on a
    threaded server there may be no running hub to host a greenlet.
    """
    if _get_hub_if_exists() is not None:
        _gevent_spawn(fn)
    else:
        _start_thread(fn, ())


_start_thread: Callable[..., int] = get_original("_thread", "start_new_thread")


class RealThread:
    """A handle on an OS thread started with the original ``start_new_thread``.

    After ``gevent.monkey.patch_all()`` a ``threading.Thread`` is a greenlet,
    so "blocking code in a thread" would block the whole hub; this is always a
    real thread. ``join()`` blocks the calling OS thread (not cooperatively):
    call it from a thread, or poll ``is_alive()``.
    """

    def __init__(self, fn: Callable[..., object], args: tuple[Any, ...], name: str) -> None:
        self.name = name
        self._running = allocate_lock()
        self._running.acquire()
        self.ident: int = _start_thread(self._run, (fn, args))

    def _run(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except BaseException:
            _log.exception("thread %s raised", self.name)
        finally:
            self._running.release()

    def is_alive(self) -> bool:
        return bool(self._running.locked())

    def join(self, timeout: float | None = None) -> None:
        if self._running.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            self._running.release()

    def __repr__(self) -> str:
        return f"<RealThread {self.name} {'running' if self.is_alive() else 'done'}>"


def start_real_thread(
    fn: Callable[..., object], *args: Any, name: str = "wsgi_detach"
) -> RealThread:
    """Run ``fn(*args)`` in a new real OS thread, monkey-patched process or not."""
    return RealThread(fn, args, name)
