"""The server conformance matrix: the same cases on every server we support.

Seven servers, gevent.pywsgi in three configurations (plain, monkey-patched,
with :class:`~wsgi_detach.DetachHandler`), all serving :mod:`tests.matrix_apps`
through :class:`~wsgi_detach.DetachMiddleware`.

Each server kind is started once per module (a module-scoped parametrised
fixture) in its own process on 127.0.0.1, and all cases run against it at the
same time from threads, which keeps the whole matrix well under a minute. Each
(server, case) pair is then reported as its own test, and its measured figure
is recorded (see :mod:`tests.matrix_report`) so docs/matrix.md's table comes from
a run, never from memory.

A case returns a :class:`Cell` or raises: an ``AssertionError`` (or any other
exception) fails that pair and carries the details to its test.
"""

from __future__ import annotations

import socket
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest

from tests import matrix_report
from tests.client import Response, Stream, get, wait_event
from tests.servers import ServerProcess

#: Add to a client's monotonic arrival time to compare it with the server's time.time().
WALL = time.time() - time.monotonic()

#: Where the middleware can watch an idle connection (the server exposes it).
WATCHED = ("pywsgi-detach", "gunicorn-gevent", "gunicorn-gthread", "waitress")

HEARTBEAT = 0.2
#: Scheduling slack on a loaded 2-core machine, added to every time limit.
SLACK = 0.15


@dataclass
class Cell:
    """One (server, case) result: what the matrix cell shows and why."""

    text: str = ""
    note: str | None = None  # a key of matrix_report.NOTES
    failure: str | None = None  # the traceback when the case failed
    broken: bool = False  # the case shows a documented breakage (test passes, cell says ✗)


# ---------------------------------------------------------------------------- helpers


def line_arrivals(response: Response) -> list[tuple[float, bytes]]:
    """Each complete line of the body with the wall-clock time its last byte arrived."""
    out: list[tuple[float, bytes]] = []
    pending = b""
    for arrived, data in response.chunks:
        pending += data
        *lines, pending = pending.split(b"\n")
        out += [(arrived + WALL, line) for line in lines]
    return out


def key() -> str:
    return uuid.uuid4().hex


def seconds(value: float) -> str:
    """A duration for a matrix cell: milliseconds below 0.1 s."""
    return f"{value * 1000:.0f} ms" if round(value * 1000) < 100 else f"{value:.2f} s"


# ---------------------------------------------------------------------------- cases


def _timed_stream(port: int, via: str, limit: float) -> str:
    """Fetch /stream; check each chunk came on its own and within ``limit`` of its put().

    Incremental means causal: each chunk reached the client before the
    producer even put the next one. Returns the worst lag as cell text. A
    2-core machine running seven servers' worth of tests stalls a process
    for tens of ms now and then; one such stall is not what this case hunts
    (a wake-up that waits for an unrelated timer or event, 0.5 s and up, or
    forever), so a late attempt is retried once, and the cell says so.
    """
    n, interval = 5, 0.1
    problem = ""
    for attempt in (1, 2):
        response = get(port, f"/stream?n={n}&interval={interval}&via={via}")
        assert response.status == 200 and response.complete, response
        lines = line_arrivals(response)
        assert [line.split()[1] for _, line in lines] == [str(i).encode() for i in range(n)]
        put_at = [float(line.split()[2]) for _, line in lines]
        arrived_at = [arrived for arrived, _ in lines]
        lags = [arrived - put for arrived, put in zip(arrived_at, put_at)]
        early = [i for i in range(n - 1) if arrived_at[i] >= put_at[i + 1]]
        if early:
            problem = f"chunks {early} arrived only after the next put: lags {lags}"
        elif max(lags) >= limit:
            problem = f"a chunk arrived later than {limit}s: lags {lags}"
        else:
            return seconds(max(lags)) + (" (2nd try)" if attempt == 2 else "")
    raise AssertionError(f"twice (producer: {via}): {problem}")


def case_stream(server: str, port: int) -> Cell:
    return Cell(_timed_stream(port, "greenlet", limit=0.1))


def case_thread(server: str, port: int) -> Cell:
    return Cell(
        _timed_stream(port, "thread", limit=0.05),
        note="patched_thread" if server == "pywsgi-patched" else None,
    )


def case_queue(server: str, port: int) -> Cell:
    n = 5
    response = get(port, f"/queue?n={n}&queued=2&interval=0.02", timeout=5)
    assert response.status == 200 and response.complete, response
    assert response.body == b"".join(f"queued {i};".encode() for i in range(n)), response
    return Cell()


#: How servers use a body's len() for Content-Length: pywsgi
#: sums the chunks (draining the iterable); waitress and wsgiref send the
#: first chunk's length when len() == 1 after it. A gevent queue's len() is
#: its current size, so both send a wrong length.
SUMS_LEN = ("pywsgi", "pywsgi-patched", "pywsgi-detach")
LEN_ONE = ("waitress", "wsgiref")


def case_queue_raw(server: str, port: int) -> Cell:
    """Bottle's queue-as-body pattern without the middleware: asserts the documented breakage."""
    n = 5
    # Two chunks wait in the queue when the server first looks at it.
    with Stream(port, f"/raw/queue?n={n}&queued=2&interval=0.02", timeout=1) as stream:
        try:
            stream.read_all()
        except TimeoutError:
            pass
    response = stream.response
    whole = b"".join(f"queued {i};".encode() for i in range(n))
    length = response.headers.get("content-length")
    if server in SUMS_LEN:
        # If this ever stops, the notes and this row need updating.
        assert length and not response.complete and response.body != whole, response
        return Cell(
            f"Content-Length {length}, got {len(response.body)} B, hangs",
            broken=True,
            note="raw_queue_sum",
        )
    if server in LEN_ONE:
        assert length == "9" and response.complete and response.body == b"queued 0;", response
        return Cell("Content-Length 9: silently truncated", broken=True, note="raw_queue_one")
    assert response.complete and response.body == whole, response
    return Cell()


def case_len(server: str, port: int) -> Cell:
    response = get(port, "/first_of_many?n=5")
    assert response.status == 200 and response.complete, response
    assert response.body == b"first;" + b"".join(f"more{i};".encode() for i in range(5))
    assert "content-length" not in response.headers, response.headers
    return Cell()


def case_late_start(server: str, port: int) -> Cell:
    response = get(port, "/late_start")
    assert response.status == 201 and response.headers.get("x-late") == "yes", response
    assert response.body == b"made later" and response.complete, response
    return Cell()



def case_disconnect(server: str, port: int) -> Cell:
    k = key()
    # A greenlet producer (body.spawn), also on threaded servers: there it
    # runs in wsgi_detach's producer hub, not on the request thread, where it
    # would freeze when the request ended and never hear of the close.
    with Stream(port, f"/forever?key={k}&interval=0.05") as stream:
        assert stream.read_chunk() and stream.read_chunk()
        left = time.time()  # the with block closes the connection right after
    closed = wait_event(port, k, "on_close", timeout=3)
    # The producer blocked in or calling put() must hear about it too.
    wait_event(port, k, "put raised BodyAborted", timeout=1)
    assert closed - left < 2, f"on_close {closed - left:.2f}s after the client left"
    return Cell(seconds(closed - left))


def case_idle(server: str, port: int) -> Cell:
    k = key()
    watched = server in WATCHED
    query = "" if watched else f"&heartbeat={HEARTBEAT}"
    with Stream(port, f"/idle?key={k}{query}") as stream:
        assert stream.read_chunk() == b"hello\n"
        left = time.time()
    closed = wait_event(port, k, "on_close", timeout=3)
    lag = closed - left
    limit = 1.0 if watched else 2 * HEARTBEAT + SLACK
    assert lag < limit, f"on_close {lag:.2f}s after an idle client left (limit {limit}s)"
    return Cell(seconds(lag), note=None if watched else "heartbeat")


def case_fail_mid(server: str, port: int) -> Cell:
    response = get(port, "/fail_mid")
    assert response.status == 200 and response.body == b"partial-1;partial-2;", response
    if server == "wsgiref":
        assert response.complete  # close-delimited: EOF is all the client sees
        return Cell("looks complete", note="http10")
    assert response.headers.get("transfer-encoding") == "chunked", response.headers
    assert not response.complete, "a failed stream ended with a terminating chunk"
    return Cell()


def case_fail_mid_http10(server: str, port: int) -> Cell:
    """HTTP/1.0, so close-delimited: only a reset (not a FIN) tells the client it was cut."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /fail_mid HTTP/1.0\r\nHost: x\r\n\r\n")
        received, ending = b"", "EOF"
        while True:
            try:
                more = sock.recv(65536)
            except ConnectionResetError:
                ending = "reset"
                break
            if not more:
                break
            received += more
    assert received.endswith(b"partial-1;partial-2;"), received  # what was put arrived
    if server == "pywsgi-detach":
        assert ending == "reset", "an aborted close-delimited response ended with a FIN"
    if ending == "EOF":
        return Cell("EOF: looks complete", broken=True, note="http10_fin")
    return Cell(ending)


def case_fail_first(server: str, port: int) -> Cell:
    response = get(port, "/fail_first")
    assert response.status == 500, response
    assert response.body == b"500 Internal Server Error\n", response
    return Cell(str(response.status))


def case_fail_first_own(server: str, port: int) -> Cell:
    response = get(port, "/fail_before_data")
    assert response.status == 500 and response.complete, response
    return Cell(str(response.status))


def case_fail_first_raw(server: str, port: int) -> Cell:
    """The same failure without the middleware: asserts what each server does alone."""
    with Stream(port, "/raw/fail_before_data", timeout=2) as stream:
        response = stream.read_all()
    if server == "cheroot":
        # A 200 with an empty body, cut off: the client cannot see the error.
        assert response.status == 200 and not response.complete, response
        return Cell("200, empty, cut off", broken=True, note="cheroot_200")
    assert response.status == 500 and response.complete, response
    return Cell(str(response.status))


def case_headers(server: str, port: int) -> Cell:
    response = get(port, "/stream?n=1&interval=0.01")
    assert response.headers.get("cache-control") == "no-cache", response.headers
    assert response.headers.get("x-accel-buffering") == "no", response.headers
    return Cell()


CASES: dict[str, Callable[[str, int], Cell]] = {
    "stream": case_stream,
    "thread": case_thread,
    "queue": case_queue,
    "queue_raw": case_queue_raw,
    "len": case_len,
    "late_start": case_late_start,
    "disconnect": case_disconnect,
    "idle": case_idle,
    "fail_mid": case_fail_mid,
    "fail_mid_http10": case_fail_mid_http10,
    "fail_first": case_fail_first,
    "fail_first_own": case_fail_first_own,
    "fail_first_raw": case_fail_first_raw,
    "headers": case_headers,
}
assert set(CASES) | {"validate"} == set(matrix_report.CASES)


def _run(case: Callable[[str, int], Cell], server: str, port: int) -> Cell:
    try:
        return case(server, port)
    except Exception:
        return Cell(failure=traceback.format_exc())


def _validate(server: ServerProcess) -> Cell:
    violations = server.info()["violations"] + server.validation_problems()
    if violations:
        return Cell(failure="wsgiref.validate reported:\n" + "\n".join(violations))
    return Cell()


@pytest.fixture(
    scope="module",
    params=list(matrix_report.SERVERS),
)
def matrix(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Cell]]]:
    """Start one server, run every case against it concurrently, hand out the cells."""
    with ServerProcess(request.param, "tests.matrix_apps:app") as server:
        with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
            futures = {
                name: pool.submit(_run, case, server.server, server.port)
                for name, case in CASES.items()
            }
            cells = {name: future.result(timeout=30) for name, future in futures.items()}
        cells["validate"] = _validate(server)
        yield server.server, cells


@pytest.mark.parametrize("case", list(matrix_report.CASES))
def test_matrix(
    matrix: tuple[str, dict[str, Cell]], case: str, request: pytest.FixtureRequest
) -> None:
    server, cells = matrix
    cell = cells[case]
    request.node.user_properties.append(
        (
            "matrix",
            {
                "server": server,
                "case": case,
                "text": cell.text,
                "note": cell.note,
                "broken": cell.broken,
            },
        )
    )
    assert cell.failure is None, f"{case} on {server}:\n{cell.failure}"
