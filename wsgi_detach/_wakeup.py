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
pywsgi server; see PEP3333-NOTES "Waking a waiting greenlet from another OS
thread"). The loop's own ``run_callback_threadsafe`` writes to the loop's
wake-up descriptor, which is the documented way to wake it from another thread.

The rule for choosing the kind of waiter: *if this thread has a gevent hub,
wait cooperatively in it*. That covers pywsgi and gunicorn's gevent worker, and
also a threaded server whose app spawned greenlets on the request thread (they
can only run while that thread's hub runs, so a thread-style wait would
deadlock them). A thread without a hub waits on a real (never monkey-patched)
lock. Calling from inside the hub greenlet itself, where blocking would stop
every greenlet, raises :class:`CannotBlockHere`.

This module imports nothing of ours.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from gevent.hub import Waiter as _GeventHubWaiter
from gevent.monkey import get_original
from greenlet import getcurrent

try:  # gevent >= 20: the per-thread hub, without creating one
    from gevent._hub_local import get_hub_if_exists as _get_hub_if_exists
except ImportError:  # pragma: no cover - older gevent
    from gevent.hub import _get_hub as _get_hub_if_exists

__all__ = [
    "CannotBlockHere",
    "Waiter",
    "allocate_lock",
    "get_ident",
    "in_hub",
    "make_waiter",
]

#: A real OS lock, even after ``gevent.monkey.patch_all()``. The body holds it
#: only around short, non-switching critical sections, so a real lock is both
#: correct (it excludes real threads) and cheaper than a cooperative one.
allocate_lock: Callable[[], Any] = get_original("_thread", "allocate_lock")

#: The real OS thread id (monkey-patching makes ``threading.get_ident`` return
#: a greenlet id, which would make two greenlets look like two threads).
get_ident: Callable[[], int] = get_original("_thread", "get_ident")


class CannotBlockHere(RuntimeError):
    """Raised by :func:`make_waiter` when called from the gevent hub greenlet."""


class Waiter(Protocol):
    """A one-shot wake-up for one blocked caller."""

    def wait(self, timeout: float | None) -> bool:
        """Block until woken (True) or until ``timeout`` seconds pass (False)."""

    def wake(self) -> None:
        """Wake the waiter; callable from any greenlet or thread, at most once."""


class _HubWaiter:
    """Waits cooperatively in this thread's gevent hub."""

    __slots__ = ("_hub", "_ident", "_waiter")

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._ident = get_ident()
        self._waiter = _GeventHubWaiter(hub)

    def wait(self, timeout: float | None) -> bool:
        if timeout is None:
            return bool(self._waiter.get())
        timer = self._hub.loop.timer(max(timeout, 0.0))
        timer.start(self._waiter.switch, False)
        try:
            return bool(self._waiter.get())
        finally:
            timer.close()

    def wake(self) -> None:
        # Waiter.switch must run in the hub: schedule it as a loop callback.
        # From another OS thread only the threadsafe variant wakes a loop
        # that is asleep in epoll_wait.
        if get_ident() == self._ident:
            self._hub.loop.run_callback(self._waiter.switch, True)
        else:
            self._hub.loop.run_callback_threadsafe(self._waiter.switch, True)


class _ThreadWaiter:
    """Waits on a real lock; for threads that have no gevent hub."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._lock.acquire()

    def wait(self, timeout: float | None) -> bool:
        if timeout is None:
            return bool(self._lock.acquire())
        return bool(self._lock.acquire(True, max(timeout, 0.0)))

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
