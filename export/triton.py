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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.bundle import Artifact, Bundle, load_bundle
from engine.errors import BundleError
from export.errors import ExportError

ENSEMBLE, TOKENIZE, MODEL, DECODE = "spanrt_qa", "spanrt_tokenize", "spanrt_model", "spanrt_decode"
CPU_MODEL = ENSEMBLE  # the CPU repository's one model answers under the ensemble's name: clients need not care
DEFAULT_MAX_CONTEXT_BYTES = 256 * 1024  # the CPU model refuses longer contexts (a request, not a document store)
MARKER = "spanrt_triton.json"  # written at the repository root (Triton only loads folders)
MODEL_SOURCE = Path(__file__).resolve().parent / "triton_model.py"
DEFAULT_BUCKETS = (64, 128, 256)  # plus max_seq_len; a plan's own profile bounds take precedence
_NP_TO_TRITON = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
_ONNX_ELEM = {7: "int64", 6: "int32", 1: "float32", 10: "float16"}  # onnx.TensorProto element types
ANSWER_OUTPUTS = (("ANSWER", "TYPE_STRING"), ("SCORE", "TYPE_FP32"), ("START", "TYPE_INT64"), ("END", "TYPE_INT64"),
                  ("IMPOSSIBLE", "TYPE_BOOL"))


@dataclass(frozen=True)
class TritonOptions:
    """What ``python -m export triton`` can be told (answering options are fixed per repository)."""

    target: str = "gpu"  # "gpu": the ensemble below; "cpu": one Python-backend model running engine.Engine
    model: str = "auto"  # "auto" (TensorRT plan when present and kind is gpu), "onnx" or "tensorrt"
    precision: str | None = None  # None: fp16 on GPU (fp32 without it), int8 on CPU (fp32 without it)
    kind: str = "gpu"  # where spanrt_model runs: "gpu" or "cpu" (the Python stages always run on CPU)
    instances: int = 1  # spanrt_model instances (per GPU)
    python_instances: int = 2  # instances of each Python stage
    max_batch_size: int = 32  # windows per model batch (capped by a plan's profiles)
    max_queue_delay_us: int = 1000  # how long the dynamic batcher waits for batch mates
    max_queue_size: int = 0  # requests waiting at spanrt_model before Triton rejects more; 0: unbounded
    length_buckets: tuple[int, ...] | None = None  # None: the plan's profile bounds, else 64,128,256 (+ max_seq_len)
    max_question_len: int = 64
    doc_stride: int | None = None
    top_k: int = 1
    max_answer_len: int = 30
    handle_impossible: bool = False
    null_threshold: float = 0.0
    align_to_words: bool = True
    backend: str = "auto"  # --target cpu: the Engine's backend
    threads: int | None = None  # --target cpu: the Engine's intra-op threads (None: every core)
    max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES  # --target cpu: longer contexts get an error response
    python_env: str | None = None  # --target cpu: EXECUTION_ENV_PATH, the Python the stub runs (NumPy < 2, see engine.serve)
    force: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("gpu", "cpu"):
            raise ExportError(f"--target must be gpu or cpu, got {self.target!r}")
        if self.target == "cpu" and self.model == "tensorrt":
            raise ExportError("--target cpu serves the bundle with engine.Engine; --model tensorrt is for --target gpu")
        if self.threads is not None and self.threads < 1 or self.max_context_bytes < 1:
            raise ExportError("--threads and --max-context-bytes must be >= 1")
        if self.model not in ("auto", "onnx", "tensorrt"):
            raise ExportError(f"--model must be auto, onnx or tensorrt, got {self.model!r}")
        if self.kind not in ("gpu", "cpu"):
            raise ExportError(f"--kind must be gpu or cpu, got {self.kind!r}")
        if self.model == "tensorrt" and self.kind == "cpu":
            raise ExportError("a TensorRT plan runs on a GPU only: use --kind gpu, or --model onnx for CPU instances")
        for name in ("instances", "python_instances", "max_batch_size", "max_question_len", "top_k", "max_answer_len"):
            if getattr(self, name) < 1:
                raise ExportError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0 or self.max_queue_size < 0:
            raise ExportError("--max-queue-delay-us and --max-queue-size must be >= 0")
        if self.doc_stride is not None and self.doc_stride < 0:
            raise ExportError(f"--doc-stride must be >= 0, got {self.doc_stride}")
        if self.length_buckets is not None and (not self.length_buckets or min(self.length_buckets) < 1):
            raise ExportError(f"--length-buckets must be positive lengths, got {self.length_buckets}")


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


def choose_model(bundle: Bundle, opts: TritonOptions) -> ModelChoice:
    """The artifact to serve: a TensorRT plan (asked for, or "auto" on GPU when present) or an ONNX model."""
    plans = bundle.precisions("tensorrt")
    use_trt = opts.model == "tensorrt" or (opts.model == "auto" and opts.kind == "gpu" and bool(plans)
                                           and (opts.precision is None or opts.precision in plans))
    if use_trt:
        precision = opts.precision or ("fp16" if "fp16" in plans else (plans[0] if plans else "fp16"))
        art = bundle.find("tensorrt", precision)
        if art is None:
            raise ExportError(f"bundle {bundle.root} has no TensorRT {precision} plan (plans: {', '.join(plans) or 'none'}); "
                              f"build one on the target GPU with: python -m export build-trt {bundle.root}")
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
        return ModelChoice(art, "tensorrt_plan", "model.plan", ins, outs, min(opts.max_batch_size, plan_batch),
                           [list(map(int, p)) for p in profiles])
    have = bundle.precisions("onnx")
    if opts.precision is not None:
        precision = opts.precision
    else:
        order = ("fp16", "fp32") if opts.kind == "gpu" else ("int8", "fp32")
        precision = next((p for p in order if p in have), None)  # type: ignore[assignment]
        if precision is None:
            raise ExportError(f"bundle {bundle.root} has no ONNX {' or '.join(order)} model for --kind {opts.kind} "
                              f"(has: {', '.join(have) or 'none'}); pass --precision")
    art = bundle.find("onnx", precision)
    if art is None:
        raise ExportError(f"bundle {bundle.root} has no ONNX {precision} model (has: {', '.join(have) or 'none'})")
    ins, outs = _onnx_io(art.path)
    return ModelChoice(art, "onnxruntime_onnx", "model.onnx", ins, outs, opts.max_batch_size)


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

    tokenize = {"name": TOKENIZE, "backend": "python", "max_batch_size": 0, "input": strings,
                "output": [_tensor(n, in_types[n], [-1, -1]) for n in names], "instance_group": python_group,
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
              "input": [*strings, *(_tensor(n, out_types[n], [-1, -1]) for n in ("start_logits", "end_logits"))],
              "output": [_tensor(n, t, [-1]) for n, t in ANSWER_OUTPUTS], "instance_group": python_group,
              "parameters": _parameters(_stage_parameters(bundle, choice, opts, "decode"))}

    def step(model_name: str, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
        return {"model_name": model_name, "model_version": -1,
                "input_map": [{"key": n, "value": n} for n in inputs], "output_map": [{"key": n, "value": n} for n in outputs]}

    ensemble = {"name": ENSEMBLE, "platform": "ensemble", "max_batch_size": 0, "input": strings,
                "output": [_tensor(n, t, [-1]) for n, t in ANSWER_OUTPUTS],
                "ensemble_scheduling": {"step": [
                    step(TOKENIZE, ["QUESTION", "CONTEXT"], names),
                    step(MODEL, names, ["start_logits", "end_logits"]),
                    step(DECODE, ["QUESTION", "CONTEXT", "start_logits", "end_logits"], [n for n, _ in ANSWER_OUTPUTS]),
                ]}}
    return choice, {TOKENIZE: tokenize, MODEL: model, DECODE: decode, ENSEMBLE: ensemble}


def cpu_config(bundle: Bundle, opts: TritonOptions) -> dict[str, Any]:
    """The CPU repository's one model config: engine.Engine behind Triton's dynamic batcher."""
    from engine.backends import BACKENDS

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


# ---- writing ------------------------------------------------------------------------------------------
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


# ---- checking -----------------------------------------------------------------------------------------
def _dims_match(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def check_ensemble(cfgs: dict[str, dict[str, Any]]) -> None:
    """Apply Triton's ensemble load-time rules to configs given as dicts (or parsed messages as dicts):
    step models exist, every model input is mapped exactly once, mapped names exist, each ensemble
    tensor has one data type and consistent shapes (a non-batching [-1, d...] matches a batching
    [d...]), the ensemble's outputs are produced, and its max_batch_size fits every step."""
    ensembles = [c for c in cfgs.values() if c.get("platform") == "ensemble"]
    if not ensembles:
        raise ExportError("the repository has no ensemble model")
    for ens in ensembles:
        where = f"ensemble {ens['name']}"
        tensors: dict[str, tuple[str, str, list[int], list[int]]] = {}  # name -> (from model, type, dims, full dims)

        def meet(name: str, model: str, dtype: str, dims: list[int], batching: bool, where: str = where,
                 tensors: dict[str, tuple[str, str, list[int], list[int]]] = tensors) -> None:
            full = ([-1] if batching else []) + list(dims)
            if name not in tensors:
                tensors[name] = (model, dtype, list(dims), full)
                return
            m0, t0, d0, f0 = tensors[name]
            if t0 != dtype:
                raise ExportError(f"{where}, tensor {name}: data type {t0} from {m0} but {dtype} from {model}")
            if not _dims_match(d0, list(dims)) and not _dims_match(f0, full):
                raise ExportError(f"{where}, tensor {name}: shape {f0} from {m0} but {full} from {model}")

        ens_batch = ens.get("max_batch_size", 0) > 0
        for t in ens.get("input", []):
            meet(t["name"], ens["name"], str(t["data_type"]), t["dims"], ens_batch)
        for t in ens.get("output", []):
            meet(t["name"], ens["name"], str(t["data_type"]), t["dims"], ens_batch)
        produced = {t["name"] for t in ens.get("input", [])}
        for st in ens["ensemble_scheduling"]["step"]:
            model = cfgs.get(st["model_name"])
            if model is None:
                raise ExportError(f"{where}: step model {st['model_name']} is not in the repository")
            mb = model.get("max_batch_size", 0)
            if mb != 0 and mb < ens.get("max_batch_size", 0):
                raise ExportError(f"{where} allows batch {ens['max_batch_size']} but {model['name']} only {mb}")
            in_map, out_map = _as_map(st.get("input_map"), where, model["name"]), _as_map(st.get("output_map"), where, model["name"])
            model_inputs = {t["name"]: t for t in model.get("input", [])}
            model_outputs = {t["name"]: t for t in model.get("output", [])}
            for key in in_map:
                if key not in model_inputs:
                    raise ExportError(f"{where}: {model['name']} has no input {key}")
            for key in out_map:
                if key not in model_outputs:
                    raise ExportError(f"{where}: {model['name']} has no output {key}")
            for name, t in model_inputs.items():
                if name not in in_map:
                    if not t.get("optional", False):
                        raise ExportError(f"{where}: input {name} of {model['name']} is not mapped to any ensemble tensor")
                    continue
                if in_map[name] not in produced:
                    raise ExportError(f"{where}: {model['name']} reads {in_map[name]} before any step produces it")
                meet(in_map[name], model["name"], str(t["data_type"]), t["dims"], mb > 0)
            if len(set(out_map.values())) != len(out_map):
                raise ExportError(f"{where}: two outputs of {model['name']} map to the same ensemble tensor")
            for key, name in out_map.items():
                t = model_outputs[key]
                meet(name, model["name"], str(t["data_type"]), t["dims"], mb > 0)
                produced.add(name)
        missing = [t["name"] for t in ens.get("output", []) if t["name"] not in produced]
        if missing:
            raise ExportError(f"{where}: outputs {missing} are produced by no step")


def _as_map(entries: Any, where: str, model: str) -> dict[str, str]:
    """A step's input_map/output_map: [{"key", "value"}, ...] as written, or a dict as parsed."""
    if entries is None:
        return {}
    if isinstance(entries, dict):
        return dict(entries)
    out = {m["key"]: m["value"] for m in entries}
    if len(out) != len(entries):
        raise ExportError(f"{where}: step {model} maps one name twice")
    return out


def _message_dict(msg: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for key in ("input", "output"):
        for t in d.get(key, []):
            t["dims"] = [int(x) for x in t.get("dims", [])]
    return d


def validate_repository(repo: str | Path) -> dict[str, Any]:
    """Parse every config.pbtxt of ``repo`` with Triton's ModelConfig schema (unknown fields and bad
    enum values are errors), check files and the ensemble graph; returns the parsed configs by name.

    Needs ``tritonclient`` (``pip install "tritonclient[grpc]"``) for the schema.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ExportError(f"validating a Triton repository needs Triton's model-config schema ({e}); "
                          'install it with: pip install "tritonclient[grpc]"') from e
    root = Path(repo)
    parsed: dict[str, Any] = {}
    as_dicts: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / "config.pbtxt"
        if not path.is_file():
            raise ExportError(f"{folder.name}: no config.pbtxt")
        cfg = model_config_pb2.ModelConfig()
        try:
            text_format.Parse(path.read_text(encoding="utf-8"), cfg)
        except text_format.ParseError as e:
            raise ExportError(f"{path}: not a valid Triton model config: {e}") from e
        if cfg.name != folder.name:
            raise ExportError(f"{path}: name {cfg.name!r} differs from its folder {folder.name!r}")
        _check_model_files(folder, cfg, model_config_pb2)
        parsed[cfg.name] = cfg
        as_dicts[cfg.name] = _message_dict(cfg)
    if any(c.get("platform") == "ensemble" for c in as_dicts.values()) or CPU_MODEL not in as_dicts:
        check_ensemble(as_dicts)
    return parsed


def _check_model_files(folder: Path, cfg: Any, pb: Any) -> None:
    version = folder / "1"
    need = {"python": "model.py", "onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
    kind = cfg.backend if cfg.backend else cfg.platform
    if kind != "ensemble":
        if kind not in need or not (version / need[kind]).is_file():
            raise ExportError(f"{folder.name}: backend/platform {kind!r} needs {version / need.get(kind, '?')}")
        stage = cfg.parameters["spanrt_stage"].string_value if "spanrt_stage" in cfg.parameters else ""
        if stage == "engine":
            try:
                load_bundle(version / "bundle", verify=True)  # the copied bundle is whole
            except BundleError as e:
                raise ExportError(f"{folder.name}: the bundle the model serves is not usable: {e}") from e
    elif not version.is_dir():
        raise ExportError(f"{folder.name}: an ensemble still needs its version folder {version}")
    for t in [*cfg.input, *cfg.output]:
        if t.data_type == pb.TYPE_INVALID or not t.dims:
            raise ExportError(f"{folder.name}: tensor {t.name} has no data type or no dims")
    if kind == "tensorrt_plan" and any(g.kind != pb.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group):
        raise ExportError(f"{folder.name}: TensorRT instances must be KIND_GPU")
    if cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching") is False and kind != "ensemble":
        raise ExportError(f"{folder.name}: max_batch_size {cfg.max_batch_size} without dynamic_batching")


# ---- command line (python -m export triton) -------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, e.g. 64,128,256") from None


def main(argv: list[str]) -> int:
    """``python -m export triton BUNDLE_DIR --out REPO_DIR [...]``: write (and with --validate check) a repository."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m export triton",
                                description="Write a Triton Inference Server model repository from a SpanRT bundle: "
                                            "--target cpu, one Python-backend model running engine.Engine; --target gpu, "
                                            "an ensemble tokenize -> ONNX model or TensorRT plan -> decode.")
    p.add_argument("bundle_dir", metavar="BUNDLE_DIR")
    p.add_argument("--out", required=True, metavar="REPO_DIR", help="repository folder to create")
    p.add_argument("--target", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: engine.Engine in the Python backend (any tritonserver); gpu: the ensemble (default)")
    p.add_argument("--model", choices=("auto", "onnx", "tensorrt"), default="auto",
                   help="what spanrt_model serves (auto: the TensorRT plan when the bundle has one and --kind is gpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "bf16"), default=None,
                   help="default: fp16 on GPU, int8 on CPU (fp32 when missing); --target cpu: the Engine's default")
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="--target gpu: where spanrt_model's instances run")
    p.add_argument("--instances", type=int, default=1,
                   help="spanrt_model instances per GPU (or on the CPU); --target cpu: Engine instances (each its own process)")
    p.add_argument("--python-instances", type=int, default=2, help="instances of each Python stage")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="windows per model batch (capped by a plan's profiles); --target cpu: requests per dynamic batch")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, help="dynamic batcher delay (default 1000)")
    p.add_argument("--max-queue-size", type=int, default=0, help="queued requests at spanrt_model before rejecting; 0: no limit")
    p.add_argument("--length-buckets", type=_ints, default=None, help="padded window lengths (default: the plan's profiles, "
                   "else 64,128,256; max_seq_len is always the last)")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--max-answer-len", type=int, default=30)
    p.add_argument("--max-question-len", type=int, default=64)
    p.add_argument("--doc-stride", type=int, default=None)
    p.add_argument("--handle-impossible", action="store_true")
    p.add_argument("--null-threshold", type=float, default=0.0)
    p.add_argument("--no-align-to-words", action="store_true")
    p.add_argument("--backend", default="auto", help="--target cpu: the Engine's backend (default auto)")
    p.add_argument("--threads", type=int, default=None, help="--target cpu: the Engine's intra-op threads (default: all cores)")
    p.add_argument("--max-context-bytes", type=int, default=DEFAULT_MAX_CONTEXT_BYTES,
                   help="--target cpu: longer contexts get an error response (default 256 KiB)")
    p.add_argument("--python-env", default=None, metavar="DIR",
                   help="--target cpu: the Python environment the backend stub runs (EXECUTION_ENV_PATH; "
                        "python -m engine.serve --make-python-env DIR makes one)")
    p.add_argument("--validate", action="store_true", help='parse the configs with Triton\'s schema (needs tritonclient[grpc])')
    p.add_argument("--force", action="store_true", help="replace a repository this command wrote before")
    a = p.parse_args(argv)
    opts = TritonOptions(target=a.target, backend=a.backend, threads=a.threads, max_context_bytes=a.max_context_bytes,
                         python_env=a.python_env, model=a.model, precision=a.precision, kind=a.kind, instances=a.instances,
                         python_instances=a.python_instances, max_batch_size=a.max_batch_size,
                         max_queue_delay_us=a.max_queue_delay_us, max_queue_size=a.max_queue_size, length_buckets=a.length_buckets,
                         max_question_len=a.max_question_len, doc_stride=a.doc_stride, top_k=a.top_k,
                         max_answer_len=a.max_answer_len, handle_impossible=a.handle_impossible, null_threshold=a.null_threshold,
                         align_to_words=not a.no_align_to_words, force=a.force)
    repo = write_repository(a.bundle_dir, a.out, opts)
    if a.validate:
        validate_repository(repo)
    marker = json.loads((repo / MARKER).read_text(encoding="utf-8"))
    if opts.target == "cpu":
        print(f"{repo}: {CPU_MODEL} = engine.Engine (backend {opts.backend}) in Triton's Python backend, dynamic batching"
              + ("; configs validated against Triton's schema" if a.validate else ""))
        return 0
    print(f"{repo}: {ENSEMBLE} = {TOKENIZE} -> {MODEL} ({marker['platform']}, {marker['served']}) -> {DECODE}"
          + ("; configs validated against Triton's schema" if a.validate else ""))
    return 0
