"""Run an installed wheel's commands briefly: ``--version``, ``demo`` and ``serve``.

Usage: ``VENV/bin/python .ci/smoke_wheel.py`` from any directory but the
checkout (so that the installed package is the one imported). Each server is
started on a free port, asked for one page, and stopped with SIGTERM; every
wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request

APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from serve\\n"]
'''


def run_server(args: list[str], path: str, expect: bytes, cwd: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "wsgi_detach", *args, "--port", "0"],
        cwd=cwd, stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            assert port, f"{args}: no address in {line!r}"
            url = f"http://127.0.0.1:{port.group(1)}{path}"
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
            assert expect in body, f"{url}: {body[:200]!r}"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, f"{args}: exit status {proc.returncode}"
        finally:
            if proc.poll() is None:
                proc.kill()
    print(f"ok: {' '.join(args)} answered {path}")


def main() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "wsgi_detach", "--version"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert version.startswith("wsgi_detach "), version
    print(f"ok: {version.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "hello.py"), "w") as f:
            f.write(APP)
        run_server(["demo", "--no-access-log"], "/", b"new EventSource(", tmp)
        run_server(["demo", "--no-access-log"], "/api/rooms/lobby/history", b'"messages"', tmp)
        run_server(["serve", "hello:app", "--no-access-log"], "/", b"hello from serve", tmp)


if __name__ == "__main__":
    main()
