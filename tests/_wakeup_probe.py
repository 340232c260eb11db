"""Run a consumer on a brand-new OS thread that has no gevent hub (like a waitress worker)."""

from __future__ import annotations

import threading

from wsgi_detach import DetachedBody


class ThreadResult:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.data = b""
        self.error: str | None = None

    def wait(self, timeout: float) -> bytes:
        assert self.done.wait(timeout), "the consumer thread did not finish in time"
        return self.data


def consume_in_fresh_thread(body: DetachedBody) -> ThreadResult:
    result = ThreadResult()

    def consume() -> None:
        parts = []
        try:
            for chunk in body:
                parts.append(chunk)
        except Exception as exc:
            result.error = type(exc).__name__
        finally:
            result.data = b"".join(parts)
            body.close()
            result.done.set()

    threading.Thread(target=consume, daemon=True).start()
    return result
