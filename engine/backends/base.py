"""The common interface of the model backends, and what they share.

A backend turns padded token arrays into start/end logits. It hands the logits (host NumPy arrays,
or device arrays exposing ``__cuda_array_interface__``) to a ``consume`` callback while they are
valid, so GPU backends can keep them on the device for the CUDA decoder and reuse their buffers
afterwards. Each backend lives in its own module and imports its packages lazily.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from engine.bundle import Artifact, Bundle
from engine.errors import BackendUnavailableError, BundleError

T = TypeVar("T")

# consume(start_logits, end_logits, stream): stream is the CUDA stream (an int, the
# __cuda_array_interface__ convention) the logits were produced on, or None for host arrays.
Consume = Callable[[Any, Any, "int | None"], T]


# Batch limits of the CPU backends (ONNX Runtime and torch), from `python -m bench shapes` on a
# 2-core AVX-512/AMX Xeon (docs/runtime.md): past ~1,000 padded tokens per call the cost per token
# rises (ONNX Runtime int8: 28-34 us/token within it, up to 63 beyond), and one call's fixed cost
# is worth ~30 tokens (ORT int8: ~30 at 96 tokens, ~36 at 160, ~27 at 256; torch fp32: ~37 at 128).
CPU_MAX_BATCH_TOKENS = 1024
CPU_CALL_COST_TOKENS = 32

LOGIT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# A span model's logits are tens at most (SQuAD models: |logit| < 30). Beyond this bound a float32
# start + end sum and its softmax lose their meaning (3e38 + 3e38 is inf): the model is broken.
MAX_ABS_LOGIT = 1e6


def default_threads() -> int:
    """Intra-op threads when none are given: the CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Backend(abc.ABC):
    """One loaded model on one runtime; ``run`` is safe to call from several threads at once."""

    name: str  # "onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-cuda"
    precision: str  # "fp32", "fp16", "int8"
    device: str  # "cpu" or "cuda"
    input_names: tuple[str, ...]
    input_dtypes: dict[str, np.dtype]
    max_batch_size: int | None = None  # a hard limit of the model (TensorRT profiles), else None
    max_seq_len: int | None = None
    # Padded tokens per run that keep this backend at its best cost per token (None: no limit,
    # only max_batch_size). The Engine cuts length-sorted batches to it unless told otherwise.
    max_batch_tokens: int | None = None
    # The fixed cost of one model call, in tokens' worth of work: the batch planner puts two
    # windows in one batch only when the padding costs less than the call it saves (0: greedy).
    call_cost_tokens: int = 0
    # Batches are padded to a multiple of this many tokens (runtimes that compile per input shape)
    pad_multiple: int = 1
    details: dict[str, Any]  # what was actually used: provider, threads, file ... (recorded, logged)

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Run the model on ``feeds`` ([B, S] arrays by input name) and return ``consume``'s result."""

    def to_device(self, array: np.ndarray) -> Any:
        """``array`` where this backend's logits live (host backends return it unchanged)."""
        return array

    def close(self) -> None:
        """Free the model and its buffers; the backend is unusable afterwards."""


def _dtype_and_shape(array: Any) -> tuple[np.dtype | None, tuple[int, ...] | None]:
    cai = getattr(array, "__cuda_array_interface__", None)
    if cai is not None:  # a device array: read what it is without copying it
        return np.dtype(cai["typestr"]), tuple(cai["shape"])
    dtype, shape = getattr(array, "dtype", None), getattr(array, "shape", None)
    return (np.dtype(dtype) if isinstance(dtype, np.dtype) else None), (tuple(shape) if isinstance(shape, tuple) else None)


def check_logits(backend: Backend, start: Any, end: Any, shape: tuple[int, int], used: np.ndarray | None) -> None:
    """The model's outputs at the backend boundary, once per batch: float32/float16 arrays of the
    batch's [B, S] shape, and on the host, finite and within +-MAX_ABS_LOGIT at the positions the
    answer is read from (``used``: bool [B, S], the context tokens and [CLS]). Anything else is a
    BundleError: the model file gives outputs no answer can come from (a NaN logit, a +inf that
    would make a score NaN, float64, [B, S-1], 1-D ...). Costs a dtype/shape check and one pass
    over the used logits."""
    where = f"backend {backend.name!r} ({backend.details.get('file', 'its model')})"
    fix = "Fix: export the bundle again (python -m export MODEL_DIR --out BUNDLE --force), or check the model file"
    for name, array in (("start_logits", start), ("end_logits", end)):
        dtype, got = _dtype_and_shape(array)
        if dtype not in LOGIT_DTYPES or got != shape:
            raise BundleError(f"{where}: the model's {name} is {dtype or type(array).__name__} {list(got) if got else ''}, "
                              f"expected float32 or float16 {list(shape)} (one logit per token of the batch). {fix}")
        if used is not None and not hasattr(array, "__cuda_array_interface__"):
            values = np.asarray(array)[used].astype(np.float32, copy=False)
            bad = ~(np.abs(values) <= MAX_ABS_LOGIT)  # NaN compares False: caught too
            if bad.any():
                row = int(np.nonzero(used)[0][np.argmax(bad)])
                raise BundleError(f"{where}: the model's {name} holds {values[bad][0]:g} at a token the answer is read from "
                                  f"(batch row {row}; logits must be finite, within +-{MAX_ABS_LOGIT:g}). {fix}")


def require_artifact(bundle: Bundle, fmt: str, precision: str, backend: str) -> Artifact:
    """The bundle's artifact for this backend, or a BackendUnavailableError naming what exists."""
    art = bundle.find(fmt, precision)
    if art is None:
        have = ", ".join(bundle.precisions(fmt)) or "none"
        raise BackendUnavailableError(
            f"backend {backend!r} needs the {precision} {fmt} model, but bundle {bundle.root} has {fmt} precisions: {have}. "
            f"Pick one of those precisions, or export the bundle again with {precision} (python -m export ...)")
    return art


def first_precision(bundle: Bundle, precisions: tuple[str, ...], fmt: str, what: str) -> str:
    """The first of ``precisions`` (best first) that the bundle has a ``fmt`` model for, or a
    BackendUnavailableError naming what ``what`` needs and what the bundle has."""
    have = bundle.precisions(fmt)
    for p in precisions:
        if p in have:
            return p
    raise BackendUnavailableError(f"bundle {bundle.root} has no {fmt} model for {what} (needs {' or '.join(precisions)}; "
                                  f"has {', '.join(have) or 'none'})")


def onnx_numpy_dtype(type_str: str) -> np.dtype:
    """NumPy dtype of an ONNX tensor type string such as 'tensor(int64)'."""
    table = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(float16)": np.float16}
    if type_str not in table:
        raise BundleError(f"model input/output type {type_str} is not supported (int64, int32, float, float16 are). "
                          "Fix: export the bundle again with python -m export")
    return np.dtype(table[type_str])
