"""Disconnect watchers: notice a client that left an *idle* stream, on servers that let us look.

Why this exists
---------------
A WSGI server learns that a client left only when a write fails, so a
detached stream that is waiting for its producer holds its connection, its
greenlet or thread and its producer forever (PEP3333-NOTES "Disconnect
detection"). Some servers expose the connection in the environ, and there we
can watch it while the stream is idle:

==============================  ==========================================  ============
server                          what it exposes                             how we watch
==============================  ==========================================  ============
gevent.pywsgi + DetachHandler   ``environ["wsgi_detach.socket"]``           epoll, below
gunicorn (any worker)           ``environ["gunicorn.socket"]``              epoll, below
waitress                        ``environ["waitress.client_disconnected"]``  polled 4x/s
                                (needs ``channel_request_lookahead >= 1``)
cheroot, wsgiref, others        nothing                                     heartbeats
==============================  ==========================================  ============

Theory of operation
-------------------
One daemon OS thread per process (started at the first watch, again after a
fork) blocks in ``epoll_wait`` on every watched socket, registered for
``EPOLLRDHUP`` only: the kernel reports the peer's FIN (or an RST, as
``EPOLLHUP``/``EPOLLERR``), never mere readability, so a pipelined request or
a request body the app did not read does not wake it. On an event it looks
again with ``poll(0)`` (the descriptor may have been closed and reused by a
new connection since ``epoll_wait`` returned) and checks ``FIONREAD``: no
unread bytes means the read side is at EOF (what a 0-byte ``MSG_PEEK`` would
say); unread bytes mean the client half-closed *after* sending more, which is
not treated as a disconnect -- the socket is dropped from the watch, and the
next failing write will tell. An idle stream therefore costs one epoll
registration (~700 bytes with our bookkeeping) and no wake-ups at all;
detection is as fast as the kernel delivers the FIN. ``waitress.client_disconnected`` is a
function, not a descriptor, so those are polled every :data:`POLL_INTERVAL`.

Why an OS thread and not a greenlet per stream or a libev io watcher
(measured in bench/mw_idle_watch.py, 5 000 idle streams): one thread serves
gevent and threaded servers alike; it never wakes while streams are idle (a
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
from typing import Any, Callable, Final

from gevent.monkey import get_original

from ._wakeup import allocate_lock, runner_here

__all__ = ["POLL_INTERVAL", "SOCKET_KEY", "watch"]

log = logging.getLogger("wsgi_detach")

#: Where :class:`~wsgi_detach.DetachHandler` puts the client socket.
SOCKET_KEY: Final = "wsgi_detach.socket"

#: Seconds between two looks at ``waitress.client_disconnected``: well inside
#: the 1 s we promise, and 4 cheap calls per second per idle stream.
POLL_INTERVAL: Final = 0.25

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
    """One watched request: how to reach it back, and what to call."""

    __slots__ = ("check", "fd", "on_disconnect", "run")

    def __init__(
        self,
        fd: int,
        check: Callable[[], bool] | None,
        on_disconnect: Callable[[], object],
    ) -> None:
        self.fd = fd
        self.check = check
        self.on_disconnect = on_disconnect
        self.run = runner_here()


class _Monitor:
    """The per-process watcher thread and what it watches."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = allocate_lock()
        assert _epoll is not None
        self._epoll = _epoll()
        self._by_fd: dict[int, _Watch] = {}
        self._polled: list[_Watch] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        _start_thread(self._loop, ())

    # ------------------------------------------------------------ registration (any thread)

    def watch_socket(self, fd: int, on_disconnect: Callable[[], object]) -> Cancel:
        entry = _Watch(fd, None, on_disconnect)
        with self._lock:
            self._by_fd[fd] = entry
            try:
                self._epoll.register(fd, _RDHUP)
            except FileExistsError:
                # A previous request on a reused descriptor was closed by the
                # server before it was unwatched: take the slot over.
                self._epoll.modify(fd, _RDHUP)
        return lambda: self._forget(entry)

    def watch_poll(self, check: Callable[[], bool], on_disconnect: Callable[[], object]) -> Cancel:
        entry = _Watch(-1, check, on_disconnect)
        with self._lock:
            self._polled.append(entry)
            first = len(self._polled) == 1
        if first:
            os.write(self._wake_w, b"x")  # switch the thread from waiting forever to polling
        return lambda: self._forget(entry)

    def _forget(self, entry: _Watch) -> bool:
        """Stop watching ``entry``; True if it was still watched (so it is ours to report)."""
        with self._lock:
            if entry.check is not None:
                if entry not in self._polled:
                    return False
                self._polled.remove(entry)
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
        timeout = POLL_INTERVAL if self._polled else -1
        for fd, _ in self._epoll.poll(timeout):
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
        if self._forget(entry):
            entry.run(entry.on_disconnect)


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


_monitor: _Monitor | None = None
_monitor_lock = allocate_lock()


def _get_monitor() -> _Monitor:
    global _monitor
    with _monitor_lock:
        if _monitor is None or _monitor.pid != os.getpid():
            _monitor = _Monitor()  # first use, or a forked child (threads do not survive fork)
        return _monitor


def watch(environ: dict[str, Any], on_disconnect: Callable[[], object]) -> Cancel | None:
    """Call ``on_disconnect()`` once if the request's client goes away; None if we cannot tell.

    Call it from the greenlet or thread that serves the request:
    ``on_disconnect`` runs back there (in a new greenlet of its hub), or in
    the watcher thread when the serving thread has no gevent hub. Returns a
    function that stops the watch; call it when the response ends, and
    always before the server may close the socket. Linux only (epoll): None
    elsewhere.
    """
    if _epoll is None:
        return None
    sock = environ.get(SOCKET_KEY) or environ.get("gunicorn.socket")
    if sock is not None:
        try:
            fd = sock.fileno()
        except (AttributeError, OSError):
            return None
        if fd < 0:
            return None
        return _get_monitor().watch_socket(fd, on_disconnect)
    check = environ.get("waitress.client_disconnected")
    if callable(check):
        return _get_monitor().watch_poll(check, on_disconnect)
    return None
