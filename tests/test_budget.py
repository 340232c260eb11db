"""ByteBudget: one cap on the bytes buffered across bodies, released as the server reads."""

from __future__ import annotations

import pytest

from wsgi_detach import BufferFull, ByteBudget, DetachedBody


def test_a_put_over_the_shared_cap_raises_at_once() -> None:
    budget = ByteBudget(100)
    first, second = DetachedBody(budget=budget), DetachedBody(budget=budget, max_buffer=1000)
    first.put(b"a" * 60)
    with pytest.raises(BufferFull, match=r"^the shared budget of 100 bytes buffered across all "
                                         r"bodies is used up"):
        second.put(b"b" * 50)  # a blocking put: still raises, it would wait on strangers
    assert second.buffered == 0
    second.put(b"b" * 40)
    assert budget.used == 100


def test_bytes_are_released_when_read_or_discarded() -> None:
    budget = ByteBudget(100)
    first, second = DetachedBody(budget=budget), DetachedBody(budget=budget)
    first.put(b"a" * 60)
    second.put(b"b" * 40)
    assert next(first) == b"a" * 60
    assert budget.used == 40
    second.close()
    assert budget.used == 0


def test_ending_a_body_is_never_refused() -> None:
    budget = ByteBudget(10)
    body = DetachedBody(budget=budget)
    body.put(b"1234567890")
    body.finish(b"last words over the cap")  # finish() never fails for lack of room
    assert budget.used == 33
    assert list(body) == [b"1234567890last words over the cap"]
    assert budget.used == 0


def test_without_a_limit_it_only_counts() -> None:
    budget = ByteBudget()
    body = DetachedBody(budget=budget)
    body.put(b"x" * 10_000)
    assert (budget.used, repr(budget)) == (10_000, "<ByteBudget 10000 of unlimited bytes>")


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"^limit must be a positive int or None, got 0$"):
        ByteBudget(0)
    with pytest.raises(TypeError, match=r"^budget must be a ByteBudget or None, got 5$"):
        DetachedBody(budget=5)  # type: ignore[arg-type]
