"""engine.dynamic_batching.BatchingEngine on lookup-model bundles: concurrent calls share model batches,
every caller gets its own answer (the plain Engine's answer is the oracle), and queue limits,
timeouts, bad calls and shutdown each end in the documented typed error."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import lookup_bundle, token_ids

from engine import Answer, Engine
from engine.dynamic_batching import BatchingEngine, QueueFullError, RequestTimeoutError
from engine.errors import EngineClosedError, InvalidInputError, UnknownOptionError

# One planted (single-token) answer per caller: context i holds only colour i, so a call routed
# to the wrong caller is seen at once.
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "silver", "golden", "pink", "brown",
           "gray", "violet", "crimson", "amber"]


def context_for(i: int) -> str:
    filler = " ".join(["the", "old", "house", "stood", "near", "a", "river"][: 2 + i % 5])
    return f"In the story {filler}, the painted door was {COLOURS[i % len(COLOURS)]} and quite small."


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ids = {token_ids(c)[0]: 12.0 for c in COLOURS}
    return lookup_bundle(tmp_path_factory.mktemp("colours"), start=ids, end=ids, max_seq_len=64)


@pytest.fixture(scope="module")
def eng(bundle: Path) -> Iterator[Engine]:
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        yield e


def run_threads(n: int, call: Any) -> list[Any]:
    """Run call(i) on n threads released together; the results (or raised errors) by i."""
    out: list[Any] = [None] * n
    gate = threading.Barrier(n)

    def target(i: int) -> None:
        gate.wait()
        try:
            out[i] = call(i)
        except Exception as e:  # the test inspects it
            out[i] = e

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


class Gate:
    """Wraps Engine.answer_batch so the test decides when a batch may run, and records batches."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.real = engine.answer_batch
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []

    def __call__(self, questions: list[str], contexts: list[str], **options: Any) -> Any:
        self.batches.append(list(questions))
        self.entered.set()
        assert self.open.wait(30)
        return self.real(questions, contexts, **options)


@pytest.fixture
def gated(bundle: Path) -> Iterator[tuple[Engine, Gate]]:
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        gate = Gate(e)
        e.answer_batch = gate  # type: ignore[method-assign]
        yield e, gate
        gate.open.set()


def test_sixteen_concurrent_callers_share_one_batch_and_get_their_own_answers(eng: Engine) -> None:
    with BatchingEngine(eng, max_batch_size=16, max_delay_ms=5000) as be:
        got = run_threads(16, lambda i: be.answer(f"What colour was door {i}?", context_for(i)))
        stats = be.stats()
    want = [eng.answer(f"What colour was door {i}?", context_for(i)) for i in range(16)]
    assert [a.text for a in got] == COLOURS
    for g, w in zip(got, want):
        assert (g.text, g.start, g.end) == (w.text, w.start, w.end)
        assert g.score == pytest.approx(w.score, rel=1e-6)
    # The batch filled up (16 calls) long before the 5 s delay ran out: one model batch.
    assert (stats["batches"], stats["largest_batch"], stats["answered"]) == (1, 16, 16)


def test_a_lone_call_waits_at_most_max_delay(eng: Engine) -> None:
    with BatchingEngine(eng, max_batch_size=32, max_delay_ms=50) as be:
        be.answer("warm up?", context_for(0))
        t0 = time.perf_counter()
        a = be.answer("What colour?", context_for(3))
        waited = time.perf_counter() - t0
    assert a.text == COLOURS[3]
    assert 0.045 <= waited < 2.0


def test_max_batch_size_bounds_each_batch(eng: Engine) -> None:
    with BatchingEngine(eng, max_batch_size=4, max_delay_ms=200) as be:
        got = run_threads(12, lambda i: be.answer("colour?", context_for(i)))
        stats = be.stats()
    assert [a.text for a in got] == COLOURS[:12]
    assert stats["largest_batch"] <= 4 and stats["batches"] >= 3


def test_calls_with_different_options_are_batched_apart(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    real = eng.answer_batch

    def spy(questions: list[str], contexts: list[str], **options: Any) -> Any:
        seen.append((len(questions), options["top_k"]))
        return real(questions, contexts, **options)

    monkeypatch.setattr(eng, "answer_batch", spy)
    with BatchingEngine(eng, max_batch_size=8, max_delay_ms=5000) as be:
        got = run_threads(8, lambda i: be.answer("colour?", context_for(i), top_k=1 + i % 2))
    for i, g in enumerate(got):
        if i % 2 == 0:
            assert isinstance(g, Answer) and g.text == COLOURS[i]
        else:
            assert isinstance(g, list) and 1 <= len(g) <= 2 and g[0].text == COLOURS[i]
    assert sorted(seen) == [(4, 1), (4, 2)]


def test_a_bad_call_fails_alone_and_its_batch_mates_are_answered(eng: Engine) -> None:
    def call(i: int) -> Any:
        if i == 5:
            return be.answer("\u200b\u200b", context_for(i))  # no token the model knows
        if i == 9:
            return be.answer("colour?", context_for(i), max_answer_len=0)  # option out of range
        return be.answer("colour?", context_for(i))

    with BatchingEngine(eng, max_batch_size=16, max_delay_ms=5000) as be:
        got = run_threads(16, call)
        stats = be.stats()
    assert isinstance(got[5], InvalidInputError) and "question has no tokens" in str(got[5])
    assert isinstance(got[9], InvalidInputError) and "max_answer_len" in str(got[9])
    assert [g.text for i, g in enumerate(got) if i not in (5, 9)] == [c for i, c in enumerate(COLOURS) if i not in (5, 9)]
    assert stats["failed"] == 2 and stats["answered"] == 14 and stats["retried_alone"] > 0


def test_caller_side_errors_never_enter_the_queue(eng: Engine) -> None:
    with BatchingEngine(eng) as be:
        with pytest.raises(UnknownOptionError, match="topk"):
            be.answer("q?", context_for(0), topk=3)
        with pytest.raises(InvalidInputError, match="context is empty"):
            be.answer("q?", "   ")
        with pytest.raises(InvalidInputError, match="question must be a str"):
            be.answer(b"q?", context_for(0))
        with pytest.raises(InvalidInputError, match="answer_batch"):
            be.answer(["q?", "r?"], context_for(0))
        with pytest.raises(InvalidInputError, match="timeout"):
            be.answer("q?", context_for(0), timeout=-1)
        assert be.stats()["submitted"] == 0


def test_full_queue_raises_queue_full_at_once(gated: tuple[Engine, Gate]) -> None:
    e, gate = gated
    with BatchingEngine(e, max_batch_size=1, max_delay_ms=0, max_queue_size=2) as be:
        results: list[Any] = [None] * 3

        def call(i: int) -> None:
            results[i] = be.answer("colour?", context_for(i))

        first = threading.Thread(target=call, args=(0,))
        first.start()
        assert gate.entered.wait(10)  # the worker holds call 0; the queue is empty again
        waiting = [threading.Thread(target=call, args=(i,)) for i in (1, 2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while be.stats()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError, match="max_queue_size=2"):
            be.answer("one too many?", context_for(3))
        assert time.perf_counter() - t0 < 5.0  # refused at once (waiting would last until the gate opens)
        gate.open.set()
        for t in (first, *waiting):
            t.join(10)
        assert [r.text for r in results] == COLOURS[:3]
        assert be.stats()["rejected"] == 1


def test_a_call_that_times_out_in_the_queue_is_never_run(gated: tuple[Engine, Gate]) -> None:
    e, gate = gated
    with BatchingEngine(e, max_batch_size=1, max_delay_ms=0, timeout_s=None) as be:
        holder = threading.Thread(target=be.answer, args=("held?", context_for(0)))
        holder.start()
        assert gate.entered.wait(10)
        with pytest.raises(RequestTimeoutError, match="still queued; it was dropped"):
            be.answer("too late?", context_for(1), timeout=0.05)
        gate.open.set()
        holder.join(10)
        assert be.answer("next?", context_for(2)).text == COLOURS[2]
        assert ["too late?"] not in gate.batches
        assert be.stats()["timed_out"] == 1


def test_a_call_that_times_out_while_running_stops_its_model_work(gated: tuple[Engine, Gate]) -> None:
    e, gate = gated
    with BatchingEngine(e, max_batch_size=1, max_delay_ms=0, timeout_s=0.05) as be:
        with pytest.raises(RequestTimeoutError, match="batch was running"):
            be.answer("slow?", context_for(0))
        gate.open.set()
        assert be.answer("fine?", context_for(1), timeout=10).text == COLOURS[1]
    # the abandoned call's windows were not computed: its batch stopped before the model ran
    assert be.stats()["answered"] == 1 and be.stats()["cancelled"] == 1


def test_asyncio_tasks_are_batched_together(eng: Engine) -> None:
    async def main() -> tuple[list[Any], dict[str, float]]:
        with BatchingEngine(eng, max_batch_size=16, max_delay_ms=5000) as be:
            got = await asyncio.gather(*(be.answer_async("colour?", context_for(i)) for i in range(16)))
            return got, be.stats()

    got, stats = asyncio.run(main())
    assert [a.text for a in got] == COLOURS
    assert stats["batches"] == 1


def test_asyncio_timeout_and_cancellation_drop_queued_calls(gated: tuple[Engine, Gate]) -> None:
    e, gate = gated

    async def main(be: BatchingEngine) -> None:
        holder = asyncio.ensure_future(be.answer_async("held?", context_for(0)))
        while not gate.entered.is_set():
            await asyncio.sleep(0.005)
        with pytest.raises(RequestTimeoutError, match="still queued"):
            await be.answer_async("timed out?", context_for(1), timeout=0.05)
        doomed = asyncio.ensure_future(be.answer_async("cancelled?", context_for(2)))
        await asyncio.sleep(0.05)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        gate.open.set()
        assert (await holder).text == COLOURS[0]
        assert (await be.answer_async("after?", context_for(3))).text == COLOURS[3]

    with BatchingEngine(e, max_batch_size=1, max_delay_ms=0, timeout_s=None) as be:
        asyncio.run(main(be))
    assert ["timed out?"] not in gate.batches and ["cancelled?"] not in gate.batches


def test_close_drains_or_fails_waiting_calls(gated: tuple[Engine, Gate], bundle: Path) -> None:
    e, gate = gated
    for drain in (True, False):
        gate.open.clear()
        gate.entered.clear()
        be = BatchingEngine(e, max_batch_size=1, max_delay_ms=0, timeout_s=None)
        got: list[Any] = [None, None]

        def call(i: int, be: BatchingEngine = be, got: list[Any] = got) -> None:
            try:
                got[i] = be.answer("colour?", context_for(i))
            except EngineClosedError as err:
                got[i] = err

        threads = [threading.Thread(target=call, args=(0,))]
        threads[0].start()
        assert gate.entered.wait(10)
        threads.append(threading.Thread(target=call, args=(1,)))
        threads[1].start()
        while be.stats()["queued"] < 1:
            time.sleep(0.005)
        closer = threading.Thread(target=be.close, kwargs={"drain": drain})
        closer.start()
        time.sleep(0.05)
        gate.open.set()
        closer.join(10)
        for t in threads:
            t.join(10)
        assert got[0].text == COLOURS[0]  # the running batch always finishes
        if drain:
            assert got[1].text == COLOURS[1]
        else:
            assert isinstance(got[1], EngineClosedError)
        with pytest.raises(EngineClosedError):
            be.answer("after close?", context_for(0))
    assert not e.closed  # a shared Engine stays open

    owned = BatchingEngine(bundle, backend="onnxruntime", threads=1)
    assert owned.answer("colour?", context_for(4)).text == COLOURS[4]
    owned.close()
    assert owned.engine.closed and owned.closed


def test_an_unexpected_engine_failure_reaches_the_caller_and_the_worker_lives_on(eng: Engine,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = eng.answer_batch
    calls = {"n": 0}

    def flaky(questions: list[str], contexts: list[str], **options: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("backend fell over")
        return real(questions, contexts, **options)

    monkeypatch.setattr(eng, "answer_batch", flaky)
    with BatchingEngine(eng, max_delay_ms=0) as be:
        with pytest.raises(RuntimeError, match="backend fell over"):
            be.answer("colour?", context_for(0))
        assert be.answer("colour?", context_for(1)).text == COLOURS[1]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_delay_ms": -1}, "max_delay_ms"),
    ({"max_delay_ms": float("nan")}, "max_delay_ms"),
    ({"max_queue_size": 0}, "max_queue_size"),
    ({"timeout_s": "5"}, "timeout_s"),
    ({"workers": 0}, "workers"),
    ({"threads": 2}, "engine options"),
])
def test_settings_are_checked(eng: Engine, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        BatchingEngine(eng, **kwargs)


def test_two_workers_answer_correctly(eng: Engine) -> None:
    with BatchingEngine(eng, max_batch_size=4, max_delay_ms=1, workers=2) as be:
        got = run_threads(16, lambda i: be.answer("colour?", context_for(i)))
    assert [a.text for a in got] == COLOURS
