"""Model backends, one module each, imported only when asked for.

``open_backend(bundle, "auto")`` tries TensorRT, then ONNX Runtime CUDA, then SpanRT's native
encoder (int8, fp32; on every CPU path but the untuned generic one), then ONNX Runtime with the OpenVINO plugin (bf16, when installed), then
ONNX Runtime CPU and
records why each faster one was skipped; any explicitly named backend or precision that cannot run
raises BackendUnavailableError (never a quiet substitution). The torch backend is a reference and
is never picked by "auto".
"""

from __future__ import annotations

import logging

from engine.backends.base import Backend, default_threads
from engine.bundle import Bundle
from engine.errors import BackendUnavailableError, BundleError

BACKENDS = ("onnxruntime", "native", "onnxruntime-openvino", "onnxruntime-cuda", "tensorrt", "torch", "torch-cuda")
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "native", "onnxruntime-openvino", "onnxruntime")

logger = logging.getLogger("engine")

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "default_threads", "open_backend"]


def _open_one(name: str, bundle: Bundle, precision: str | None, threads: int | None, device_id: int,
              cpu_isa: str | None = None) -> Backend:
    if name == "onnxruntime":
        from engine.backends.onnxruntime_cpu import OnnxRuntimeCPU

        return OnnxRuntimeCPU(bundle, precision, threads=threads)
    if name == "native":
        from engine.backends.native import NativeCPU

        return NativeCPU(bundle, precision, threads=threads, cpu_isa=cpu_isa)
    if name == "onnxruntime-openvino":
        from engine.backends.onnxruntime_openvino import OnnxRuntimeOpenVINO

        return OnnxRuntimeOpenVINO(bundle, precision, threads=threads)
    if name == "onnxruntime-cuda":
        from engine.backends.onnxruntime_cuda import OnnxRuntimeCUDA

        return OnnxRuntimeCUDA(bundle, precision, threads=threads, device_id=device_id)
    if name == "tensorrt":
        from engine.backends.tensorrt import TensorRT

        return TensorRT(bundle, precision, threads=threads, device_id=device_id)
    if name in ("torch", "torch-cuda"):
        from engine.backends.torch import TorchBackend

        return TorchBackend(bundle, precision, threads=threads, device="cuda" if name == "torch-cuda" else "cpu", device_id=device_id)
    raise BackendUnavailableError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")


def open_backend(bundle: Bundle, backend: str = "auto", precision: str | None = None, *,
                 threads: int | None = None, device_id: int = 0, cpu_isa: str | None = None) -> tuple[Backend, tuple[str, ...]]:
    """The loaded backend and, for "auto", why each faster backend was skipped (also logged).

    ``cpu_isa`` caps the native encoder's instruction-set path (else $SPANRT_CPU_ISA)."""
    if backend != "auto":
        return _open_one(backend, bundle, precision, threads, device_id, cpu_isa), ()
    skipped: list[str] = []
    for name in AUTO_ORDER:
        want = precision
        if name == "native":
            # Its INT8 and FP32 are the fastest CPU models of those precisions here; its BF16 is
            # slower than OpenVINO's in batches.
            if precision not in (None, "int8", "fp32"):
                skipped.append(f"{name}: not used for {precision} by auto (ask for backend='native' explicitly)")
                continue
            want = precision or "int8"
            record = bundle.manifest.get("native_encoder")  # the export's word on why it wrote no weights
            if not bundle.precisions("native") and isinstance(record, dict) and record.get("reason"):
                skipped.append(f"{name}: the bundle has no native encoder weights: {record['reason']}")
                continue
            try:
                from engine.backends.native import auto_skip_reason

                why = auto_skip_reason(cpu_isa)
            except BackendUnavailableError as e:
                why = str(e)
            if why is not None:
                skipped.append(f"{name}: {why}")
                continue
        elif name == "onnxruntime-openvino":
            # Only its BF16 beats ONNX Runtime's own CPU models (int8, fp32); its FP32 does not.
            if precision not in (None, "bf16"):
                skipped.append(f"{name}: not used for {precision} (onnxruntime's CPU provider runs it faster)")
                continue
            want = "bf16"
        if want is not None and want not in _precisions_of(name, bundle):
            skipped.append(f"{name}: bundle has no {want} model for it")
            continue
        try:
            chosen = _open_one(name, bundle, want, threads, device_id, cpu_isa)
        except BackendUnavailableError as e:
            skipped.append(f"{name}: {e}")
            logger.info("spanrt auto backend: skipping %s: %s", name, e)
            continue
        except BundleError as e:
            if name != "tensorrt":
                raise
            # A plan for another GPU or TensorRT version: "auto" moves on, loudly; asking for
            # backend="tensorrt" explicitly raises this BundleError.
            skipped.append(f"{name}: {e}")
            logger.warning("spanrt auto backend: skipping %s: %s", name, e)
            continue
        path = chosen.details.get("isa")
        logger.info("spanrt auto backend: using %s (%s%s)", chosen.name, chosen.precision, f", {path} path" if path else "")
        return chosen, tuple(skipped)
    raise BackendUnavailableError("no backend can run this bundle here:\n  " + "\n  ".join(skipped))


def _precisions_of(name: str, bundle: Bundle) -> tuple[str, ...]:
    if name == "native":  # INT8, BF16 or FP32 computed from the bundle's float32 native weights
        return ("int8", "bf16", "fp32") if "fp32" in bundle.precisions("native") else ()
    if name == "onnxruntime-openvino":  # OpenVINO's BF16 or FP32 on the bundle's FP32 graph
        return ("bf16", "fp32") if "fp32" in bundle.precisions("onnx") else ()
    fmt = "tensorrt" if name == "tensorrt" else "onnx"
    return bundle.precisions(fmt)
