"""DetachedBody served by real servers (gevent.pywsgi plain and monkey-patched, threaded
wsgiref) in subprocesses, over loopback sockets, with wsgiref.validate around the app.

Producers are greenlets and plain OS threads (``via``). The ``served`` fixture
(conftest.py) asserts at teardown that the validator objected to nothing.
"""

from __future__ import annotations

import time

import psutil
import pytest

from tests.client import Stream, events, get, wait_until
from tests.servers import ServerProcess

pytestmark = pytest.mark.parametrize("via", ["greenlet", "thread"])


def test_chunks_arrive_as_they_are_put(served: ServerProcess, via: str) -> None:
    wall_minus_monotonic = time.time() - time.monotonic()
    response = get(served.port, f"/stream?via={via}&n=4&interval=0.2")
    assert response.status == 200 and response.complete
    lines = response.body.decode().splitlines()
    assert [line.split()[1] for line in lines] == ["0", "1", "2", "3"]
    put_at = [float(line.split()[2]) for line in lines]
    arrived_at = [t + wall_minus_monotonic for t, _ in response.chunks]
    assert len(arrived_at) == 4, "chunks were merged: they did not travel as they were put"
    # Incremental: each chunk reached the client before the next one was even put.
    for i in range(3):
        assert arrived_at[i] < put_at[i + 1], (i, arrived_at, put_at)


def test_one_buffered_chunk_never_becomes_a_content_length(served: ServerProcess, via: str) -> None:
    response = get(served.port, f"/first_of_many?via={via}&n=5")
    assert "content-length" not in response.headers
    assert response.body == b"first;more0;more1;more2;more3;more4;"
    assert response.complete


def test_client_disconnect_runs_on_close_and_the_next_put_raises(
    served: ServerProcess, via: str
) -> None:
    key = f"disconnect-{served.server}-{via}"
    stream = Stream(served.port, f"/forever?via={via}&key={key}&interval=0.02")
    stream.read_head()
    assert stream.read_chunk() is not None
    stream.reset()
    left = time.monotonic()
    port = served.port
    assert wait_until(lambda: len(events(port, key)) == 2, timeout=2.0), events(port, key)
    assert sorted(events(served.port, key)) == ["on_close", "put raised BodyAborted"]
    assert time.monotonic() - left < 2.0


def test_fail_mid_stream_never_looks_complete(served: ServerProcess, via: str) -> None:
    response = get(served.port, f"/fail_mid?via={via}")
    assert response.status == 200
    assert response.body == b"partial-1;partial-2;"
    if served.server == "wsgiref":
        # HTTP/1.0, close-delimited: a truncated body cannot be told from a
        # complete one. The middleware's job, not ours.
        assert response.headers.get("transfer-encoding") is None
    else:
        assert response.headers["transfer-encoding"] == "chunked"
        assert not response.complete, "an aborted stream ended with its terminating chunk"


def test_failure_before_any_data_is_a_500(served: ServerProcess, via: str) -> None:
    response = get(served.port, f"/fail_first?via={via}")
    assert response.status == 500
    assert response.body == b"500 Internal Server Error\n"


def test_status_and_headers_decided_after_the_app_returned(served: ServerProcess, via: str) -> None:
    response = get(served.port, f"/late_start?via={via}")
    assert (response.status, response.headers["x-late"], response.body) == (
        201,
        "yes",
        b"made later",
    )


def test_a_stalled_client_keeps_memory_bounded_and_frees_the_producer(
    served: ServerProcess, via: str
) -> None:
    """64 MiB pushed into a 64 KiB max_buffer toward a client that never reads."""
    key = f"flood-{served.server}-{via}"
    process = psutil.Process(served.pid)
    before = process.memory_info().rss
    stream = Stream(served.port, f"/flood?via={via}&key={key}")
    # The socket buffers fill within a few MiB; then the producer blocks.
    time.sleep(0.5)  # a measurement window, not synchronisation: RSS must stay flat over it
    grown = [process.memory_info().rss - before]
    for _ in range(5):
        time.sleep(0.1)
        grown.append(process.memory_info().rss - before)
    assert max(grown) < 24 * 1024 * 1024, f"server RSS grew by {max(grown) >> 20} MiB"
    assert events(served.port, key) == []  # still blocked, not finished
    stream.reset()
    left = time.monotonic()
    port = served.port
    assert wait_until(lambda: "put raised BodyAborted" in events(port, key), timeout=3.0), events(
        port, key
    )
    assert time.monotonic() - left < 2.0
