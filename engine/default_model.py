"""The embedded default model: a MiniLM-L6 span model fine-tuned on SQuAD v1.1, shipped in the package.

The package ships the fine-tuned checkpoint (fp16 safetensors + config + tokenizer, see its
MODEL_CARD.md). The runtime only ever loads bundles, so the first call that needs the default
model builds one and caches it in a per-user folder: ``$SPANRT_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/spanrt`` or ``~/.cache/spanrt``, keyed by the checkpoint's sha256 and a recipe
number, so a new shipped checkpoint or a changed recipe gets a new bundle. Two bundles:

- the native bundle (:func:`default_native_bundle`): tokenizer + the native encoder's weights,
  built in about a second from the safetensors with NumPy, safetensors and tokenizers only
  (engine/native_bundle.py). ``backend="auto"`` uses it wherever the native encoder has a tuned
  path for this CPU (and ``backend="native"`` always), so ``pip install spanrt`` answers with no
  torch, transformers or onnx installed;
- the full bundle (:func:`default_bundle`): every ONNX graph too, built by the export stage
  (``python -m export``, in a subprocess: engine/ never imports export/) when an ONNX backend is
  asked for or the CPU has no tuned native path. It needs the export extras.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from engine.errors import BackendUnavailableError, BundleError

DEFAULT_MODEL_NAME = "minilm-l6-squad1"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "models" / DEFAULT_MODEL_NAME
DEFAULT_PRECISIONS = ("fp32", "int8")
# Bumped whenever the export stage makes different files for the same checkpoint, so cached
# bundles from an older recipe are rebuilt. 2: CPU graphs without SkipLayerNormalization;
# 3: the native encoder's weights; 4: its verification on every CPU path, built by the export CLI.
BUNDLE_RECIPE = 4
# The same for the native bundle (engine/native_bundle.py).
NATIVE_RECIPE = 1
# Measured on all 10,570 SQuAD v1.1 dev questions, official scoring (MODEL_CARD.md), recorded in the manifest.
MEASURED_ACCURACY = {
    "data": "SQuAD v1.1 dev, 10,570 questions, official scoring",
    "fp32": {"exact_match": 70.99, "f1": 80.74, "backend": "onnxruntime-cpu"},
    "int8": {"exact_match": 70.75, "f1": 80.51, "backend": "onnxruntime-cpu"},
    "native_int8": {"exact_match": 70.85, "f1": 80.74, "backend": "native"},
    "native_fp32": {"exact_match": 70.99, "f1": 80.74, "backend": "native"},
    "pytorch_fp32": {"exact_match": 71.00, "f1": 80.75, "runtime": "transformers 4.57.6 question-answering pipeline"},
}
EXPORT_MODULES = ("torch", "transformers", "onnx", "safetensors")
EXPORT_EXTRA_HINT = 'pip install "spanrt[export]"  (on CPU-only machines: pip install torch==2.13.0 first)'


def default_checkpoint_dir() -> Path:
    """The shipped Hugging Face checkpoint folder of the default model (for peers and export)."""
    if not (CHECKPOINT_DIR / "model.safetensors").is_file():
        raise BundleError(f"the default model's weights are missing from {CHECKPOINT_DIR}: reinstall spanrt")
    return CHECKPOINT_DIR


def cache_dir() -> Path:
    """Where built bundles are cached: $SPANRT_CACHE_DIR, else $XDG_CACHE_HOME/spanrt or ~/.cache/spanrt."""
    env = os.environ.get("SPANRT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "spanrt"


def checkpoint_sha256(checkpoint: Path) -> str:
    """sha256 over the checkpoint's weights and config (memoised per file size and mtime)."""
    parts = [checkpoint / "model.safetensors", checkpoint / "config.json"]
    return _sha256_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in parts))


@lru_cache(maxsize=8)
def _sha256_files(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _target(checkpoint: str | Path | None, cache: str | Path | None, kind: str) -> tuple[Path, Path, Path]:
    """(checkpoint, cache root, bundle folder) of a default-model bundle of ``kind``."""
    ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint_dir()
    root = Path(cache) if cache is not None else cache_dir()
    return ckpt, root, root / "bundles" / f"{ckpt.name}-{checkpoint_sha256(ckpt)[:16]}-{kind}"


def _measured(ckpt: Path, keys: tuple[str, ...] | None = None) -> dict[str, object] | None:
    """The shipped model's measured accuracy (for its own checkpoint only), limited to ``keys``."""
    if ckpt.resolve() != CHECKPOINT_DIR.resolve():
        return None
    return {k: v for k, v in MEASURED_ACCURACY.items() if keys is None or k in keys}


def default_native_bundle(*, checkpoint: str | Path | None = None, cache: str | Path | None = None, quiet: bool = False) -> Path:
    """The default model's native bundle (tokenizer + native encoder weights), built on first use
    from the shipped safetensors without PyTorch (about a second) and cached.

    ``checkpoint`` and ``cache`` override the shipped checkpoint and the cache folder (tests)."""
    ckpt, root, target = _target(checkpoint, cache, f"native-r{NATIVE_RECIPE}")
    if (target / "manifest.json").is_file():
        return target
    from engine.native_bundle import build_native_bundle

    accuracy = _measured(ckpt, ("data", "native_int8", "native_fp32", "pytorch_fp32"))
    return _build_once(root, target, "native bundle", quiet, lambda: build_native_bundle(ckpt, target, accuracy=accuracy))


def default_bundle(*, checkpoint: str | Path | None = None, cache: str | Path | None = None, quiet: bool = False) -> Path:
    """The default model's full bundle (ONNX graphs and native weights), built on first use by the
    export stage (``python -m export``, in a subprocess) and cached. Needs the export extras.

    ``checkpoint`` and ``cache`` override the shipped checkpoint and the cache folder (tests).
    """
    ckpt, root, target = _target(checkpoint, cache, f"r{BUNDLE_RECIPE}")
    if (target / "manifest.json").is_file():
        return target
    missing = [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(
            f"the default model's ONNX bundle is not built yet and building it needs the export extras "
            f"(missing: {', '.join(missing)}). Install them with: {EXPORT_EXTRA_HINT}"
        )
    return _build_once(root, target, "bundle", quiet, lambda: _export(ckpt, target, quiet=quiet))


def _build_once(root: Path, target: Path, what: str, quiet: bool, build: Callable[[], object]) -> Path:
    """Build ``target`` under the cache's lock, unless another process built it while we waited."""
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / ".build.lock"):
        if not (target / "manifest.json").is_file():
            if not quiet:
                print(f"spanrt: building the default model's {what} (once) into {target} ...", file=sys.stderr, flush=True)
            build()
    return target


def _export(ckpt: Path, target: Path, *, quiet: bool) -> None:
    """Run ``python -m export`` into a temporary folder beside ``target``, record the measured
    accuracy in its manifest, then rename it into place (the caller holds the build lock)."""
    from engine.bundle import load_bundle, load_manifest
    from engine.bundle_writer import write_manifest

    tmp = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "export", str(ckpt), "--out", str(tmp), "--precisions", ",".join(DEFAULT_PRECISIONS)]
    if quiet:
        cmd.append("--quiet")
    # The export package sits beside engine/ (one distribution); the child must find this copy.
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-15:]
            raise BundleError(f"building the default model's bundle failed (python -m export exited with {proc.returncode})"
                              + (":\n  " + "\n  ".join(tail) if tail else "; its messages are above"))
        accuracy = _measured(ckpt)
        if accuracy:
            write_manifest(tmp, replace(load_manifest(tmp), accuracy=accuracy))
        load_bundle(tmp, verify=False)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def uses_native_bundle(backend: str, precision: str | None) -> bool:
    """Whether the default model runs from its native bundle for this backend and precision:
    ``backend="native"`` always; ``"auto"`` for int8/fp32 where the native encoder has a path
    "auto" uses on this CPU (engine.backends.native.auto_skip_reason) and no GPU backend is
    installed (auto prefers those, and they need the ONNX bundle)."""
    if backend == "native":
        return True
    from engine.backends.native import NativeCPU, auto_skip_reason

    if backend != "auto" or precision not in (None, *NativeCPU.AUTO_PRECISIONS):  # native's bf16 only when asked for
        return False

    try:
        if auto_skip_reason() is not None:
            return False
    except BackendUnavailableError:
        return False
    return not _gpu_backend_installed()


def _gpu_backend_installed() -> bool:
    """ONNX Runtime with the CUDA/TensorRT providers, or TensorRT, is installed ("auto" tries them first)."""
    if importlib.util.find_spec("tensorrt") is not None:
        return True
    try:
        import onnxruntime
    except ImportError:
        return False
    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()))


def bundle_for(backend: str, precision: str | None) -> Path:
    """The default model's bundle for this backend and precision: the native one where it serves
    (``uses_native_bundle``), else the full one."""
    return default_native_bundle() if uses_native_bundle(backend, precision) else default_bundle()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
