"""Child processes with bounded waits: start, read a JSON line, stop by PID.

Every wait here has a deadline, and every child is stopped by its own PID
(terminate, then kill), never by name: a benchmark that hangs or leaks a
server poisons every measurement after it.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


class ChildError(RuntimeError):
    """A child process died, said something unexpected, or was too slow."""


class Child:
    """A ``python -m bench.*`` process talking JSON lines on stdout."""

    def __init__(self, module: str, args: list[str], stdin: bool = False) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.name = f"{module} {' '.join(args[:1])}"
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix="bench-")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=ROOT,
            env=env,
        )
        self.pid = self.proc.pid
        self._buf = b""
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    def read_json(self, timeout: float) -> dict[str, Any]:
        """Return the next stdout line as JSON, waiting at most ``timeout`` s."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChildError(f"{self.name}: no answer in {timeout:.0f}s{self.tail()}")
                if sel.select(left):
                    data = self.proc.stdout.read()
                    if not data:
                        raise ChildError(f"{self.name}: exited ({self.proc.poll()}){self.tail()}")
                    self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)  # type: ignore[no-any-return]
        except ValueError as exc:
            raise ChildError(f"{self.name}: not JSON: {line[:200]!r}") from exc

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def tail(self, limit: int = 2000) -> str:
        """The end of the child's stderr, for error messages."""
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")[-limit:]
        return f"\n--- stderr of {self.name} ---\n{text}" if text.strip() else ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 3.0) -> None:
        """Stop the child by its PID: SIGTERM, then SIGKILL after ``grace`` s."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.wait(grace) is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait(grace)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.log.close()
