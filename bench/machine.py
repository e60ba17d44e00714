"""What a result was measured on: CPU, cores, GPU, package versions, git commit, peak RSS."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Packages whose versions go into every results.json (absent ones are recorded as None).
PACKAGES = (
    "spanrt", "numpy", "tokenizers", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "transformers",
    "optimum", "optimum-onnx", "tensorrt", "cuda-python", "safetensors", "matplotlib", "psutil",
)
REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores usable by this process (the default thread count of every system)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or usable, usable))


# The ISA features that decide int8/fp32 speed, as the report names them, and the flag the Linux
# kernel shows for each in /proc/cpuinfo ("flags" on x86-64, "Features" on aarch64).
ISA_FEATURES = {
    "x86_64": {"AMX-INT8": "amx_int8", "AMX-BF16": "amx_bf16", "AVX-512 VNNI": "avx512_vnni", "AVX-512 BF16": "avx512_bf16",
               "AVX-512F": "avx512f", "AVX-VNNI": "avx_vnni", "AVX2": "avx2", "FMA": "fma"},
    "aarch64": {"NEON": "asimd", "NEON dot product": "asimddp", "NEON i8mm": "i8mm", "BF16": "bf16", "SVE": "sve"},
}


def _cpuinfo_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _features() -> dict[str, str] | None:
    machine = platform.machine().lower()
    return ISA_FEATURES.get("x86_64" if machine in ("x86_64", "amd64") else "aarch64" if machine in ("aarch64", "arm64") else "")


def isa_features() -> dict[str, bool] | None:
    """{feature: present} for this CPU's architecture (AMX, AVX-512 VNNI/BF16, AVX-VNNI, AVX2; NEON dot/i8mm),
    or None where the OS does not say (no /proc/cpuinfo, another architecture)."""
    features, have = _features(), _cpuinfo_flags()
    return {name: flag in have for name, flag in features.items()} if features and have else None


def cpu_flags() -> list[str]:
    """The ISA features present, by their kernel flag names."""
    features, have = _features() or {}, _cpuinfo_flags()
    return [flag for flag in features.values() if flag in have]


def gpus() -> list[str]:
    """NVIDIA GPUs as ``nvidia-smi`` names them; empty when there is none (or no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU, OS and Python of this machine."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "isa_features": isa_features(),
        "architecture": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average"] = list(os.getloadavg())
    except (ImportError, OSError):
        pass
    return info


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter to the figures."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict[str, Any]:
    """The commit the bench ran from and whether the work tree had changes."""
    exe = shutil.which("git")
    if exe is None or not (REPO_ROOT / ".git").exists():
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str:
        return subprocess.run([exe, "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


class OtherCPUMeter:
    """CPU time that processes other than this one and its children used between start and ``share()``.

    System-wide busy CPU time (psutil) minus our own and our waited-for children's CPU time, as a
    share of all CPUs over the wall time: a measure of how disturbed the figures are.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._t0 = time.perf_counter()
        self._busy0 = self._busy()
        self._own0 = self._own()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    @staticmethod
    def _own() -> float:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def share(self) -> float:
        """Fraction (0..1) of the machine's CPU capacity used by other processes since creation."""
        wall = time.perf_counter() - self._t0
        other = (self._busy() - self._busy0) - (self._own() - self._own0)
        return max(0.0, other / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


def rss_mb() -> float:
    """This process's current resident set size, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20
