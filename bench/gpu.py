"""`python -m bench gpu`: the GPU check of the CUDA span-search kernel (device machine, no network).

1. builds engine._kernels with plain CMake (SPANRT_CUDA=ON, no pip) into a temporary folder;
2. runs the decoder tests (tests/test_decode.py and the cuda-marked tests/test_decode_cuda.py)
   against that build;
3. compares the kernel with the C++ decoder on 1,000 random batches (spans and scores bit for
   bit, log-sum-exps to float32 rounding);
4. times, at B = 1, 32, 256 and S = 384 (L = 30, k = 1 and 20): the kernel (results copied back,
   and kept on the device with `out=`), "copy logits to host + C++ decode", and a torch-on-GPU
   decode (outer sum + band mask + topk);
and writes everything as JSON (--out). Needs torch with CUDA (present on the device image); takes
1-3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Runs `command`, appending its output to `log`; returns the exit status."""
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        return subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode


def build(work: Path, log: Path, architectures: str | None) -> Path:
    """Configures and builds with CMake; returns a site folder holding engine/ with the module."""
    import pybind11

    build_dir = work / "build"
    configure = [
        "cmake", "-S", str(REPO), "-B", str(build_dir), "-DSPANRT_CUDA=ON", "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
    ]
    if architectures:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={architectures}")
    if _run(configure, log) != 0 or _run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 4)], log) != 0:
        raise SystemExit(f"CMake build failed; see {log}")
    site = work / "site"
    shutil.copytree(REPO / "engine", site / "engine", ignore=shutil.ignore_patterns("_kernels*.so", "__pycache__"))
    if _run(["cmake", "--install", str(build_dir), "--prefix", str(site)], log) != 0:
        raise SystemExit(f"CMake install failed; see {log}")
    return site


def isolated_env(site: Path) -> dict[str, str]:
    """Environment for `python -S` children: engine from `site`, bench from the repository, the
    installed packages from site-packages (skipping .pth import hooks of an editable install)."""
    paths = sysconfig.get_paths()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), paths["purelib"], paths["platlib"]])
    return env


# ---- the worker (runs in the isolated child) ---------------------------------------------------


def _torch_decode(torch: Any, start: Any, end: Any, mask: Any, band: Any, top_k: int) -> tuple[Any, Any]:
    """A straightforward torch-on-GPU decode: outer sum, band + mask, topk; results to the host."""
    seq_len = start.shape[1]
    scores = start[:, :, None] + end[:, None, :]
    valid = band[None] & mask[:, :, None] & mask[:, None, :]
    flat = torch.where(valid, scores, torch.tensor(float("-inf"), device=scores.device)).flatten(1)
    values, index = torch.topk(flat, top_k, dim=1)
    spans = torch.stack((index // seq_len, index % seq_len), dim=-1)
    return spans.cpu(), values.cpu()


def _median_seconds(function: Any, synchronize: Any, iterations: int) -> float:
    for _ in range(3):
        function()
    synchronize()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(batches: int, seed: int) -> dict[str, Any]:
    """Kernel-vs-C++ comparison and timings; returns the JSON-ready figures."""
    import numpy as np
    import torch

    from bench.decode import realistic_logits
    from engine import _kernels
    from engine.decode import SpanSearchResult, span_search
    from engine.options import DEFAULTS

    assert _kernels.WITH_CUDA, "engine._kernels was built without CUDA"
    rng = np.random.default_rng(seed)
    mismatches: list[str] = []
    max_lse_error = 0.0
    t0 = time.perf_counter()
    for index in range(batches):
        batch = int(rng.integers(1, 65))
        seq_len = int(rng.choice([rng.integers(1, 33), rng.integers(33, 513)]))
        max_answer_len = int(rng.integers(1, seq_len + 11))
        top_k = int(rng.choice([1, rng.integers(1, 26), rng.integers(1, 200)]))
        dtype = np.float16 if rng.random() < 0.3 else np.float32
        shape = (batch, seq_len)
        if rng.random() < 0.4:  # ties
            start, end = rng.integers(-3, 4, (2, *shape)).astype(dtype)
        else:
            start, end = rng.normal(0, 4, (2, *shape)).astype(dtype)
        start[rng.random(shape) < 0.05] = -np.inf
        end[rng.random(shape) < 0.05] = -np.inf
        mask = rng.random(shape) < rng.uniform(0.0, 1.0)
        options = dict(max_answer_len=max_answer_len, top_k=top_k, return_lse=True, return_null=True)
        gpu = span_search(torch.from_numpy(start).cuda(), torch.from_numpy(end).cuda(), torch.from_numpy(mask).cuda(), **options)
        cpu = span_search(start, end, mask, **options)
        same = (np.array_equal(gpu.spans, cpu.spans)
                and np.array_equal(gpu.scores.view(np.uint32), cpu.scores.view(np.uint32))
                and np.array_equal(gpu.null_scores.view(np.uint32), cpu.null_scores.view(np.uint32)))
        with np.errstate(invalid="ignore"):
            for name in ("start_lse", "end_lse"):
                g, c = getattr(gpu, name), getattr(cpu, name)
                finite = np.isfinite(c)
                same &= bool(np.array_equal(np.isfinite(g), finite) and np.array_equal(g[~finite], c[~finite]))
                if finite.any():
                    error = float(np.max(np.abs(g[finite] - c[finite]) / np.maximum(1.0, np.abs(c[finite]))))
                    max_lse_error = max(max_lse_error, error)
                    same &= error <= 2e-6
        if not same:
            mismatches.append(f"batch {index}: B={batch} S={seq_len} L={max_answer_len} k={top_k} {np.dtype(dtype).name}")
    compare_seconds = time.perf_counter() - t0

    timings = []
    sync = torch.cuda.synchronize
    max_len = DEFAULTS.max_answer_len  # span_search's default, which the timed calls use
    for batch in (1, 32, 256):
        start, end, mask = realistic_logits(batch, 384, 300, seed=batch)
        d_start, d_end, d_mask = (torch.from_numpy(a).cuda() for a in (start, end, mask))
        positions = torch.arange(384, device="cuda")
        band = (positions[None, :] >= positions[:, None]) & (positions[None, :] - positions[:, None] < max_len)
        for top_k in (1, 20):
            out = SpanSearchResult(torch.empty((batch, top_k, 2), dtype=torch.int64, device="cuda"),
                                   torch.empty((batch, top_k), dtype=torch.float32, device="cuda"))
            reference = span_search(start, end, mask, top_k=top_k)
            assert np.array_equal(span_search(d_start, d_end, d_mask, top_k=top_k)[0], reference[0])
            row = {"batch": batch, "seq_len": 384, "max_answer_len": max_len, "top_k": top_k}
            candidates = {
                "kernel_results_to_host": lambda: span_search(d_start, d_end, d_mask, top_k=top_k),
                "kernel_results_on_device": lambda: span_search(d_start, d_end, d_mask, top_k=top_k, out=out),
                "host_copy_plus_cpp": lambda: span_search(d_start.cpu().numpy(), d_end.cpu().numpy(), d_mask.cpu().numpy(), top_k=top_k),
                "torch_gpu_decode": lambda: _torch_decode(torch, d_start, d_end, d_mask, band, top_k),
            }
            for name, function in candidates.items():
                row[f"{name}_us"] = 1e6 * _median_seconds(function, sync, 50 if batch < 256 else 20)
            row["speedup_vs_host_copy_plus_cpp"] = row["host_copy_plus_cpp_us"] / row["kernel_results_to_host_us"]
            row["speedup_vs_torch_gpu_decode"] = row["torch_gpu_decode_us"] / row["kernel_results_to_host_us"]
            timings.append(row)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda_architectures": _kernels.CUDA_ARCHITECTURES,
        "comparison": {"batches": batches, "mismatches": mismatches[:20], "mismatch_count": len(mismatches),
                       "max_lse_relative_error": max_lse_error, "seconds": compare_seconds},
        "timings": timings,
    }


# ---- the driver ----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json", help="JSON result")
    parser.add_argument("--batches", type=int, default=1000, help="random batches compared with the C++ decoder")
    parser.add_argument("--cuda-architectures", help="CMAKE_CUDA_ARCHITECTURES (default: the project's 87;90)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: build and run the tests (CUDA ones skip), no comparison or timings")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # inside the isolated child: print the figures as JSON
        print(json.dumps(worker(args.batches, args.seed)))
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("needs an NVIDIA GPU and torch with CUDA (use --dry-run to check the build and tests only)")

    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".log")
    log.write_text("")
    result: dict[str, Any] = {"ok": False}
    with tempfile.TemporaryDirectory(prefix="spanrt-gpu-") as temporary:
        work = Path(temporary)
        t0 = time.perf_counter()
        site = build(work, log, args.cuda_architectures)
        result["build_seconds"] = time.perf_counter() - t0
        env = isolated_env(site)
        check = [sys.executable, "-S", "-c",
                 "import engine._kernels as k, sys; assert k.WITH_CUDA, k.__file__; "
                 f"assert k.__file__.startswith({str(site)!r}), 'wrong module: ' + k.__file__"]
        if _run(check, log, cwd=site, env=env) != 0:
            raise SystemExit(f"the freshly built module is not the one imported; see {log}")

        t0 = time.perf_counter()
        tests = [sys.executable, "-S", "-m", "pytest", str(REPO / "tests" / "test_decode.py"),
                 str(REPO / "tests" / "test_decode_cuda.py"), "-q", "-rs", "-p", "no:cacheprovider",
                 f"--junitxml={work / 'junit.xml'}"]
        result["tests_exit_code"] = _run(tests, log, cwd=site, env=env)
        result["tests_seconds"] = time.perf_counter() - t0
        result["tests"] = _junit_summary(work / "junit.xml")

        if args.dry_run:
            result["total_seconds"] = time.perf_counter() - started
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
            return 0 if result["tests_exit_code"] == 0 else 1
        child = subprocess.run(
            [sys.executable, "-S", "-m", "bench", "gpu", "--worker", "--batches", str(args.batches), "--seed", str(args.seed)],
            cwd=site, env=env, capture_output=True, text=True, check=False,
        )
        with log.open("a") as handle:
            handle.write(child.stderr)
        if child.returncode != 0:
            result["worker_error"] = child.stderr[-4000:]
        else:
            result.update(json.loads(child.stdout.strip().splitlines()[-1]))
    result["total_seconds"] = time.perf_counter() - started
    result["ok"] = (result.get("tests_exit_code") == 0 and result["tests"].get("cuda_tests_run", 0) >= 10
                    and "worker_error" not in result and result.get("comparison", {}).get("mismatch_count") == 0)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "timings"}, indent=2))
    for row in result.get("timings", []):
        print(f"B={row['batch']:>3} k={row['top_k']:>2}: kernel {row['kernel_results_to_host_us']:8.1f} us "
              f"(on device {row['kernel_results_on_device_us']:8.1f}), host copy + C++ {row['host_copy_plus_cpp_us']:8.1f} us, "
              f"torch GPU {row['torch_gpu_decode_us']:8.1f} us")
    print(f"written: {args.out} (log {log})")
    return 0 if result["ok"] else 1


def _junit_summary(path: Path) -> dict[str, Any]:
    """Counts of the pytest run, the CUDA tests that ran, and why tests were skipped."""
    import xml.etree.ElementTree as ElementTree

    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    summary: dict[str, Any] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    cases = suite.iter("testcase")
    skipped = {(c.get("classname", ""), c.get("name", "")): c.find("skipped") for c in cases}
    summary["cuda_tests_run"] = sum(1 for (cls, _), s in skipped.items() if cls.endswith("test_decode_cuda") and s is None)
    summary["skip_reasons"] = sorted({s.get("message", "") for s in skipped.values() if s is not None})
    return summary
