"""The exception hierarchy of wsgi_detach.

Every error this package raises on purpose derives from :class:`DetachError`.
Below it the errors are split by *who is at fault*, so that a producer can
tell a bug in its own code from the ordinary end of a request:

=====================  ===========================================  ==============
exception              raised when                                  who caused it
=====================  ===========================================  ==============
``UsageError``         the API was misused (``put()`` before        the caller
                       ``start()``, two consumers, ...)
``BodyEnded``          writing after your own ``finish()``/``fail()``  the caller
``BodyAborted``        writing after the server closed the body,    the outside
                       or after a timeout ended it                  world
``BodyTimeout``        iterating past ``idle_timeout``/``deadline``  the producer
                                                                    was too slow
``BufferFull``         ``put_nowait()`` with ``max_buffer`` reached,  the consumer
                       or a blocking ``put()`` where it cannot block  is behind
``Unavailable``        ``DetachMiddleware`` refuses a new detached    the load (or
                       response (``max_open``, draining), or ends   a shutdown)
                       one that outlived ``drain()``'s grace
``RequestTimeout``     a read of the request body waited longer    the client
                       than ``make_server(body_timeout=...)``       was too slow
=====================  ===========================================  ==============

``BodyEnded`` and ``BodyAborted`` share the base :class:`BodyClosed`, so code
that only wants to know "can I still write?" catches that one. ``BodyEnded`` is
also a :class:`UsageError`: both are bugs in the calling code.

This module imports nothing of ours.
"""

from __future__ import annotations

import errno
from typing import Any

__all__ = [
    "BodyAborted",
    "BodyClosed",
    "BodyEnded",
    "BodyTimeout",
    "BrokerRefused",
    "BrokerUnavailable",
    "BufferFull",
    "DetachError",
    "ProducerStopped",
    "RequestTimeout",
    "Unavailable",
    "UsageError",
]


class DetachError(Exception):
    """Base class of every error wsgi_detach raises on purpose."""


class UsageError(DetachError, RuntimeError):
    """The calling code used the API in a way it does not allow; the message says how to fix it."""


class BodyClosed(DetachError):
    """The body no longer accepts data.

    Raised by ``put()``/``write()``/``finish(chunk)`` and by a blocked ``put()``
    that was waiting for buffer space. Catch this to stop producing whatever
    the reason; catch a subclass to tell the reasons apart.

    Attributes:
        state: the body's state when the write was refused (``"finished"``,
            ``"failed"``, ``"expired"`` or ``"closed"``).
        body: the body that refused it, so that a producer writing to several
            bodies can tell which one ended.
    """

    def __init__(self, message: str, state: str, body: object = None) -> None:
        super().__init__(message)
        self.state = state
        self.body = body


class BodyEnded(BodyClosed, UsageError):
    """You wrote to a body after ending it yourself with ``finish()`` or ``fail()``.

    This is a bug in the producing code: the producer already said the
    response was complete (or broken), and then tried to add to it.
    """


class BodyAborted(BodyClosed):
    """The consuming side ended the body before the producer did.

    Either the server called ``close()`` (the client disconnected, the request
    ended, the server is shutting down) or a timeout expired. This is the
    ordinary way a long-lived producer learns that nobody is listening any
    more: stop producing and clean up.
    """


class BodyTimeout(DetachError, TimeoutError):
    """The producer was silent for ``idle_timeout`` seconds, or ``deadline`` passed.

    Raised out of the body's iteration, that is inside the server, so that the
    server aborts the connection and the client sees an incomplete response
    rather than a clean (and wrong) end. Pass ``timeout_chunk`` to end cleanly
    instead.
    """


class RequestTimeout(DetachError, TimeoutError):
    """The client did not send its request in time; caused by the client.

    Raised by ``make_server``'s server (``body_timeout``) out of a read of
    ``environ["wsgi.input"]`` that waited too long for the request body. The
    connection is closed after the response; an app that lets it propagate
    gets a ``408 Request Timeout`` sent for it (if nothing was sent yet) and
    one INFO line in the log, no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.ETIMEDOUT, message)


class ProducerStopped(DetachError):
    """The producer was stopped by a ``BaseException`` before it ended the body.

    ``GreenletExit`` (a killed greenlet), ``gevent.Timeout`` or
    ``KeyboardInterrupt`` passed to ``fail()`` (or escaping ``with body:``)
    become this ordinary exception, with the original as ``__cause__``, so
    that servers treat it as the request error it is.
    """


class BufferFull(DetachError):
    """``max_buffer`` bytes are waiting for the client and the caller cannot wait.

    Raised by ``put_nowait()``, by ``put(timeout=...)`` when the timeout
    passes, and by ``put()`` called from the gevent hub itself (a loop
    callback), where blocking would deadlock the whole process.
    """


class Unavailable(DetachError):
    """The server cannot take (or keep) this detached response: it is full or shutting down.

    Raised by ``detach(environ)`` when ``DetachMiddleware(max_open=...)``
    detached responses are already open or ``drain()`` began; let it
    propagate (or let your framework turn it into any error page): the
    middleware answers ``503`` with ``Retry-After`` either way. Also the
    exception a body fails with when ``drain()``'s grace runs out.
    """


class BrokerUnavailable(DetachError):
    """The message broker (Redis) could not be reached, or did not answer in time.

    Who caused it: the broker or the network between, not the caller. Raised
    by a publish through :class:`~wsgi_detach.RedisBroker` within a bounded
    time (see its timeouts), never after waiting indefinitely, and never
    retried behind your back.

    Attributes:
        maybe_applied: True when the command had been sent when the
            connection failed or timed out: Redis may have run it (the
            message may have been published). False: it certainly was not.
    """

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class BrokerRefused(BrokerUnavailable):
    """Redis answered, but refused the command.

    Who caused it: the broker's state or configuration, not the caller nor the
    network: Redis is out of memory (``maxmemory`` with ``noeviction``), is a
    read-only replica (after a failover), is still loading its data after a
    restart, or cannot persist (``MISCONF``). A :class:`BrokerUnavailable`,
    so code that catches that one (the chat demo's 503) handles this one too.

    Attributes:
        reply: Redis's error reply, e.g. ``"OOM command not allowed when used
            memory > 'maxmemory'."``.
        maybe_applied: False when Redis refused before running anything (the
            refusals above); True for an error Redis hit while running the
            publish script, which may have written part of it.
        published: for ``publish_many()``, one entry per item, in order: its
            :class:`~wsgi_detach.Message` if Redis published it, ``None`` if
            it did not (retry those only). ``None`` for a single publish.
    """

    def __init__(
        self,
        message: str,
        *,
        reply: str,
        maybe_applied: bool = False,
        published: list[Any] | None = None,
    ) -> None:
        super().__init__(message, maybe_applied=maybe_applied)
        self.reply = reply
        self.published = published
