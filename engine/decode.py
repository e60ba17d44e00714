"""Span search: start/end logits -> the top-k answer spans of each window (C++ or CUDA).

The rule (kernels/include/spanrt/span_search.h holds it once for C++ and CUDA; this module's
`reference_span_search` states it again in NumPy as the test oracle):

* a span (i, j) of a row is valid when mask[i] and mask[j] and i <= j <= i + max_answer_len - 1
  and its score start[i] + end[j] (a float32 sum; float16 inputs are widened first) is greater
  than -inf (so -inf logits never make a span);
* spans are ranked by higher score, then smaller start, then smaller end;
* rows with fewer than top_k valid spans are filled with (-1, -1) and -inf;
* a NaN logit at a masked-in position raises ValueError naming the row;
* top_k above MAX_TOP_K or max_answer_len above MAX_ANSWER_LEN raise ValueError (not a 16 TiB
  allocation or a binding's TypeError).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import numpy as np

from engine.errors import BackendUnavailableError, brief
from engine.options import DEFAULTS

try:
    from engine import _kernels
except ImportError as _error:  # not built: every call says how to build it
    _kernels = None
    _KERNELS_IMPORT_ERROR: ImportError | None = _error
else:
    _KERNELS_IMPORT_ERROR = None

__all__ = ["SpanSearchResult", "reference_span_search", "span_search"]


class SpanSearchResult(NamedTuple):
    """Decoder outputs; fields that were not asked for are None.

    spans: int64 [B, k, 2] (start, end) token positions, best first; (-1, -1) fills.
    scores: float32 [B, k] start + end logit of each span; -inf fills.
    start_lse, end_lse: float32 [B] log-sum-exp of the logits over the mask plus position 0
        ([CLS], the null answer, as the Hugging Face QA pipeline keeps it in its softmax), so
        exp(score - start_lse - end_lse) is a probability comparable across windows; -inf
        when all of them are -inf.
    null_scores: float32 [B] start[0] + end[0], the SQuAD 2.0 "no answer" score.
    """

    spans: Any
    scores: Any
    start_lse: Any = None
    end_lse: Any = None
    null_scores: Any = None


def _require_kernels() -> Any:
    if _kernels is None:
        raise BackendUnavailableError(
            "engine._kernels (the C++/CUDA span-search decoder) is not built or failed to "
            f"import ({_KERNELS_IMPORT_ERROR}); build it from the repository root with "
            "`pip install -e .` (see README.md)"
        )
    return _kernels


def _is_device_array(array: Any) -> bool:
    return hasattr(array, "__cuda_array_interface__")


def _stream_handle(stream: Any) -> int | None:
    """A CUDA stream as the integer handle the kernel takes (CAI convention: 1 legacy, 2 per-thread)."""
    if stream is None or isinstance(stream, int):
        return stream
    if hasattr(stream, "__cuda_stream__"):  # cuda.core / the CUDA stream protocol
        return int(stream.__cuda_stream__()[1])
    for attribute in ("cuda_stream", "ptr", "handle"):  # torch.cuda.Stream, CuPy, Numba
        if hasattr(stream, attribute):
            handle = getattr(stream, attribute)
            handle = getattr(handle, "value", handle)  # Numba's handle is a ctypes.c_void_p
            return int(handle or 0)
    if hasattr(stream, "__int__"):  # cuda-python's CUstream / cudaStream_t
        return int(stream)
    raise TypeError(
        f"stream must be None, an int handle or a CUDA stream object, got {type(stream).__name__}"
    )


MAX_TOP_K = 1 << 16  # the outputs are [B, top_k, 2]: beyond this a mistake, not a request
MAX_ANSWER_LEN = (1 << 63) - 1  # the kernels take an int64 (a huge value means no length limit)


def _bounded(name: str, value: Any, hi: int) -> int:
    """``value`` as an int, at most ``hi`` (the kernels check the lower bound with their own message)."""
    number = operator.index(value)
    if number > hi:
        raise ValueError(f"{name} must be at most {hi}, got {brief(number)}")
    return number


def _pack(raw: tuple[Any, ...], return_lse: bool, return_null: bool) -> Any:
    result = SpanSearchResult(*raw)
    if return_lse or return_null:
        return result
    return result.spans, result.scores


def span_search(
    start_logits: Any,
    end_logits: Any,
    mask: Any,
    *,
    max_answer_len: int = DEFAULTS.max_answer_len,
    top_k: int = DEFAULTS.top_k,
    return_lse: bool = False,
    return_null: bool = False,
    stream: Any = None,
    out: SpanSearchResult | tuple[Any, ...] | None = None,
) -> Any:
    """Top-k answer spans of each row of [B, S] start/end logits (float32 or float16).

    NumPy inputs (and anything np.asarray accepts) run the C++ decoder with the GIL released;
    non-contiguous arrays are copied. Device arrays (objects with __cuda_array_interface__:
    torch CUDA tensors, CuPy, pycuda, Numba, cuda-python buffers) run the CUDA kernel on
    `stream` (an int handle or a torch/CuPy/cuda.core stream; default: the stream start_logits'
    interface names, else the default stream), after waiting for the streams the inputs name.
    Results come back as new NumPy arrays, or stay on the device when `out` holds device arrays
    to write them into: a SpanSearchResult or 5-tuple (spans int64 [B, k, 2], scores float32
    [B, k], start_lse/end_lse/null_scores float32 [B], None where not asked for), returned
    as given. Either way the call waits for the kernel (it reads back a 4-byte NaN flag).
    Returns (spans, scores), or a SpanSearchResult when return_lse or return_null is set.
    Raises ValueError (shapes, options, NaN in the mask), TypeError (dtypes) and
    BackendUnavailableError (device arrays with an extension built without CUDA).
    """
    kernels = _require_kernels()
    options = dict(
        max_answer_len=_bounded("max_answer_len", max_answer_len, MAX_ANSWER_LEN),
        top_k=_bounded("top_k", top_k, MAX_TOP_K),
        return_lse=bool(return_lse),
        return_null=bool(return_null),
    )
    on_device = [_is_device_array(a) for a in (start_logits, end_logits, mask)]
    if any(on_device):
        if not all(on_device):
            raise ValueError(
                "start_logits, end_logits and mask must all be device arrays or all host arrays"
            )
        if not kernels.WITH_CUDA:
            raise BackendUnavailableError(
                "device arrays (__cuda_array_interface__) need the CUDA decoder, but engine._kernels "
                "was built without CUDA; rebuild with nvcc on PATH: "
                'SPANRT_CUDA=ON pip install -e . (or pass NumPy arrays)'
            )
        out_tuple = None if out is None else tuple(out)
        raw = kernels.span_search_device(
            start_logits, end_logits, mask, stream=_stream_handle(stream), out=out_tuple, **options
        )
        return _pack(raw, return_lse, return_null)
    if stream is not None or out is not None:
        raise ValueError("stream and out apply to device arrays only; these inputs are host arrays")
    raw = kernels.span_search_host(
        np.asarray(start_logits), np.asarray(end_logits), np.asarray(mask), **options
    )
    return _pack(raw, return_lse, return_null)


def _reference_lse(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    included = mask.copy()
    included[:, 0] = True
    values = np.where(included, logits.astype(np.float64), -np.inf)
    out = np.empty(len(values), dtype=np.float32)
    for row, x in enumerate(values):
        kept = x[included[row]]
        top = kept.max()
        if np.isnan(kept).any():
            out[row] = np.nan
        elif not np.isfinite(top):
            out[row] = top
        else:
            out[row] = top + np.log(np.exp(kept - top).sum())
    return out


def reference_span_search(
    start_logits: Any,
    end_logits: Any,
    mask: Any,
    *,
    max_answer_len: int = DEFAULTS.max_answer_len,
    top_k: int = DEFAULTS.top_k,
    return_lse: bool = False,
    return_null: bool = False,
    stream: Any = None,
) -> Any:
    """The rule by brute force over all valid pairs, in NumPy: the oracle the decoders are tested
    against (slow; host arrays only). Same arguments, results and errors as span_search (its
    signature repeats span_search's on purpose: the tests call both with the same arguments)."""
    if stream is not None:
        raise ValueError("reference_span_search runs on the host; stream must be None")
    max_answer_len, top_k = _bounded("max_answer_len", max_answer_len, MAX_ANSWER_LEN), _bounded("top_k", top_k, MAX_TOP_K)
    start, end, keep = np.asarray(start_logits), np.asarray(end_logits), np.asarray(mask)
    if start.dtype not in (np.float32, np.float16):
        raise TypeError(f"start_logits must be float32 or float16, got {start.dtype}")
    if end.dtype != start.dtype:
        raise TypeError(f"end_logits must have the dtype of start_logits ({start.dtype}), got {end.dtype}")
    if keep.dtype not in (np.bool_, np.uint8):
        raise TypeError(f"mask must be bool or uint8, got {keep.dtype}")
    if start.ndim != 2:
        raise ValueError(f"start_logits must be 2-D [batch, seq_len], got shape {start.shape}")
    if end.shape != start.shape or keep.shape != start.shape:
        raise ValueError(f"end_logits and mask must have the shape of start_logits {start.shape}")
    if start.shape[1] < 1:
        raise ValueError("seq_len (axis 1 of the logits) must be >= 1, got 0")
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be >= 1 (tokens per answer), got {max_answer_len}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    start, end, keep = start.astype(np.float32), end.astype(np.float32), keep.astype(bool)
    nan_rows = np.flatnonzero((keep & (np.isnan(start) | np.isnan(end))).any(axis=1))
    if len(nan_rows):
        raise ValueError(
            f"row {nan_rows[0]} of start_logits/end_logits holds NaN at a position where mask is "
            "true; the model or its inputs produced NaN logits"
        )
    batch, seq_len = start.shape
    spans = np.full((batch, top_k, 2), -1, dtype=np.int64)
    scores = np.full((batch, top_k), -np.inf, dtype=np.float32)
    i, j = np.meshgrid(np.arange(seq_len), np.arange(seq_len), indexing="ij")
    band = (j >= i) & (j - i < max_answer_len)
    for row in range(batch):
        with np.errstate(invalid="ignore", over="ignore"):  # +inf + -inf = NaN: not a valid span; 3e38 + 3e38 = inf
            pair_scores = start[row][:, None] + end[row][None, :]
            valid = band & keep[row][:, None] & keep[row][None, :] & (pair_scores > -np.inf)
        starts, ends, values = i[valid], j[valid], pair_scores[valid]
        order = np.lexsort((ends, starts, -values))[:top_k]
        spans[row, : len(order), 0] = starts[order]
        spans[row, : len(order), 1] = ends[order]
        scores[row, : len(order)] = values[order]
    result = SpanSearchResult(spans, scores)
    if return_lse:
        result = result._replace(start_lse=_reference_lse(start, keep), end_lse=_reference_lse(end, keep))
    if return_null:
        with np.errstate(invalid="ignore", over="ignore"):
            result = result._replace(null_scores=(start[:, 0] + end[:, 0]).astype(np.float32))
    return result if (return_lse or return_null) else (result.spans, result.scores)
