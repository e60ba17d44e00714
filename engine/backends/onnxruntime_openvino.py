"""ONNX Runtime with Intel's OpenVINO execution provider plugin, on the CPU: BF16 (or FP32).

The same ONNX Runtime session API and the bundle's FP32 ONNX graph, but the whole graph runs in
OpenVINO's CPU plugin, which on CPUs with BF16 support (AVX-512 BF16, AMX) computes in BF16 with
FP32 accumulation. On the project's 2-core Xeon (AVX-512 VNNI/BF16, AMX) it runs a 192-token
window of the default model in ~4.9 ms against ~7.3 ms for the CPU execution provider's INT8
model (docs/runtime.md has the measurements and the commands).

Needs the plugin package ``onnxruntime-ep-openvino`` (``pip install spanrt[openvino]``; it brings
its own OpenVINO libraries and works with the plain ``onnxruntime`` package, ONNX Runtime >= 1.23).
The session refuses to start when any node would fall back to the CPU execution provider, and
the provider it got is checked: no silent mix or substitution.

OpenVINO compiles kernels for each new input shape on first sight (measured: 5-20 ms extra on the
first call of a shape), so this backend pads every batch's length to a multiple of
``PAD_MULTIPLE`` tokens: at most 24 lengths per batch size up to 384, which ``warmup`` and the
first minutes of traffic cover. Padded positions are masked; answers do not change.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from engine.backends._host_session import HostSessionBackend
from engine.backends._ort import check_io, check_provider, import_onnxruntime, open_session, session_options
from engine.backends.base import default_threads, require_artifact
from engine.bundle import Bundle
from engine.errors import BackendUnavailableError

EP_NAME = "OpenVINOExecutionProvider"
PRECISIONS = ("bf16", "fp32")
# OpenVINO inference precision per SpanRT precision (the ONNX model is the bundle's FP32 one)
OV_PRECISION = {"bf16": "bf16", "fp32": "f32"}
PAD_MULTIPLE = 16
# Batch limits: the CPU backends' (base.py). `python -m bench shapes --backend onnxruntime-openvino
# --precision bf16` (2-core AMX Xeon, default model), us per padded token: 31 at 1 x 96, 24 at
# 2 x 96, 20 at 8 x 96, 19-21 from 8 x 160 to 32 x 160, 24-29 at 384 tokens; on the 300-question
# bench sample, budgets of 1,024 / 2,048 / 4,096 tokens (call cost 32 / 64 / 96) gave the same
# throughput within run-to-run noise (183-200 q/s at batch 32).
INSTALL_HINT = "pip install onnxruntime-ep-openvino (or: pip install 'spanrt[openvino]')"

_register_lock = threading.Lock()
_registered: set[str] = set()  # plugin libraries this process has registered (ONNX Runtime refuses a second time)


def import_plugin() -> Any:
    """The onnxruntime_ep_openvino module, or BackendUnavailableError saying how to install it."""
    try:
        import onnxruntime_ep_openvino
    except ImportError as e:
        raise BackendUnavailableError(f"backend 'onnxruntime-openvino' needs the OpenVINO execution provider plugin ({e}); "
                                      f"install it with: {INSTALL_HINT}") from e
    return onnxruntime_ep_openvino


def cpu_device(ort: Any, plugin: Any) -> Any:
    """The plugin's OrtEpDevice for the CPU, registering the plugin library once per process."""
    with _register_lock:
        # Registered once per process: on a CPU where the plugin offers no device (AMD), the device
        # list stays empty after registering, and a second registration is an ONNX Runtime error.
        if EP_NAME not in _registered and not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
            if not hasattr(ort, "register_execution_provider_library"):
                raise BackendUnavailableError(f"onnxruntime {ort.__version__} cannot load execution provider plugins "
                                              "(ONNX Runtime 1.23 or newer can): pip install -U onnxruntime")
            try:
                ort.register_execution_provider_library(EP_NAME, plugin.get_library_path())
            except Exception as e:  # onnxruntime raises its own pybind exception types
                if "already registered" not in str(e):
                    raise BackendUnavailableError(f"ONNX Runtime could not load the OpenVINO plugin "
                                                  f"{plugin.get_library_path()}: {e}") from e
        _registered.add(EP_NAME)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME and d.ep_metadata.get("ov_device") == "CPU"]
    if not devices:
        raise BackendUnavailableError(f"the OpenVINO plugin offers no CPU device here (devices: "
                                      f"{[(d.ep_name, dict(d.ep_metadata).get('ov_device')) for d in ort.get_ep_devices()]})")
    return devices[0]


def check_available() -> None:
    """Raise BackendUnavailableError unless the OpenVINO plugin is installed and offers this CPU as a
    device (it offers none on AMD CPUs)."""
    cpu_device(import_onnxruntime(), import_plugin())


def supports_bf16(device: Any) -> bool:
    """Whether OpenVINO computes BF16 natively on this CPU (AVX-512 BF16 or AMX)."""
    return "BF16" in str(device.ep_metadata.get("OPTIMIZATION_CAPABILITIES", "")).split()


class OnnxRuntimeOpenVINO(HostSessionBackend):
    """ONNX Runtime with the OpenVINO execution provider on the CPU, BF16 or FP32, whole graph."""

    name = "onnxruntime-openvino"
    FORMAT = "onnx"
    PRECISIONS = PRECISIONS
    COMPUTED_FROM = "fp32"  # OpenVINO's BF16 or FP32 on the bundle's FP32 graph
    # Only its BF16 beats ONNX Runtime's own CPU models (int8, fp32); its FP32 does not.
    AUTO_PRECISIONS = ("bf16",)
    AUTO_NOTE = "onnxruntime's CPU provider runs it faster"
    PROBES = (check_available,)
    pad_multiple = PAD_MULTIPLE

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        plugin = import_plugin()
        device = cpu_device(ort, plugin)
        bf16 = supports_bf16(device)
        precision = precision or ("bf16" if bf16 else "fp32")
        if precision not in PRECISIONS:
            raise BackendUnavailableError(
                f"backend 'onnxruntime-openvino' runs {' or '.join(PRECISIONS)} (from the bundle's fp32 model), not {precision}: "
                "use backend='onnxruntime' for the int8 model")
        if precision == "bf16" and not bf16:
            raise BackendUnavailableError(
                "backend 'onnxruntime-openvino' precision bf16 needs a CPU with native BF16 (AVX-512 BF16 or AMX); OpenVINO reports "
                f"{device.ep_metadata.get('OPTIMIZATION_CAPABILITIES')!r} here: use precision='fp32'")
        artifact = require_artifact(bundle, "onnx", "fp32", self.name)
        self.threads = threads or default_threads()
        # ONNX Runtime's own threads have nothing to run (no node may fall back to its CPU EP)
        so = session_options(ort, 1)
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        load_config = {"CPU": {"INFERENCE_NUM_THREADS": str(self.threads), "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                               "PERFORMANCE_HINT": "LATENCY"}}
        so.add_provider_for_devices([device], {"load_config": json.dumps(load_config)})
        self.session = open_session(ort, artifact, so, [], provider=EP_NAME)
        provider = check_provider(self.session, EP_NAME)
        self.input_dtypes = check_io(self.session, bundle, artifact)
        self.input_names = bundle.input_names
        self.precision = precision
        self.details = {"provider": provider, "openvino_device": "CPU", "inference_precision": OV_PRECISION[precision],
                        "file": artifact.path.name, "threads": self.threads, "performance_hint": "LATENCY",
                        "cpu_ep_fallback": False, "pad_multiple": self.pad_multiple, "max_batch_tokens": self.max_batch_tokens,
                        "call_cost_tokens": self.call_cost_tokens, "onnxruntime": ort.__version__,
                        "plugin": str(device.ep_metadata.get("version", "?"))}
