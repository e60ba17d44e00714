"""The config.pbtxt of every model of a Triton repository, as messages written in protobuf text
format, and the choice of the bundle artifact the GPU ensemble's spanrt_model serves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.backends import AUTO_ORDER, BACKENDS, Backend, backend_class
from engine.bundle import Artifact, Bundle
from export.errors import ExportError
from export.triton_model import HANDOFF
from export.triton_options import (
    ANSWER_OUTPUTS,
    CPU_MODEL,
    DECODE,
    DEFAULT_BUCKETS,
    ENSEMBLE,
    MODEL,
    TOKENIZE,
    TritonOptions,
)

_NP_TO_TRITON = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
_ONNX_ELEM = {7: "int64", 6: "int32", 1: "float32", 10: "float16"}  # onnx.TensorProto element types
# The SpanRT backends whose model one of Triton's own backends serves: its platform, and the
# model's file name in the version folder
TRITON_PLATFORMS = {"tensorrt": ("tensorrt_plan", "model.plan"), "onnxruntime-cuda": ("onnxruntime_onnx", "model.onnx"),
                    "onnxruntime": ("onnxruntime_onnx", "model.onnx")}


# ---- protobuf text format -------------------------------------------------------------------------
class Enum(str):
    """An enum value: written bare (TYPE_INT64), not quoted."""


def _scalar(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string literal is a valid protobuf text string literal
    raise TypeError(f"cannot write {type(v).__name__} {v!r} in protobuf text format")


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """A message (dict; lists are repeated fields; Enum values are bare) in protobuf text format."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and value and not isinstance(value[0], dict):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
            continue
        for v in values:
            if isinstance(v, dict):
                lines.append(f"{pad}{key} {{\n{to_pbtxt(v, indent + 1)}{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_scalar(v)}")
    return "".join(line + "\n" for line in lines)


def _tensor(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": Enum(dtype), "dims": dims}


def _parameters(params: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": v}} for k, v in params.items()]


# ---- choosing what to serve ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """The artifact spanrt_model serves, and its I/O as Triton sees it."""

    artifact: Artifact
    platform: str  # "onnxruntime_onnx" or "tensorrt_plan"
    filename: str  # model.onnx or model.plan
    input_dtypes: dict[str, str]  # numpy dtype names
    output_dtypes: dict[str, str]
    max_batch_size: int
    profiles: list[list[int]] = field(default_factory=list)  # TensorRT [min, opt, max] sequence lengths


def _onnx_io(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def dtype(v: Any) -> str:
        t = v.type.tensor_type.elem_type
        if t not in _ONNX_ELEM:
            raise ExportError(f"{path.name}: tensor {v.name} has ONNX element type {t}; Triton configs are written for "
                              "int64, int32, float32 and float16")
        return _ONNX_ELEM[t]

    return ({v.name: dtype(v) for v in graph.input if v.name not in inits}, {v.name: dtype(v) for v in graph.output})


def choose_backend(bundle: Bundle, opts: TritonOptions) -> tuple[type[Backend], Artifact]:
    """The SpanRT backend whose model spanrt_model serves, and that model: the first in
    engine.backends.AUTO_ORDER that a Triton backend serves (TRITON_PLATFORMS) on ``opts.kind``'s
    device, in ``opts.model``'s format, with a model in the bundle at ``opts.precision`` (None: the
    first of its PRECISIONS the bundle has), as ``Engine(backend="auto")`` chooses on that device."""
    device = "cuda" if opts.kind == "gpu" else "cpu"
    tried: list[str] = []
    for name in AUTO_ORDER:
        if name not in TRITON_PLATFORMS:
            continue
        cls = backend_class(name)
        if cls.device != device or opts.model not in ("auto", cls.FORMAT):
            continue
        runnable = cls.bundle_precisions(bundle)
        art = bundle.find(str(cls.FORMAT), opts.precision or runnable[0]) if runnable else None
        if art is not None and art.precision in runnable:
            return cls, art
        tried.append(f"{name} runs {' or '.join(cls.PRECISIONS)}, the bundle has {cls.FORMAT} "
                     f"{', '.join(bundle.precisions(str(cls.FORMAT))) or 'none'}")
    fix = f"; build a plan on the target GPU with: python -m export build-trt {bundle.root}" if opts.model == "tensorrt" else ""
    want = f"{opts.precision} model" if opts.precision else "model"
    raise ExportError(f"bundle {bundle.root} has no {want} that Triton serves with --kind {opts.kind} --model {opts.model} "
                      f"({'; '.join(tried)}){fix}")


def choose_model(bundle: Bundle, opts: TritonOptions) -> ModelChoice:
    """The artifact spanrt_model serves (a TensorRT plan or an ONNX model, see ``choose_backend``) and its I/O."""
    backend, art = choose_backend(bundle, opts)
    platform, filename = TRITON_PLATFORMS[backend.name]
    if backend.FORMAT != "tensorrt":
        ins, outs = _onnx_io(art.path)
        return ModelChoice(art, platform, filename, ins, outs, opts.max_batch_size)
    source = art.info.get("source")
    src = next((a for a in bundle.artifacts if a.path.name == source), None) if isinstance(source, str) else None
    if src is None:
        raise ExportError(f"bundle {bundle.root}: the manifest entry of {art.path.name} names no source graph in the "
                          "bundle (needed for the plan's input/output types); rebuild it with python -m export build-trt")
    profiles = art.info.get("profiles")
    plan_batch = art.info.get("max_batch_size")
    if not isinstance(profiles, list) or not profiles or not isinstance(plan_batch, int):
        raise ExportError(f"bundle {bundle.root}: the manifest entry of {art.path.name} lacks profiles/max_batch_size; "
                          "rebuild it with python -m export build-trt --force")
    ins, outs = _onnx_io(src.path)
    return ModelChoice(art, platform, filename, ins, outs, min(opts.max_batch_size, plan_batch), [list(map(int, p)) for p in profiles])


def _buckets(bundle: Bundle, choice: ModelChoice, opts: TritonOptions) -> list[int]:
    if opts.length_buckets is not None:
        bounds = set(opts.length_buckets)
    elif choice.profiles:
        bounds = {p[2] for p in choice.profiles}
    else:
        bounds = set(DEFAULT_BUCKETS)
    out = sorted(b for b in bounds if b < bundle.max_seq_len) + [bundle.max_seq_len]
    if choice.profiles:
        covered = [(p[0], p[2]) for p in choice.profiles]
        for b in out:
            if not any(lo <= b <= hi for lo, hi in covered):
                raise ExportError(f"length bucket {b} is outside every optimization profile of the plan {covered}")
    return out


# ---- the configs --------------------------------------------------------------------------------------
def _stage_parameters(bundle: Bundle, choice: ModelChoice, opts: TritonOptions, stage: str) -> dict[str, str]:
    names = list(bundle.input_names)
    return {
        "spanrt_stage": stage,
        "input_names": ",".join(names),
        "input_dtypes": ",".join(choice.input_dtypes[n] for n in names),
        "pad_token_id": str(bundle.pad_token_id),
        "max_seq_len": str(bundle.max_seq_len),
        "max_question_len": str(opts.max_question_len),
        "doc_stride": "" if opts.doc_stride is None else str(opts.doc_stride),
        "length_buckets": ",".join(str(b) for b in _buckets(bundle, choice, opts)),
        "max_windows": str(choice.max_batch_size),
        "top_k": str(opts.top_k),
        "max_answer_len": str(opts.max_answer_len),
        "handle_impossible": "true" if opts.handle_impossible else "false",
        "null_threshold": repr(float(opts.null_threshold)),
        "align_to_words": "true" if opts.align_to_words else "false",
        "precision": choice.artifact.precision,
    }


def configs(bundle: Bundle, opts: TritonOptions) -> tuple[ModelChoice, dict[str, dict[str, Any]]]:
    """The chosen artifact and every model's config (as messages for ``to_pbtxt``), by model name."""
    choice = choose_model(bundle, opts)
    names = list(bundle.input_names)
    in_types = {n: _NP_TO_TRITON[choice.input_dtypes[n]] for n in names}
    out_types = {n: _NP_TO_TRITON[choice.output_dtypes[n]] for n in ("start_logits", "end_logits")}
    strings = [_tensor("QUESTION", "TYPE_STRING", [1]), _tensor("CONTEXT", "TYPE_STRING", [1])]
    python_group = [{"kind": Enum("KIND_CPU"), "count": opts.python_instances}]
    handoff = [_tensor(n, t, dims) for n, t, dims in HANDOFF]  # tokenize -> decode: decode never tokenizes again

    tokenize = {"name": TOKENIZE, "backend": "python", "max_batch_size": 0, "input": strings,
                "output": [*(_tensor(n, in_types[n], [-1, -1]) for n in names), *handoff], "instance_group": python_group,
                "parameters": _parameters(_stage_parameters(bundle, choice, opts, "tokenize"))}
    batching: dict[str, Any] = {"max_queue_delay_microseconds": opts.max_queue_delay_us}
    if opts.max_queue_size:
        batching["default_queue_policy"] = {"max_queue_size": opts.max_queue_size}
    group: dict[str, Any] = {"kind": Enum("KIND_GPU" if opts.kind == "gpu" else "KIND_CPU"), "count": opts.instances}
    if choice.profiles:
        group["profile"] = [str(i) for i in range(len(choice.profiles))]  # Triton uses profile 0 only unless told
    model = {"name": MODEL, "platform": choice.platform, "max_batch_size": choice.max_batch_size,
             "input": [_tensor(n, in_types[n], [-1]) for n in names],
             "output": [_tensor(n, out_types[n], [-1]) for n in ("start_logits", "end_logits")],
             "instance_group": [group], "dynamic_batching": batching}
    decode = {"name": DECODE, "backend": "python", "max_batch_size": 0,
              "input": [strings[1], *handoff, *(_tensor(n, out_types[n], [-1, -1]) for n in ("start_logits", "end_logits"))],
              "output": [_tensor(n, t, [-1]) for n, t in ANSWER_OUTPUTS], "instance_group": python_group,
              "parameters": _parameters(_stage_parameters(bundle, choice, opts, "decode"))}

    def step(model_name: str, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
        return {"model_name": model_name, "model_version": -1,
                "input_map": [{"key": n, "value": n} for n in inputs], "output_map": [{"key": n, "value": n} for n in outputs]}

    ensemble = {"name": ENSEMBLE, "platform": "ensemble", "max_batch_size": 0, "input": strings,
                "output": [_tensor(n, t, [-1]) for n, t in ANSWER_OUTPUTS],
                "ensemble_scheduling": {"step": [
                    step(TOKENIZE, ["QUESTION", "CONTEXT"], [*names, *(t["name"] for t in handoff)]),
                    step(MODEL, names, ["start_logits", "end_logits"]),
                    step(DECODE, ["CONTEXT", *(t["name"] for t in handoff), "start_logits", "end_logits"],
                         [n for n, _ in ANSWER_OUTPUTS]),
                ]}}
    return choice, {TOKENIZE: tokenize, MODEL: model, DECODE: decode, ENSEMBLE: ensemble}


def cpu_config(bundle: Bundle, opts: TritonOptions) -> dict[str, Any]:
    """The CPU repository's one model config: engine.Engine behind Triton's dynamic batcher."""
    if opts.backend not in ("auto", *BACKENDS):
        raise ExportError(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {opts.backend!r}")
    row = [1]
    options = [{**_tensor("TOP_K", "TYPE_INT32", row), "optional": True},
               {**_tensor("MAX_ANSWER_LEN", "TYPE_INT32", row), "optional": True},
               {**_tensor("HANDLE_IMPOSSIBLE", "TYPE_BOOL", row), "optional": True}]
    batching: dict[str, Any] = {"max_queue_delay_microseconds": opts.max_queue_delay_us}
    if opts.max_queue_size:
        batching["default_queue_policy"] = {"max_queue_size": opts.max_queue_size}
    params = {
        "spanrt_stage": "engine", "backend": opts.backend, "precision": opts.precision or "",
        "threads": "" if opts.threads is None else str(opts.threads),
        "max_question_len": str(opts.max_question_len), "doc_stride": "" if opts.doc_stride is None else str(opts.doc_stride),
        "top_k": str(opts.top_k), "max_answer_len": str(opts.max_answer_len),
        "handle_impossible": "true" if opts.handle_impossible else "false", "null_threshold": repr(float(opts.null_threshold)),
        "align_to_words": "true" if opts.align_to_words else "false", "max_context_bytes": str(opts.max_context_bytes),
    }
    if opts.python_env is not None:
        params["EXECUTION_ENV_PATH"] = str(Path(opts.python_env).resolve())
    return {"name": CPU_MODEL, "backend": "python", "max_batch_size": opts.max_batch_size,
            "input": [_tensor("QUESTION", "TYPE_STRING", row), _tensor("CONTEXT", "TYPE_STRING", row), *options],
            "output": [_tensor(n, t, [-1]) for n, t in ANSWER_OUTPUTS],
            "instance_group": [{"kind": Enum("KIND_CPU"), "count": opts.instances}],
            "dynamic_batching": batching, "parameters": _parameters(params)}

