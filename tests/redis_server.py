"""A real ``redis-server`` on a free 127.0.0.1 port, for the broker's tests.

:class:`RedisServer` runs the Debian ``redis-server`` binary in its own
temporary directory, with the persistence a test asks for, and stops it by
its PID. It can be restarted with its data (``appendonly``: every write is in
the append-only file before the reply) or without (the directory emptied
first: what a restart without persistence looks like), frozen with SIGSTOP
and thawed with SIGCONT.

Where the binary (or redis-py) is absent, :func:`require_redis` skips the
test with the reason; with ``WSGI_DETACH_REQUIRE_REDIS=1`` (``.ci/run`` sets
it) the skip becomes a failure, so CI cannot pass without having run them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

#: Set to 1 where a missing redis-server must fail the tests instead of skipping them.
REQUIRE_ENV = "WSGI_DETACH_REQUIRE_REDIS"


def require_redis() -> str:
    """The path of ``redis-server``; skips (or fails, see the module docs) without it."""
    missing = None
    binary = shutil.which("redis-server")
    if binary is None:
        missing = "redis-server is not installed (Debian: apt-get install redis-server)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            missing = "redis-py is not installed (pip install 'wsgi_detach[redis]')"
    if missing is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_ENV}=1 requires it")
        pytest.skip(missing)
    assert binary is not None
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; see the module docs.

    Args:
        appendonly: keep every write in an append-only file, so that
            :meth:`restart` keeps the data; without it nothing is ever saved.
    """

    def __init__(self, *, appendonly: bool = False) -> None:
        self.binary = require_redis()
        self.appendonly = appendonly
        self._dir = tempfile.mkdtemp(prefix="wsgi-detach-redis-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = Path(self._dir) / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        for _ in range(3):  # a port taken between _free_port() and the bind: pick another
            self.port = _free_port()
            if self._try_start(timeout):
                return self
        raise RuntimeError(f"redis-server did not start; its log:\n{self.log_text()}")

    def _try_start(self, timeout: float) -> bool:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self._dir,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(self._log),
            "--daemonize", "no",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            try:
                if self.command("PING") in (True, "PONG"):
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        return False

    def command(self, *args: str | int, timeout: float = 5.0) -> Any:
        """Send one command on a fresh connection; the reply (bytes decoded as text)."""
        import redis

        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )
        try:
            return client.execute_command(*args)
        except redis.ConnectionError as exc:
            raise OSError(str(exc)) from exc
        finally:
            client.close()

    def clients(self) -> list[dict[str, str]]:
        """``CLIENT LIST``, one dict per connection."""
        lines = self.command("CLIENT", "LIST").splitlines()
        return [dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
                for line in lines]

    def stop(self) -> None:
        """Stop the server by its PID (thawing it first if it was frozen)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, *, keep_data: bool) -> None:
        """Stop, then start on the same port: with the append-only file, or emptied."""
        self.stop()
        if not keep_data:
            for entry in Path(self._dir).iterdir():
                if entry != self._log:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if not self._try_start(10.0):
            raise RuntimeError(f"redis-server did not restart; its log:\n{self.log_text()}")

    def freeze(self) -> None:
        """SIGSTOP: the server holds its connections but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        try:
            return self._log.read_text()
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
