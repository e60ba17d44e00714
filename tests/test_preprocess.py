"""Tokenization, the pair template and doc-stride windows, checked against the tokenizers library's
own pair encoding and overflow (the rule the Hugging Face pipeline uses)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import TOKENIZER_JSON
from tokenizers import Tokenizer

from engine.windows import WindowTable, build_batch, plan_batches
from engine.errors import InvalidInputError
from engine.preprocess import TextEncoder, make_example, plan_windows


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(TOKENIZER_JSON)


@lru_cache(maxsize=1)
def shared_encoder() -> TextEncoder:
    return TextEncoder(TOKENIZER_JSON)


@lru_cache(maxsize=1)
def _hf() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_JSON))


def hf_tokenizer(max_length: int | None = None, stride: int = 0) -> Tokenizer:
    """The tokenizer as the pipeline drives it (one shared object, reconfigured per call)."""
    tok = _hf()
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length, stride=stride, strategy="only_second")
    return tok


def test_bert_template(encoder: TextEncoder) -> None:
    t = encoder.template
    assert t.prefix.tolist() == [101] and t.middle.tolist() == [102] and t.suffix.tolist() == [102]
    assert (t.question_type, t.context_type) == (0, 1)
    assert t.prefix_types.tolist() == [0] and t.middle_types.tolist() == [0] and t.suffix_types.tolist() == [1]
    assert t.num_special == 3


def test_tokenizer_json_truncation_and_padding_are_switched_off(encoder: TextEncoder) -> None:
    # The shipped tokenizer.json pads/truncates to 128; windows would be wrong if that stayed on.
    text = "word " * 300
    _, (ctx,) = encoder.encode(["q"], [text])
    assert len(ctx.ids) == 300


def test_single_window_equals_pair_encoding(encoder: TextEncoder) -> None:
    q, c = "Who wrote it?", "Café  naïve 東京 😀 U.S. running, the   end."
    (qi,), (ctx,) = encoder.encode([q], [c])
    ex = make_example(encoder.template, qi, ctx, max_seq_len=384, max_question_len=64, doc_stride=None)
    table = WindowTable.from_examples([ex], encoder.template)
    batch = build_batch([ex], table, np.array([0]), encoder.template, pad_token_id=0)
    ref = hf_tokenizer().encode(q, c)
    assert batch.input_ids[0].tolist() == ref.ids
    assert batch.token_type_ids[0].tolist() == ref.type_ids
    assert batch.attention_mask[0].tolist() == [1] * len(ref.ids)
    assert batch.context_mask[0].tolist() == [s == 1 for s in ref.sequence_ids]
    # offsets of the context tokens are those of the pair encoding's second sequence
    ref_offsets = [o for o, s in zip(ref.offsets, ref.sequence_ids) if s == 1]
    assert ctx.offsets.tolist() == [list(o) for o in ref_offsets]


@settings(max_examples=40, deadline=None)
@given(n_words=st.integers(1, 400), max_seq_len=st.integers(24, 96), stride=st.integers(0, 10), q_words=st.integers(1, 6))
def test_windows_equal_tokenizers_overflow(n_words: int, max_seq_len: int, stride: int, q_words: int) -> None:
    enc = shared_encoder()
    words = ["alpha", "beta", "gamma", "delta", "running", "x", "Zürich", "1990"]
    c = " ".join(words[(i * 7) % len(words)] for i in range(n_words))
    q = " ".join(["what"] * q_words) + "?"
    (qi,), (ctx,) = enc.encode([q], [c])
    ex = make_example(enc.template, qi, ctx, max_seq_len=max_seq_len, max_question_len=64, doc_stride=stride)
    ref = hf_tokenizer(max_seq_len, stride).encode(q, c)
    ref_windows = [ref, *ref.overflowing]
    assert len(ex.window_starts) == len(ref_windows)
    for a, z, r in zip(ex.window_starts.tolist(), ex.window_stops.tolist(), ref_windows):
        got = ctx.ids[a:z].tolist()
        want = [i for i, s in zip(r.ids, r.sequence_ids) if s == 1]
        assert got == want


@given(n=st.integers(1, 5000), budget=st.integers(1, 400), stride_frac=st.floats(0, 0.99))
def test_plan_windows_cover_everything_with_the_stride_overlap(n: int, budget: int, stride_frac: float) -> None:
    stride = int(stride_frac * budget)
    if stride >= budget:
        stride = budget - 1
    starts, stops = plan_windows(n, budget, stride)
    assert starts[0] == 0 and stops[-1] == n
    assert np.all(stops - starts <= budget) and np.all(stops > starts)
    # consecutive windows overlap by exactly `stride` tokens (the last one may overlap more)
    if len(starts) > 1:
        assert np.all(stops[:-2] - starts[1:-1] == stride)
        assert stops[-2] - starts[-1] >= min(stride, stops[-2] - starts[-1])
        assert np.all(np.diff(starts) == budget - stride)
    assert (stops[:-1] < n).all()  # no window after the one that reaches the end


def test_question_truncation_is_recorded(encoder: TextEncoder) -> None:
    q = " ".join(["why"] * 100)
    (qi,), (ctx,) = encoder.encode([q], ["a short context"])
    ex = make_example(encoder.template, qi, ctx, max_seq_len=384, max_question_len=64, doc_stride=None)
    assert len(ex.question_ids) == 64
    assert ex.warnings and "question truncated from 100 to 64 tokens" in ex.warnings[0]
    short = make_example(encoder.template, qi[:10], ctx, max_seq_len=384, max_question_len=64, doc_stride=None)
    assert short.warnings == ()


def test_doc_stride_too_large_is_an_input_error(encoder: TextEncoder) -> None:
    (qi,), (ctx,) = encoder.encode(["what?"], ["word " * 200])
    with pytest.raises(InvalidInputError, match="doc_stride=60"):
        make_example(encoder.template, qi, ctx, max_seq_len=64, max_question_len=64, doc_stride=60)
    with pytest.raises(InvalidInputError, match="no room for context"):
        make_example(encoder.template, qi, ctx, max_seq_len=4, max_question_len=64, doc_stride=None)


def test_default_stride_fits_a_long_question(encoder: TextEncoder) -> None:
    # 60 question tokens in 128: 65 context tokens per window; the default stride (64) must shrink.
    (qi,), (ctx,) = encoder.encode([" ".join(["why"] * 60)], ["word " * 300])
    ex = make_example(encoder.template, qi, ctx, max_seq_len=128, max_question_len=64, doc_stride=None)
    assert ex.window_stops[-1] == 300 and len(ex.window_starts) > 1


def test_word_char_spans_match_tokenizers_word_to_chars(encoder: TextEncoder) -> None:
    c = "Unbelievably, the naïve U.S. runners ran 10,000m in Zürich's 東京-dome 😀."
    (_,), (ctx,) = encoder.encode(["q"], [c])
    ws, we = ctx.word_char_spans
    enc = ctx.encoding
    for t in range(len(ctx.ids)):
        w = enc.token_to_word(t)
        assert (ws[t], we[t]) == enc.word_to_chars(w)
    # a sub-word token snaps to its whole word
    t = next(i for i, tok in enumerate(enc.tokens) if tok.startswith("##"))
    assert c[ws[t]:we[t]] in ("Unbelievably",)


def test_batches_sorted_by_length_and_padded_to_their_longest(encoder: TextEncoder) -> None:
    qs = ["what?"] * 5
    cs = ["word " * n for n in (3, 50, 7, 200, 20)]
    q_ids, ctxs = encoder.encode(qs, cs)
    exs = [make_example(encoder.template, q, c, max_seq_len=384, max_question_len=64, doc_stride=None) for q, c in zip(q_ids, ctxs)]
    table = WindowTable.from_examples(exs, encoder.template)
    batches = plan_batches(table.length, 2)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [table.length[b].tolist() for b in batches] == [[205, 55], [25, 12], [8]]  # 3 specials + 2 question tokens + n
    b = build_batch(exs, table, batches[1], encoder.template, pad_token_id=0)
    assert b.input_ids.shape == (2, 25)  # padded to its own longest window, not 384
    assert b.attention_mask[1].sum() == 12 and (b.input_ids[1, 12:] == 0).all()


def test_plan_batches_token_budget() -> None:
    """Longest first; each batch within max_batch_size and the padded-token budget; every window once."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 385, size=200)
    for max_bs, budget in ((32, 1024), (4, 1024), (32, 400), (32, None), (1, 10)):
        batches = plan_batches(lengths, max_bs, budget)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(200))
        assert np.all(np.diff(lengths[flat]) <= 0), "windows come longest first"
        for b in batches:
            assert 1 <= len(b) <= max_bs
            padded = len(b) * int(lengths[b].max())
            if budget is not None and len(b) > 1:
                assert padded <= budget
        if budget is not None:
            # greedy: a batch stops only at a limit (the next window would break the budget or the size)
            for b, nxt in zip(batches, batches[1:]):
                assert len(b) == max_bs or (len(b) + 1) * int(lengths[b[0]]) > budget
    # a window longer than the budget still runs, alone
    assert [len(b) for b in plan_batches(np.array([500, 300, 200]), 32, 256)] == [1, 1, 1]
    with pytest.raises(ValueError):
        plan_batches(lengths, 0)
    with pytest.raises(ValueError):
        plan_batches(lengths, 8, 0)


def _brute_cost(lengths: list[int], max_bs: int, budget: int | None, call: int) -> float:
    """Minimal modelled cost over every partition of the sorted windows into contiguous batches."""
    ls = sorted(lengths, reverse=True)
    n = len(ls)
    best = float("inf")
    for mask in range(1 << (n - 1)):  # bit i set: cut after window i
        cost, a = 0.0, 0
        for i in range(n):
            if i == n - 1 or mask >> i & 1:
                size, pad = i + 1 - a, (i + 1 - a) * ls[a]
                if size > max_bs or (budget is not None and pad > budget and size > 1):
                    cost = float("inf")
                    break
                cost += call + pad
                a = i + 1
        best = min(best, cost)
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=9), st.integers(1, 5), st.sampled_from([None, 300, 800]),
       st.integers(1, 80))
def test_plan_batches_minimises_call_plus_padding_cost(lengths: list[int], max_bs: int, budget: int | None, call: int) -> None:
    """The planner's batches against a brute-force oracle over all contiguous partitions."""
    arr = np.asarray(lengths)
    batches = plan_batches(arr, max_bs, budget, call_cost_tokens=call)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert np.all(np.diff(arr[flat]) <= 0)
    cost = 0.0
    for b in batches:
        assert len(b) <= max_bs and (budget is None or len(b) == 1 or len(b) * arr[b].max() <= budget)
        cost += call + len(b) * arr[b].max()
    assert cost == _brute_cost(lengths, max_bs, budget, call)


def test_plan_batches_keeps_far_apart_lengths_in_separate_calls() -> None:
    lengths = np.array([384, 120, 118, 117, 60])
    # padding 120 -> 384 costs 264 tokens, more than a call (32): separate; 120/118/117 share
    assert [sorted(b.tolist()) for b in plan_batches(lengths, 32, 1024, call_cost_tokens=32)] == [[0], [1, 2, 3], [4]]
    assert [len(b) for b in plan_batches(lengths, 32, 1024)] == [2, 3]  # greedy fills to the budget
