"""wsgi_detach: a WSGI response body you can write to later.

Return a :class:`DetachedBody` from any WSGI app and let callbacks, greenlets
or plain OS threads fill it long after the app function returned; the body
keeps PEP 3333's promises (no lying ``len()``, ``close()`` on every outcome,
errors that never look like a clean end) on gevent and threaded servers alike.
:class:`DetachMiddleware` applies one policy (timeouts, limits, disconnect
detection, drain) to every detached response of an app.

The gevent.pywsgi server helpers (``DetachHandler``, ``DetachServer``,
``make_server``) are imported on first use, so that ``python -m wsgi_detach
serve`` can monkey-patch before gevent.pywsgi (and its socket, ssl and
http.client imports) is loaded.
"""

from __future__ import annotations

import typing as _typing

from ._body import BodyOptions, Chunk, DetachedBody
from ._broadcast import (
    Batch,
    History,
    Hub,
    Message,
    MessageStore,
    SlowSubscriber,
    Subscription,
)
from ._broker import ChannelHub, RedisBroker
from ._budget import ByteBudget
from ._errors import (
    BodyAborted,
    BodyClosed,
    BodyEnded,
    BodyTimeout,
    BrokerRefused,
    BrokerUnavailable,
    BufferFull,
    DetachError,
    ProducerStopped,
    RequestTimeout,
    Unavailable,
    UsageError,
)
from ._longpoll import long_poll, wait_for_messages
from ._middleware import DetachMiddleware, DetachStats, detach
from ._sse import EventStream, encode_comment, encode_event

if _typing.TYPE_CHECKING:
    from ._server import DetachHandler, DetachServer, make_server

__version__ = "0.1.0.dev0"

__all__ = [
    "Batch",
    "BodyAborted",
    "BodyClosed",
    "BodyEnded",
    "BodyOptions",
    "BodyTimeout",
    "BrokerRefused",
    "BrokerUnavailable",
    "BufferFull",
    "ByteBudget",
    "ChannelHub",
    "Chunk",
    "DetachError",
    "DetachHandler",
    "DetachMiddleware",
    "DetachServer",
    "DetachStats",
    "DetachedBody",
    "EventStream",
    "History",
    "Hub",
    "Message",
    "MessageStore",
    "ProducerStopped",
    "RedisBroker",
    "RequestTimeout",
    "SlowSubscriber",
    "Subscription",
    "Unavailable",
    "UsageError",
    "detach",
    "encode_comment",
    "encode_event",
    "long_poll",
    "make_server",
    "wait_for_messages",
]

_LAZY = frozenset({"DetachHandler", "DetachServer", "make_server"})


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        from . import _server

        return getattr(_server, name)
    raise AttributeError(f"module 'wsgi_detach' has no attribute {name!r}")
