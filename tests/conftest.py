"""Shared pytest set-up: hypothesis profiles, and the `cuda` marker's skip rule and device arrays.

Tests marked `cuda` run only where engine._kernels was built with CUDA and a GPU is reachable
through torch or CuPy; elsewhere they are skipped with the reason. The `device` fixture moves
NumPy arrays to the GPU (torch first, then CuPy) and back.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# CI: fewer examples and a fixed seed sequence (no flaky runs); locally: hypothesis' defaults.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None)
settings.register_profile("thorough", max_examples=3000, deadline=None)  # HYPOTHESIS_PROFILE=thorough
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


class DeviceArrays:
    """Moves NumPy arrays to the GPU and back with one array library (torch or CuPy)."""

    def __init__(self, library: str) -> None:
        self.library = library

    def put(self, array: np.ndarray) -> Any:
        """A C-contiguous device copy of `array` (same dtype) exposing __cuda_array_interface__."""
        if self.library == "torch":
            import torch

            return torch.from_numpy(np.array(array, order="C", copy=True)).to("cuda")
        import cupy

        return cupy.asarray(np.array(array, order="C", copy=True))

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised device array."""
        if self.library == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda")
        import cupy

        return cupy.empty(shape, dtype=dtype)

    def get(self, array: Any) -> np.ndarray:
        """A NumPy copy of a device array."""
        if self.library == "torch":
            return array.cpu().numpy()
        return array.get()

    def synchronize(self) -> None:
        if self.library == "torch":
            import torch

            torch.cuda.synchronize()
        else:
            import cupy

            cupy.cuda.runtime.deviceSynchronize()


@functools.cache
def _cuda_setup() -> tuple[DeviceArrays | None, str]:
    """(device arrays, "") where CUDA tests can run, else (None, why not)."""
    try:
        from engine import _kernels
    except ImportError as error:
        return None, f"engine._kernels is not built ({error})"
    if not _kernels.WITH_CUDA:
        return None, "engine._kernels was built without CUDA (SPANRT_CUDA=OFF or no nvcc)"
    try:  # no driver, no GPU: decided without importing torch (seconds)
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "no NVIDIA driver (libcuda.so.1) on this machine"
    try:
        import torch

        if torch.cuda.is_available():
            return DeviceArrays("torch"), ""
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return DeviceArrays("cupy"), ""
    except (ImportError, RuntimeError):  # CuPy's CUDARuntimeError is a RuntimeError
        pass
    return None, "no CUDA GPU reachable through torch or CuPy"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None:
        arrays, reason = _cuda_setup()
        if arrays is None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def device() -> DeviceArrays:
    """Device-array helpers for `cuda`-marked tests."""
    arrays, reason = _cuda_setup()
    if arrays is None:
        pytest.skip(reason)
    return arrays
