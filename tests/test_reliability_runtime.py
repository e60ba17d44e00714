"""Reliability round 2 (issue 19), the runtime side: numeric options out of range, the batching
worker's death, the HTTP service's hostile bodies and its bound on the work of one request.

Each case was found by an adversarial run; each test fails on the code before the fix (an
OverflowError, a hang, a 500, a request that kept the worker busy) and checks the typed result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import lookup_bundle, planted

from engine import Engine
from engine.answering import label_for, prepare
from engine.dynamic_batching import BatchingEngine, RequestTimeoutError, WorkerDiedError
from engine.errors import CallCancelledError, InvalidInputError, RequestTooLargeError
from engine.options import AnswerOptions

ANSWER = "Zanzibar Island"
CONTEXT = "After a long voyage the ship sailed to Zanzibar Island, then home again."
LONG_CONTEXT = " ".join(["The crew mended sails and counted stores for the long road ahead."] * 60) + " " + CONTEXT
HUGE = 10**400  # an int no float holds: float(HUGE) raises OverflowError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lookup_bundle(tmp_path_factory.mktemp("reliability"), **planted(ANSWER), max_seq_len=64)


@pytest.fixture(scope="module")
def eng(bundle: Path) -> Iterator[Engine]:
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        yield e


class CountingRuns:
    """Wraps an Engine's backend.run to count model calls (and optionally slow each one down)."""

    def __init__(self, engine: Engine, delay_s: float = 0.0) -> None:
        self.backend = engine._backend
        self.real = self.backend.run
        self.delay_s = delay_s
        self.calls = 0

    def __call__(self, feeds: Any, consume: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay_s)
        return self.real(feeds, consume)


# ---- defect 6: numeric options out of range are InvalidInputError, never OverflowError -------------
@pytest.mark.parametrize(("option", "value", "message"), [
    ("null_threshold", HUGE, "null_threshold must be a finite number between -1 and 1"),
    ("null_threshold", -HUGE, "null_threshold must be a finite number between -1 and 1"),
    ("null_threshold", float("inf"), "null_threshold"),
    ("null_threshold", 1.5, "between -1 and 1"),
    ("null_threshold", "0.5", "null_threshold must be a number"),
    ("max_answer_len", HUGE, "max_answer_len must be between 1 and"),
    ("max_question_len", HUGE, "max_question_len must be between 1 and"),
    ("doc_stride", HUGE, "doc_stride must be between 0 and"),
    ("top_k", HUGE, "top_k must be between 1 and 1000"),
])
def test_numeric_options_out_of_range_are_typed_errors(eng: Engine, option: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        eng.answer("Where did the ship sail?", CONTEXT, **{option: value})
    assert len(str(info.value)) < 300  # a 400-digit value is not echoed in full
    assert eng.answer("Where did the ship sail?", CONTEXT, null_threshold=-1, max_answer_len=2**20).text == ANSWER


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device_id": HUGE}, "device_id must be between 0 and"),
    ({"max_windows": 0}, "max_windows must be between 1 and"),
    ({"max_windows": HUGE}, "max_windows"),
])
def test_engine_settings_out_of_range_are_typed_errors(bundle: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Engine(bundle, backend="onnxruntime", threads=1, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_delay_ms": HUGE}, "max_delay_ms must be a number between 0 and 60000"),
    ({"max_delay_ms": 1e13}, "max_delay_ms"),  # accepted before, and the worker died on the first call
    ({"timeout_s": HUGE}, "timeout_s must be a number between 0 and 86400 .or None"),
    ({"timeout_s": 1e10}, "timeout_s"),  # above threading.TIMEOUT_MAX
    ({"max_queue_size": HUGE}, "max_queue_size"),
])
def test_batching_settings_out_of_range_are_refused_at_construction(eng: Engine, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        BatchingEngine(eng, **kwargs)


@pytest.mark.parametrize("timeout", [HUGE, 1e10, float("nan"), -1])
def test_a_bad_call_timeout_is_refused_before_the_call_is_queued(eng: Engine, timeout: Any) -> None:
    with BatchingEngine(eng, max_delay_ms=0) as be:
        with pytest.raises(InvalidInputError, match="timeout must be a number between 0 and 86400"):
            be.answer("Where did the ship sail?", CONTEXT, timeout=timeout)
        assert be.stats()["submitted"] == 0  # never queued, never answered unseen
        assert be.answer("Where did the ship sail?", CONTEXT, timeout=86_400).text == ANSWER


# ---- defect 7: a dead batching worker fails every pending and later call, and shows in health ------
def test_a_dead_worker_fails_pending_and_later_calls_with_a_typed_error(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_take = BatchingEngine._take

    def broken_take(self: BatchingEngine) -> Any:
        release.wait(10)
        with self._cond:  # let every call queue first: they are pending when the worker dies
            while len(self._queue) < 3:
                self._cond.wait(0.01)
        raise OverflowError("timeout value is too large")  # what a bad wait did before the fix

    monkeypatch.setattr(BatchingEngine, "_take", broken_take)
    be = BatchingEngine(eng, max_delay_ms=1, timeout_s=20)
    monkeypatch.setattr(BatchingEngine, "_take", real_take)
    results: list[Any] = [None] * 3

    def call(i: int) -> None:
        try:
            results[i] = be.answer("Where did the ship sail?", CONTEXT)
        except Exception as e:  # the test inspects it
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(15)
    assert all(isinstance(r, WorkerDiedError) for r in results), results
    assert "OverflowError" in str(results[0]) and "create a new one" in str(results[0])
    assert not be.healthy and be.stats()["healthy"] is False and isinstance(be.failure, WorkerDiedError)
    t0 = time.perf_counter()
    with pytest.raises(WorkerDiedError):
        be.answer("Later?", CONTEXT)
    assert time.perf_counter() - t0 < 1  # at once, not after the timeout
    be.close()


# ---- defect 8: the work of one request is bounded, and abandoned work stops ---------------------------
def test_max_windows_refuses_a_long_context_before_any_model_work(bundle: Path) -> None:
    with Engine(bundle, backend="onnxruntime", threads=1, max_windows=4) as e:
        runs = CountingRuns(e)
        e._backend.run = runs  # type: ignore[method-assign]
        with pytest.raises(RequestTooLargeError, match=r"max_windows=4"):
            e.answer("Where did the ship sail?", LONG_CONTEXT)
        assert runs.calls == 0
        assert e.answer("Where did the ship sail?", CONTEXT).text == ANSWER
        with pytest.raises(RequestTooLargeError, match=r"context\[1\]"):
            e.answer_batch(["Where?", "Where?"], [CONTEXT, LONG_CONTEXT])


def test_should_stop_ends_a_call_between_model_batches(bundle: Path) -> None:
    with Engine(bundle, backend="onnxruntime", threads=1, max_batch_size=1) as e:
        runs = CountingRuns(e)
        e._backend.run = runs  # type: ignore[method-assign]
        with pytest.raises(CallCancelledError):
            e.answer_batch(["Where did the ship sail?"], LONG_CONTEXT, should_stop=lambda: runs.calls >= 2)
        assert runs.calls == 2
        with pytest.raises(InvalidInputError, match="should_stop must be None or a callable"):
            e.answer_batch(["Where?"], CONTEXT, should_stop=True)  # type: ignore[arg-type]


def test_a_timed_out_request_stops_computing_its_windows(bundle: Path) -> None:
    with Engine(bundle, backend="onnxruntime", threads=1, max_batch_size=1) as e:
        windows = len(prepare(e._encoder, ["Where did the ship sail?"], [LONG_CONTEXT],
                              AnswerOptions().resolve(e.max_seq_len, e._template.num_special), label=label_for(True))[0].window_starts)
        runs = CountingRuns(e, delay_s=0.02)
        e._backend.run = runs  # type: ignore[method-assign]
        with BatchingEngine(e, max_delay_ms=0) as be:
            with pytest.raises(RequestTimeoutError, match="batch was running"):
                be.answer("Where did the ship sail?", LONG_CONTEXT, timeout=0.1)
            deadline = time.monotonic() + 10
            while be.stats()["cancelled"] < 1:
                assert time.monotonic() < deadline, be.stats()
                time.sleep(0.01)
            assert runs.calls < windows // 2, (runs.calls, windows)
            assert be.answer("Where did the ship sail?", CONTEXT, timeout=10).text == ANSWER


def test_a_context_far_beyond_max_windows_is_refused_from_a_prefix(bundle: Path) -> None:
    huge = "The crew mended sails and counted stores for the long road ahead. " * 3000  # ~200 KB
    with Engine(bundle, backend="onnxruntime", threads=1, max_windows=2) as e:
        seen: list[int] = []
        real = e._encoder.encode

        def encode(questions: list[str], contexts: list[str]) -> Any:
            seen.extend(len(c) for c in contexts)
            return real(questions, contexts)

        e._encoder.encode = encode  # type: ignore[method-assign]
        with pytest.raises(RequestTooLargeError, match=r"more than 128 tokens in its first 768 characters"):
            e.answer("Where did the ship sail?", huge)
        assert seen == [768]  # only the prefix was tokenized, not the 200 KB
        seen.clear()
        with pytest.raises(RequestTooLargeError, match=r"needs \d+ model windows"):  # near the limit: measured exactly
            e.answer("Where did the ship sail?", LONG_CONTEXT[:700])
        assert e.answer("Where did the ship sail?", CONTEXT).text == ANSWER
