"""Disconnect watchers: notice a client that left an *idle* stream, on servers that let us look.

Why this exists
---------------
A WSGI server learns that a client left only when a write fails, so a
detached stream that is waiting for its producer holds its connection, its
greenlet or thread and its producer forever. Some servers expose the connection
in the environ, and there we can watch it while the stream is idle:

==============================  ==========================================  ============
server                          what it exposes                             how we watch
==============================  ==========================================  ============
gevent.pywsgi + DetachHandler   ``environ["wsgi_detach.watch"]``            its own read
                                (and ``environ["wsgi_detach.socket"]``)     watcher, below
gunicorn (any worker)           ``environ["gunicorn.socket"]``              epoll, below
StockDetachHandler              ``environ["wsgi_detach.socket"]``           epoll, below
waitress                        ``environ["waitress.client_disconnected"]``  polled 4x/s
                                (needs ``channel_request_lookahead >= 1``)
cheroot, wsgiref, others        nothing                                     heartbeats
==============================  ==========================================  ============

Theory of operation
-------------------
One daemon OS thread per process (started when the first watch reaches it
-- under a gevent server, the first that outlives its delay -- and again
after a fork) blocks in ``epoll_wait`` on every watched socket, registered for
``EPOLLRDHUP`` only: the kernel reports the peer's FIN (or an RST, as
``EPOLLHUP``/``EPOLLERR``), never mere readability, so a pipelined request or
a request body the app did not read does not wake it. On an event it looks
again with ``poll(0)`` (the descriptor may have been closed and reused by a
new connection since ``epoll_wait`` returned) and checks ``FIONREAD``: no
unread bytes means the read side is at EOF (what a 0-byte ``MSG_PEEK`` would
say); unread bytes mean the client half-closed *after* sending more, which is
not treated as a disconnect -- the socket is dropped from the watch, and the
next failing write will tell. ``FIONREAD`` sees only what is still in the
kernel, though: pywsgi (and gunicorn) read ahead into their own buffer, so a
pipelined request they already read, followed by a half-close, looks like a
departure. Either way a reported disconnect ends the response with an
*abort* (no terminating chunk, see :func:`exposes_socket`), never a clean
end, so a half-closed client that still reads sees a truncated response as
truncated, and its pipelined request goes unanswered (a client must be ready
to resend those after a closed connection). An idle stream therefore costs
one epoll registration (~700 bytes with our bookkeeping); detection is as
fast as the kernel delivers the FIN. The callback never runs in the watcher
thread itself: in the request's gevent hub if it has one, else in a thread
of its own, so a slow ``on_close`` callback delays nobody else's detection.

Registration waits :data:`WATCH_DELAY` (0.1 s): most responses (a long-poll
answered at once, an ordinary stream) end before that, and then cost no
``epoll_ctl`` at all, only a dictionary entry. The thread wakes when the oldest
pending socket is due and registers every one due within the next half
delay, so under a steady stream of requests it wakes at most about 20
times a second. With nothing pending it sleeps without a timeout, and the
next socket to arrive wakes it (through its pipe, once) to set a deadline.
A client that leaves in the first 0.1 s is noticed when its socket is
registered: epoll reports a hang-up that already happened. Under a gevent
server the watch does not even reach the thread before it is due: it waits
in its own hub's queue, where starting and stopping it takes no lock (see
:class:`_Deferrals`); a plain thread of a threaded server has no hub to
wait in, so its watches go to the thread at once.

``waitress.client_disconnected`` is a function, not a descriptor, so those
are polled every :data:`POLL_INTERVAL`.

``DetachHandler`` (with its speed-ups, the default) offers a cheaper way of
its own, which :func:`watch` takes first: each connection keeps one libev
read watcher for its whole life, already in the hub's epoll set, and a watch
only swaps its callback (:class:`ConnectionReader`). No lock, no thread, no
object per watch, no system call once the watcher is started (from the
connection's first wait on, it stays started), and a departure is noticed as
soon as the kernel reports it (0.1 ms, ``python -m bench.mw_disconnect``)
instead of after the delay. When bytes arrive without a hang-up, that watch
moves to the thread above, so the ``EPOLLRDHUP`` rules hold for it too.


Why an OS thread and not a greenlet per stream or a libev io watcher
(measured in bench/mw_idle_watch.py, 5 000 idle streams): one thread serves
gevent and threaded servers alike; it never wakes while streams are idle and
no new ones arrive (a
250 ms peek loop costs 4-5 % CPU, a greenlet per stream 8.8 KiB);
``EPOLLRDHUP`` is not available through libev's io watchers, which fire on
readability and must stop watching at a pipelined request. The thread never touches a server object:
it calls back, through :func:`wsgi_detach._wakeup.runner_here`, into the
greenlet hub or thread that registered the watch.

Linux only: elsewhere :func:`watch` returns None and heartbeats are the
fallback. When not to rely on it: behind a proxy, the watched connection is the
proxy's, which notices a client leaving only if it is configured to close the
upstream (nginx does with ``proxy_ignore_client_abort off``, the default).
Use a heartbeat there too. This module knows nothing of bodies or WSGI apps:
it is handed an environ and a callback.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import termios
import time
import weakref
from collections import deque
from typing import Any, Callable, Final

from gevent import spawn as _gevent_spawn
from gevent.hub import Waiter as _Waiter
from gevent.monkey import get_original

from ._wakeup import (
    allocate_lock,
    get_ident,
    hub_of_this_greenlet,
    runner_here,
    start_beside,
)

__all__ = [
    "OWN_WATCH_KEY",
    "POLL_INTERVAL",
    "SOCKET_KEY",
    "WATCH_DELAY",
    "ConnectionReader",
    "exposes_socket",
    "watch",
]

log = logging.getLogger("wsgi_detach")

#: Where :class:`~wsgi_detach.DetachHandler` puts the client socket.
SOCKET_KEY: Final = "wsgi_detach.socket"

#: Where :class:`~wsgi_detach.DetachHandler` puts its own watch for the
#: client leaving (``watch(on_disconnect) -> cancel or None``): through the
#: connection's :class:`ConnectionReader`, before any other way is tried.
OWN_WATCH_KEY: Final = "wsgi_detach.watch"

#: Seconds between two looks at ``waitress.client_disconnected``: well inside
#: the 1 s we promise, and 4 cheap calls per second per idle stream.
POLL_INTERVAL: Final = 0.25

#: Seconds a socket waits before it is registered with epoll: a response that
#: ends sooner never costs the two ``epoll_ctl`` calls.
WATCH_DELAY: Final = 0.1

_RDHUP: Final = getattr(select, "EPOLLRDHUP", 0x2000)
_GONE: Final = select.POLLHUP | select.POLLERR  # == EPOLLHUP | EPOLLERR, and defined off Linux

# A real OS thread and a real epoll even under gevent.monkey.patch_all().
_start_thread: Callable[..., int] = get_original("_thread", "start_new_thread")
try:
    _epoll: Callable[[], Any] | None = get_original("select", "epoll")
    _poll: Callable[[], Any] = get_original("select", "poll")
except AttributeError:  # not Linux: no epoll, no EPOLLRDHUP; heartbeats are the fallback
    _epoll = None

Cancel = Callable[[], object]


class _Watch:
    """One watched request: how to reach it back, and what to call.

    Calling it stops the watch: it is the cancel function :func:`watch`
    returns, so an idle stream holds no closure over it besides.
    """

    __slots__ = ("check", "due", "fd", "monitor", "on_disconnect", "run")

    def __init__(
        self,
        monitor: _Monitor,
        fd: int,
        check: Callable[[], bool] | None,
        on_disconnect: Callable[[], object],
        delay: float = WATCH_DELAY,
    ) -> None:
        self.monitor = monitor
        self.due = time.monotonic() + delay  # when to register it with epoll
        self.fd = fd
        self.check = check
        self.on_disconnect = on_disconnect
        self.run = runner_here()

    def __call__(self) -> bool:
        """Stop watching; True if it was still watched."""
        return self.monitor._forget(self)


class _Monitor:
    """The per-process watcher thread and what it watches."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = allocate_lock()
        assert _epoll is not None
        self._epoll = _epoll()
        self._by_fd: dict[int, _Watch] = {}
        self._pending: dict[_Watch, None] = {}  # not yet registered, oldest first
        self._sleeping = False  # the thread waits with no deadline: a new watch must wake it
        self._polled: list[_Watch] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        _start_thread(self._loop, ())

    # ------------------------------------------------------------ registration (any thread)

    def watch_socket(
        self, fd: int, on_disconnect: Callable[[], object], delay: float = WATCH_DELAY
    ) -> Cancel:
        entry = _Watch(self, fd, None, on_disconnect, delay)
        with self._lock:
            self._pending[entry] = None
            wake, self._sleeping = self._sleeping, False
        if wake:  # the thread waits without a timeout: give it this one's deadline
            os.write(self._wake_w, b"x")
        return entry

    def _register_due(self) -> None:
        """Register with epoll the sockets due now or within half a delay (watcher thread)."""
        limit = time.monotonic() + WATCH_DELAY / 2  # a batch per wake-up, not one each
        with self._lock:
            pending = self._pending
            while pending:
                entry = next(iter(pending))
                if entry.due > limit:
                    break
                del pending[entry]
                try:
                    self._epoll.register(entry.fd, _RDHUP)
                except FileExistsError:
                    # A previous request on a reused descriptor was closed by
                    # the server before it was unwatched: take the slot over.
                    self._epoll.modify(entry.fd, _RDHUP)
                except OSError as exc:  # closed before it was unwatched: nothing to watch
                    log.debug("fd %d not watched: %s", entry.fd, exc)
                    continue
                self._by_fd[entry.fd] = entry

    def watch_poll(self, check: Callable[[], bool], on_disconnect: Callable[[], object]) -> Cancel:
        entry = _Watch(self, -1, check, on_disconnect)
        with self._lock:
            self._polled.append(entry)
            first = len(self._polled) == 1
        if first:
            os.write(self._wake_w, b"x")  # switch the thread from waiting forever to polling
        return entry

    def _forget(self, entry: _Watch) -> bool:
        """Stop watching ``entry``; True if it was still watched (so it is ours to report)."""
        with self._lock:
            if entry.check is not None:
                if entry not in self._polled:
                    return False
                self._polled.remove(entry)
                return True
            if entry in self._pending:
                del self._pending[entry]
                return True
            # The descriptor may have been closed and reused by a later
            # request: only the entry that owns the slot may clear it.
            if self._by_fd.get(entry.fd) is not entry:
                return False
            del self._by_fd[entry.fd]
            try:
                self._epoll.unregister(entry.fd)
            except OSError:  # already closed: the kernel dropped it itself
                pass
            return True

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            try:
                self._once()
            except Exception:  # never let the watcher die: every stream relies on it
                log.exception("disconnect watcher failed; it keeps running")

    def _once(self) -> None:
        with self._lock:
            due = next(iter(self._pending)).due if self._pending else None
            self._sleeping = due is None
        timeout = -1.0 if due is None else max(due - time.monotonic(), 0.0)
        if self._polled:
            timeout = POLL_INTERVAL if timeout < 0 else min(timeout, POLL_INTERVAL)
        events = self._epoll.poll(timeout)
        self._register_due()
        for fd, _ in events:
            if fd == self._wake_r:
                os.read(self._wake_r, 4096)
                continue
            with self._lock:
                entry = self._by_fd.get(fd)
            if entry is None:
                continue
            verdict = _look(fd)
            if verdict == _LEFT:
                self._report(entry)
            elif verdict == _BYTES_FIRST:
                log.debug("fd %d half-closed with unread bytes: no longer watched", fd)
                self._forget(entry)
            # _STALE: the event was for a connection that has since been closed
            # and its descriptor reused by a request that is still there.
        for entry in list(self._polled):
            assert entry.check is not None
            if entry.check():
                self._report(entry)

    def _report(self, entry: _Watch) -> None:
        if not self._forget(entry):
            return
        if entry.run is runner_here():
            # The request's thread had no gevent hub, so the callback would run
            # right here -- on_close callbacks and all (an unsubscribe RPC, a
            # database write). Give it a thread of its own, so that one slow
            # callback does not hold up noticing every other departure.
            start_beside(lambda: _guarded(entry.on_disconnect))
        else:  # a new greenlet in the request's hub: already beside us
            entry.run(entry.on_disconnect)


def _guarded(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:
        log.exception("disconnect callback %r raised", fn)


_LEFT: Final = "left"
_BYTES_FIRST: Final = "bytes first"
_STALE: Final = "stale"


def _look(fd: int) -> str:
    """Look again, now, at the connection behind ``fd``.

    ``_LEFT``: reset, or the read side at EOF with nothing unread (what a
    0-byte ``MSG_PEEK`` would say). ``_BYTES_FIRST``: the peer half-closed
    after sending bytes nobody read yet (pipelined requests, an unread body).
    ``_STALE``: no hang-up now.
    """
    poller = _poll()
    poller.register(fd, _RDHUP)
    ready = poller.poll(0)
    events = ready[0][1] if ready else 0
    if events & (_GONE | select.POLLNVAL):
        return _LEFT
    if not events & _RDHUP:
        return _STALE
    try:
        buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTCONN, errno.ECONNRESET):
            return _LEFT
        raise
    return _BYTES_FIRST if struct.unpack("i", buf)[0] else _LEFT


def _socket_of(environ: dict[str, Any]) -> Any:
    return environ.get(SOCKET_KEY) or environ.get("gunicorn.socket")


def exposes_socket(environ: dict[str, Any]) -> bool:
    """True when :func:`watch` watches the client socket itself (not a server's own flag).

    Such a server still holds the connection open when the watch reports the
    client gone -- the client may only have half-closed and still read -- so
    a response must then end with an abort, not a clean end. Waitress, the
    flag case, closes the connection itself when it notices.
    """
    return _socket_of(environ) is not None


class _Deferred:
    """A watch its hub has not handed to the watcher thread yet (see :class:`_Deferrals`).

    Calling it stops the watch, as a :class:`_Watch` does: before the hand-over
    by forgetting the callback (the queue drops the entry when it comes to
    it), after it by stopping the watch it became.
    """

    __slots__ = ("due", "fd", "handed", "on_disconnect")

    def __init__(self, fd: int, on_disconnect: Callable[[], object], due: float) -> None:
        self.fd = fd
        self.on_disconnect: Callable[[], object] | None = on_disconnect
        self.due = due
        self.handed: Cancel | None = None

    def __call__(self) -> bool:
        handed = self.handed
        if handed is not None:
            return bool(handed())
        if self.on_disconnect is None:
            return False
        self.on_disconnect = None
        return True


class _Deferrals:
    """The watches of one gevent hub whose responses are younger than :data:`WATCH_DELAY`.

    Most detached responses under a gevent server end within the delay (a
    long-poll answered by the next message): those never need the watcher
    thread. Handing each one to it anyway cost a lock, a dictionary entry
    and a time stamp on the way in, and the same lock on the way out -- a
    few percent of a long-poll. Here a watch starts as an entry at the end
    of this hub's queue, in the hub's own thread, so no lock; one repeating
    timer of the hub (every half delay, only while the queue holds
    something, never keeping the loop alive by itself) hands the entries
    due within the next half delay and still watched to the watcher thread,
    which registers them at once: 0.05-0.1 s after the watch began, as the
    thread does with its own; a client that left meanwhile is noticed then.
    Times are ``time.monotonic()``'s, as the thread's: the loop's cached
    ``now()`` follows the wall clock, and a clock set back would hold every
    entry behind the first.

    Only the hub's own thread adds and cancels (a request's greenlets run
    there), so nothing here needs a lock.
    """

    __slots__ = ("_queue", "_timer")

    def __init__(self, hub: Any) -> None:
        self._queue: deque[_Deferred] = deque()
        self._timer = hub.loop.timer(WATCH_DELAY / 2, WATCH_DELAY / 2)
        self._timer.ref = False

    def add(self, fd: int, on_disconnect: Callable[[], object]) -> _Deferred:
        entry = _Deferred(fd, on_disconnect, time.monotonic() + WATCH_DELAY)
        self._queue.append(entry)
        if not self._timer.active:
            self._timer.start(self._hand_over)
        return entry

    def _hand_over(self) -> None:
        """In the hub: give the watcher thread what is due and still watched."""
        limit = time.monotonic() + WATCH_DELAY / 2  # a batch per tick, as the thread takes them
        queue = self._queue
        while queue:
            entry = queue[0]
            on_disconnect = entry.on_disconnect
            if on_disconnect is not None and entry.due > limit:
                break
            queue.popleft()
            if on_disconnect is None:
                continue  # its response ended in time
            entry.handed = _hand_to_thread(entry.fd, on_disconnect)
            if entry.handed is None:
                entry.on_disconnect = None
        if not queue:
            self._timer.stop()

    def forget_all(self) -> None:
        """Drop every entry: after a fork, the connections are the parent's to watch."""
        for entry in self._queue:
            entry.on_disconnect = None
        self._queue.clear()


def _hand_to_thread(fd: int, on_disconnect: Callable[[], object]) -> Cancel | None:
    """Give a watch to the watcher thread, to register at once; None (logged) if it cannot."""
    try:
        return _get_monitor().watch_socket(fd, on_disconnect, delay=0.0)
    except Exception as exc:  # EPERM, the epoll limit, no thread to be had
        log.warning("cannot watch fd %d for a disconnect (%s); unwatched", fd, exc)
        return None


def _closed_cancel() -> bool:
    return False


class ConnectionReader:
    """A connection's own libev read watcher, kept for the connection's life (``DetachHandler``).

    It does two jobs that would otherwise cost system calls on every request.

    Between requests, :meth:`wait` waits for the next request head. gevent's
    socket starts its watcher for each wait and stops it after; libev then
    leaves the descriptor in epoll, so the next start asks epoll to add it
    again and is refused (``EEXIST``): a failed system call per keep-alive
    request, two when data came first. Here the watcher stays started
    between waits, with a callback that stops it, which runs only if the
    client sends something while nobody waits (a pipelined request, a
    close): the next wait starts it again, as gevent would.

    During a detached response, :meth:`watch` watches for the client leaving.
    The descriptor is already in the loop's epoll set, so a watch only swaps
    the watcher's callback: no lock, no watcher thread, no ``epoll_ctl``
    while the watcher is started (only the first start on a connection, or a
    start after it fired, asks epoll again),
    and a departure is noticed as soon as the kernel reports it, not
    :data:`WATCH_DELAY` later. The watcher fires on readability, not on a
    hang-up alone, so when it fires the connection is looked at again as
    the watcher thread looks (:func:`_look`): a reset or an EOF with nothing
    unread is a departure; bytes that came without a hang-up (a pipelined
    request, a body the app did not read) move the watch to the watcher
    thread, which waits for ``EPOLLRDHUP`` only, as for every other server.

    One watch at a time, for the response in progress, and no object of
    its own: the watch is this reader's state, and :meth:`watch` returns the
    reader's one ``cancel``. Every object a waiting long-poll holds counts
    towards the garbage collector's next young collection, and three more
    per poll (a watch, its callback's arguments, a bound method) made the
    collector run several times as often with 800 waiting polls. The
    middleware cancels at the response's end, before the connection reads
    its next request, so a cancel always belongs to the current watch.

    Only the connection's own thread uses it (its hub runs the callbacks);
    it holds the socket, not the handler, so the environ that carries its
    :meth:`watch` makes no reference cycle with the handler.
    """

    __slots__ = (
        "_handed",
        "_idle",
        "_on_disconnect",
        "_readable_callback",
        "cancel",
        "closed",
        "fd",
        "ident",
        "io",
        "sock",
    )

    def __init__(self, loop: Any, sock: Any, fd: int) -> None:
        self.sock = sock
        self.fd = fd
        self.ident = get_ident()  # the thread whose loop this is
        self.io = loop.io(fd, 1)
        self.closed = False
        self._on_disconnect: Callable[[], object] | None = None
        self._handed: Cancel | None = None  # the watch, moved to the watcher thread
        # Bound once: per-connection cycles through the watcher's callback,
        # which close() breaks (a stopped watcher drops its callback).
        self._idle = self.io.stop
        self._readable_callback: Callable[[], object] = self._readable
        self.cancel: Cancel = self._cancel

    def wait(self) -> None:
        """Wait until the connection has something to read, or the client left."""
        waiter = _Waiter()
        self.io.start(waiter.switch, None)  # on a started watcher: the callback only
        try:
            waiter.get()
        finally:
            if not self.closed:
                self.io.start(self._idle)

    def watch(self, on_disconnect: Callable[[], object]) -> Cancel | None:
        """Call ``on_disconnect()`` once, in a new greenlet, if the client leaves; see above.

        Returns the function that stops the watch, or None when this reader
        cannot watch: called from another thread, or the app detached the
        socket (the descriptor is no longer the connection's).
        """
        if self.closed or get_ident() != self.ident or self.sock.fileno() != self.fd:
            return None
        if self._handed is not None or self._on_disconnect is not None:
            self._cancel()  # a watch nobody stopped: this response's replaces it
        self._on_disconnect = on_disconnect
        self.io.start(self._readable_callback)
        return self.cancel

    def _cancel(self) -> bool:
        """Stop the watch; True if it was still watched (as a :class:`_Watch` says)."""
        handed = self._handed
        if handed is not None:
            self._handed = None
            return bool(handed())
        if self._on_disconnect is None:
            return False
        self._on_disconnect = None
        if not self.closed and self.io.callback is self._readable_callback:
            self.io.start(self._idle)  # back to waiting for nothing in particular
        return True

    def _readable(self) -> None:
        """The watched connection became readable (in its hub): left, or bytes first?"""
        self.io.stop()  # level-triggered: it would fire again at once
        on_disconnect, self._on_disconnect = self._on_disconnect, None
        if on_disconnect is None or self.closed:
            return
        try:
            verdict = _look(self.fd)
        except Exception:  # never into libev, and not to the thread, which would fail alike
            log.exception("looking at fd %d failed; no longer watched", self.fd)
            return
        if verdict == _LEFT:
            _gevent_spawn(on_disconnect)  # beside the hub: it may block, as the thread's may
        elif verdict == _BYTES_FIRST:
            log.debug("fd %d half-closed with unread bytes: no longer watched", self.fd)
        else:  # bytes and no hang-up: only EPOLLRDHUP can wait past them
            self._handed = _hand_to_thread(self.fd, on_disconnect)

    def close(self) -> None:
        """The connection is over: stop for good (a late cancel then changes nothing)."""
        if self.closed:
            return
        self.closed = True
        self._on_disconnect = None
        handed, self._handed = self._handed, None
        if handed is not None:
            handed()
        self.io.stop()  # also drops its callback: the idle one, or ours
        self.io.close()
        # The bound methods are cycles through this reader: freed now, not
        # by the collector (a cancel held elsewhere still works: it is bound).
        self._readable_callback = self.cancel = _closed_cancel


#: Each running hub's deferrals, by hub; the last one asked for kept at hand.
_deferrals: weakref.WeakKeyDictionary[Any, _Deferrals] = weakref.WeakKeyDictionary()
_last_deferrals: list[tuple[Callable[[], Any], _Deferrals | None]] = [(lambda: None, None)]


def _deferrals_here() -> _Deferrals | None:
    """This hub's deferrals when the caller is a greenlet a running hub schedules; else None."""
    hub = hub_of_this_greenlet()
    if hub is None:
        return None
    last_hub, last = _last_deferrals[0]
    if last_hub() is hub:
        return last
    found = _deferrals.get(hub)
    if found is None:
        found = _deferrals[hub] = _Deferrals(hub)
    _last_deferrals[0] = (weakref.ref(hub), found)
    return found


_monitor: _Monitor | None = None
_monitor_lock = allocate_lock()


def _forget_monitor_after_fork() -> None:
    global _monitor, _monitor_lock
    _monitor = None  # its thread did not survive the fork
    _monitor_lock = allocate_lock()  # another thread may have held it at the fork
    for deferrals in list(_deferrals.values()):
        deferrals.forget_all()  # as the monitor's pending watches are forgotten


os.register_at_fork(after_in_child=_forget_monitor_after_fork)


def _get_monitor() -> _Monitor:
    global _monitor
    monitor = _monitor
    if monitor is not None:  # every watch asks: no lock, no getpid() system call
        return monitor
    with _monitor_lock:
        if _monitor is None or _monitor.pid != os.getpid():
            _monitor = _Monitor()  # first use, or a forked child (threads do not survive fork)
        return _monitor


def watch(environ: dict[str, Any], on_disconnect: Callable[[], object]) -> Cancel | None:
    """Call ``on_disconnect()`` once if the request's client goes away; None if we cannot tell.

    Call it from the greenlet or thread that serves the request:
    ``on_disconnect`` runs back there (in a new greenlet of its hub), or in
    a new thread of its own when the serving thread has no gevent hub. Returns a
    function that stops the watch; call it when the response ends, from that
    same thread, and always before the server may close the socket. Linux only (epoll): None
    elsewhere.
    """
    if _epoll is None:
        return None
    own = environ.get(OWN_WATCH_KEY)
    if own is not None:
        cancel: Cancel | None = own(on_disconnect)
        if cancel is not None:
            return cancel
    sock = _socket_of(environ)
    if sock is not None:
        try:
            fd = sock.fileno()
        except (AttributeError, OSError):
            return None
        if fd < 0:
            return None
        deferrals = _deferrals_here()
        if deferrals is not None:
            return deferrals.add(fd, on_disconnect)
        try:
            return _get_monitor().watch_socket(fd, on_disconnect)
        except OSError as exc:
            # Not a pollable socket (EPERM), or the kernel's epoll limit
            # (ENOSPC: fs.epoll.max_user_watches) is reached: unwatched, as on a
            # server that exposes nothing; heartbeats remain the fallback.
            log.warning("cannot watch fd %d for a disconnect (%s); unwatched", fd, exc)
            return None
    check = environ.get("waitress.client_disconnected")
    if callable(check):
        return _get_monitor().watch_poll(check, on_disconnect)
    return None
