"""Reliability round 2 (issue 19): model outputs are checked at the backend boundary, and a score
is always a finite probability.

A model whose logits have the wrong dtype or shape, or hold NaN/inf where the answer is read from
(the context tokens and [CLS]), is a BundleError at the boundary, not an assorted Python error in
the decoder or an answer with score NaN. Hypothesis feeds the decoder and the whole answering path
non-finite logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import lookup_bundle, planted

from engine import Engine
from engine.decode import reference_span_search, span_search
from engine.errors import BundleError
from engine.postprocess import Candidates, collect

ANSWER = "Zanzibar Island"
CONTEXT = "After a long voyage the ship sailed to Zanzibar Island, then home again."
QUESTION = "Where did the ship sail?"


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = lookup_bundle(tmp_path_factory.mktemp("outputs"), **planted(ANSWER), max_seq_len=64)
    with Engine(root, backend="onnxruntime", threads=1) as e:
        yield e


class Outputs:
    """Replaces the backend's logits: ``change(start, end, feeds)`` returns what the model "gave"."""

    def __init__(self, engine: Engine, change: Any) -> None:
        self.backend = engine._backend
        self.real = self.backend.run
        self.change = change

    def __enter__(self) -> Outputs:
        def run(feeds: Any, consume: Any) -> Any:
            return self.real(feeds, lambda s, e, stream: consume(*self.change(s.copy(), e.copy(), feeds), stream))

        self.backend.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.backend.run


def _context_position(feeds: dict[str, np.ndarray]) -> tuple[int, int]:
    """(row 0, a context token's position): the first token of segment 1."""
    return 0, int(np.argmax(feeds["token_type_ids"][0] == 1))


def _at_context(value: float, which: str = "start") -> Any:
    def change(s: np.ndarray, e: np.ndarray, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        (s if which == "start" else e)[_context_position(feeds)] = value
        return s, e
    return change


@pytest.mark.parametrize(("change", "message"), [
    (lambda s, e, f: (s.astype(np.float64), e.astype(np.float64)), r"start_logits is float64 \[1, \d+\], expected float32 or float16"),
    (lambda s, e, f: (s[:, :-1], e[:, :-1]), r"start_logits is float32 \[1, \d+\], expected float32 or float16 \[1, \d+\]"),
    (lambda s, e, f: (s[0], e[0]), "start_logits is float32 \\[\\d+\\]"),
    (lambda s, e, f: (s, e.astype(np.int32)), "end_logits is int32"),
    (lambda s, e, f: (s.tolist(), e), "start_logits is list"),
    (_at_context(float("nan")), "start_logits holds nan at a token the answer is read from"),
    (_at_context(float("inf")), "start_logits holds inf"),  # the +inf that gave score = NaN
    (_at_context(float("-inf"), "end"), "end_logits holds -inf"),
    (_at_context(3e38), "start_logits holds 3e\\+38"),  # finite, but start + end overflows float32
    (lambda s, e, f: (s, _cls(e, np.nan)), "end_logits holds nan"),  # [CLS]: the null answer reads it
])
def test_bad_model_outputs_are_a_bundle_error_at_the_boundary(eng: Engine, change: Any, message: str) -> None:
    with Outputs(eng, change), pytest.raises(BundleError, match=message) as info:
        eng.answer(QUESTION, CONTEXT, handle_impossible=True)
    assert "export the bundle again" in str(info.value)
    assert eng.answer(QUESTION, CONTEXT).text == ANSWER  # the Engine keeps working


def _cls(a: np.ndarray, value: float) -> np.ndarray:
    a[:, 0] = value
    return a


def test_non_finite_logits_where_no_answer_is_read_are_harmless(eng: Engine) -> None:
    def question_tokens_nan(s: np.ndarray, e: np.ndarray, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        s[0, 1:3] = np.nan  # question tokens: the decoder never reads them
        e[0, 1:3] = np.inf
        return s, e

    with Outputs(eng, question_tokens_nan):
        a = eng.answer(QUESTION, CONTEXT)
    assert a.text == ANSWER and math.isfinite(a.score) and 0 <= a.score <= 1


def test_collect_refuses_non_finite_scores() -> None:
    """Logits decoded on a GPU are not checked at the boundary: the scores are, when they become
    probabilities (+inf logits made score = NaN before)."""
    cands = [Candidates()]
    spans = np.array([[[0, 1]]], dtype=np.int64)
    with pytest.raises(BundleError, match="non-finite answer score"):
        collect(cands, np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64),
                spans, np.array([[np.inf]], np.float32), np.array([np.inf], np.float32), np.array([1.0], np.float32), None)


# ---- fuzzing the decoder and the answering path with non-finite logits --------------------------------
_specials = st.sampled_from([np.nan, np.inf, -np.inf, 3.0e38, -3.0e38, 0.0, 1e-45])


@st.composite
def logits_with_non_finite(draw: Any, max_batch: int = 3, max_seq: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    b = draw(st.integers(1, max_batch))
    s = draw(st.integers(1, max_seq))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    start = rng.normal(0, 3, (b, s)).astype(np.float32)
    end = rng.normal(0, 3, (b, s)).astype(np.float32)
    for a in (start, end):
        for _ in range(draw(st.integers(0, 4))):
            a[draw(st.integers(0, b - 1)), draw(st.integers(0, s - 1))] = draw(_specials)
    mask = rng.random((b, s)) < draw(st.floats(0.0, 1.0))
    with np.errstate(over="ignore"):
        return start.astype(dtype), end.astype(dtype), mask, draw(st.integers(1, 6)), draw(st.integers(1, 5))


@settings(max_examples=300, deadline=None)
@given(case=logits_with_non_finite())
def test_decoder_matches_the_reference_on_non_finite_logits(case: tuple[np.ndarray, np.ndarray, np.ndarray, int, int]) -> None:
    start, end, mask, max_answer_len, top_k = case
    kw = dict(max_answer_len=max_answer_len, top_k=top_k, return_lse=True, return_null=True)
    try:
        want = reference_span_search(start, end, mask, **kw)
    except ValueError as e:  # NaN where the mask is true: both refuse it
        assert "NaN" in str(e)
        with pytest.raises(ValueError, match="NaN"):
            span_search(start, end, mask, **kw)
        return
    got = span_search(start, end, mask, **kw)
    np.testing.assert_array_equal(got.spans, want.spans)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert not np.isnan(got.scores).any()  # a span's score is a number, -inf only as a fill
    valid = got.spans[:, :, 0] >= 0
    assert (got.scores[valid] > -np.inf).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), specials=st.lists(st.tuples(st.sampled_from(["start", "end"]), st.integers(0, 63), _specials),
                                                          max_size=4))
def test_answers_have_finite_scores_or_the_model_is_refused(eng: Engine, seed: int, specials: list[tuple[str, int, float]]) -> None:
    rng = np.random.default_rng(seed)

    def change(s: np.ndarray, e: np.ndarray, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        s, e = (rng.normal(0, 4, s.shape).astype(np.float32), rng.normal(0, 4, e.shape).astype(np.float32))
        for which, pos, value in specials:
            (s if which == "start" else e)[0, pos % s.shape[1]] = value
        return s, e

    with Outputs(eng, change):
        try:
            answers = eng.answer(QUESTION, CONTEXT, top_k=3, handle_impossible=True)
        except BundleError:
            return
    for a in answers:
        assert math.isfinite(a.score) and 0 <= a.score <= 1 + 1e-6, a
        assert CONTEXT[a.start:a.end] == a.text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"top_k": 2**40}, "top_k must be at most 65536"),  # was a 16 TiB allocation
    ({"max_answer_len": 10**400}, "max_answer_len must be at most 9223372036854775807"),  # was the binding's TypeError
])
@pytest.mark.parametrize("decoder", [span_search, reference_span_search])
def test_decoder_counts_out_of_range_are_value_errors(decoder: Any, kwargs: dict[str, int], message: str) -> None:
    logits = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match=message):
        decoder(logits, logits, np.ones((1, 4), bool), **kwargs)


def test_a_model_path_that_loops_is_a_bundle_error(tmp_path: Path) -> None:
    import engine

    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(BundleError):
        engine.answer(QUESTION, CONTEXT, model=tmp_path / "loop")
