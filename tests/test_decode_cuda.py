"""The CUDA span-search kernel against the C++ decoder (bit for bit) on device arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings

from engine.decode import SpanSearchResult, span_search
from test_decode import assert_same, decode_cases

pytestmark = pytest.mark.cuda


def on_both(device: Any, start: np.ndarray, end: np.ndarray, mask: np.ndarray, **options: Any) -> tuple[SpanSearchResult, SpanSearchResult]:
    options.setdefault("return_lse", True)
    options.setdefault("return_null", True)
    gpu = span_search(device.put(start), device.put(end), device.put(mask), **options)
    return gpu, span_search(start, end, mask, **options)


@settings(max_examples=150)
@given(case=decode_cases())
def test_matches_cpp_decoder(device: Any, case: dict[str, Any]) -> None:
    gpu, cpu = on_both(device, case["start"], case["end"], case["mask"],
                       max_answer_len=case["max_answer_len"], top_k=case["top_k"])
    assert isinstance(gpu.spans, np.ndarray)  # no `out`: results come back to the host
    assert_same(gpu, cpu)


@pytest.mark.parametrize(
    ("batch", "seq_len", "max_answer_len", "top_k"),
    [(1, 1, 1, 1), (2, 1, 5, 3), (3, 5, 50, 20), (2, 4, 2, 100), (4, 64, 64, 500),
     (2, 5120, 30, 3), (3, 6000, 40, 5), (256, 384, 30, 20)],
    ids=["S=1", "S=1 k>valid", "L>S", "k>valid", "k=500", "S=5120 shared limit", "S=6000 global buffers", "B=256"],
)
def test_shapes(device: Any, batch: int, seq_len: int, max_answer_len: int, top_k: int) -> None:
    rng = np.random.default_rng(batch * seq_len + top_k)
    start, end = rng.integers(-3, 4, (2, batch, seq_len)).astype(np.float32)
    mask = rng.random((batch, seq_len)) < 0.8
    gpu, cpu = on_both(device, start, end, mask, max_answer_len=max_answer_len, top_k=top_k)
    assert_same(gpu, cpu)


def test_float16_and_uint8_mask(device: Any) -> None:
    rng = np.random.default_rng(2)
    start, end = rng.normal(0, 4, (2, 16, 300)).astype(np.float16)
    start[0, :5] = [65504, -65504, np.inf, -np.inf, 6e-8]
    mask = (rng.random((16, 300)) < 0.7).astype(np.uint8)
    for top_k in (1, 20):
        gpu, cpu = on_both(device, start, end, mask, top_k=top_k)
        assert_same(gpu, cpu)


def test_all_false_mask(device: Any) -> None:
    zeros = np.zeros((3, 20), np.float32)
    gpu, cpu = on_both(device, zeros, zeros, np.zeros((3, 20), bool), top_k=4)
    assert_same(gpu, cpu)
    assert (gpu.spans == -1).all()


def test_out_buffers_keep_results_on_device(device: Any) -> None:
    rng = np.random.default_rng(4)
    start, end = rng.normal(size=(2, 8, 128)).astype(np.float32)
    mask = np.ones((8, 128), bool)
    out = SpanSearchResult(
        device.empty((8, 5, 2), np.int64), device.empty((8, 5), np.float32),
        device.empty((8,), np.float32), device.empty((8,), np.float32), device.empty((8,), np.float32),
    )
    got = span_search(device.put(start), device.put(end), device.put(mask), top_k=5,
                      return_lse=True, return_null=True, out=out)
    assert all(g is o for g, o in zip(got, out))
    on_host = SpanSearchResult(*(device.get(a) for a in got))
    assert_same(on_host, span_search(start, end, mask, top_k=5, return_lse=True, return_null=True))
    spans, scores = span_search(device.put(start), device.put(end), device.put(mask), top_k=5,
                                out=(out.spans, out.scores, None, None, None))
    assert spans is out.spans and scores is out.scores


def test_explicit_stream(device: Any) -> None:
    if device.library != "torch":
        pytest.skip("uses torch streams")
    import torch

    rng = np.random.default_rng(6)
    start, end = rng.normal(size=(2, 32, 384)).astype(np.float32)
    mask = np.ones((32, 384), bool)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # produced on `stream`, decoded on it
        d_start, d_end, d_mask = device.put(start), device.put(end), device.put(mask)
        d_start = d_start * 1.0  # queued work the kernel must wait for
        got = span_search(d_start, d_end, d_mask, top_k=3, stream=stream)
    np.testing.assert_array_equal(got[0], span_search(start, end, mask, top_k=3)[0])
    got = span_search(d_start, d_end, d_mask, top_k=3, stream=stream.cuda_stream)
    np.testing.assert_array_equal(got[0], span_search(start, end, mask, top_k=3)[0])


def test_nan_names_the_row(device: Any) -> None:
    start = np.zeros((5, 16), np.float32)
    start[3, 2] = np.nan
    start[4, 9] = np.nan
    with pytest.raises(ValueError, match="^row 3 of start_logits/end_logits holds NaN"):
        span_search(device.put(start), device.put(start), device.put(np.ones((5, 16), bool)))


def test_non_contiguous_device_array_is_refused(device: Any) -> None:
    if device.library != "torch":
        pytest.skip("uses torch views")
    logits = device.put(np.zeros((16, 8), np.float32)).t()
    mask = device.put(np.ones((8, 16), bool))
    with pytest.raises(ValueError, match="C-contiguous"):
        span_search(logits, logits, mask)


def test_cupy_arrays(device: Any) -> None:
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(8)
    start, end = rng.normal(size=(2, 4, 100)).astype(np.float32)
    mask = np.ones((4, 100), bool)
    got = span_search(cupy.asarray(start), cupy.asarray(end), cupy.asarray(mask), top_k=7)
    want = span_search(start, end, mask, top_k=7)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
