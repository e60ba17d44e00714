"""What each system loads: resolve ``--model`` to a checkpoint and a bundle, and build exports before timing.

``--model`` may be a SpanRT bundle folder (manifest.json) or a Hugging Face checkpoint folder
(config.json); without it the embedded default model is used. The peers need the checkpoint, SpanRT
needs a bundle: a bundle's checkpoint is found through its manifest's ``source.path``, and a
checkpoint's bundle is built by the export stage and cached (engine.default_model). Preparation
runs in its own process, so the export's memory is not counted against any system.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.base import Artifacts, SystemUnavailable
from bench.systems import SYSTEMS_BY_NAME, SystemSpec


@dataclass(frozen=True)
class ModelSource:
    """The model a run asks about: a checkpoint (peers), a bundle or the checkpoint to build one (SpanRT)."""

    label: str
    checkpoint: Path | None
    bundle: Path | None
    checkpoint_missing: str | None = None  # why there is no checkpoint for the peers


def resolve_model(model: str | Path | None) -> ModelSource:
    """Interpret ``--model`` (None: the embedded default model)."""
    if model is None:
        from engine.default_model import DEFAULT_MODEL_NAME, default_checkpoint_dir

        return ModelSource(label=f"default model ({DEFAULT_MODEL_NAME})", checkpoint=default_checkpoint_dir(), bundle=None)
    path = Path(model).expanduser().resolve()
    if (path / "manifest.json").is_file():
        from engine.bundle import load_bundle

        src = (load_bundle(path, verify=False).manifest.source or {}).get("path")
        ckpt = None if not isinstance(src, str) or not src else (Path(src) if Path(src).is_absolute() else path / src)
        if ckpt is not None and (ckpt / "config.json").is_file():
            return ModelSource(label=str(path), checkpoint=ckpt, bundle=path)
        return ModelSource(label=str(path), checkpoint=None, bundle=path,
                           checkpoint_missing=f"the bundle's source checkpoint {src!r} is not on this machine; the peers need a "
                                              "Hugging Face checkpoint: pass --model CHECKPOINT_DIR instead of the bundle")
    if (path / "config.json").is_file():
        return ModelSource(label=str(path), checkpoint=path, bundle=None)
    raise ValueError(f"--model {model}: neither a SpanRT bundle (no manifest.json) nor a Hugging Face checkpoint (no config.json)")


def prepare_one(spec: SystemSpec, source: ModelSource) -> Artifacts:
    """Build (or find in the cache) what ``spec`` loads; raises SystemUnavailable with the reason."""
    from engine.default_model import cache_dir

    t0 = time.perf_counter()
    if spec.family == "peer":
        if source.checkpoint is None:
            raise SystemUnavailable(source.checkpoint_missing or "no Hugging Face checkpoint")
        if spec.backend == "pytorch":
            return Artifacts(checkpoint=source.checkpoint)
        if spec.backend == "ctranslate2":
            from bench.ct2 import ct2_model

            try:
                model_dir = ct2_model(source.checkpoint, cache_dir(), spec.precision)
            except ImportError as exc:
                raise SystemUnavailable(f"CTranslate2 cannot convert here ({exc.name} missing): pip install \"spanrt[bench]\"") from exc
            return Artifacts(checkpoint=source.checkpoint, model_dir=model_dir, prepare_s=time.perf_counter() - t0)
        from bench.peers import optimum_onnx

        try:
            onnx_dir, onnx_file, _ = optimum_onnx(source.checkpoint, cache_dir(), spec.precision)
        except ImportError as exc:
            raise SystemUnavailable(f"Optimum cannot export here ({exc.name} missing): pip install \"spanrt[bench]\"") from exc
        return Artifacts(checkpoint=source.checkpoint, onnx_dir=onnx_dir, onnx_file=onnx_file, prepare_s=time.perf_counter() - t0)
    if spec.family == "spanrt":
        bundle = source.bundle
        if bundle is None and spec.device == "cuda" and source.checkpoint is not None:
            bundle = _fp16_bundle(source.checkpoint)
        if bundle is None:
            from engine.default_model import default_bundle
            from engine.errors import BackendUnavailableError

            try:
                bundle = default_bundle(checkpoint=source.checkpoint, quiet=True)
            except BackendUnavailableError as exc:
                raise SystemUnavailable(str(exc)) from exc
        return Artifacts(checkpoint=source.checkpoint, bundle=bundle, prepare_s=time.perf_counter() - t0)
    raise ValueError(f"unknown system family {spec.family!r}")


def _fp16_bundle(checkpoint: Path) -> Path:
    """A bundle that also holds the fp16 ONNX model the GPU backends load (the default bundle has fp32 and int8 only),
    built once into the bench cache. TensorRT plans are not built here: the Engine reports when one is missing."""
    import importlib.util

    from engine.default_model import cache_dir, checkpoint_sha256

    target = cache_dir() / "bench" / "bundles" / f"{checkpoint.name}-{checkpoint_sha256(checkpoint)[:16]}-fp16"
    if (target / "manifest.json").is_file():
        return target
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise SystemUnavailable('building an fp16 bundle needs the export extras: pip install "spanrt[export]"')
    from export.pipeline import ExportOptions, export_bundle

    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(export_bundle(checkpoint, target, ExportOptions(precisions=("fp32", "int8", "fp16"), quiet=True)))


def prepare_all(names: list[str], model: str | None) -> dict[str, Any]:
    """Artifacts (or the reason it cannot run) for every named system; run in a child process."""
    import warnings

    warnings.simplefilter("ignore")  # exporter chatter; failures still raise
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        source = resolve_model(model)
    except Exception as exc:  # noqa: BLE001 - every system gets the reason, none is dropped
        return {"model": None, "systems": {n: {"reason": f"model not usable: {type(exc).__name__}: {exc}", "failed": True} for n in names}}
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = {"artifacts": prepare_one(SYSTEMS_BY_NAME[name], source)}
        except SystemUnavailable as exc:
            out[name] = {"reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failed export is reported against its system
            out[name] = {"reason": f"preparation failed: {type(exc).__name__}: {exc}", "failed": True}
    return {"model": {"label": source.label, "checkpoint": str(source.checkpoint) if source.checkpoint else None,
                      "bundle": str(source.bundle) if source.bundle else None}, "systems": out}
