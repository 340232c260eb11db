"""Hypothesis drives DetachedBody through random put/finish/fail/close/consume/timeout
sequences and compares every step with a plain-Python model of the lifecycle table.

Every (state, operation) pair either lands in the state the model predicts or
raises the documented error; nothing is lost, duplicated or reordered.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from wsgi_detach import BodyAborted, BodyEnded, BodyTimeout, DetachedBody

chunks = st.one_of(st.binary(max_size=12), st.text(max_size=6))
IDLE = 0.002  # so short that consuming an open, empty body always expires it


class BodyModel(RuleBasedStateMachine):
    @initialize(coalesce=st.sampled_from([0, 8]), clean_timeout=st.booleans())
    def setup(self, coalesce: int, clean_timeout: bool) -> None:
        self.coalesce = coalesce
        self.timeout_chunk = b"TO" if clean_timeout else None
        self.body = DetachedBody(
            idle_timeout=IDLE, coalesce=coalesce, timeout_chunk=self.timeout_chunk
        )
        self.state = "open"
        self.buffer: list[bytes] = []
        self.pending_error: BaseException | None = None
        self.closed_calls = 0
        self.registered = 0
        self.outcome: str | None = None

    # -- producer side
    @rule(chunk=chunks)
    def put(self, chunk: bytes | str) -> None:
        data = chunk.encode() if isinstance(chunk, str) else chunk
        if self.state == "open":
            self.body.put(chunk)
            if data:
                self.buffer.append(data)
        else:
            self.expect_refusal(lambda: self.body.put(chunk))

    @rule(bad=st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=1)))
    def put_wrong_type(self, bad: Any) -> None:
        with pytest.raises(TypeError, match="a chunk must be bytes"):
            self.body.put(bad)

    @rule(chunk=st.one_of(st.none(), chunks))
    def finish(self, chunk: bytes | str | None) -> None:
        if self.state == "open":
            self.body.finish(chunk)
            data = chunk.encode() if isinstance(chunk, str) else chunk
            if data:
                self.buffer.append(data)
            self.state = "finished"
        elif chunk is None:
            self.body.finish()  # a no-op in every ended state
        else:
            self.expect_refusal(lambda: self.body.finish(chunk))

    @rule()
    def fail(self) -> None:
        error = RuntimeError("model failure")
        self.body.fail(error)
        if self.state == "open":
            self.state = "failed"
            self.pending_error = error

    @rule()
    def register_on_close(self) -> None:
        def callback() -> None:
            self.closed_calls += 1

        self.body.on_close(callback)
        self.registered += 1
        if self.state == "closed":
            assert self.closed_calls == self.registered  # ran at once

    @rule()
    def close(self) -> None:
        if self.state != "closed":
            self.outcome = {"failed": "failed", "expired": "timed_out"}.get(
                self.state,
                "finished" if self.state == "finished" and not self.buffer else "disconnected",
            )
        self.body.close()
        self.state = "closed"
        self.buffer.clear()
        self.pending_error = None
        assert self.closed_calls == self.registered
        assert self.body.outcome == self.outcome

    # -- consumer side
    @precondition(lambda self: self.buffer or self.state != "open")
    @rule()
    def consume(self) -> None:
        if self.buffer:
            expected = self.buffer.pop(0)
            while (
                self.buffer
                and len(expected) < self.coalesce
                and len(expected) + len(self.buffer[0]) <= self.coalesce
            ):
                expected += self.buffer.pop(0)
            assert next(self.body) == expected
        elif self.pending_error is not None:
            with pytest.raises(RuntimeError, match="model failure"):
                next(self.body)
            self.pending_error = None
        else:
            with pytest.raises(StopIteration):
                next(self.body)

    @precondition(lambda self: not self.buffer and self.state == "open")
    @rule()
    def consume_until_timeout(self) -> None:
        self.state = "expired"
        if self.timeout_chunk is not None:
            assert next(self.body) == self.timeout_chunk
        else:
            with pytest.raises(BodyTimeout, match="idle_timeout"):
                next(self.body)

    def expect_refusal(self, call: Any) -> None:
        error = BodyEnded if self.state in ("finished", "failed") else BodyAborted
        with pytest.raises(error, match=f"the body is {self.state} because"):
            call()

    @invariant()
    def agrees_with_model(self) -> None:
        if not hasattr(self, "body"):
            return
        assert self.body.state == self.state
        assert self.body.buffered == sum(len(c) for c in self.buffer)
        assert self.body.closed == (self.state == "closed")


BodyModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestBodyStates = BodyModel.TestCase
