"""ByteBudget: one cap on the bytes buffered across many DetachedBody objects.

Use it when memory, not any single client, is what you must protect: each
body's ``max_buffer`` bounds one slow client, but ten thousand bodies each
within their own cap can still add up to more than the process can hold.
Hand the same budget to every body (``DetachedBody(budget=...)``;
``DetachMiddleware(max_buffered=...)`` does it for you) and a ``put()`` that
would take the total over the cap raises :class:`~wsgi_detach.BufferFull`.

Why raise rather than block, as a body's own ``max_buffer`` does: room in a
shared budget is freed by *other* clients reading, so a producer blocked on it
would wait on strangers, and one stalled client could freeze every producer in
the process. A full budget means the process is overloaded; the producer is
told at once and decides (drop the message, end the body, retry later).

Not for: limiting one body (use ``max_buffer``), or counting bytes sent.
This module imports only :mod:`wsgi_detach._wakeup`.
"""

from __future__ import annotations

from ._wakeup import allocate_lock

__all__ = ["ByteBudget"]


class ByteBudget:
    """A thread-safe count of buffered bytes with an optional cap.

    Args:
        limit: the most bytes that may be buffered in all bodies sharing this
            budget; ``None`` counts without limiting (for statistics).

    The body calls :meth:`take` before buffering a chunk, :meth:`give` when the
    server took it or the body was closed, and :meth:`force` for the few bytes
    that must never be refused (a last chunk passed to ``finish()``, a
    ``timeout_chunk``), so that ending a body never fails.
    """

    __slots__ = ("_lock", "_used", "limit")

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0
        ):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        self.limit = limit
        self._lock = allocate_lock()
        self._used = 0

    @property
    def used(self) -> int:
        """Bytes currently buffered in all bodies sharing this budget."""
        return self._used

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes if they fit under the limit; False if they do not."""
        with self._lock:
            if self.limit is not None and self._used + size > self.limit:
                return False
            self._used += size
            return True

    def force(self, size: int) -> None:
        """Count ``size`` more bytes even over the limit."""
        with self._lock:
            self._used += size

    def give(self, size: int) -> None:
        """Stop counting ``size`` bytes: the server took them, or they were discarded."""
        with self._lock:
            self._used -= size

    def __repr__(self) -> str:
        return f"<ByteBudget {self._used} of {self.limit if self.limit else 'unlimited'} bytes>"
