"""The C++ span-search decoder against the NumPy brute-force oracle, and its error paths."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import decode
from engine.decode import SpanSearchResult, reference_span_search, span_search
from engine.errors import BackendUnavailableError

pytest.importorskip("engine._kernels", reason="engine._kernels is not built: pip install -e .")
from engine import _kernels  # noqa: E402


def assert_same(got: SpanSearchResult, want: SpanSearchResult) -> None:
    """Spans and scores bit for bit; log-sum-exps to float32 rounding; null scores exactly."""
    np.testing.assert_array_equal(got.spans, want.spans)
    assert got.spans.dtype == np.int64 and got.scores.dtype == np.float32
    np.testing.assert_array_equal(got.scores.view(np.uint32), want.scores.view(np.uint32))
    for name in ("start_lse", "end_lse"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None)
        if g is not None:
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6)
    if want.null_scores is not None:
        np.testing.assert_array_equal(got.null_scores, want.null_scores)


def both(*args: Any, **kwargs: Any) -> tuple[SpanSearchResult, SpanSearchResult]:
    kwargs.setdefault("return_lse", True)
    kwargs.setdefault("return_null", True)
    return span_search(*args, **kwargs), reference_span_search(*args, **kwargs)


@st.composite
def decode_cases(draw: st.DrawFn) -> dict[str, Any]:
    batch = draw(st.integers(1, 4))
    seq_len = draw(st.one_of(st.integers(1, 24), st.integers(25, 512)))
    max_answer_len = draw(st.one_of(st.integers(1, 40), st.integers(1, seq_len + 10)))
    possible = seq_len * min(max_answer_len, seq_len)
    top_k = draw(st.one_of(st.integers(1, 4), st.integers(1, min(possible + 5, 400))))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    ties = draw(st.booleans())  # integer logits: many equal scores, the tie rule decides
    neg_inf_rate = draw(st.sampled_from([0.0, 0.05, 0.6]))
    mask_kind = draw(st.sampled_from(["random", "random", "all", "none", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (batch, seq_len)
    if ties:
        start, end = rng.integers(-3, 4, shape), rng.integers(-3, 4, shape)
    else:
        start, end = rng.normal(0, 4, shape), rng.normal(0, 4, shape)
    start, end = start.astype(dtype), end.astype(dtype)
    start[rng.random(shape) < neg_inf_rate] = -np.inf
    end[rng.random(shape) < neg_inf_rate] = -np.inf
    mask = {
        "random": rng.random(shape) < rng.uniform(0.2, 1.0),
        "all": np.ones(shape, bool),
        "none": np.zeros(shape, bool),
        "sparse": rng.random(shape) < 0.03,
    }[mask_kind]
    if draw(st.booleans()):
        mask = mask.astype(np.uint8)
    return dict(start=start, end=end, mask=mask, max_answer_len=max_answer_len, top_k=top_k)


@given(decode_cases())
def test_matches_oracle(case: dict[str, Any]) -> None:
    got, want = both(
        case["start"], case["end"], case["mask"],
        max_answer_len=case["max_answer_len"], top_k=case["top_k"],
    )
    assert_same(got, want)


@pytest.mark.parametrize(
    ("seq_len", "max_answer_len", "top_k"),
    [(1, 1, 1), (1, 5, 3), (5, 50, 20), (4, 2, 100), (17, 1, 3), (40, 40, 1)],
    ids=["S=1", "S=1 k>valid", "L>S", "k>valid", "L=1", "L=S"],
)
def test_edge_shapes(seq_len: int, max_answer_len: int, top_k: int) -> None:
    rng = np.random.default_rng(seq_len * 1000 + top_k)
    start = rng.integers(-2, 3, (3, seq_len)).astype(np.float32)
    end = rng.integers(-2, 3, (3, seq_len)).astype(np.float32)
    mask = np.ones((3, seq_len), bool)
    got, want = both(start, end, mask, max_answer_len=max_answer_len, top_k=top_k)
    assert_same(got, want)
    expected_pairs = sum(min(max_answer_len, seq_len - i) for i in range(seq_len))
    filled = (got.spans[:, :, 0] >= 0).sum(axis=1)
    np.testing.assert_array_equal(filled, min(top_k, expected_pairs))


def test_all_false_mask_fills_every_rank() -> None:
    start = np.zeros((2, 9), np.float32)
    got = span_search(start, start, np.zeros((2, 9), bool), top_k=4, return_lse=True)
    np.testing.assert_array_equal(got.spans, -1)
    assert np.all(got.scores == -np.inf)
    # log-sum-exp still covers position 0 ([CLS]): log(exp(0)) = 0
    np.testing.assert_array_equal(got.start_lse, 0.0)


def test_tie_rule_prefers_smaller_start_then_smaller_end() -> None:
    start = np.zeros((1, 4), np.float32)
    end = np.zeros((1, 4), np.float32)
    spans, scores = span_search(start, end, np.ones((1, 4), bool), max_answer_len=2, top_k=7)
    assert spans[0].tolist() == [[0, 0], [0, 1], [1, 1], [1, 2], [2, 2], [2, 3], [3, 3]]
    assert scores[0].tolist() == [0.0] * 7


def test_minus_inf_logits_never_make_a_span() -> None:
    start = np.array([[-np.inf, 1.0, np.inf, 0.0]], np.float32)
    end = np.array([[0.0, -np.inf, -np.inf, 2.0]], np.float32)
    got, want = both(start, end, np.ones((1, 4), bool), max_answer_len=4, top_k=10)
    assert_same(got, want)
    # +inf + -inf = NaN is not a valid span either; (2, 3) = +inf is the best one
    assert got.spans[0, 0].tolist() == [2, 3] and got.scores[0, 0] == np.inf
    assert [tuple(s) for s in got.spans[0] if s[0] >= 0] == [(2, 3), (1, 3), (3, 3)]


def test_float16_extremes() -> None:
    bits = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x0000, 0x8000, 0x7C00, 0xFC00, 0x3C00], np.uint16)
    values = bits.view(np.float16)
    start = np.stack([values, np.roll(values, 3)])
    end = np.stack([np.roll(values, 1), values[::-1].copy()])
    for top_k in (1, 5, 80):
        got, want = both(start, end, np.ones(start.shape, bool), max_answer_len=4, top_k=top_k)
        assert_same(got, want)
    # 65504 + 65504 overflows float16 but not the float32 sum
    got = span_search(np.full((1, 2), 65504, np.float16), np.full((1, 2), 65504, np.float16),
                      np.ones((1, 2), bool))
    assert got[1][0, 0] == np.float32(131008.0)


def test_realistic_batch() -> None:
    rng = np.random.default_rng(7)
    start, end = rng.normal(size=(2, 64, 384)).astype(np.float32)
    mask = np.zeros((64, 384), bool)
    mask[:, 80:380] = True
    for top_k in (1, 20):
        got, want = both(start, end, mask, max_answer_len=30, top_k=top_k)
        assert_same(got, want)


def test_large_batch_split_over_threads() -> None:
    # 24 x 512 x 200 = 2.4M span evaluations: the decoder splits the rows over 2+ threads
    rng = np.random.default_rng(9)
    start, end = rng.normal(0, 3, (2, 24, 512)).astype(np.float32)
    mask = rng.random((24, 512)) < 0.9
    got, want = both(start, end, mask, max_answer_len=200, top_k=4)
    assert_same(got, want)
    start[20, 100] = np.nan  # NaN rows in different threads' chunks: the first is named
    end[13, 3] = np.nan
    mask[13, 3] = mask[20, 100] = True
    with pytest.raises(ValueError, match="^row 13 "):
        span_search(start, end, mask, max_answer_len=200)


def test_lse_gives_hugging_face_probabilities() -> None:
    rng = np.random.default_rng(3)
    start, end = rng.normal(0, 3, (2, 5, 64)).astype(np.float32)
    mask = rng.random((5, 64)) < 0.6
    mask[:, 0] = False  # [CLS] is not a span position, yet it stays in the softmax
    got = span_search(start, end, mask, top_k=3, return_lse=True)
    for row in range(5):
        keep = mask[row].copy()
        keep[0] = True
        p_start = np.exp(start[row] - start[row][keep].max()) * keep
        p_start /= p_start.sum()
        p_end = np.exp(end[row] - end[row][keep].max()) * keep
        p_end /= p_end.sum()
        for (i, j), score in zip(got.spans[row], got.scores[row]):
            probability = np.exp(np.float64(score) - got.start_lse[row] - got.end_lse[row])
            np.testing.assert_allclose(probability, p_start[i] * p_end[j], rtol=1e-5)


def test_null_scores_and_default_return_type() -> None:
    start = np.array([[1.5, 0.0, 2.0]], np.float32)
    end = np.array([[-0.5, 1.0, 0.0]], np.float32)
    mask = np.array([[False, True, True]])
    result = span_search(start, end, mask)
    assert isinstance(result, tuple) and not isinstance(result, SpanSearchResult)
    assert len(result) == 2
    full = span_search(start, end, mask, return_null=True)
    assert isinstance(full, SpanSearchResult)
    assert full.start_lse is None and full.end_lse is None
    assert full.null_scores.tolist() == [1.0]
    assert full.spans.tolist() == [[[2, 2]]]


def test_non_contiguous_input_is_copied_not_misread() -> None:
    rng = np.random.default_rng(11)
    wide_start, wide_end = rng.normal(size=(2, 6, 200)).astype(np.float32)
    wide_mask = rng.random((6, 200)) < 0.8
    start, end, mask = wide_start[::2, ::3], wide_end[::2, ::3], wide_mask[::2, ::3]
    assert not start.flags.c_contiguous
    got, want = both(start, end, mask, top_k=5)
    assert_same(got, want)
    fortran = np.asfortranarray(wide_start)
    np.testing.assert_array_equal(
        span_search(fortran, wide_end, wide_mask, top_k=3)[0],
        span_search(np.ascontiguousarray(wide_start), wide_end, wide_mask, top_k=3)[0],
    )


def test_nan_in_mask_names_the_row() -> None:
    start = np.zeros((4, 8), np.float32)
    end = np.zeros((4, 8), np.float32)
    mask = np.ones((4, 8), bool)
    end[2, 5] = np.nan
    start[3, 1] = np.nan
    for function in (span_search, reference_span_search):
        with pytest.raises(ValueError, match=r"^row 2 of start_logits/end_logits holds NaN"):
            function(start, end, mask)


def test_nan_outside_mask_is_ignored() -> None:
    start = np.zeros((2, 8), np.float32)
    start[1, 4] = np.nan
    mask = np.ones((2, 8), bool)
    mask[1, 4] = False
    got, want = both(start, np.zeros_like(start), mask, top_k=3)
    assert_same(got, want)


def test_empty_batch() -> None:
    spans, scores = span_search(np.zeros((0, 7), np.float32), np.zeros((0, 7), np.float32),
                                np.zeros((0, 7), bool), top_k=3)
    assert spans.shape == (0, 3, 2) and scores.shape == (0, 3)


@pytest.mark.parametrize(
    ("start", "end", "mask", "options", "error", "message"),
    [
        (np.zeros(5, np.float32), np.zeros(5, np.float32), np.ones(5, bool), {}, ValueError, "2-D"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 4), np.float32), np.ones((2, 5), bool), {},
         ValueError, "end_logits must have the shape"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32), np.ones((5, 2), bool), {},
         ValueError, "mask must have the shape"),
        (np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32), np.ones((2, 0), bool), {},
         ValueError, "seq_len"),
        (np.zeros((2, 5)), np.zeros((2, 5)), np.ones((2, 5), bool), {}, TypeError,
         "float32 or float16, got float64"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float16), np.ones((2, 5), bool), {},
         TypeError, "dtype of start_logits"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32), np.ones((2, 5), np.int64), {},
         TypeError, "mask must be bool or uint8"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32), np.ones((2, 5), bool),
         {"max_answer_len": 0}, ValueError, "max_answer_len must be >= 1"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32), np.ones((2, 5), bool),
         {"top_k": 0}, ValueError, "top_k must be >= 1"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32), np.ones((2, 5), bool),
         {"top_k": 2.5}, TypeError, "integer"),
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32), np.ones((2, 5), bool),
         {"stream": 0}, ValueError, "device arrays only"),
    ],
    ids=["1-D", "end shape", "mask shape", "S=0", "float64", "mixed dtypes", "int mask",
         "L=0", "k=0", "float k", "stream on host"],
)
def test_bad_arguments(start: Any, end: Any, mask: Any, options: dict[str, Any],
                       error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        span_search(start, end, mask, **options)
    if "stream" not in options and message != "integer":
        with pytest.raises(error):
            reference_span_search(start, end, mask, **options)


def test_threads_get_the_serial_results() -> None:
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(2, 16, 256)).astype(np.float32) for _ in range(8)]
    mask = np.ones((16, 256), bool)
    serial = [span_search(s, e, mask, top_k=5) for s, e in batches]
    results: list[Any] = [None] * len(batches)

    def work(index: int) -> None:
        for _ in range(20):
            results[index] = span_search(*batches[index], mask, top_k=5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


# ---- dispatch to the CUDA decoder (no GPU needed) ------------------------------------------


class FakeDeviceArray:
    """An object with a __cuda_array_interface__ whose pointer is not device memory."""

    def __init__(self, shape: tuple[int, ...], typestr: str, strides: tuple[int, ...] | None = None):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (4096, False), "strides": strides,
            "version": 3, "stream": None,
        }


def _fake_inputs(batch: int = 2, seq_len: int = 8) -> tuple[FakeDeviceArray, ...]:
    shape = (batch, seq_len)
    return FakeDeviceArray(shape, "<f4"), FakeDeviceArray(shape, "<f4"), FakeDeviceArray(shape, "|b1")


def test_unbuilt_extension_says_how_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_kernels", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install -e \."):
        span_search(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32), np.ones((1, 3), bool))
    # the oracle needs no extension
    assert reference_span_search(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32),
                                 np.ones((1, 3), bool))[0].shape == (1, 1, 2)


def test_device_input_without_cuda_build_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_only = SimpleNamespace(WITH_CUDA=False, span_search_host=_kernels.span_search_host)
    monkeypatch.setattr(decode, "_kernels", cpu_only)
    with pytest.raises(BackendUnavailableError, match="built without CUDA.*SPANRT_CUDA=ON pip install -e"):
        span_search(*_fake_inputs())


def test_mixed_host_and_device_inputs_are_refused() -> None:
    start, end, _ = _fake_inputs()
    with pytest.raises(ValueError, match="all be device arrays or all host arrays"):
        span_search(start, end, np.ones((2, 8), bool))


needs_cuda_build = pytest.mark.skipif(not _kernels.WITH_CUDA, reason="extension built without CUDA")


@needs_cuda_build
@pytest.mark.parametrize(
    ("inputs", "options", "error", "message"),
    [
        ((FakeDeviceArray((2, 8), "<f8"), FakeDeviceArray((2, 8), "<f8"), FakeDeviceArray((2, 8), "|b1")),
         {}, TypeError, "float32 or float16"),
        ((FakeDeviceArray((2, 8), "<f4"), FakeDeviceArray((2, 8), "<f2"), FakeDeviceArray((2, 8), "|b1")),
         {}, TypeError, "dtype of start_logits"),
        ((FakeDeviceArray((2, 8), "<f4"), FakeDeviceArray((2, 8), "<f4"), FakeDeviceArray((2, 8), "<i4")),
         {}, TypeError, "bool or uint8"),
        ((FakeDeviceArray((2, 8), "<f4", (4, 8)), FakeDeviceArray((2, 8), "<f4"), FakeDeviceArray((2, 8), "|b1")),
         {}, ValueError, "C-contiguous"),
        ((FakeDeviceArray((2, 8), "<f4"), FakeDeviceArray((2, 7), "<f4"), FakeDeviceArray((2, 8), "|b1")),
         {}, ValueError, "end_logits must have the shape"),
        (_fake_inputs(), {"top_k": 0}, ValueError, "top_k must be >= 1"),
        (_fake_inputs(), {"out": (FakeDeviceArray((2, 1, 2), "<i8"), None, None, None, None)},
         ValueError, "out.scores must be a device array"),
        (_fake_inputs(), {"out": (FakeDeviceArray((2, 3, 2), "<i8"), FakeDeviceArray((2, 1), "<f4"),
                                  None, None, None)},
         ValueError, r"out.spans must have shape \(2, 1, 2\)"),
        (_fake_inputs(), {"stream": "fast"}, TypeError, "stream must be"),
    ],
    ids=["float64", "mixed dtypes", "int32 mask", "strided", "shape", "k=0", "out missing",
         "out shape", "bad stream"],
)
def test_device_arguments_are_checked_before_any_cuda_call(
    inputs: tuple[Any, ...], options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        span_search(*inputs, **options)


def _driver_present() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@needs_cuda_build
def test_device_pointer_is_checked() -> None:
    # Without a driver: BackendUnavailableError; with one: address 4096 is not device memory.
    expected = ValueError if _driver_present() else BackendUnavailableError
    with pytest.raises(expected, match="device memory" if expected is ValueError else "CUDA"):
        span_search(*_fake_inputs())


def test_stream_objects_become_handles() -> None:
    import ctypes

    class CudaCore:
        def __cuda_stream__(self) -> tuple[int, int]:
            return (0, 4242)

    class CuStream:
        def __int__(self) -> int:
            return 99

    assert decode._stream_handle(None) is None
    assert decode._stream_handle(7) == 7
    assert decode._stream_handle(SimpleNamespace(cuda_stream=123)) == 123  # torch.cuda.Stream
    assert decode._stream_handle(SimpleNamespace(ptr=456)) == 456  # cupy.cuda.Stream
    assert decode._stream_handle(SimpleNamespace(handle=ctypes.c_void_p(789))) == 789  # Numba
    assert decode._stream_handle(SimpleNamespace(handle=ctypes.c_void_p(None))) == 0
    assert decode._stream_handle(CudaCore()) == 4242
    assert decode._stream_handle(CuStream()) == 99
    with pytest.raises(TypeError, match="stream must be"):
        decode._stream_handle("fast")


def test_huge_max_answer_len_means_no_length_limit() -> None:
    rng = np.random.default_rng(12)
    start, end = rng.normal(size=(2, 3, 40)).astype(np.float32)
    mask = np.ones((3, 40), bool)
    huge = span_search(start, end, mask, max_answer_len=2**63 - 1, top_k=6)
    np.testing.assert_array_equal(huge[0], span_search(start, end, mask, max_answer_len=40, top_k=6)[0])
