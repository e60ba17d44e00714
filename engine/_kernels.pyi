"""SpanRT's span-search decoder (C++ and, when built with it, CUDA). Use engine.decode."""

from typing import Any

import numpy as np
import numpy.typing as npt

WITH_CUDA: bool
CUDA_ARCHITECTURES: str
SANITIZED: bool

_Outputs = tuple[Any, Any, Any | None, Any | None, Any | None]

def span_search_host(
    start_logits: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    end_logits: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8],
    *,
    max_answer_len: int,
    top_k: int,
    return_lse: bool,
    return_null: bool,
) -> _Outputs:
    """Top-k spans of NumPy logits with the C++ decoder (GIL released)."""

def span_search_device(
    start_logits: Any,
    end_logits: Any,
    mask: Any,
    *,
    max_answer_len: int,
    top_k: int,
    return_lse: bool,
    return_null: bool,
    stream: int | None = None,
    out: tuple[Any, ...] | None = None,
) -> _Outputs:
    """Top-k spans of device logits (__cuda_array_interface__); only in CUDA builds."""
