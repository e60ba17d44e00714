"""TensorRT 10: serialized FP16/INT8 engines (``.plan``) from the bundle, on an NVIDIA GPU.

Written against the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``) and
cuda-python for device memory and the stream. Not executable on the machines this project is
developed on (no GPU): see README. A plan is only valid for the TensorRT version and GPU it was
built for; that is checked before deserializing (engine.bundle.check_tensorrt_plan).

One execution context serves all threads behind a lock (a context holds one optimization profile
and one set of bound buffers at a time); the logits stay in device buffers and the CUDA span
decoder reads them on the same stream while the lock is held.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.backends._cuda_arrays import DeviceArray
from engine.backends.base import Backend, Consume, T, require_artifact
from engine.bundle import Bundle, check_tensorrt_plan
from engine.errors import BackendUnavailableError, BundleError

PRECISIONS = ("fp16", "int8", "fp32")


def import_tensorrt() -> Any:
    """The tensorrt module, or BackendUnavailableError saying how to install it."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend 'tensorrt' needs TensorRT 10 ({e}): pip install 'spanrt[tensorrt]' on x86_64, JetPack on Jetson") from e
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime module (new and old layouts), or BackendUnavailableError."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise BackendUnavailableError(f"backend 'tensorrt' needs cuda-python ({e}): pip install cuda-python") from e
    return cudart


def cuda_check(cudart: Any, result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; a CUDA error raises RuntimeError."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class TensorRT(Backend):
    """A TensorRT engine with device buffers sized for its largest profile."""

    name = "tensorrt"
    device = "cuda"
    FORMAT = "tensorrt"
    PRECISIONS = PRECISIONS
    AUTO_SKIPS_BUNDLE_ERRORS = True  # a plan for another GPU or TensorRT version: "auto" moves on, loudly
    MISSING_FIX = "build one on this GPU with python -m export build-trt {bundle}"
    PROBES = (import_tensorrt, import_cudart)
    OPTIONS = ("threads", "device_id")

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None, device_id: int = 0) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        self._cudart = cudart
        precision = precision or self.default_precision(bundle)
        artifact = require_artifact(bundle, "tensorrt", precision, self.name)
        try:
            cuda_check(cudart, cudart.cudaSetDevice(device_id))
            props = cuda_check(cudart, cudart.cudaGetDeviceProperties(device_id))
        except RuntimeError as e:
            raise BackendUnavailableError(f"backend 'tensorrt' cannot use CUDA device {device_id}: {e}") from e
        check_tensorrt_plan(artifact, tensorrt_version=trt.__version__, compute_capability=(props.major, props.minor))
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(artifact.path.read_bytes())
        if engine is None:
            raise BundleError(f"bundle {bundle.root}: {artifact.path.name}: TensorRT cannot deserialize the plan. "
                              f"Fix: rebuild it here with python -m export build-trt {bundle.root} --force")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if set(inputs) != set(bundle.input_names) or not {"start_logits", "end_logits"} <= set(outputs):
            raise BundleError(f"bundle {bundle.root}: {artifact.path.name} has inputs {inputs} and outputs {outputs}, "
                              f"the manifest says {bundle.input_names}. Fix: rebuild the plan")
        self._engine = engine
        self.input_names = bundle.input_names
        self.input_dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in inputs}
        self._out_typestr = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))).str for n in ("start_logits", "end_logits")}
        # (min batch, max batch, min seq, max seq) of each optimization profile
        self._profiles = []
        for p in range(engine.num_optimization_profiles):
            lo, _, hi = engine.get_tensor_profile_shape("input_ids", p)
            self._profiles.append((lo[0], hi[0], lo[1], hi[1]))
        self.max_batch_size = max(p[1] for p in self._profiles)
        self.max_seq_len = max(p[3] for p in self._profiles)
        self._context = engine.create_execution_context()
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate())
        cells = self.max_batch_size * self.max_seq_len
        self._buffers: dict[str, int] = {}
        for n in inputs + ["start_logits", "end_logits"]:
            itemsize = np.dtype(trt.nptype(engine.get_tensor_dtype(n))).itemsize
            self._buffers[n] = int(cuda_check(cudart, cudart.cudaMalloc(cells * itemsize)))
            self._context.set_tensor_address(n, self._buffers[n])
        self._mask = int(cuda_check(cudart, cudart.cudaMalloc(cells)))
        self._profile = -1
        self._lock = threading.Lock()
        self.precision = precision
        self.device_id = device_id
        self.details = {"file": artifact.path.name, "tensorrt": trt.__version__, "device_id": device_id,
                        "compute_capability": f"{props.major}.{props.minor}", "profiles": self._profiles,
                        "execution_contexts": 1}

    def _pick_profile(self, batch: int, seq: int) -> int:
        for i, (b0, b1, s0, s1) in enumerate(self._profiles):
            if b0 <= batch <= b1 and s0 <= seq <= s1:
                return i
        raise BackendUnavailableError(f"no TensorRT profile covers batch {batch} x {seq} tokens (profiles: {self._profiles}); "
                                      "rebuild the plan with a wider profile, or lower max_batch_size / max_seq_len")

    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Copy inputs in, execute on the stream, and decode on the device while holding the lock."""
        cudart = self._cudart
        batch, seq = feeds["input_ids"].shape
        with self._lock:
            if self._context is None:
                raise RuntimeError("TensorRT backend is closed")
            profile = self._pick_profile(batch, seq)
            if profile != self._profile:
                self._context.set_optimization_profile_async(profile, self._stream)
                self._profile = profile
            for name in self.input_names:
                array = np.ascontiguousarray(feeds[name], dtype=self.input_dtypes[name])
                cuda_check(cudart, cudart.cudaMemcpyAsync(self._buffers[name], array.ctypes.data, array.nbytes,
                                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
                self._context.set_input_shape(name, (batch, seq))
            if not self._context.execute_async_v3(int(self._stream)):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for batch {batch} x {seq}")
            stream = int(self._stream)
            start = DeviceArray(self._buffers["start_logits"], (batch, seq), self._out_typestr["start_logits"], stream, self)
            end = DeviceArray(self._buffers["end_logits"], (batch, seq), self._out_typestr["end_logits"], stream, self)
            return consume(start, end, stream)

    def to_device(self, array: np.ndarray) -> Any:
        """Copy the context mask into the device mask buffer on the stream (called inside ``run``)."""
        host = np.ascontiguousarray(array, dtype=np.uint8)
        cuda_check(self._cudart, self._cudart.cudaMemcpyAsync(self._mask, host.ctypes.data, host.nbytes,
                                                              self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
        return DeviceArray(self._mask, host.shape, "|u1", int(self._stream), self)

    def close(self) -> None:
        """Free the device buffers, the stream and the engine."""
        with self._lock:
            if self._context is None:
                return
            cudart = self._cudart
            cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream))
            for ptr in [*self._buffers.values(), self._mask]:
                cuda_check(cudart, cudart.cudaFree(ptr))
            cuda_check(cudart, cudart.cudaStreamDestroy(self._stream))
            self._context = None
            self._engine = None
