"""The runtime end to end on lookup-model bundles (the answer is known in advance): offsets,
windows, batching, top-k, the null answer, the API's shapes and its errors."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import CLS_ID, lookup_bundle, planted, token_ids

import engine
from engine import Answer, Engine
from engine.errors import EngineClosedError, InvalidInputError, UnknownOptionError
from engine.preprocess import TextEncoder, make_example

ANSWER = "Zanzibar Island"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lookup_bundle(tmp_path_factory.mktemp("lookup"), **planted(ANSWER), max_seq_len=64)


@pytest.fixture(scope="module")
def eng(bundle: Path) -> Engine:
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        yield e


def test_planted_answer_with_exact_offsets(eng: Engine) -> None:
    context = "Café  naïve 東京 😀 the ship sailed to   Zanzibar Island, then home."
    a = eng.answer("Where did the ship sail?", context)
    assert isinstance(a, Answer)
    assert (a.text, context[a.start:a.end]) == (ANSWER, ANSWER)
    assert a.start == context.index(ANSWER)
    assert 0.0 < a.score <= 1.0
    assert (a.backend, a.precision, a.impossible, a.warnings) == ("onnxruntime", "fp32", False, ())
    assert a.to_dict() == {"score": a.score, "start": a.start, "end": a.end, "answer": ANSWER}


def test_accents_cjk_emoji_rtl_and_control_characters_keep_offsets_exact(tmp_path: Path) -> None:
    b = lookup_bundle(tmp_path, **planted("zurich"), max_seq_len=64)
    with Engine(b, backend="onnxruntime", threads=1) as e:
        for context in ("東京😀 \x00 ZÜRICH 😀東京", "שלום עולם Zürich مرحبا \u200f", "tab\tZu\u0308rich\u00a0end"):
            a = e.answer("which city?", context)
            assert context[a.start:a.end] == a.text
            assert a.text.lower().replace("\u0308", "").replace("ü", "u") == "zurich"


def test_answer_in_the_last_of_more_than_50_windows(eng: Engine) -> None:
    context = "filler words go here. " * 400 + "At the very end: Zanzibar Island."
    enc = TextEncoder(eng.bundle.tokenizer_path)
    (q,), (ctx,) = enc.encode(["where?"], [context])
    ex = make_example(enc.template, q, ctx, max_seq_len=64, max_question_len=64, doc_stride=None)
    assert len(ex.window_starts) > 50
    a = eng.answer("where?", context)
    assert (a.text, a.start) == (ANSWER, context.index(ANSWER))


def test_top_k_is_sorted_and_deduplicated_across_overlapping_windows(eng: Engine) -> None:
    context = "x " * 30 + "Zanzibar Island " + "y " * 30 + "zanzibar island " + "z " * 30
    answers = eng.answer("where?", context, top_k=6, doc_stride=20)
    assert isinstance(answers, list) and 1 < len(answers) <= 6
    scores = [a.score for a in answers]
    assert scores == sorted(scores, reverse=True)
    keys = [a.text.lower() for a in answers]
    assert len(keys) == len(set(keys))  # the two occurrences and both windows: one answer
    assert answers[0].text.lower() == ANSWER.lower()
    assert all(context[a.start:a.end] == a.text for a in answers)


def test_handle_impossible(tmp_path: Path) -> None:
    b = lookup_bundle(tmp_path, start={CLS_ID: 20.0}, end={CLS_ID: 20.0}, max_seq_len=64)
    with Engine(b, backend="onnxruntime", threads=1) as e:
        a = e.answer("where?", "Nothing in here answers it.", handle_impossible=True)
        assert (a.text, a.start, a.end, a.impossible) == ("", 0, 0, True)
        assert a.score > 0.9
        assert e.answer("where?", "Nothing in here answers it.", handle_impossible_answer=True).impossible
        span = e.answer("where?", "Nothing in here answers it.")
        assert not span.impossible and span.text
        # a threshold above the null probability lets the best span through
        assert not e.answer("where?", "Nothing in here answers it.", handle_impossible=True, null_threshold=1.0).impossible


def test_truncated_question_is_answered_with_a_warning(eng: Engine) -> None:
    q = "why " * 200 + "?"
    a = eng.answer(q, "It sailed to Zanzibar Island.", max_question_len=16)
    assert a.text == ANSWER
    assert any("question truncated from 201 to 16 tokens" in w for w in a.warnings)


def test_shapes_of_results(eng: Engine) -> None:
    ctx = "It sailed to Zanzibar Island."
    many = eng.answer(["where?", "what?"], ctx)
    assert isinstance(many, list) and all(isinstance(a, Answer) for a in many)
    many_k = eng.answer(["where?", "what?"], [ctx, ctx], top_k=2)
    assert all(isinstance(r, list) and len(r) == 2 for r in many_k)
    batch = eng.answer_batch(["where?"] * 3, ctx)
    assert len(batch) == 3 and all(len(r) == 1 and r[0].text == ANSWER for r in batch)
    assert eng.answer([], []) == []


def test_batches_give_the_answers_of_single_calls(eng: Engine) -> None:
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "sea", "ship", "Zanzibar Island", "the", "of"]
    contexts = [" ".join(rng.choice(words, size=int(rng.integers(5, 150)))) for _ in range(40)]
    questions = [f"question number {i}?" for i in range(40)]
    singles = [eng.answer(q, c, top_k=2) for q, c in zip(questions, contexts)]
    batched = eng.answer(questions, contexts, top_k=2)
    assert batched == singles


def test_token_budget_cuts_batches_and_changes_no_answer(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.api as api

    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "sea", "ship", "Zanzibar Island", "the"]
    contexts = [" ".join(rng.choice(words, size=int(rng.integers(5, 120)))) for _ in range(30)]
    questions = [f"q {i}?" for i in range(30)]
    shapes: list[tuple[int, int]] = []
    real = api.build_batch
    monkeypatch.setattr(api, "build_batch", lambda *a: (lambda b: (shapes.append(b.input_ids.shape), b)[1])(real(*a)))
    with Engine(bundle, backend="onnxruntime", threads=1, max_batch_tokens=None) as e:
        assert e.max_batch_tokens == 1024  # the ONNX Runtime CPU backend's measured default
        assert e.backend_details["max_batch_tokens"] == 1024
        assert e.backend_details["disabled_optimizers"] == ["SkipLayerNormFusion"]
        assert e.backend_details["call_cost_tokens"] == 32
    results = {}
    for budget in (64, 200, 100_000):
        shapes.clear()
        with Engine(bundle, backend="onnxruntime", threads=1, max_batch_size=32, max_batch_tokens=budget) as e:
            results[budget] = e.answer(questions, contexts, top_k=2)
        assert all(b * s <= budget or b == 1 for b, s in shapes)
        assert len(shapes) > 2
        if budget == 100_000:
            assert max(b for b, _ in shapes) == 32
    assert results[64] == results[200] == results[100_000]
    with pytest.raises(InvalidInputError, match="max_batch_tokens must be"):
        Engine(bundle, max_batch_tokens=0)


def test_thread_settings_are_explicit(bundle: Path) -> None:
    import os

    with Engine(bundle, backend="onnxruntime") as e:
        assert e.backend_details["intra_op_threads"] == len(os.sched_getaffinity(0))
        assert e.backend_details["execution_mode"] == "sequential"
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        assert e.backend_details["intra_op_threads"] == 1


def test_stage_seconds_cover_tokenize_model_decode(eng: Engine) -> None:
    eng.reset_stage_seconds()
    eng.answer(["where?"] * 8, "It sailed to Zanzibar Island. " * 20)
    s = eng.stage_seconds()
    assert set(s) == {"tokenize", "model", "decode"} and all(v > 0 for v in s.values())


# ---- bad input ----------------------------------------------------------------------------------
BAD_CALLS = [
    ((None, "ctx"), {}, "question must be a str, got NoneType"),
    (("q?", None), {}, "context must be a str, got NoneType"),
    ((b"q?", "ctx"), {}, "decode it first"),
    (("q?", 42), {}, "context must be a str, got int"),
    ((3.5, "ctx"), {}, "got float"),
    (({"question": "q"}, "ctx"), {}, "got dict"),
    (("", "ctx"), {}, "empty or only whitespace"),
    (("q?", " \n\t "), {}, "empty or only whitespace"),
    (("q\ud800?", "ctx"), {}, "lone surrogate"),
    (("q?", "ctx \udfff"), {}, "lone surrogate"),
    ((["q1?", "q2?"], ["c1", "c2", "c3"]), {}, "2 questions and 3 contexts"),
    ((["q1?", None], "ctx"), {}, r"question\[1\] must be a str"),
    (("q?", "ctx"), {"max_answer_len": 0}, "max_answer_len must be between 1 and"),
    (("q?", "ctx"), {"max_answer_len": -3}, "max_answer_len must be between 1 and"),
    (("q?", "ctx"), {"top_k": 0}, "top_k must be between 1 and 1000"),
    (("q?", "ctx"), {"top_k": 10**9}, "top_k must be between 1 and 1000"),
    (("q?", "ctx"), {"top_k": True}, "top_k must be an int"),
    (("q?", "ctx"), {"top_k": 1.5}, "top_k must be an int"),
    (("q?", "ctx"), {"handle_impossible": "yes"}, "handle_impossible must be True or False"),
    (("q?", "ctx"), {"null_threshold": float("nan")}, "null_threshold must be a finite number"),
    (("q?", "ctx"), {"max_seq_len": 10_000}, "max_seq_len must be between"),
    (("q?", "word " * 100), {"doc_stride": 500}, "doc_stride=500"),
    (("q?", "\x00\x01\x02"), {}, "context has no tokens"),
]


@pytest.mark.parametrize(("args", "kwargs", "message"), BAD_CALLS)
def test_bad_input_is_a_typed_error_and_the_engine_keeps_working(eng: Engine, args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        eng.answer(*args, **kwargs)
    assert eng.answer("where?", "It sailed to Zanzibar Island.").text == ANSWER


def test_unknown_options_are_typed_errors(eng: Engine) -> None:
    with pytest.raises(UnknownOptionError, match="unknown option.*max_anwser_len") as info:
        eng.answer("q?", "ctx", max_anwser_len=3)
    assert isinstance(info.value, TypeError) and isinstance(info.value, InvalidInputError)
    with pytest.raises(UnknownOptionError, match="use top_k"):
        eng.answer("q?", "ctx", topk=3)


def test_engine_options_are_checked(bundle: Path) -> None:
    with pytest.raises(InvalidInputError, match="backend must be"):
        Engine(bundle, backend="onnx")
    with pytest.raises(InvalidInputError, match="precision must be"):
        Engine(bundle, precision="int4")
    with pytest.raises(InvalidInputError, match="max_batch_size must be"):
        Engine(bundle, max_batch_size=0)
    with pytest.raises(InvalidInputError, match="threads must be"):
        Engine(bundle, threads=0)


def test_ten_thousand_questions_in_one_call(eng: Engine) -> None:
    ctx = "The ship sailed to Zanzibar Island in 1990."
    answers = eng.answer([f"q{i}?" for i in range(10_000)], ctx)
    assert len(answers) == 10_000 and all(a.text == ANSWER for a in answers)


def test_one_megabyte_context_in_bounded_batches(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import api

    sizes: list[int] = []
    real = api.build_batch

    def spy(examples, table, windows, *rest):  # type: ignore[no-untyped-def]
        sizes.append(len(windows))
        return real(examples, table, windows, *rest)

    monkeypatch.setattr(api, "build_batch", spy)
    context = ("lorem ipsum dolor sit amet. " * 37_500)[:1_000_000] + " Zanzibar Island."
    assert len(context.encode()) >= 1_000_000
    a = eng.answer("where?", context)
    assert (a.text, a.start) == (ANSWER, context.index(ANSWER))
    assert len(sizes) > 100 and max(sizes) <= eng.max_batch_size


# ---- closing and threads ------------------------------------------------------------------------
def test_closed_engine_raises(bundle: Path) -> None:
    e = Engine(bundle, backend="onnxruntime", threads=1)
    assert e.answer("where?", "to Zanzibar Island").text == ANSWER
    e.close()
    e.close()  # idempotent
    assert e.closed
    with pytest.raises(EngineClosedError, match="create a new Engine"):
        e.answer("where?", "to Zanzibar Island")


def test_close_while_threads_answer(bundle: Path) -> None:
    e = Engine(bundle, backend="onnxruntime", threads=1, max_batch_size=4)
    context = "words and words. " * 600 + "Zanzibar Island"
    outcomes: list[str] = []
    started = threading.Barrier(5)

    def worker() -> None:
        started.wait()
        try:
            for _ in range(50):
                assert e.answer("where?", context).text == ANSWER
            outcomes.append("done")
        except EngineClosedError:
            outcomes.append("closed")
        except BaseException as ex:  # noqa: BLE001 - anything else is the failure we look for
            outcomes.append(f"unexpected {type(ex).__name__}: {ex}")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    e.close()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == 4 and set(outcomes) <= {"done", "closed"}, outcomes
    assert "closed" in outcomes


def test_threads_share_one_engine_and_get_the_serial_answers(bundle: Path) -> None:
    # 8 threads x 500 calls on one Engine, each thread in its own order: exactly the serial answers
    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "Zanzibar Island", "sea", "of", "the", "gamma"]
    jobs = [(f"q{i}?", " ".join(rng.choice(words, size=int(rng.integers(5, 120))))) for i in range(500)]
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        serial = [e.answer(q, c, top_k=2) for q, c in jobs]
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            order = np.random.default_rng(t).permutation(len(jobs)).tolist()
            try:
                results[t] = [(i, e.answer(*jobs[i], top_k=2)) for i in order]
            except BaseException as ex:  # noqa: BLE001 - reported below
                errors.append(ex)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for t in range(8):
        assert len(results[t]) == len(jobs)
        assert all(ans == serial[i] for i, ans in results[t])


# ---- module-level API ---------------------------------------------------------------------------
def test_module_answer_reuses_one_engine_per_bundle(bundle: Path) -> None:
    a = engine.answer("where?", "to Zanzibar Island", model=bundle, backend="onnxruntime")
    b = engine.answer("where?", "to Zanzibar Island", model=str(bundle), backend="onnxruntime")
    assert a == b and a.text == ANSWER
    from engine import shared_engines

    assert sum(1 for k in shared_engines._engines if k[0] == str(bundle.resolve())) == 1
    with pytest.raises(InvalidInputError, match="model must be"):
        engine.answer("q?", "c", model=3)


def test_pipeline_drop_in(eng: Engine) -> None:
    qa = engine.pipeline("question-answering", model=eng)
    ctx = "It sailed to Zanzibar Island."
    d = qa(question="where?", context=ctx)
    assert d == {"score": d["score"], "start": 13, "end": 28, "answer": ANSWER}
    assert qa("where?", ctx) == d
    assert qa({"question": "where?", "context": ctx}) == d
    assert qa(question=["where?", "where?"], context=ctx) == [d, d]
    top = qa(question="where?", context=ctx, top_k=3, handle_impossible_answer=True, max_answer_len=15,
             doc_stride=16, max_seq_len=64, max_question_len=32, align_to_words=False)
    assert isinstance(top, list) and top[0]["answer"] == ANSWER
    with pytest.raises(InvalidInputError, match="question-answering"):
        engine.pipeline("summarization", model=eng)


def test_runtime_does_not_import_torch_or_transformers(bundle: Path) -> None:
    code = (
        "import sys, engine\n"
        f"a = engine.answer('where?', 'to Zanzibar Island', model={str(bundle)!r})\n"
        "assert a.text == 'Zanzibar Island', a\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- fuzzing ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=st.text(min_size=0, max_size=40), context=st.text(min_size=0, max_size=300),
       top_k=st.integers(1, 4), align=st.booleans(), impossible=st.booleans())
def test_fuzz_answer_path(eng: Engine, question: str, context: str, top_k: int, align: bool, impossible: bool) -> None:
    try:
        result = eng.answer(question, context, top_k=top_k, align_to_words=align, handle_impossible=impossible)
    except InvalidInputError:
        return
    answers = result if isinstance(result, list) else [result]
    assert 1 <= len(answers) <= top_k
    for a in answers:
        assert 0 <= a.start <= a.end <= len(context)
        assert context[a.start:a.end] == a.text
        assert 0.0 <= a.score <= 1.0 + 1e-6
        if a.impossible:
            assert (a.text, a.start, a.end) == ("", 0, 0)
        else:
            assert a.text


def test_fuzz_finds_planted_answer_in_random_unicode(eng: Engine) -> None:
    @settings(max_examples=40, deadline=None)
    @given(left=st.text(max_size=200), right=st.text(max_size=200))
    def check(left: str, right: str) -> None:
        context = f"{left} Zanzibar Island {right}"
        a = eng.answer("where?", context)
        assert context[a.start:a.end] == a.text
        if token_ids(context).count(token_ids("zanzibar")[0]) == 1:
            assert a.start == len(left) + 1 and a.text.startswith("Zanzibar")

    check()


def test_context_cache_reuses_tokens_and_changes_no_answer(bundle: Path) -> None:
    contexts = [f"Story {i}: the ship sailed to Zanzibar Island." for i in range(5)]
    with Engine(bundle, backend="onnxruntime", threads=1, context_cache=0) as plain, \
            Engine(bundle, backend="onnxruntime", threads=1, context_cache=3) as cached:
        assert cached._context_cache is not None and plain._context_cache is None
        tokenized: list[str] = []
        encode = cached._encoder.encode
        cached._encoder.encode = lambda qs, cs: tokenized.extend(cs) or encode(qs, cs)  # type: ignore[method-assign]
        for c in contexts * 2:
            assert cached.answer("where?", c, top_k=2) == plain.answer("where?", c, top_k=2)
        assert tokenized == contexts * 2  # 5 contexts cycling through 3 places: LRU evicts each
        cached.answer("why?", contexts[-1])
        assert len(tokenized) == 10  # the last context was kept: not tokenized again
        cache = cached._context_cache
        huge = "word " * 30_000 + "Zanzibar Island"
        cached.answer("where?", huge)
        assert huge not in cache._items  # long documents are not kept
