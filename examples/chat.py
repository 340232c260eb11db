"""The long-polling/SSE chat: rooms, nicknames, a page with a little JavaScript.

Run: ``python examples/chat.py [--port 8000]`` (or ``python -m wsgi_detach demo``), open
http://127.0.0.1:8000/ in two windows and type.

The chat itself lives in the package (``wsgi_detach/_demo/``, with its HTML
as package data) so that the README's demo command works from an installed
wheel; this file only serves it. Read ``wsgi_detach/_demo/chat.py`` for the
server side: a ``Hub`` per room, ``hub.event_stream`` for SSE, ``long_poll``
for long-polling.
"""

from __future__ import annotations

from wsgi_detach._demo import ChatApp, main

#: Paths tests/test_examples.py requests from a served copy of this module.
SMOKE_PATHS = ["/", "/api/rooms/lobby/history", "/api/rooms/lobby/events"]

app = ChatApp()

if __name__ == "__main__":
    main()
