"""Export helpers without a model: options, INT8 recipe rules, calibration pairs, span comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.default_model import CHECKPOINT_DIR
from export.errors import ExportError
from export.onnx import best_spans, compare_logits
from export.pipeline import ExportOptions
from export.quantize import QuantConfig, resolve_reduce_range
from export.samples import SHIPPED_SAMPLE, EncodedBatch, Pair, encode_pairs, load_pairs


def test_options_are_validated() -> None:
    with pytest.raises(ExportError, match="unknown ONNX precision"):
        ExportOptions(precisions=("fp64",))
    with pytest.raises(ExportError, match="--tensorrt precision"):
        ExportOptions(tensorrt=("fp32",))
    with pytest.raises(ExportError, match="too short"):
        ExportOptions(max_seq_len=16)
    with pytest.raises(ExportError, match="unknown INT8 recipe"):
        QuantConfig(recipe="fp8")
    with pytest.raises(ExportError, match="unknown calibration method"):
        QuantConfig(recipe="static", calibration="mse")


@pytest.mark.parametrize(("vnni", "expected"), [(True, False), (False, True), (None, False)])
def test_reduce_range_only_on_x86_without_vnni(monkeypatch: pytest.MonkeyPatch, vnni: bool | None, expected: bool) -> None:
    import export.quantize as q

    monkeypatch.setattr(q, "cpu_has_vnni", lambda: vnni)
    assert resolve_reduce_range(QuantConfig()) is expected
    assert resolve_reduce_range(QuantConfig(reduce_range=True)) is True  # an explicit choice wins


def test_shipped_sample_is_squad_train_not_dev() -> None:
    import gzip

    pairs = load_pairs()
    assert len(pairs) == 512 and len({p.context for p in pairs}) == 512
    with gzip.open(SHIPPED_SAMPLE, "rt", encoding="utf-8") as f:
        ids = {json.loads(line)["id"] for line in f}
    from export.squad_data import load_squad

    dev = Path(__file__).resolve().parents[1] / "bench" / "data" / "squad" / "dev-v1.1.json.gz"
    dev_ids = {e.qid for e in load_squad(dev)}
    dev_contexts = {e.context for e in load_squad(dev)}
    assert not ids & dev_ids and not {p.context for p in pairs} & dev_contexts


def test_load_pairs_limit_is_deterministic_and_formats(tmp_path: Path) -> None:
    assert load_pairs(limit=10, seed=3) == load_pairs(limit=10, seed=3) != load_pairs(limit=10, seed=4)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"question": "Who?", "context": "Ann did."}\n\n{"question": " ", "context": "skipped"}\n')
    assert load_pairs(jsonl) == [Pair("Who?", "Ann did.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(ExportError, match="unreadable"):
        load_pairs(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ExportError, match="no question/context pairs"):
        load_pairs(empty)


def test_encode_pairs_marks_only_context_tokens() -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))
    pairs = [Pair("Where does the river flow?", "The river flows north to the sea."), Pair("Who?", "Ann.")]
    b = encode_pairs(tok, pairs, seq_len=12, input_names=("input_ids", "attention_mask"), pad_token_id=0, pad_to=16)
    assert b.shape == (2, 16) and set(b.feeds) == {"input_ids", "attention_mask"}
    ids, mask = b.feeds["input_ids"], b.feeds["attention_mask"]
    assert mask[0].sum() == 12  # the context was cut to fit 12 tokens
    assert (ids[mask == 0] == 0).all()
    for row in range(2):
        context_ids = ids[row][b.context_mask[row]]
        assert 101 not in context_ids and 102 not in context_ids and len(context_ids) > 0
        first_sep = int(np.argmax(ids[row] == 102))
        assert not b.context_mask[row][: first_sep + 1].any()  # question side never counts


def _brute(start: np.ndarray, end: np.ndarray, ctx: np.ndarray, max_len: int) -> tuple[int, int]:
    best, arg = -np.inf, (0, 0)
    for i in range(len(start)):
        for j in range(i, min(i + max_len, len(start))):
            if ctx[i] and ctx[j] and start[i] + end[j] > best:
                best, arg = start[i] + end[j], (i, j)
    return arg


@given(st.integers(1, 24), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_best_spans_match_brute_force(length: int, max_len: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((2, length)).astype(np.float32)
    end = rng.standard_normal((2, length)).astype(np.float32)
    ctx = rng.random((2, length)) < 0.7
    got = best_spans(start, end, ctx, max_len)
    for r in range(2):
        if ctx[r].any():
            assert tuple(got[r]) == _brute(start[r], end[r], ctx[r], max_len)


def test_compare_logits_counts_ties_but_not_real_disagreements() -> None:
    ctx = np.ones((1, 4), dtype=bool)
    batch = EncodedBatch(feeds={"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)}, context_mask=ctx)
    ref = (np.array([[0.0, 5.0, 5.0, 0.0]], np.float32), np.array([[0.0, 0.0, 0.0, 5.0]], np.float32))
    tied = (np.array([[0.0, 5.0, 5.00001, 0.0]], np.float32), ref[1])  # spans (1,3) vs (2,3): equal in the reference
    fig = compare_logits(ref, tied, batch, tie_tolerance=1e-4)
    assert (fig["same_span"], fig["tied_span"]) == (0, 1)
    moved = (np.array([[9.0, 5.0, 5.0, 0.0]], np.float32), ref[1])  # best (0,3): 5 below the reference best
    fig = compare_logits(ref, moved, batch, tie_tolerance=1e-4)
    assert (fig["same_span"], fig["tied_span"]) == (0, 0) and fig["max_abs_diff"] == pytest.approx(9.0)
