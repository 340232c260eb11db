"""DetachedBody in-process: types, lifecycle, timeouts, heartbeat, backpressure, start/fail."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgi_detach import (
    BodyAborted,
    BodyClosed,
    BodyEnded,
    BodyOptions,
    BodyTimeout,
    BufferFull,
    ByteBudget,
    DetachedBody,
    UsageError,
)


def drain(body: DetachedBody) -> list[bytes]:
    return list(body)


# ---------------------------------------------------------------- chunk types


def test_accepts_bytes_bytearray_memoryview_and_str() -> None:
    body = DetachedBody(coalesce=0)
    source = bytearray(b"ba")
    body.put(b"b")
    body.put(source)
    body.put(memoryview(b"mv"))
    body.put("é")
    source[:] = b"XX"  # the body copied it
    body.finish()
    assert drain(body) == [b"b", b"ba", b"mv", "é".encode()]


def test_str_uses_the_encoding() -> None:
    body = DetachedBody(encoding="latin-1")
    body.finish("é")
    assert drain(body) == [b"\xe9"]


@pytest.mark.parametrize("bad", [None, 42, 1.5, ["x"], object()])
def test_a_wrong_chunk_type_fails_at_put_and_leaves_the_body_usable(bad: Any) -> None:
    body = DetachedBody()
    with pytest.raises(TypeError, match=rf"a chunk must be bytes.*got {type(bad).__name__}"):
        body.put(bad)
    body.put(b"still fine")
    body.finish()
    assert drain(body) == [b"still fine"]


def test_put_stopiteration_is_finish_like_a_gevent_queue_body() -> None:
    body = DetachedBody()
    body.put("a")
    body.put(StopIteration)
    assert body.state == "finished"
    assert drain(body) == [b"a"]


def test_empty_chunks_are_not_yielded() -> None:
    body = DetachedBody(coalesce=0)
    body.put(b"")
    body.put(b"x")
    body.put("")
    body.finish()
    assert drain(body) == [b"x"]


def test_no_len_so_servers_cannot_trust_a_queue_size() -> None:
    body = DetachedBody()
    body.put(b"one chunk")
    assert not hasattr(body, "__len__")
    with pytest.raises(TypeError):
        len(body)  # type: ignore[arg-type]
    assert iter(body) is body


def test_bad_options_are_rejected_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="idle_timeout must be a positive number"):
        DetachedBody(idle_timeout=0)
    with pytest.raises(ValueError, match="max_buffer must be a positive int"):
        DetachedBody(max_buffer=-1)
    with pytest.raises(TypeError, match="heartbeat_chunk must be non-empty bytes"):
        DetachedBody(heartbeat=1, heartbeat_chunk=b"")
    with pytest.raises(LookupError):
        DetachedBody(encoding="no-such-codec")
    with pytest.raises(ValueError, match="coalesce must be an int >= 0"):
        DetachedBody(coalesce=-1)


# ---------------------------------------------------------------- lifecycle


def test_finish_twice_is_a_noop_and_finish_with_chunk_appends() -> None:
    body = DetachedBody(coalesce=0)
    body.put("a")
    body.finish(b"last")
    body.finish()
    assert drain(body) == [b"a", b"last"]


def test_writing_after_finish_is_the_callers_bug() -> None:
    body = DetachedBody()
    body.finish()
    with pytest.raises(BodyEnded, match="cannot put\\(\\): the body is finished because you"):
        body.put("x")
    with pytest.raises(BodyEnded, match="cannot finish\\(\\) with a last chunk"):
        body.finish("x")
    assert issubclass(BodyEnded, UsageError) and issubclass(BodyEnded, BodyClosed)


def test_writing_after_close_is_the_outside_world() -> None:
    body = DetachedBody()
    body.close()
    with pytest.raises(BodyAborted, match="the server closed it") as info:
        body.write("x")
    assert info.value.state == "closed"
    body.finish()  # a no-op: cleanup paths may always call it
    body.fail(RuntimeError("ignored"))


def test_fail_delivers_buffered_chunks_then_raises() -> None:
    body = DetachedBody(coalesce=0)
    body.put("a")
    body.put("b")
    error = RuntimeError("boom")
    body.fail(error)
    assert next(body) == b"a"
    assert next(body) == b"b"
    with pytest.raises(RuntimeError, match="boom") as info:
        next(body)
    assert info.value is error
    with pytest.raises(StopIteration):
        next(body)
    with pytest.raises(BodyEnded, match="you already called fail"):
        body.put("c")


def test_fail_accepts_an_exception_class_and_rejects_other_things() -> None:
    body = DetachedBody()
    body.fail(ValueError)
    with pytest.raises(ValueError):
        next(body)
    with pytest.raises(TypeError, match="fail\\(\\) takes an exception, got str"):
        DetachedBody().fail("nope")  # type: ignore[arg-type]


def test_close_discards_the_buffer_and_stops_iteration() -> None:
    body = DetachedBody()
    body.put("unsent")
    body.close()
    assert body.closed and body.buffered == 0
    assert drain(body) == []
    assert body.outcome == "disconnected"


def test_on_close_runs_each_callback_once_and_logs_a_raising_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = DetachedBody()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("callback broke")

    body.on_close(lambda: calls.append("first"))
    body.on_close(broken)
    body.on_close(lambda: calls.append("third"))
    with caplog.at_level(logging.ERROR, logger="wsgi_detach"):
        body.close()
        body.close()
    assert calls == ["first", "third"]
    assert "callback broke" in caplog.text
    body.on_close(lambda: calls.append("late"))  # after close: runs at once
    assert calls == ["first", "third", "late"]


@pytest.mark.parametrize(
    ("end", "outcome"),
    [
        (lambda b: b.finish(), "finished"),
        (lambda b: b.fail(RuntimeError("x")), "failed"),
        (lambda b: None, "disconnected"),
    ],
)
def test_outcome_says_how_the_response_ended(end: Any, outcome: str) -> None:
    body = DetachedBody()
    end(body)
    if body.state != "open":
        drain_until_error(body)
    assert body.outcome is None
    body.close()
    assert body.outcome == outcome


def test_finished_but_undelivered_counts_as_disconnected() -> None:
    body = DetachedBody()
    body.finish("never sent")
    body.close()
    assert body.outcome == "disconnected"


def test_repr_shows_state_and_buffer() -> None:
    body = DetachedBody()
    body.put(b"12345")
    assert repr(body) == "<DetachedBody open, 1 chunks / 5 bytes buffered>"
    body.close()
    assert repr(body) == "<DetachedBody closed, 0 chunks / 0 bytes buffered>"


def test_coalesces_waiting_chunks_up_to_the_limit_in_order() -> None:
    body = DetachedBody(coalesce=10)
    for piece in [b"aaaa", b"bbbb", b"cccc", b"dddddddddddd", b"e"]:
        body.put(piece)
    body.finish()
    assert drain(body) == [b"aaaabbbb", b"cccc", b"dddddddddddd", b"e"]


@pytest.mark.parametrize(("coalesce", "third"), [(0, [b"2", b"3"]), (10, [b"23"])])
def test_order_holds_as_the_buffer_empties_and_fills_again(
    coalesce: int, third: list[bytes]
) -> None:
    """The oldest chunk waits in a slot of its own, any more behind it in a
    deque made only then: what comes out must not depend on which holds what."""
    body = DetachedBody(coalesce=coalesce)
    body.put(b"1")
    assert next(body) == b"1"  # the slot alone
    body.put(b"2")
    body.put(b"3")  # behind it
    got = [next(body) for _ in third]
    assert got == third
    body.put(b"4")
    body.put(b"5")
    body.put(b"6")
    assert repr(body) == "<DetachedBody open, 3 chunks / 3 bytes buffered>"
    assert next(body) == (b"4" if coalesce == 0 else b"456")
    body.finish(b"7")  # a last chunk behind whatever still waits
    assert drain(body) == ([b"5", b"6", b"7"] if coalesce == 0 else [b"7"])


class _Tagged(DetachedBody):
    """A user's subclass that declares no ``__slots__`` and so gets an instance dict."""

    def __init__(self, tag: str, **options: Any) -> None:
        self.tag = tag  # before DetachedBody.__init__ ran
        super().__init__(**options)
        self.seen: list[bytes] = []

    def __next__(self) -> bytes:
        chunk = super().__next__()
        self.seen.append(chunk)
        return chunk


def test_a_subclass_without_slots_keeps_attributes_of_its_own() -> None:
    body = _Tagged("t", coalesce=0)
    body.later = "set from outside"  # type: ignore[attr-defined]
    body.put(b"a")
    body.finish(b"b")
    assert drain(body) == [b"a", b"b"]
    assert vars(body) == {"tag": "t", "seen": [b"a", b"b"], "later": "set from outside"}
    assert body.outcome is None and body.state == "finished"


def test_a_body_keeps_its_attributes_in_slots_and_can_be_weakly_referenced() -> None:
    """Slots: no per-body dict (bench/mem_idle.py); weak references as before."""
    body = DetachedBody()
    assert not hasattr(body, "__dict__")
    with pytest.raises(AttributeError):
        body.anything = 1  # type: ignore[attr-defined]
    ref = weakref.ref(body)
    assert ref() is body
    del body
    assert ref() is None


# ---------------------------------------------------------------- producers tied to the body


def test_with_block_finishes_on_normal_exit_and_fails_on_error() -> None:
    body = DetachedBody()
    with body:
        body.put("ok")
    assert body.state == "finished"

    body = DetachedBody()
    with pytest.raises(KeyError):
        with body:
            body.put("partial")
            raise KeyError("producer died")
    assert drain_until_error(body) == ([b"partial"], KeyError)


def drain_until_error(body: DetachedBody) -> tuple[list[bytes], type[BaseException] | None]:
    got: list[bytes] = []
    try:
        for chunk in body:
            got.append(chunk)
    except BaseException as exc:
        return got, type(exc)
    return got, None


def test_with_block_swallows_its_own_abort_so_producers_end_quietly() -> None:
    body = DetachedBody()
    with body:
        body.close()  # the client left
        body.put("nobody listens")
    other = DetachedBody()
    other.close()
    mine = DetachedBody()
    with pytest.raises(BodyAborted):
        with mine:
            other.put("x")  # someone else's abort is not ours to swallow
    assert mine.state == "failed"


def test_spawn_ties_a_greenlet_producer() -> None:
    body = DetachedBody(coalesce=0)

    def produce(n: int) -> None:
        for i in range(n):
            body.put(str(i))
            gevent.sleep(0)

    # From a greenlet (as on gevent servers) the producer shares the caller's hub.
    greenlet = gevent.spawn(body.spawn, produce, 3).get(timeout=5)
    assert drain(body) == [b"0", b"1", b"2"]
    greenlet.join(timeout=5)
    assert greenlet.successful()

    body = DetachedBody()
    failing = gevent.spawn(body.spawn, lambda: 1 / 0).get(timeout=5)
    assert drain_until_error(body) == ([], ZeroDivisionError)
    failing.join(timeout=5)
    assert isinstance(failing.exception, ZeroDivisionError)


def test_spawn_from_a_plain_thread_outlives_that_thread() -> None:
    """On a threaded server the request thread leaves when the request ends; a
    greenlet in its hub would freeze. spawn() uses the producer hub thread."""
    body = DetachedBody(coalesce=0)
    stop = threading.Event()
    spawned: list[gevent.Greenlet] = []

    def produce() -> None:
        for i in range(1000):
            if stop.is_set():
                break
            body.put(f"{i};")
            gevent.sleep(0.005)

    def request_thread() -> None:  # spawns, then returns at once
        spawned.append(body.spawn(produce))

    thread = threading.Thread(target=request_thread)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    first, second = next(body), next(body)  # still producing after its spawner left
    assert (first, second) == (b"0;", b"1;")
    body.close()
    assert wait_for(lambda: spawned[0].dead, 5)  # the next put raised BodyAborted
    stop.set()


def wait_for(predicate: Any, timeout: float) -> bool:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.005)
    return True


def test_spawn_thread_ties_a_thread_producer() -> None:
    body = DetachedBody(coalesce=0)
    thread = body.spawn_thread(lambda: [body.put(str(i)) for i in range(3)])
    assert b"".join(drain(body)) == b"012"
    thread.join(timeout=5)
    assert not thread.is_alive()


# ---------------------------------------------------------------- start_response owned by the body


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.calls.append((status, headers, exc_info))
        return lambda data: None


def test_start_is_handed_to_the_server_inside_the_first_iteration() -> None:
    recorder = Recorder()
    body = DetachedBody(start_response=recorder)
    body.start("201 Created", [("X-A", "1")])
    body.put("x")
    assert recorder.calls == []  # not yet: the server has not asked
    assert next(body) == b"x"
    assert recorder.calls == [("201 Created", [("X-A", "1")], None)]


def test_put_before_start_is_refused_and_the_body_stays_usable() -> None:
    body = DetachedBody(start_response=Recorder())
    with pytest.raises(UsageError, match="put\\(\\) before start\\(\\)"):
        body.put("x")
    body.start("200 OK", [])
    with pytest.raises(UsageError, match="start\\(\\) was already called"):
        body.start("200 OK", [])
    with pytest.raises(UsageError, match="needs a body created with"):
        DetachedBody().start("200 OK", [])


def test_finish_before_start_fails_the_body_as_a_500() -> None:
    recorder = Recorder()
    body = DetachedBody(start_response=recorder)
    with pytest.raises(UsageError, match="finish\\(\\) before start\\(\\)"):
        body.finish()
    assert drain(body) == [b"500 Internal Server Error\n"]
    assert recorder.calls[0][0] == "500 Internal Server Error"


def test_failure_before_any_data_is_a_500_with_exc_info() -> None:
    recorder = Recorder()
    body = DetachedBody(start_response=recorder)
    body.start("200 OK", [("Content-Type", "text/html")])
    body.fail(RuntimeError("db down"))
    assert drain(body) == [b"500 Internal Server Error\n"]
    status, headers, exc_info = recorder.calls[0]
    assert status == "500 Internal Server Error"
    assert ("Content-Length", "26") in headers
    assert exc_info[0] is RuntimeError


def test_failure_after_data_raises_so_the_server_aborts() -> None:
    recorder = Recorder()
    body = DetachedBody(start_response=recorder)
    body.start("200 OK", [])
    body.put("partial")
    body.fail(RuntimeError("late"))
    assert next(body) == b"partial"
    with pytest.raises(RuntimeError, match="late"):
        next(body)
    assert len(recorder.calls) == 1


# ---------------------------------------------------------------- timeouts and heartbeat


def test_idle_timeout_raises_body_timeout() -> None:
    body = DetachedBody(idle_timeout=0.05)
    started = time.monotonic()
    with pytest.raises(BodyTimeout, match=r"silent for idle_timeout=0\.05s"):
        next(body)
    assert 0.04 <= time.monotonic() - started < 1
    assert body.state == "expired"
    with pytest.raises(BodyAborted, match="it timed out"):
        body.put("too late")
    body.close()
    assert body.outcome == "timed_out"


def test_activity_postpones_the_idle_timeout() -> None:
    body = DetachedBody(idle_timeout=0.2, coalesce=0)

    def produce() -> None:
        for i in range(4):
            gevent.sleep(0.1)
            body.put(str(i))
        body.finish()

    gevent.spawn(produce)
    assert drain(body) == [b"0", b"1", b"2", b"3"]  # 0.4 s total, never 0.2 s silent


def test_deadline_expires_however_active() -> None:
    body = DetachedBody(deadline=0.15)

    def chatter() -> None:
        while not body.closed and body.state == "open":
            body.put(".")
            gevent.sleep(0.01)

    gevent.spawn(chatter)
    with pytest.raises(BodyTimeout, match=r"deadline=0\.15s passed"):
        drain(body)


def test_timeout_chunk_ends_cleanly_instead() -> None:
    body = DetachedBody(idle_timeout=0.05, timeout_chunk=b"[]")
    assert drain(body) == [b"[]"]
    body.close()
    assert body.outcome == "timed_out"


def test_timeout_before_start_of_an_owned_body_is_a_504() -> None:
    recorder = Recorder()
    body = DetachedBody(idle_timeout=0.05, start_response=recorder, timeout_chunk=b"[]")
    assert drain(body) == [b"504 Gateway Timeout\n"]
    assert recorder.calls[0][0] == "504 Gateway Timeout"


def test_heartbeat_fills_silence_but_does_not_count_as_activity() -> None:
    body = DetachedBody(heartbeat=0.03, heartbeat_chunk=b":\n", idle_timeout=0.2)
    beats, error = drain_until_error(body)
    assert error is BodyTimeout
    assert 2 <= len(beats) <= 7 and set(beats) == {b":\n"}


def test_heartbeat_waits_for_the_head_of_an_owned_body() -> None:
    recorder = Recorder()
    body = DetachedBody(heartbeat=0.02, start_response=recorder)

    def later() -> None:
        gevent.sleep(0.1)
        body.start("200 OK", [])
        gevent.sleep(0.05)
        body.finish("end")

    gevent.spawn(later)
    chunks = drain(body)
    assert chunks[-1] == b"end" and set(chunks[:-1]) == {b"\n"}
    assert recorder.calls and recorder.calls[0][0] == "200 OK"


# ---------------------------------------------------------------- backpressure


def test_put_blocks_at_max_buffer_until_the_consumer_drains() -> None:
    body = DetachedBody(max_buffer=10, coalesce=0)
    progress: list[int] = []

    def produce() -> None:
        for i in range(5):
            body.put(b"12345")
            progress.append(i)
        body.finish()

    producer = gevent.spawn(produce)
    gevent.sleep(0.05)
    assert progress == [0, 1] and body.buffered == 10  # third put waits for room
    assert next(body) == b"12345"
    gevent.sleep(0.01)
    assert progress == [0, 1, 2]
    assert drain(body) == [b"12345"] * 4
    producer.join(timeout=5)
    assert progress == [0, 1, 2, 3, 4]


def test_put_nowait_and_put_timeout_raise_buffer_full() -> None:
    body = DetachedBody(max_buffer=4)
    body.put(b"1234")
    with pytest.raises(BufferFull, match="max_buffer=4 bytes reached"):
        body.put_nowait(b"5")
    started = time.monotonic()
    with pytest.raises(BufferFull, match=r"put\(\) waited 0\.05s for room"):
        body.put(b"5", timeout=0.05)
    assert time.monotonic() - started >= 0.04
    assert body.buffered == 4


def test_a_chunk_larger_than_the_cap_passes_when_the_buffer_is_empty() -> None:
    body = DetachedBody(max_buffer=4)
    body.put_nowait(b"123456789")
    assert body.buffered == 9


def test_close_wakes_a_blocked_producer_with_body_aborted() -> None:
    body = DetachedBody(max_buffer=1)
    body.put(b"x")
    result: list[BaseException] = []

    def blocked() -> None:
        try:
            body.put(b"y")
        except BodyClosed as exc:
            result.append(exc)

    producer = gevent.spawn(blocked)
    gevent.sleep(0.01)
    body.close()
    producer.join(timeout=5)
    assert isinstance(result[0], BodyAborted)


def test_put_from_the_hub_at_the_cap_is_a_clear_error_not_a_deadlock() -> None:
    body = DetachedBody(max_buffer=1)
    body.put(b"x")
    errors: list[BaseException] = []

    def callback() -> None:
        try:
            body.put(b"y")
        except BufferFull as exc:
            errors.append(exc)

    hub = gevent.get_hub()
    hub.loop.run_callback(callback)
    gevent.sleep(0.01)
    assert len(errors) == 1
    assert "called from the gevent hub" in str(errors[0])


def test_two_consumers_are_refused() -> None:
    body = DetachedBody()
    first = gevent.spawn(next, body)
    gevent.sleep(0.01)
    with pytest.raises(UsageError, match="two consumers"):
        next(body)
    body.finish("x")
    assert first.get(timeout=5) == b"x"


def test_a_late_wake_up_of_the_reused_consumer_waiter_is_only_a_second_look() -> None:
    """The consumer keeps one waiter; a wake-up meant for an earlier wait (it lost
    the race with a timer) must neither end the wait with nothing nor look like a
    second consumer."""
    body = DetachedBody()
    chunks: list[bytes] = []
    consumer = gevent.spawn(lambda: chunks.extend(body))
    body.put(b"one")
    gevent.sleep(0.01)
    assert chunks == [b"one"]
    waiter = body._consumer
    assert waiter is not None and waiter is getattr(consumer, "_wsgi_detach_waiter", None)
    waiter.wake()  # as a producer whose wake-up came late would
    gevent.sleep(0.01)
    assert consumer.dead is False and body._consumer is waiter  # waiting again, same waiter
    body.finish(b"two")
    consumer.get(timeout=5)
    assert chunks == [b"one", b"two"]


# ---------------------------------------------------------------------------- regressions


def test_a_producer_killed_by_a_base_exception_fails_with_an_ordinary_one() -> None:
    """GreenletExit or gevent.Timeout raised inside waitress never ended the connection."""
    from wsgi_detach import ProducerStopped

    body = DetachedBody()
    body.put("partial")
    body.fail(gevent.GreenletExit())
    assert next(body) == b"partial"
    with pytest.raises(ProducerStopped, match="stopped by GreenletExit") as info:
        next(body)
    assert isinstance(info.value.__cause__, gevent.GreenletExit)

    body = DetachedBody()

    def sleeper() -> None:
        gevent.sleep(10)

    producer = gevent.spawn(body.spawn, sleeper).get(timeout=5)
    gevent.sleep(0)
    producer.kill(block=True, timeout=5)
    with pytest.raises(ProducerStopped):
        next(body)


def test_waiting_for_a_slow_client_is_not_producer_silence() -> None:
    """A producer blocked on max_buffer is alive; the client is the slow one."""
    body = DetachedBody(max_buffer=8, idle_timeout=0.15, coalesce=0)

    def produce() -> None:
        for _ in range(6):
            body.put(b"12345678")
        body.finish()

    gevent.spawn(produce)
    got = []
    for chunk in body:
        got.append(chunk)
        if len(got) % 2:
            # The client stalls past idle_timeout with the producer blocked on
            # the cap; then drains without pause, faster than the producer refills.
            gevent.sleep(0.25)
    assert got == [b"12345678"] * 6


def test_the_deadline_holds_while_data_waits_for_a_slow_client() -> None:
    body = DetachedBody(deadline=0.2, coalesce=0)
    for _ in range(100):
        body.put(b"x")
    started = time.monotonic()
    with pytest.raises(BodyTimeout, match="data still waiting for the client"):
        for _ in body:
            gevent.sleep(0.05)
    assert time.monotonic() - started < 1
    assert body.buffered == 0


def test_a_blocking_put_without_timeout_outlasts_the_waiters_keep_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wsgi_detach import _wakeup

    monkeypatch.setattr(_wakeup, "_KEEP_ALIVE", 0.02)
    body = DetachedBody(max_buffer=1)
    body.put(b"x")
    done: list[str] = []

    def blocked() -> None:
        body.put(b"y")  # no timeout: must wait however many keep-alive periods pass
        done.append("put")

    producer = gevent.spawn(blocked)
    gevent.sleep(0.15)
    assert not done and not producer.dead
    assert next(body) == b"x"
    producer.join(timeout=5)
    assert done == ["put"]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e12])
def test_unbounded_timeouts_are_refused_at_construction(value: float) -> None:
    with pytest.raises(ValueError, match="idle_timeout must be a positive number of seconds"):
        DetachedBody(idle_timeout=value)


def test_spawn_thread_is_a_real_thread_even_after_patch_all() -> None:
    import subprocess
    import sys

    script = """
from gevent import monkey; monkey.patch_all()
import threading, time
from gevent.monkey import get_original
from wsgi_detach import DetachedBody
real_ident = get_original("_thread", "get_ident")
body = DetachedBody()
main = real_ident()
handle = body.spawn_thread(lambda: body.put(str(real_ident() != main)))
print(b"".join(body).decode())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "True", out


# ---------------------------------------------------------------------- BodyOptions

_FIELDS = ("_idle_timeout", "_deadline", "_heartbeat", "_heartbeat_chunk", "_max_buffer",
           "_encoding", "_timeout_chunk", "_coalesce", "_budget")

_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([b"", b"\n", b"x", "text", "utf-8", "latin-1", "no-such-codec", 400 * 86400]),
)


@settings(max_examples=400, deadline=None)
@given(
    values=st.fixed_dictionaries(
        {},
        optional={
            "idle_timeout": _ANY_VALUE,
            "deadline": _ANY_VALUE,
            "heartbeat": _ANY_VALUE,
            "heartbeat_chunk": _ANY_VALUE,
            "max_buffer": _ANY_VALUE,
            "encoding": st.sampled_from(["utf-8", "latin-1", "no-such-codec"]),
            "timeout_chunk": _ANY_VALUE,
            "coalesce": _ANY_VALUE,
        },
    )
)
def test_keywords_and_body_options_apply_the_same_checks(values: dict[str, Any]) -> None:
    """A body built from keywords and one built from BodyOptions agree, error or not."""
    outcomes = []
    for build in (
        lambda: DetachedBody(**values),
        lambda: DetachedBody(options=BodyOptions(**values)),
        lambda: DetachedBody(options=BodyOptions().merge(values)),
    ):
        try:
            body = build()
        except (TypeError, ValueError, LookupError) as exc:
            outcomes.append((type(exc), str(exc)))
        else:
            outcomes.append(tuple(getattr(body, name) for name in _FIELDS))
            body.close()
    assert outcomes[0] == outcomes[1] == outcomes[2]


def test_body_options_carry_a_shared_budget() -> None:
    budget = ByteBudget(100)
    options = BodyOptions(budget=budget)
    first, second = DetachedBody(options=options), DetachedBody(options=options)
    first.put(b"x" * 60)
    with pytest.raises(BufferFull, match="shared budget of 100 bytes"):
        second.put(b"y" * 60)
    first.close()
    second.close()
    assert budget.used == 0


def test_a_registrar_is_told_once_when_its_body_closes_after_the_callbacks() -> None:
    """The middleware's on_close, held as the request itself (no object per body)."""
    told: list[str] = []

    class Request:
        def __init__(self, name: str) -> None:
            self.name = name

        def release_closed(self) -> None:
            told.append(self.name)

    body = DetachedBody()
    body._tell_on_close(Request("first"))
    body._tell_on_close(Request("second"))  # a second request: a callback of its own
    body.on_close(lambda: told.append("app"))
    body.close()
    body.close()
    assert told == ["second", "app", "first"]  # callbacks in order, then the request
    closed = DetachedBody()
    closed.close()
    closed._tell_on_close(Request("late"))  # closed already: at once
    assert told[-1] == "late"
