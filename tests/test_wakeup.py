"""_wakeup: the right kind of waiter for each context, and each wakes across threads."""

from __future__ import annotations

import threading
import time
from typing import Any

import gevent
from greenlet import getcurrent

from wsgi_detach._wakeup import (
    CannotBlockHere,
    in_hub,
    make_waiter,
    reuse_waiter,
    runner_here,
    start_real_thread,
)


def test_a_thread_without_a_hub_gets_a_thread_waiter_woken_from_a_greenlet() -> None:
    kinds: list[str] = []
    woken: list[bool] = []
    registered = threading.Event()
    holder: list[object] = []

    def thread() -> None:
        waiter = make_waiter()
        kinds.append(type(waiter).__name__)
        holder.append(waiter)
        registered.set()
        woken.append(waiter.wait(5))

    t = threading.Thread(target=thread)
    t.start()
    assert registered.wait(5)
    gevent.spawn(lambda: holder[0].wake()).join(5)  # type: ignore[attr-defined]
    t.join(5)
    assert kinds == ["_ThreadWaiter"] and woken == [True]


def test_a_hub_waiter_times_out_and_wakes_from_another_thread() -> None:
    gevent.get_hub()
    waiter = make_waiter()
    assert type(waiter).__name__ == "_HubWaiter"
    started = time.monotonic()
    assert waiter.wait(0.02) is False
    assert time.monotonic() - started >= 0.015

    waiter = make_waiter()
    threading.Thread(target=lambda: (time.sleep(0.01), waiter.wake())).start()
    assert waiter.wait(5) is True  # no LoopExit though nothing else keeps the hub busy


def test_waits_without_timeout_share_one_keep_alive_and_never_hit_loop_exit() -> None:
    """Many greenlets waiting with no timeout, woken from another thread, in a hub with
    nothing else to watch: the hub's one keep-alive timer keeps the loop running while
    any of them waits, and stops once none does."""
    from wsgi_detach._wakeup import _inbox

    hub = gevent.get_hub()
    waiters = [make_waiter() for _ in range(20)]
    results: list[bool] = []
    greenlets = [gevent.spawn(lambda w=w: results.append(w.wait(None))) for w in waiters]
    gevent.sleep(0)  # every greenlet is waiting now
    keep_alive = _inbox(hub)._keep_alive
    assert keep_alive.active

    def wake_all() -> None:
        for waiter in waiters:
            time.sleep(0.001)
            waiter.wake()

    threading.Thread(target=wake_all).start()
    gevent.joinall(greenlets, timeout=5)
    assert results == [True] * 20
    assert not keep_alive.active


def test_the_hub_itself_cannot_block() -> None:
    seen: list[object] = []

    def callback() -> None:
        seen.append(in_hub())
        try:
            make_waiter()
        except CannotBlockHere as exc:
            seen.append(str(exc))

    gevent.get_hub().loop.run_callback(callback)
    gevent.sleep(0.01)
    assert seen[0] is True
    assert "cannot block in the gevent hub" in str(seen[1])
    assert in_hub() is False


def test_a_wake_before_the_wait_is_not_lost() -> None:
    gevent.get_hub()
    waiter = make_waiter()
    waiter.wake()
    gevent.sleep(0)  # let the scheduled switch run before anyone waits
    assert waiter.wait(1) is True


def test_a_reused_hub_waiter_returns_once_at_once_after_a_late_wake_up() -> None:
    def run() -> None:
        waiter = reuse_waiter()
        assert waiter.wait(0.01) is False  # nobody woke it: the timer did
        waiter.wake()  # late: that wait is over
        assert reuse_waiter() is waiter
        assert waiter.wait(5) is True  # the late wake-up, at once
        started = time.monotonic()
        assert waiter.wait(0.05) is False  # ...and only once
        assert time.monotonic() - started >= 0.04
        woken = gevent.spawn_later(0.01, waiter.wake)
        assert waiter.wait(None) is True  # the kept keep-alive timer, re-armed
        woken.join(timeout=1)

    gevent.spawn(run).get(timeout=10)


def test_a_greenlet_keeps_one_waiter_for_the_bodies_it_consumes_one_after_another() -> None:
    """A server's connection greenlet consumes a body per request: one waiter serves
    them all (no waiter, bound method or partial per waiting body), and the first
    body's late wake-up only makes the second body look again."""
    from wsgi_detach import DetachedBody

    def run() -> tuple[Any, Any, bytes]:
        first = DetachedBody()
        gevent.spawn_later(0.01, first.finish, b"one")
        assert b"".join(first) == b"one"
        kept = reuse_waiter()  # what the body waited with
        kept.wake()  # late, for a wait that is over: the next wait returns at once
        second = DetachedBody()
        gevent.spawn_later(0.05, second.finish, b"two")
        started = time.monotonic()
        data = b"".join(second)  # looks again after the stale wake-up, waits on
        assert time.monotonic() - started >= 0.04
        return kept, reuse_waiter(), data

    kept, reused, data = gevent.spawn(run).get(timeout=10)
    assert reused is kept and data == b"two"
    other: list[Any] = []
    gevent.spawn(lambda: other.append(reuse_waiter())).join(timeout=10)
    assert other[0] is not kept  # a greenlet of its own, a waiter of its own


def test_a_body_handed_to_another_greenlet_is_waited_for_with_that_greenlets_waiter() -> None:
    """Greenlet A waits on a body, hands it to B, then waits on another: each waits
    with its own waiter, so neither takes the other's wake-up."""
    from wsgi_detach import DetachedBody

    handed, own = DetachedBody(), DetachedBody()

    def b_drains() -> bytes:
        return b"".join(handed)

    def a_runs() -> tuple[bytes, bytes]:
        gevent.spawn_later(0.01, handed.put, b"first ")
        taken = next(iter(handed))  # A waits on the empty body once
        gevent.spawn_later(0.02, handed.put, b"second")
        gevent.spawn_later(0.04, handed.finish)
        gevent.spawn_later(0.06, own.finish, b"own")
        b = gevent.spawn(b_drains)
        mine = b"".join(own)  # A waits on its own body meanwhile
        return taken + b.get(timeout=5), mine

    drained, mine = gevent.spawn(a_runs).get(timeout=10)
    assert drained == b"first second" and mine == b"own"


def test_thread_waiters_are_never_reused() -> None:
    found: list[bool] = []

    def run() -> None:
        waiter = reuse_waiter()
        found.append(reuse_waiter() is waiter)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert found == [False]


def test_runner_here_runs_in_a_new_greenlet_of_the_hub_it_was_captured_in() -> None:
    hub = gevent.get_hub()
    run = runner_here()
    ran: list[tuple[int, bool]] = []

    def note() -> None:
        ran.append((threading.get_ident(), getcurrent() is not hub and getcurrent().parent is hub))

    start_real_thread(run, note).join(5)  # posted from a thread without a hub
    deadline = time.monotonic() + 5
    while not ran and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert ran == [(threading.get_ident(), True)]


def test_runner_here_without_a_hub_runs_at_once_where_it_is_called() -> None:
    ran: list[int] = []
    captured: list[object] = []
    thread = start_real_thread(lambda: captured.append(runner_here()))
    thread.join(5)
    (run,) = captured
    run(lambda: ran.append(threading.get_ident()))  # type: ignore[operator]
    assert ran == [threading.get_ident()]
