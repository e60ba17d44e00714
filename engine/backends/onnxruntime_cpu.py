"""ONNX Runtime on the CPU: the default backend (INT8 when the bundle has it, else FP32).

Session settings are explicit: intra-op threads (default: the cores this process may use), one
inter-op thread with sequential execution (a BERT graph is a chain; parallel branches only add
scheduling), and every graph optimization ONNX Runtime has but one: SkipLayerNormFusion. On the
CPU, ONNX Runtime's SkipLayerNormalization kernel (scalar loops, a division per element) costs
more than the Add + LayerNormalization it replaces: measured with ONNX Runtime 1.32 on the default
model (2 threads), 8.5 -> 7.1 ms per 192-token int8 window at batch 1 and 4.7 -> 3.6 ms at batch
8 x 128. The export stage leaves that fusion out of the CPU graphs for the same reason.

Batches are cut at CPU_MAX_BATCH_TOKENS padded tokens: beyond about a thousand tokens per run the
activations leave the caches and the cost per token rises (int8, 2 threads: ~28 us/token at
8 x 96, 34 at 4 x 256, 63 at 32 x 384).
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from engine.backends.base import (
    CPU_CALL_COST_TOKENS,
    CPU_MAX_BATCH_TOKENS,
    Backend,
    Consume,
    T,
    default_threads,
    first_precision,
    onnx_numpy_dtype,
    require_artifact,
)
from engine.bundle import Artifact, Bundle
from engine.errors import BackendUnavailableError, BundleError

PRECISIONS = ("int8", "fp32")
# ONNX Runtime graph transformers turned off on the CPU (see the module docstring)
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def import_onnxruntime() -> Any:
    """The onnxruntime module, or BackendUnavailableError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(f"onnxruntime is not installed ({e}); install it with: pip install onnxruntime") from e
    return onnxruntime


def default_precision(bundle: Bundle) -> str:
    """INT8 when the bundle has an INT8 ONNX model, else FP32."""
    return first_precision(bundle, PRECISIONS, "onnx", "the CPU")


def session_options(ort: Any, threads: int) -> Any:
    """The SessionOptions every SpanRT ONNX Runtime session uses."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's warnings are not ours to print
    return so


def open_session(ort: Any, artifact: Artifact, so: Any, providers: list[Any], *,
                 disabled_optimizers: tuple[str, ...] = (), provider: str | None = None) -> Any:
    """An InferenceSession on ``artifact``; a file ONNX Runtime cannot load is a BundleError, a
    provider that cannot start (or cannot take the whole graph when CPU fallback is disabled) a
    BackendUnavailableError. ``provider`` names it when it is set in ``so`` rather than ``providers``."""
    try:
        return ort.InferenceSession(str(artifact.path), sess_options=so, providers=providers,
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as e:  # onnxruntime raises its own pybind exception types (Fail, InvalidGraph, ...)
        msg = str(e).lower()
        if "provider" in msg or "cuda" in msg or "fallback to cpu ep" in msg:
            name = provider or (providers[0] if providers else "the execution provider")
            raise BackendUnavailableError(f"ONNX Runtime could not start {name} for {artifact.path.name}: {e}") from e
        raise BundleError(f"bundle {artifact.path.parent}: {artifact.path.name}: ONNX Runtime cannot load it ({type(e).__name__}: {e}). "
                          "Fix: export the bundle again with python -m export") from e


def check_io(session: Any, bundle: Bundle, artifact: Artifact) -> dict[str, np.dtype]:
    """The session's input dtypes; inputs/outputs that differ from the manifest are a BundleError."""
    names = tuple(i.name for i in session.get_inputs())
    outs = tuple(o.name for o in session.get_outputs())
    if set(names) != set(bundle.input_names) or not {"start_logits", "end_logits"} <= set(outs):
        raise BundleError(f"bundle {bundle.root}: {artifact.path.name} has inputs {names} and outputs {outs}, the manifest says "
                          f"{bundle.input_names} -> {bundle.output_names}. Fix: export the bundle again")
    return {i.name: onnx_numpy_dtype(i.type) for i in session.get_inputs()}


_fork_lock = threading.Lock()
_open_backends: weakref.WeakSet[HostSessionBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()  # the parent's may have been held by a thread that does not exist here
    for backend in list(_open_backends):  # inherited sessions: never destroyed here, even if never used
        _keep_forever(backend._session)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _keep_forever(obj: Any) -> None:
    """Never destroy ``obj`` in this process: a session inherited through fork() owns threads and
    locks of the parent (its thread pool may have been inside ``run``); destroying it would join
    threads that do not exist here. One leaked reference per forked Engine, released at exit."""
    if obj is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


class HostSessionBackend(Backend):
    """An ONNX Runtime session whose logits come back to host memory (the CPU-side providers).

    Safe after ``fork()``: ONNX Runtime's thread pool does not survive a fork (a child forked while
    another thread was inside ``run`` could hang in its next call), so the first ``run`` in a new
    process opens the session again (``_reopen``), as the native backend rebuilds its thread team;
    the inherited session is never touched again. A subclass without ``_reopen`` refuses to run
    in a forked child with a BackendUnavailableError."""

    _session: Any = None
    _pid: int = -1
    _reopen: Callable[[], Any] | None = None  # opens this backend's session again (after a fork)
    _outputs = ["start_logits", "end_logits"]

    @property
    def session(self) -> Any:
        """The InferenceSession of this process."""
        return self._session

    @session.setter
    def session(self, value: Any) -> None:
        self._session = value
        self._pid = os.getpid()
        _open_backends.add(self)

    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Run the session (thread-safe in ONNX Runtime) and pass the host logits on."""
        if self._pid != os.getpid() and self._session is not None:
            self._reopen_after_fork()
        start, end = self._session.run(self._outputs, dict(feeds))
        return consume(start, end, None)

    def _reopen_after_fork(self) -> None:
        with _fork_lock:
            if self._pid == os.getpid():  # another thread of this child reopened it
                return
            self._session = None  # the inherited one was kept alive at the fork (_after_fork_in_child)
            if self._reopen is None:
                raise BackendUnavailableError(
                    f"backend {self.name!r} was opened in another process and cannot run in this forked child; create the "
                    "Engine after the fork (gunicorn: without --preload, or in a post_fork hook)")
            self.session = self._reopen()

    def close(self) -> None:
        """Drop the session (in a forked child, the inherited one stays alive, never destroyed)."""
        self._session = None


class OnnxRuntimeCPU(HostSessionBackend):
    """ONNX Runtime CPUExecutionProvider on an int8 or fp32 ONNX model of the bundle."""

    name = "onnxruntime"
    device = "cpu"
    max_batch_tokens = CPU_MAX_BATCH_TOKENS
    call_cost_tokens = CPU_CALL_COST_TOKENS

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        precision = precision or default_precision(bundle)
        if precision not in PRECISIONS:
            raise BackendUnavailableError(
                f"backend 'onnxruntime' (CPU) runs {' or '.join(PRECISIONS)}, not {precision}: "
                f"use backend='onnxruntime-cuda' or 'tensorrt' for {precision} on a GPU")
        artifact = require_artifact(bundle, "onnx", precision, self.name)
        self.threads = threads or default_threads()

        def reopen() -> Any:
            return open_session(ort, artifact, session_options(ort, self.threads), ["CPUExecutionProvider"],
                                disabled_optimizers=CPU_DISABLED_OPTIMIZERS)

        self._reopen = reopen
        self.session = reopen()
        self.input_dtypes = check_io(self.session, bundle, artifact)
        self.input_names = bundle.input_names
        self.precision = precision
        self.details = {"provider": self.session.get_providers()[0], "file": artifact.path.name, "intra_op_threads": self.threads,
                        "inter_op_threads": 1, "execution_mode": "sequential", "graph_optimization": "all",
                        "disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS), "max_batch_tokens": self.max_batch_tokens,
                        "call_cost_tokens": self.call_cost_tokens,
                        "onnxruntime": ort.__version__}

