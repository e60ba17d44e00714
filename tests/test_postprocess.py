"""Post-processing: token spans -> character answers, word alignment, merging and the null answer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import TOKENIZER_JSON

from engine.answering import char_spans
from engine.postprocess import Answer, Candidates, collect, finalize
from engine.preprocess import Example, TextEncoder, make_example

CONTEXT = "Paris is big. paris is old. The unbelievably tall tower."


@pytest.fixture(scope="module")
def example() -> Example:
    enc = TextEncoder(TOKENIZER_JSON)
    (q,), (ctx,) = enc.encode(["where?"], [CONTEXT])
    return make_example(enc.template, q, ctx, max_seq_len=384, max_question_len=64, doc_stride=None)


def tok(example: Example, word: str, nth: int = 0) -> int:
    """Index of the nth context token whose text is ``word``."""
    tokens = example.context.encoding.tokens
    return [i for i, t in enumerate(tokens) if t == word][nth]


def run(example: Example, cand: Candidates, **kw: object) -> list[Answer]:
    opts = {"top_k": 5, "align_to_words": True, "handle_impossible": False, "null_threshold": 0.0, "backend": "b", "precision": "p"}
    opts.update(kw)
    chars = char_spans(example.context, bool(opts.pop("align_to_words")))
    return finalize(cand, example.context.text, *chars, example.warnings, **opts)  # type: ignore[arg-type]


def add(cand: Candidates, window: int, spans: list[tuple[int, int, float]], null: float | None = None) -> None:
    assert window == len(cand.start)  # windows are added in order, once each
    cand.add(np.array([s for s, _, _ in spans]), np.array([e for _, e, _ in spans]),
             np.array([p for _, _, p in spans]), null)


def test_offsets_slice_the_context(example: Example) -> None:
    c = Candidates()
    p0, p1 = tok(example, "paris", 0), tok(example, "paris", 1)
    add(c, 0, [(p0, p0, 0.5), (p1, p1 + 2, 0.2)])
    answers = run(example, c)
    assert [(a.text, a.start, a.end) for a in answers] == [("Paris", 0, 5), ("paris is old", 14, 26)]
    assert all(CONTEXT[a.start:a.end] == a.text for a in answers)
    assert answers[0].to_dict() == {"score": 0.5, "start": 0, "end": 5, "answer": "Paris"}


def test_same_text_merges_case_insensitively_summing_within_a_window(example: Example) -> None:
    c = Candidates()
    p0, p1 = tok(example, "paris", 0), tok(example, "paris", 1)
    add(c, 0, [(p0, p0, 0.3), (p1, p1, 0.25), (p1, p1 + 1, 0.4)])
    answers = run(example, c)
    # "Paris" (0.3) and "paris" (0.25) are one answer: 0.55, at the place of the better one
    assert [(a.text, a.start, pytest.approx(a.score)) for a in answers] == [("Paris", 0, 0.55), ("paris is", 14, 0.4)]


def test_the_same_span_from_two_windows_counts_once(example: Example) -> None:
    c = Candidates()
    p0 = tok(example, "paris", 0)
    add(c, 0, [(p0, p0, 0.3)])
    add(c, 1, [(p0, p0, 0.35)])
    (a,) = run(example, c)
    assert (a.text, a.score) == ("Paris", 0.35)  # the larger, not 0.65


def test_top_k_is_ranked_and_truncated(example: Example) -> None:
    c = Candidates()
    p0, big = tok(example, "paris", 0), tok(example, "big")
    add(c, 0, [(p0, p0, 0.1), (big, big, 0.3), (p0, big, 0.2)])
    answers = run(example, c, top_k=2)
    assert [a.text for a in answers] == ["big", "Paris is big"]
    assert [a.score for a in answers] == sorted((a.score for a in answers), reverse=True)


def test_align_to_words_snaps_subword_tokens(example: Example) -> None:
    sub = next(i for i, t in enumerate(example.context.encoding.tokens) if t.startswith("##"))
    c = Candidates()
    add(c, 0, [(sub, sub, 0.9)])
    (aligned,) = run(example, c, align_to_words=True)
    (raw,) = run(example, c, align_to_words=False)
    assert aligned.text == "unbelievably"
    assert raw.text != aligned.text and raw.text in aligned.text and len(raw.text) < len(aligned.text)


def test_null_answer_competes_with_threshold(example: Example) -> None:
    p0 = tok(example, "paris", 0)

    def cands(null_a: float, null_b: float) -> Candidates:
        c = Candidates()
        add(c, 0, [(p0, p0, 0.4)], null_a)
        add(c, 1, [(p0, p0, 0.3)], null_b)
        return c

    # the null score is the smallest over windows (0.5), as in the pipeline; 0.5 > 0.4 wins
    (a,) = run(example, cands(0.9, 0.5), top_k=1, handle_impossible=True)
    assert (a.text, a.start, a.end, a.impossible, a.score) == ("", 0, 0, True, 0.5)
    assert a.to_dict() == {"score": 0.5, "start": 0, "end": 0, "answer": ""}
    # a threshold of 0.2 makes the null answer need 0.6 to win
    (b,) = run(example, cands(0.9, 0.5), top_k=1, handle_impossible=True, null_threshold=0.2)
    assert (b.text, b.impossible) == ("Paris", False)
    # with top_k the null answer takes its rank among the spans
    both = run(example, cands(0.9, 0.35), top_k=3, handle_impossible=True)
    assert [x.text for x in both] == ["Paris", ""]
    # without handle_impossible there is never a null answer
    assert all(not x.impossible for x in run(example, cands(0.9, 0.9), handle_impossible=False))


def test_collect_maps_window_positions_to_context_tokens(example: Example) -> None:
    # one example, two windows starting at context tokens 0 and 5; context starts at position 4
    cands = [Candidates()]
    spans = np.array([[[4, 5], [-1, -1]], [[6, 6], [-1, -1]]], dtype=np.int64)
    scores = np.array([[1.0, -np.inf], [2.0, -np.inf]], dtype=np.float32)
    lse = np.array([1.0, 1.0], dtype=np.float32)
    collect(cands, np.array([0, 0]), np.array([0, 5]), np.array([0, 1]), np.array([4, 4]), spans, scores, lse, lse,
            np.array([0.0, -1.0], dtype=np.float32))
    c = cands[0]
    assert [s.tolist() for s in c.start] == [[0], [7]] and [e.tolist() for e in c.end] == [[1], [7]]
    assert np.allclose(np.concatenate(c.prob), np.exp([1.0 - 2.0, 2.0 - 2.0]))
    assert c.null_prob == pytest.approx(np.exp(-1.0 - 2.0))


def reference_merge(example: Example, cand: Candidates, top_k: int) -> list[tuple[str, int, int, float]]:
    """All windows merged, no early stop: the rule stated plainly."""
    ws, we = example.context.word_char_spans
    text = example.context.text
    best: dict[str, tuple[float, int, int]] = {}
    for s, e, p in zip(cand.start, cand.end, cand.prob):
        mine: dict[str, list] = {}
        for a, z, q in zip(ws[s].tolist(), we[e].tolist(), p.tolist()):
            k = text[a:z].lower()
            if k in mine:
                mine[k][0] += q
            else:
                mine[k] = [q, a, z]
        for k, (q, a, z) in mine.items():
            if k not in best or (-q, a, z) < (-best[k][0], best[k][1], best[k][2]):
                best[k] = (q, a, z)
    ranked = sorted(best.values(), key=lambda c: (-c[0], c[1], c[2]))[:top_k]
    return [(text[a:z], a, z, q) for q, a, z in ranked]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), n_windows=st.integers(1, 40), top_k=st.integers(1, 5))
def test_early_stop_over_windows_is_exact(example: Example, data: st.DataObject, n_windows: int, top_k: int) -> None:
    n_tok = len(example.context.ids)
    cand = Candidates()
    for _ in range(n_windows):
        k = data.draw(st.integers(1, 6))
        s = np.array(data.draw(st.lists(st.integers(0, n_tok - 1), min_size=k, max_size=k)))
        e = np.minimum(s + np.array(data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k))), n_tok - 1)
        # coarse probabilities make ties (and the tie rules) common
        p = np.sort(np.array(data.draw(st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.2, 0.4]), min_size=k, max_size=k))))[::-1]
        cand.add(s, e, p.copy(), None)
    got = [(a.text, a.start, a.end, a.score) for a in run(example, cand, top_k=top_k)]
    assert got == reference_merge(example, cand, top_k)
