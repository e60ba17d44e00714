"""A Triton Inference Server model repository from a bundle: ``python -m export triton BUNDLE --out REPO``.

``--target cpu`` writes one Python-backend model, the only backend the tritonserver of the
``nvidia-pytriton`` wheel has besides ensembles (served for real in tests/test_triton_server.py):

    spanrt_qa        Python backend (export/triton_model.py, stage "engine"): engine.Engine over the
                     bundle copied into spanrt_qa/1/bundle, backend "auto"; Triton's dynamic
                     batcher groups concurrent requests and the model answers them with one
                     Engine.answer_batch call. Inputs: QUESTION, CONTEXT (TYPE_STRING, [rows, 1]),
                     optional TOP_K, MAX_ANSWER_LEN (TYPE_INT32), HANDLE_IMPOSSIBLE (TYPE_BOOL), one
                     per row; outputs ANSWER, SCORE, START, END, IMPOSSIBLE, [rows, k] best first.

``--target gpu`` (the default) writes four models; a client sends QUESTION and CONTEXT strings to
the ensemble and gets ANSWER, SCORE, START, END and IMPOSSIBLE back (best first, up to top_k):

    spanrt_qa        ensemble: spanrt_tokenize -> spanrt_model -> spanrt_decode
    spanrt_tokenize  Python backend (export/triton_model.py): the pair's doc-stride windows,
                     padded to a length bucket, as [windows, length] model inputs
    spanrt_model     the bundle's ONNX model (onnxruntime backend) or TensorRT plan
                     (tensorrt_plan, one instance using every optimization profile), with
                     dynamic batching: windows of concurrent requests with the same padded
                     length run as one batch
    spanrt_decode    Python backend: span search and answers, with SpanRT's own code

``validate_repository`` parses every config.pbtxt with Triton's model-config protobuf schema (from
the ``tritonclient`` package) and re-checks the ensemble's tensor graph with the rules Triton's
ValidateEnsembleConfig applies at load time (every input mapped once, data types equal, shapes
equal up to -1 wildcards and the batch dimension of batching models). The GPU repository was not
served by a real Triton where this was written (the wheel's server has no onnxruntime or TensorRT
backend); the CPU repository is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.bundle import Bundle, load_bundle
from export.errors import ExportError
from export.triton_check import check_ensemble
from export.triton_config import ModelChoice, configs, cpu_config, to_pbtxt
from export.triton_options import CPU_MODEL, DECODE, ENSEMBLE, MARKER, MODEL, TOKENIZE, TritonOptions

__all__ = ["CPU_MODEL", "DECODE", "ENSEMBLE", "MARKER", "MODEL", "TOKENIZE", "TritonOptions", "write_repository"]

MODEL_SOURCE = Path(__file__).resolve().parent / "triton_model.py"


def _check_target(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise ExportError(f"{out} exists and is not a repository written by python -m export triton; refusing to "
                              "replace it even with --force (choose another --out)")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} does not exist; create it first")


def _copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the same bytes, no second copy of a large model on disk
    except OSError:
        shutil.copyfile(src, dst)


def write_repository(bundle_dir: str | Path, out: str | Path, opts: TritonOptions = TritonOptions()) -> Path:
    """Write the model repository to ``out`` (a temporary folder renamed into place); returns its path."""
    bundle = load_bundle(bundle_dir, verify=True)
    out = Path(out).resolve()
    _check_target(out, opts.force)
    if opts.target == "cpu":
        return _write(out, {CPU_MODEL: cpu_config(bundle, opts)}, bundle, opts, None)
    choice, cfgs = configs(bundle, opts)
    check_ensemble(cfgs)
    return _write(out, cfgs, bundle, opts, choice)


def _write(out: Path, cfgs: dict[str, dict[str, Any]], bundle: Bundle, opts: TritonOptions, choice: ModelChoice | None) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, cfg in cfgs.items():
            version = tmp / name / "1"
            version.mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(to_pbtxt(cfg), encoding="utf-8")
            if cfg.get("backend") == "python":
                shutil.copyfile(MODEL_SOURCE, version / "model.py")
            if name in (TOKENIZE, DECODE):
                shutil.copyfile(bundle.tokenizer_path, version / "tokenizer.json")
            elif name == MODEL and choice is not None:
                _copy(choice.artifact.path, version / choice.filename)
            elif opts.target == "cpu":
                shutil.copytree(bundle.root, version / "bundle", copy_function=_copy)
        marker: dict[str, Any] = {"written_by": "python -m export triton", "target": opts.target, "bundle": str(bundle.root),
                                  "options": asdict(opts)}
        if choice is not None:
            marker.update(served=choice.artifact.path.name, platform=choice.platform, precision=choice.artifact.precision,
                          tensorrt_version=choice.artifact.info.get("tensorrt_version"),
                          compute_capability=choice.artifact.info.get("compute_capability"))
        else:
            marker.update(served="bundle", platform="python", precision=opts.precision)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
