"""ONNX Runtime sessions as every SpanRT backend on ONNX Runtime opens them (no backend owns this).

Session settings are explicit: intra-op threads (default: the cores this process may use), one
inter-op thread with sequential execution (a BERT graph is a chain; parallel branches only add
scheduling), and every graph optimization ONNX Runtime has; on the CPU provider but one,
SkipLayerNormFusion (CPU_DISABLED_OPTIMIZERS): there, ONNX Runtime's SkipLayerNormalization
kernel (scalar loops, a division per element) costs more than the Add + LayerNormalization it
replaces: measured with ONNX Runtime 1.32 on the default model (2 threads), 8.5 -> 7.1 ms per
192-token int8 window at batch 1 and 4.7 -> 3.6 ms at batch 8 x 128. The export stage verifies its
CPU graphs with the same settings (engine.backends.CPU_DISABLED_OPTIMIZERS).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.bundle import Artifact, Bundle
from engine.errors import BackendUnavailableError, BundleError

# ONNX Runtime graph transformers turned off on the CPU execution provider (see the module docstring)
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)

_ONNX_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(float16)": np.float16}


def import_onnxruntime() -> Any:
    """The onnxruntime module, or BackendUnavailableError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(f"onnxruntime is not installed ({e}); install it with: pip install onnxruntime") from e
    return onnxruntime


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


def check_provider(session: Any, provider: str, fix: str = "") -> str:
    """The provider the session got, which must be ``provider``: ONNX Runtime silently drops to the
    CPU when a provider cannot start, and we refuse that instead (BackendUnavailableError)."""
    got = session.get_providers()
    if not got or got[0] != provider:
        raise BackendUnavailableError(f"ONNX Runtime did not start {provider} (the session got {got})" + (f": {fix}" if fix else ""))
    return str(got[0])


def check_io(session: Any, bundle: Bundle, artifact: Artifact) -> dict[str, np.dtype]:
    """The session's input dtypes; inputs/outputs that differ from the manifest, or of a type the
    runtime does not feed, are a BundleError."""
    names = tuple(i.name for i in session.get_inputs())
    outs = tuple(o.name for o in session.get_outputs())
    if set(names) != set(bundle.input_names) or not {"start_logits", "end_logits"} <= set(outs):
        raise BundleError(f"bundle {bundle.root}: {artifact.path.name} has inputs {names} and outputs {outs}, the manifest says "
                          f"{bundle.input_names} -> {bundle.output_names}. Fix: export the bundle again")
    dtypes = {}
    for i in session.get_inputs():
        if i.type not in _ONNX_DTYPES:
            raise BundleError(f"model input/output type {i.type} is not supported (int64, int32, float, float16 are). "
                              "Fix: export the bundle again with python -m export")
        dtypes[i.name] = np.dtype(_ONNX_DTYPES[i.type])
    return dtypes
