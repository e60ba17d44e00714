"""Model backends: a table of names to classes, each imported only when asked for.

Each class declares what it runs (engine/backends/base.py: ``PRECISIONS`` best first, the artifact
``FORMAT``, the precisions "auto" uses it for) and whether it can run here (``available``).
``open_backend(bundle, "auto")`` tries them in AUTO_ORDER: TensorRT, ONNX Runtime CUDA, SpanRT's
native encoder (int8, fp32; on every CPU path but the untuned generic one), ONNX Runtime with the
OpenVINO plugin (bf16, when installed), ONNX Runtime CPU; it records why each faster one was
skipped. An explicitly named backend or precision that cannot run raises BackendUnavailableError
(never a quiet substitution). The torch backends are references and never picked by "auto".
"""

from __future__ import annotations

import importlib
import logging

from engine.backends._ort import CPU_DISABLED_OPTIMIZERS
from engine.backends.base import PRECISIONS, Backend, BackendOptions, default_threads
from engine.bundle import Bundle
from engine.errors import BackendUnavailableError, BundleError

# name -> "module:Class"; the module is imported when the backend is first asked for
BACKEND_CLASSES = {
    "onnxruntime": "engine.backends.onnxruntime_cpu:OnnxRuntimeCPU",
    "native": "engine.backends.native:NativeCPU",
    "onnxruntime-openvino": "engine.backends.onnxruntime_openvino:OnnxRuntimeOpenVINO",
    "onnxruntime-cuda": "engine.backends.onnxruntime_cuda:OnnxRuntimeCUDA",
    "tensorrt": "engine.backends.tensorrt:TensorRT",
    "torch": "engine.backends.torch:TorchBackend",
    "torch-cuda": "engine.backends.torch:TorchCUDA",
}
BACKENDS = tuple(BACKEND_CLASSES)
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "native", "onnxruntime-openvino", "onnxruntime")

logger = logging.getLogger("engine")

__all__ = ["AUTO_ORDER", "BACKENDS", "BACKEND_CLASSES", "CPU_DISABLED_OPTIMIZERS", "PRECISIONS", "Backend", "BackendOptions",
           "backend_class", "default_threads", "open_backend"]


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (its module imported now), or BackendUnavailableError for a name
    that is not in the table."""
    target = BACKEND_CLASSES.get(name)
    if target is None:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    module, _, attr = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), attr)
    return cls


def open_backend(bundle: Bundle, backend: str = "auto", precision: str | None = None, *,
                 threads: int | None = None, device_id: int = 0, cpu_isa: str | None = None) -> tuple[Backend, tuple[str, ...]]:
    """The loaded backend and, for "auto", why each faster backend was skipped (also logged).

    ``cpu_isa`` caps the native encoder's instruction-set path (else $SPANRT_CPU_ISA)."""
    options = BackendOptions(threads=threads, device_id=device_id, cpu_isa=cpu_isa)
    if backend != "auto":
        cls = backend_class(backend)
        verdict = cls.available(bundle, options)
        if not verdict.ok:
            raise BackendUnavailableError(verdict.reason)
        return cls.open(bundle, precision, options), ()
    skipped: list[str] = []

    def skip(name: str, why: str, log: int = logging.INFO) -> None:
        skipped.append(f"{name}: {why}")
        logger.log(log, "spanrt auto backend: skipping %s: %s", name, why)

    for name in AUTO_ORDER:
        cls = backend_class(name)
        if cls.AUTO_PRECISIONS is not None and precision not in (None, *cls.AUTO_PRECISIONS):
            skip(name, f"not used for {precision} by auto ({cls.AUTO_NOTE})")
            continue
        verdict = cls.available(bundle, options, auto=True)
        if not verdict.ok:
            skip(name, str(verdict.reason))
            continue
        want = precision or (cls.AUTO_PRECISIONS[0] if cls.AUTO_PRECISIONS else None)
        try:
            chosen = cls.open(bundle, want, options)
        except BackendUnavailableError as e:
            skip(name, str(e))
            continue
        except BundleError as e:
            if not cls.AUTO_SKIPS_BUNDLE_ERRORS:
                raise
            skip(name, str(e), logging.WARNING)  # asking for this backend by name raises it
            continue
        path = chosen.details.get("isa")
        logger.info("spanrt auto backend: using %s (%s%s)", chosen.name, chosen.precision, f", {path} path" if path else "")
        return chosen, tuple(skipped)
    raise BackendUnavailableError("no backend can run this bundle here:\n  " + "\n  ".join(skipped))
