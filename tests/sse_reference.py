"""The reference event-stream parser, now public as :mod:`wsgi_detach.testing`'s.

Kept under its old names for the tests that use it as the encoder's oracle.
"""

from __future__ import annotations

from wsgi_detach.testing import SSEEvent as Event
from wsgi_detach.testing import SSEParser as Parser
from wsgi_detach.testing import parse_sse as parse

__all__ = ["Event", "Parser", "parse"]
