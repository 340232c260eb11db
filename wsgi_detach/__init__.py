"""wsgi_detach: a WSGI response body you can write to later.

Return a :class:`DetachedBody` from any WSGI app and let callbacks, greenlets
or plain OS threads fill it long after the app function returned; the body
keeps PEP 3333's promises (no lying ``len()``, ``close()`` on every outcome,
errors that never look like a clean end) on gevent and threaded servers alike.
"""

from __future__ import annotations

from ._body import Chunk, DetachedBody
from ._errors import (
    BodyAborted,
    BodyClosed,
    BodyEnded,
    BodyTimeout,
    BufferFull,
    DetachError,
    UsageError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "BodyAborted",
    "BodyClosed",
    "BodyEnded",
    "BodyTimeout",
    "BufferFull",
    "Chunk",
    "DetachError",
    "DetachedBody",
    "UsageError",
]
