"""Soak: a thousand clients that read a little and reset the connection.

The body must not leak on the commonest bad exit of a real client (a tab
closed, a proxy timing out): afterwards no body is left open, every body's
``on_close`` ran exactly once, no greenlet is left parked, and the server's
resident memory is back within a few MiB of where it started, and it holds
no more file descriptors than before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from tests.client import Stream, get_json, wait_until
from tests.servers import ServerProcess, serve

CLIENTS = int(os.environ.get("SOAK_CLIENTS", "1000"))
CONCURRENCY = 50
#: Allowed RSS growth after the soak, over the level after a warm-up.
RSS_SLACK = 4 * 1024 * 1024


#: pywsgi + DetachHandler: its disconnect watcher registers every socket.
@pytest.fixture(scope="module", params=["pywsgi", "pywsgi-detach", "gunicorn-gevent"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with serve(request.param, "tests.matrix_apps:app") as process:
        yield process


def counts(port: int) -> dict[str, int]:
    result: dict[str, int] = get_json(port, "/_counts")
    return result


def reset_client(port: int) -> None:
    stream = Stream(port, "/soak?interval=0.01", timeout=10)
    try:
        assert stream.read_head().status == 200
        assert stream.read_chunk()
    finally:
        stream.reset()


def soak(port: int, clients: int) -> None:
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        for future in [pool.submit(reset_client, port) for _ in range(clients)]:
            future.result(timeout=30)


def settled(server: ServerProcess, made: int) -> dict[str, Any]:
    """The server's report once every body made so far was closed and its producer ended.

    A producer hears of the close at its next ``put()``, a moment after
    ``on_close`` ran; waiting for that keeps the greenlet counts comparable.
    On timeout the report is returned anyway, and the assertions tell what is left.
    """
    wait_until(lambda: counts(server.port)["closed"] >= made, timeout=10)
    report: dict[str, Any] = {}

    def producers_gone() -> bool:
        report.update(server.info())
        return not any(k.startswith("DetachedBody._run_tied") for k in report["greenlet_kinds"])

    wait_until(producers_gone, timeout=5)
    return report


def test_resetting_clients_leave_nothing_behind(server: ServerProcess) -> None:
    # The allocator keeps its high-water mark, which settles over a few
    # thousand requests (slower with the disconnect watcher): warm up first.
    warmup = 2 * CLIENTS
    soak(server.port, warmup)
    # One stream old enough for the disconnect watcher to take it over, so
    # that the watcher's thread (an epoll and a pipe: three descriptors, made
    # once per process, when a watch first outlives its 0.1 s delay) is part
    # of the baseline, not of the soak. 30 chunks 10 ms apart: >= 0.3 s.
    held = Stream(server.port, "/soak?interval=0.01", timeout=10)
    try:
        assert held.read_head().status == 200
        for _ in range(30):
            assert held.read_chunk()
    finally:
        held.reset()
    warmup += 1
    before = settled(server, warmup)
    process = psutil.Process(before["pid"])
    rss_before = process.memory_info().rss
    fds_before = process.num_fds()

    started = time.monotonic()
    soak(server.port, CLIENTS)
    after = settled(server, warmup + CLIENTS)
    elapsed = time.monotonic() - started
    rss_after = process.memory_info().rss
    # The server closes its side of the last report request a moment later.
    wait_until(lambda: process.num_fds() <= fds_before, timeout=2)
    fds_after = process.num_fds()

    final = counts(server.port)
    report = (
        f"{server.server}: {CLIENTS} resets in {elapsed:.1f}s; bodies {final}; "
        f"greenlets {before['greenlets']} -> {after['greenlets']}; RSS "
        f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB; "
        f"fds {fds_before} -> {fds_after}"
    )
    print(report)
    assert final == {
        "made": warmup + CLIENTS,
        "closed": warmup + CLIENTS,
        "closed_twice_or_more": 0,
    }, report
    assert after["open_bodies"] == 0, report
    stats = get_json(server.port, "/_stats")
    assert stats["open"] == 0, stats
    assert stats["disconnected"] == warmup + CLIENTS, stats
    assert after["greenlets"] <= before["greenlets"], (
        f"{report}\nbefore: {before['greenlet_kinds']}\nafter: {after['greenlet_kinds']}"
    )
    assert rss_after - rss_before < RSS_SLACK, report
    assert fds_after <= fds_before, report
    assert after["violations"] == [], report
