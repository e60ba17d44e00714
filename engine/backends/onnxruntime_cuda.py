"""ONNX Runtime with the CUDA execution provider: FP16 (or FP32) on an NVIDIA GPU.

Inputs are bound from host memory, outputs are bound to the GPU (I/O binding), so the logits stay
on the device and the CUDA span-search kernel reads them there; only the top-k spans come back.
Needs the onnxruntime-gpu package (which replaces onnxruntime, see README). The provider the
session actually got is checked: ONNX Runtime silently drops to the CPU when CUDA cannot start,
and we refuse that instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.backends._cuda_arrays import DeviceArray
from engine.backends._ort import check_io, check_provider, import_onnxruntime, open_session, session_options
from engine.backends.base import Backend, Consume, T, default_threads, require_artifact
from engine.bundle import Bundle
from engine.errors import BackendUnavailableError

PRECISIONS = ("fp16", "fp32")
_TYPESTR = {"tensor(float)": "<f4", "tensor(float16)": "<f2", "tensor(uint8)": "|u1", "tensor(bool)": "|b1"}


def ortvalue_view(value: Any) -> DeviceArray:
    """The device array of an OrtValue that lives on a CUDA device."""
    typestr = _TYPESTR.get(value.data_type())
    if typestr is None:
        raise BackendUnavailableError(f"ONNX Runtime CUDA output of type {value.data_type()} is not supported by the decoder")
    return DeviceArray(value.data_ptr(), tuple(value.shape()), typestr, None, value)


def check_available() -> None:
    """Raise BackendUnavailableError unless onnxruntime-gpu with the CUDA provider is installed."""
    ort = import_onnxruntime()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailableError(
            "backend 'onnxruntime-cuda' needs the onnxruntime-gpu package (CUDAExecutionProvider is not available in "
            f"onnxruntime {ort.__version__}, providers: {ort.get_available_providers()}); see README, 'GPU install'")


class OnnxRuntimeCUDA(Backend):
    """ONNX Runtime CUDAExecutionProvider with I/O binding; logits stay on the GPU."""

    name = "onnxruntime-cuda"
    device = "cuda"
    FORMAT = "onnx"
    PRECISIONS = PRECISIONS
    PROBES = (check_available,)
    OPTIONS = ("threads", "device_id")

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None, device_id: int = 0) -> None:
        check_available()
        ort = import_onnxruntime()
        precision = precision or self.default_precision(bundle)
        if precision not in PRECISIONS:
            raise BackendUnavailableError(
                f"backend 'onnxruntime-cuda' runs {' or '.join(PRECISIONS)}, not {precision} "
                "(dynamic INT8 ops run on the CPU there): use backend='tensorrt' for int8 on a GPU, or 'onnxruntime' on the CPU")
        artifact = require_artifact(bundle, "onnx", precision, self.name)
        self.threads = threads or default_threads()
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = open_session(ort, artifact, session_options(ort, self.threads), providers)
        provider = check_provider(self.session, "CUDAExecutionProvider",
                                  f"check GPU {device_id}, and the NVIDIA driver, CUDA and cuDNN versions that onnxruntime-gpu needs")
        self.input_dtypes = check_io(self.session, bundle, artifact)
        self.input_names = bundle.input_names
        self.precision = precision
        self.device_id = device_id
        self._ort = ort
        self.details = {"provider": provider, "device_id": device_id, "file": artifact.path.name, "io_binding": True,
                        "onnxruntime": ort.__version__}

    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Bind host inputs and device outputs, run, and pass device views of the logits on."""
        io = self.session.io_binding()
        for name, array in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(array))
        io.bind_output("start_logits", "cuda", self.device_id)
        io.bind_output("end_logits", "cuda", self.device_id)
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        start, end = io.get_outputs()
        # ONNX Runtime synchronised its stream above, so the default stream (0) may read them.
        return consume(ortvalue_view(start), ortvalue_view(end), 0)

    def to_device(self, array: np.ndarray) -> Any:
        """Copy ``array`` (the context mask) to this backend's GPU."""
        value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)
        typestr = np.dtype(array.dtype).str
        return DeviceArray(value.data_ptr(), array.shape, typestr, None, value)

    def close(self) -> None:
        """Drop the session (and its GPU memory)."""
        self.session = None
