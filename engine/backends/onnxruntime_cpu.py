"""ONNX Runtime on the CPU: the default backend (INT8 when the bundle has it, else FP32).

The session settings are engine/backends/_ort.py's: explicit threads, sequential execution, every
graph optimization but SkipLayerNormFusion (CPU_DISABLED_OPTIMIZERS, slower on the CPU).

Batches are cut at CPU_MAX_BATCH_TOKENS padded tokens: beyond about a thousand tokens per run the
activations leave the caches and the cost per token rises (int8, 2 threads: ~28 us/token at
8 x 96, 34 at 4 x 256, 63 at 32 x 384).
"""

from __future__ import annotations

from typing import Any

from engine.backends._host_session import HostSessionBackend
from engine.backends._ort import CPU_DISABLED_OPTIMIZERS, check_io, import_onnxruntime, open_session, session_options
from engine.backends.base import default_threads, require_artifact
from engine.bundle import Bundle
from engine.errors import BackendUnavailableError

PRECISIONS = ("int8", "fp32")


class OnnxRuntimeCPU(HostSessionBackend):
    """ONNX Runtime CPUExecutionProvider on an int8 or fp32 ONNX model of the bundle."""

    name = "onnxruntime"
    FORMAT = "onnx"
    PRECISIONS = PRECISIONS
    PROBES = (import_onnxruntime,)

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        precision = precision or self.default_precision(bundle)
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
