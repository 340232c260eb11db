"""Render the server conformance matrix into docs/matrix.md from a test run's results.

The matrix page's table is never typed by hand: ``tests/test_matrix.py`` records
every (server, case) outcome with :func:`record`; at the end of the pytest
session ``tests/conftest.py`` writes them to ``build/matrix.json``; this
module turns that file into Markdown between the markers
``<!-- matrix:start -->`` and ``<!-- matrix:end -->`` in docs/matrix.md.

Usage::

    python -m pytest tests/test_matrix.py      # run the matrix, writes build/matrix.json
    python -m tests.matrix_report              # render it into docs/matrix.md
    python -m tests.matrix_report --run        # both
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "build" / "matrix.json"
README = ROOT / "docs" / "matrix.md"
START = "<!-- matrix:start -->"
END = "<!-- matrix:end -->"

#: Column order and headings.
SERVERS: dict[str, str] = {
    "pywsgi": "gevent.pywsgi",
    "pywsgi-patched": "pywsgi + patch_all",
    "pywsgi-detach": "pywsgi + DetachHandler",
    "gunicorn-gevent": "gunicorn -k gevent",
    "gunicorn-gthread": "gunicorn -k gthread",
    "waitress": "waitress",
    "wsgiref": "wsgiref (threads)",
    "cheroot": "cheroot",
}

#: Row order and what each case proves.
CASES: dict[str, str] = {
    "stream": "chunks arrive as they are put, within 0.1 s (greenlet producer; worst lag)",
    "thread": "chunks put from a plain OS thread arrive within 50 ms (worst lag)",
    "queue": "Bottle's queue-as-body pattern (2 chunks ready at return) is served complete",
    "queue_raw": "... the same queue *without* the middleware",
    "len": "`len()` never truncates (one chunk queued at the first look)",
    "late_start": "status and headers decided by the producer after return",
    "disconnect": "client leaves while data flows: `on_close` within 2 s, producer told",
    "idle": "client leaves an idle stream: `on_close` within 1 s (watched), else two heartbeats",
    "fail_mid": "`fail()` mid-stream: no terminating chunk (client sees truncation)",
    "fail_mid_http10": "... the same over HTTP/1.0 (close-delimited): the connection ends "
    "with a reset, after every byte put",
    "fail_first": "`fail()` before the first chunk, body owns `start_response`: a 5xx",
    "fail_first_own": "producer dies before the first chunk, app called `start_response`: a 5xx",
    "fail_first_raw": "... the same *without* the middleware: the server's own handling",
    "headers": "detached responses carry `Cache-Control: no-cache`, `X-Accel-Buffering: no`",
    "validate": "`wsgiref.validate` reported nothing over the whole run",
}

#: Footnotes a case may attach to a cell: why a server cannot do better.
NOTES: dict[str, str] = {
    "http10": (
        "wsgiref answers HTTP/1.0 and ends a response by closing the connection, so a "
        "truncated body looks exactly like a complete one; the client receives every chunk "
        "put before the failure and then EOF."
    ),
    "http10_fin": (
        "An HTTP/1.0 response has no chunking and, here, no length: the end of the "
        "connection is the end of the body. The server closes an aborted one with a FIN, "
        "exactly as a complete one, so the client cannot tell. `DetachHandler` (which owns "
        "the connection) ends it with a reset once the bytes already sent have left."
    ),
    "heartbeat": (
        "The server exposes no connection for the middleware to watch, so the body's "
        "heartbeat (0.2 s) is what detects the departed client: a server notices only when "
        "a write fails, which on loopback is the second write after the client's FIN (the "
        "first is answered with a RST)."
    ),
    "patched_thread": (
        "After `patch_all()` a `threading.Thread` is a greenlet, so this is a greenlet "
        "producer: the process has no plain OS thread to write from."
    ),
    "raw_queue_sum": (
        "Two chunks wait in the queue when the server first looks. gevent.pywsgi sees the "
        "queue's `__len__`, so it derives a Content-Length by iterating the queue to its "
        "end, which consumes the rest of the body (36 B here, lost), sends the first chunk "
        "under that length and waits for ever. The primer's Bottle version only works "
        "because Bottle wraps the queue in an iterator without `__len__`."
    ),
    "raw_queue_one": (
        "Two chunks wait in the queue when the server first looks: after taking the first, "
        "`len()` is 1, so the server sets Content-Length to the first chunk's size and the "
        "client receives a short response that looks complete; the rest is dropped "
        "(waitress) or written past the declared length and ignored (wsgiref)."
    ),
    "cheroot_200": (
        "When the body raises before its first chunk, cheroot's clean-up (a `finally` "
        "around the iteration) still sends the headers the app passed to "
        "`start_response`, and only then aborts the connection: the client sees "
        "`200 OK` and an empty chunked body without its terminating chunk."
    ),
}

_MARKS = {"passed": "✓", "limited": "✓", "broken": "✗", "failed": "✗ FAILED", "skipped": "skipped"}


def record(results: dict[str, dict[str, Any]], server: str, case: str, **cell: Any) -> None:
    results.setdefault(server, {})[case] = cell


def render(data: dict[str, Any]) -> str:
    """The Markdown table and its footnotes for the results in ``data``."""
    results: dict[str, dict[str, Any]] = data["results"]
    servers = [s for s in SERVERS if s in results]
    cases = [c for c in CASES if any(c in results[s] for s in servers)]
    used: list[str] = []

    def cell(server: str, case: str) -> str:
        entry = results[server].get(case)
        if entry is None:
            return "-"
        text = f"{_MARKS.get(entry['outcome'], '?')} {entry.get('text', '')}".strip()
        note = entry.get("note")
        if note:
            if note not in used:
                used.append(note)
            text += f" [{used.index(note) + 1}]"
        return text

    lines = [
        "| case | " + " | ".join(SERVERS[s] for s in servers) + " |",
        "| --- | " + " | ".join("---" for _ in servers) + " |",
    ]
    for case in cases:
        lines.append(f"| {CASES[case]} | " + " | ".join(cell(s, case) for s in servers) + " |")
    lines.append("")
    lines.append(
        "✓ holds · ✗ broken as documented (the test asserts the breakage) · "
        "✗ FAILED: the test failed · [n] see below. "
        f"Measured {data['when']} on {data['machine']} by `python -m tests.matrix_report --run`."
    )
    if used:
        lines.append("")
        lines += [f"{i + 1}. {NOTES[note]}" for i, note in enumerate(used)]
    return "\n".join(lines)


_PACKAGES = ("gevent", "gunicorn", "waitress", "cheroot")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def write_results(results: dict[str, dict[str, Any]], path: Path = RESULTS) -> None:
    data = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"Python {platform.python_version()} on {platform.system()} "
        f"{platform.machine()} ({os.cpu_count()} cores), "
        + ", ".join(f"{name} {_version(name)}" for name in _PACKAGES),
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def update_readme(table: str, readme: Path = README) -> None:
    """Replace the text between the markers; append a section if they are missing."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = (
            text.rstrip("\n")
            + ("\n\n" if text else "")
            + ("## Server compatibility matrix\n\n" + block + "\n")
        )
    readme.write_text(text)


def main(argv: list[str]) -> int:
    if "--run" in argv:
        status = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "tests/test_matrix.py"], cwd=ROOT
        )
        if status not in (0, 1):
            return status
    if not RESULTS.exists():
        print(f"{RESULTS} is missing: run the matrix first (--run)", file=sys.stderr)
        return 2
    update_readme(render(json.loads(RESULTS.read_text())))
    print(f"matrix written to {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
