"""The demo chat with its rooms in Redis (``REDIS_URL``), for tests/test_scale_out.py."""

from __future__ import annotations

import os

from wsgi_detach._demo import ChatApp

app = ChatApp(redis_url=os.environ["REDIS_URL"])
