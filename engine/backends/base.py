"""The common interface of the model backends, and what they share.

A backend turns padded token arrays into start/end logits. It hands the logits (host NumPy arrays,
or device arrays exposing ``__cuda_array_interface__``) to a ``consume`` callback while they are
valid, so GPU backends can keep them on the device for the CUDA decoder and reuse their buffers
afterwards. Each backend lives in its own module and imports its packages lazily; its class
declares what it runs (``PRECISIONS``, best first, from which bundle artifact) and says, without
loading anything, whether it can run here (``available``). engine/backends/__init__.py's table
and "auto" are driven by these declarations alone.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from engine.bundle import PRECISIONS as STORED_PRECISIONS
from engine.bundle import Artifact, Bundle
from engine.errors import BackendUnavailableError, BundleError

T = TypeVar("T")

# Every precision a backend may run: those a bundle stores models in, and bf16, which the native
# encoder and OpenVINO compute from the fp32 weights.
PRECISIONS = (*STORED_PRECISIONS, "bf16")

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


@dataclass(frozen=True)
class BackendOptions:
    """How a backend is opened: its intra-op threads (None: the cores this process may use), the
    GPU it runs on, and the native encoder's instruction-set cap (None: $SPANRT_CPU_ISA, else the
    best this CPU runs). Each backend reads the fields that concern it."""

    threads: int | None = None
    device_id: int = 0
    cpu_isa: str | None = None


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run a bundle here, and if not, why (``reason``, a sentence saying what to do)."""

    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing stands in the way (opening it may still fail on the model itself)."""
        return self.reason is None

    @classmethod
    def probe(cls, *checks: Callable[[], object]) -> Availability:
        """Run ``checks`` in order; the first BackendUnavailableError one raises is the reason."""
        try:
            for check in checks:
                check()
        except BackendUnavailableError as e:
            return cls(str(e))
        return cls()


class Backend(abc.ABC):
    """One loaded model on one runtime; ``run`` is safe to call from several threads at once.

    The class attributes in capitals are the backend's declaration, read before anything is loaded."""

    name: str  # its name in engine.backends.BACKENDS
    precision: str  # one of PRECISIONS
    device: str  # "cpu" or "cuda"
    # The bundle artifact format it reads ("onnx", "tensorrt", "native"; None: none, the torch
    # reference loads the source checkpoint), and the precisions it runs, best first.
    FORMAT: ClassVar[str | None]
    PRECISIONS: ClassVar[tuple[str, ...]]
    # Set when it computes every one of PRECISIONS from this one stored precision (native, OpenVINO: fp32)
    COMPUTED_FROM: ClassVar[str | None] = None
    # The precisions "auto" uses it for (None: all it runs; the first is what "auto" asks of it when
    # no precision is given), and why it is left to other backends for the rest.
    AUTO_PRECISIONS: ClassVar[tuple[str, ...] | None] = None
    AUTO_NOTE: ClassVar[str] = ""
    # "auto" moves on (with a warning) when opening it raises BundleError: a TensorRT plan built
    # for another GPU or TensorRT version. Elsewhere a damaged bundle is an error.
    AUTO_SKIPS_BUNDLE_ERRORS: ClassVar[bool] = False
    # Added to the error when the bundle has no model for it: how to get one ({bundle}: its folder)
    MISSING_FIX: ClassVar[str] = ""
    # What ``available`` checks: functions that raise BackendUnavailableError, saying what to install
    # or fix, when a package or device this backend needs is missing
    PROBES: ClassVar[tuple[Callable[[], object], ...]] = ()
    # The BackendOptions fields its constructor takes (keyword arguments of the same names)
    OPTIONS: ClassVar[tuple[str, ...]] = ("threads",)
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

    @classmethod
    def available(cls, bundle: Bundle, options: BackendOptions, *, auto: bool = False) -> Availability:
        """Whether it can run ``bundle`` here (its packages, its device), checked without loading the
        model; with ``auto``, also whether "auto" should use it (a backend that runs but is slower
        here than a later one in engine.backends.AUTO_ORDER says no)."""
        return Availability.probe(*cls.PROBES)

    @classmethod
    def open(cls, bundle: Bundle, precision: str | None, options: BackendOptions) -> Backend:
        """The backend loaded on ``bundle`` (``precision`` None: its default), with the ``options`` it takes."""
        return cls(bundle, precision, **{name: getattr(options, name) for name in cls.OPTIONS})  # type: ignore[call-arg]

    @classmethod
    def bundle_precisions(cls, bundle: Bundle) -> tuple[str, ...]:
        """The precisions it can run from ``bundle``'s artifacts, best first."""
        if cls.FORMAT is None:
            return cls.PRECISIONS
        have = bundle.precisions(cls.FORMAT)
        if cls.COMPUTED_FROM is not None:
            return cls.PRECISIONS if cls.COMPUTED_FROM in have else ()
        return tuple(p for p in cls.PRECISIONS if p in have)

    @classmethod
    def default_precision(cls, bundle: Bundle) -> str:
        """The best precision it can run from ``bundle``, or a BackendUnavailableError naming what
        it needs and what the bundle has."""
        runnable = cls.bundle_precisions(bundle)
        if runnable:
            return runnable[0]
        have = ", ".join(bundle.precisions(cls.FORMAT)) if cls.FORMAT else ""
        fix = f": {cls.MISSING_FIX.format(bundle=bundle.root)}" if cls.MISSING_FIX else ""
        raise BackendUnavailableError(f"bundle {bundle.root} has no {cls.FORMAT} model for backend {cls.name!r} "
                                      f"(needs {' or '.join(cls.PRECISIONS)}; has {have or 'none'}){fix}")

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Run the model on ``feeds`` ([B, S] arrays by input name) and return ``consume``'s result."""

    def to_device(self, array: np.ndarray) -> Any:
        """``array`` where this backend's logits live (host backends return it unchanged)."""
        return array

    def close(self) -> None:
        """Free the model and its buffers; the backend is unusable afterwards."""


class CPUBackend(Backend):
    """A backend on the CPU: batches cut to the CPU batch budget (CPU_MAX_BATCH_TOKENS, CPU_CALL_COST_TOKENS)."""

    device = "cpu"
    max_batch_tokens = CPU_MAX_BATCH_TOKENS
    call_cost_tokens = CPU_CALL_COST_TOKENS


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
