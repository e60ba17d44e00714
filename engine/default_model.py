"""The embedded default model: a MiniLM-L6 span model fine-tuned on SQuAD v1.1, shipped in the package.

The package ships the fine-tuned checkpoint (fp16 safetensors + config + tokenizer, see its
MODEL_CARD.md). The runtime only ever loads bundles, so the first call that needs the default
model builds its bundle with the project's own export stage and caches it in a per-user folder:
``$SPANRT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/spanrt`` or ``~/.cache/spanrt``. The cache
key is the checkpoint's sha256 and the export recipe's number, so a new shipped checkpoint or a
changed export recipe gets a new bundle.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from engine.errors import BackendUnavailableError, BundleError

DEFAULT_MODEL_NAME = "minilm-l6-squad1"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "models" / DEFAULT_MODEL_NAME
DEFAULT_PRECISIONS = ("fp32", "int8")
# Bumped whenever the export stage makes different files for the same checkpoint, so cached
# bundles from an older recipe are rebuilt. 2: CPU graphs without SkipLayerNormalization;
# 3: the native encoder's weights.
BUNDLE_RECIPE = 3
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


def default_bundle(*, checkpoint: str | Path | None = None, cache: str | Path | None = None, quiet: bool = False) -> Path:
    """The default model's bundle folder, built by the export stage on first use and cached.

    ``checkpoint`` and ``cache`` override the shipped checkpoint and the cache folder (tests).
    """
    ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint_dir()
    root = Path(cache) if cache is not None else cache_dir()
    target = root / "bundles" / f"{ckpt.name}-{checkpoint_sha256(ckpt)[:16]}-r{BUNDLE_RECIPE}"
    if (target / "manifest.json").is_file():
        return target
    missing = [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(
            f"the default model's bundle is not built yet and building it needs the export extras "
            f"(missing: {', '.join(missing)}). Install them with: {EXPORT_EXTRA_HINT}"
        )
    from export.pipeline import ExportOptions, export_bundle

    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / ".build.lock"):
        if (target / "manifest.json").is_file():  # another process built it while we waited
            return target
        if not quiet:
            print(f"spanrt: building the default model's bundle (once) into {target} ...", file=sys.stderr, flush=True)
        accuracy = MEASURED_ACCURACY if ckpt.resolve() == CHECKPOINT_DIR.resolve() else None
        export_bundle(ckpt, target, ExportOptions(precisions=DEFAULT_PRECISIONS, quiet=quiet, accuracy=accuracy))
    return target


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
