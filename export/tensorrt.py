"""TensorRT engines (.plan) from a bundle's standard-op ONNX graphs, for TensorRT 10.3 through 11.x.

NOT EXECUTED on the machines this was written on (no GPU, no TensorRT); written against the
TensorRT Python API as Polygraphy and NVIDIA's samples use it. ``tensorrt`` is imported lazily:
importing ``export`` never needs it, and asking for a plan without it is an error, never a skip.

Precision is set two ways, picked by the installed version:

- "strong" (TensorRT >= 10.12, where weak typing is deprecated; 11.x has no other mode): the
  network is STRONGLY_TYPED and precision comes from the graph itself. The FP16 input graph
  (``model.trt.fp16.onnx``) is fp16 with Cast islands keeping LayerNorm and Softmax in fp32;
  the INT8 graph is explicit Q/DQ (``model.trt.int8.onnx``).
- "weak" (TensorRT 10.3 - 10.11, e.g. JetPack 6): BuilderFlag.FP16 (+ INT8 for the Q/DQ graph),
  with LayerNorm and Softmax layers constrained to fp32 (OBEY_PRECISION_CONSTRAINTS); FP16
  LayerNorm overflow is a known TensorRT accuracy problem. No implicit INT8 calibrator is used:
  INT8 comes only from the Q/DQ graph.

One optimization profile per sequence-length bucket, so a batch of short windows runs on kernels
tuned for its length instead of padding to max_seq_len.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.errors import BackendUnavailableError
from engine.manifest import ArtifactEntry
from export.errors import ExportError

DEFAULT_BUCKETS = (64, 128, 256)  # upper bounds below max_seq_len; max_seq_len closes the last bucket
DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_BATCH = 8
DEFAULT_WORKSPACE_MIB = 2048
PLAN_PATHS = {"fp16": "model.fp16.plan", "int8": "model.int8.plan"}
INPUT_GRAPHS = {"fp16": "fp16", "int8": "int8"}  # plan precision -> onnx-trt artifact precision
STRONG_TYPING_FROM = (10, 12)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: sequence lengths min..max (tuned for opt), batch 1..max_batch."""

    min_seq: int
    opt_seq: int
    max_seq: int
    min_batch: int
    opt_batch: int
    max_batch: int

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) input shapes [batch, seq] for every input of the network."""
        return (self.min_batch, self.min_seq), (self.opt_batch, self.opt_seq), (self.max_batch, self.max_seq)


def length_buckets(max_seq_len: int, boundaries: tuple[int, ...] = DEFAULT_BUCKETS) -> list[tuple[int, int]]:
    """Contiguous (lo, hi) length ranges covering 1..max_seq_len; boundaries >= max_seq_len are dropped."""
    if max_seq_len < 1:
        raise ExportError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if any(b < 1 for b in boundaries):
        raise ExportError(f"bucket boundaries must be >= 1, got {boundaries}")
    uppers = sorted({b for b in boundaries if b < max_seq_len}) + [max_seq_len]
    out, lo = [], 1
    for hi in uppers:
        out.append((lo, hi))
        lo = hi + 1
    return out


def make_profiles(max_seq_len: int, *, boundaries: tuple[int, ...] = DEFAULT_BUCKETS, max_batch: int = DEFAULT_MAX_BATCH,
                  opt_batch: int = DEFAULT_OPT_BATCH) -> list[Profile]:
    """One profile per length bucket; each is tuned for its longest length and ``opt_batch``."""
    if not 1 <= opt_batch <= max_batch:
        raise ExportError(f"need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
    return [Profile(lo, hi, hi, 1, opt_batch, max_batch) for lo, hi in length_buckets(max_seq_len, boundaries)]


def profile_for_length(profiles: list[Profile] | list[list[int]], seq_len: int) -> int:
    """Index of the profile whose length range holds ``seq_len`` (manifest [min, opt, max] lists accepted)."""
    for i, p in enumerate(profiles):
        lo, hi = (p.min_seq, p.max_seq) if isinstance(p, Profile) else (p[0], p[2])
        if lo <= seq_len <= hi:
            return i
    raise ValueError(f"no TensorRT profile covers sequence length {seq_len}")


def parse_version(v: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a TensorRT version string such as '10.3.0.30' or '11.0.0'."""
    nums = [int(n) for n in re.findall(r"\d+", v)[:3]]
    if len(nums) < 2:
        raise ExportError(f"cannot read TensorRT version {v!r}")
    return (nums + [0, 0])[0], nums[1], (nums + [0, 0, 0])[2]


def typing_mode(version: str) -> str:
    """'strong' from TensorRT 10.12 on (weak typing deprecated; removed in 11), else 'weak'."""
    return "strong" if parse_version(version)[:2] >= STRONG_TYPING_FROM else "weak"


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or a clear error saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT plans were asked for but the tensorrt package is not installed: "
            "pip install 'spanrt[tensorrt]' (x86_64), or use the JetPack TensorRT on Jetson"
        ) from None
    major, minor, _ = parse_version(trt.__version__)
    if (major, minor) < (10, 3):
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; SpanRT needs TensorRT >= 10.3")
    return trt


def compute_capability(device: int = 0) -> str:
    """'major.minor' compute capability of a CUDA device (via cuda-python)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendUnavailableError("cuda-python is needed to read the GPU's compute capability: pip install 'spanrt[tensorrt]'") from None
    values = []
    for attr in (cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor):
        err, value = cudart.cudaDeviceGetAttribute(attr, device)
        if int(err) != 0:
            raise BackendUnavailableError(f"CUDA error {err} reading the compute capability of GPU {device}")
        values.append(int(value))
    return f"{values[0]}.{values[1]}"


def default_timing_cache(trt_version: str, cc: str) -> Path:
    """Per-user timing cache file for this TensorRT version and GPU (SPANRT_CACHE_DIR overrides the folder)."""
    base = Path(os.environ.get("SPANRT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spanrt")
    return base / "tensorrt" / f"timing-trt{trt_version}-sm{cc.replace('.', '')}.cache"


def _make_logger(trt: Any) -> Any:
    """A trt.ILogger that prints warnings and keeps errors, so a failed build can say why."""

    class SpanRTTrtLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT; must not raise
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                self.errors.append(msg)
                print(f"[tensorrt] ERROR {msg}", flush=True)
            elif severity == trt.Logger.WARNING:
                print(f"[tensorrt] {msg}", flush=True)

    return SpanRTTrtLogger()


def _constrain_fp32(trt: Any, network: Any) -> dict[str, int]:
    """Weak typing: pin LayerNorm and Softmax layers (and their outputs) to fp32."""
    kinds = {trt.LayerType.NORMALIZATION: "layernorm", trt.LayerType.SOFTMAX: "softmax"}
    counts = {"layernorm": 0, "softmax": 0}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = kinds.get(layer.type)
        if kind is None:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        counts[kind] += 1
    return counts


def build_plan(onnx_path: str | Path, plan_path: str | Path, precision: str, *, input_names: tuple[str, ...], profiles: list[Profile],
               workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: str | Path | None = None, typing: str | None = None) -> dict[str, Any]:
    """Build and serialize one TensorRT engine; returns its manifest entry fields (no path/sha256)."""
    trt = require_tensorrt()
    if precision not in PLAN_PATHS:
        raise ExportError(f"TensorRT precision {precision!r} is not supported (choose from {', '.join(PLAN_PATHS)})")
    version = trt.__version__
    mode = typing or typing_mode(version)
    if mode == "weak" and parse_version(version)[0] >= 11:
        raise ExportError(f"TensorRT {version} has no weak typing; build with typing='strong'")
    cc = compute_capability()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors) or logger.errors}")
    names = tuple(network.get_input(i).name for i in range(network.num_inputs))
    if set(names) != set(input_names):
        raise ExportError(f"{onnx_path}: network inputs {names} differ from the bundle's {input_names}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    constrained: dict[str, int] = {}
    if mode == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
        constrained = _constrain_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for p in profiles:
        prof = builder.create_optimization_profile()
        lo, opt, hi = p.shapes()
        for name in names:
            prof.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(prof) < 0:
            raise ExportError(f"TensorRT rejected optimization profile {p}")

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(version, cc)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ExportError(f"TensorRT failed to build the {precision} engine: {'; '.join(logger.errors) or 'see the log above'}")
    Path(plan_path).write_bytes(memoryview(serialized))

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=".timing-")
    with os.fdopen(fd, "wb") as f:
        f.write(memoryview(config.get_timing_cache().serialize()))
    os.replace(tmp, cache_path)

    _check_engine(trt, logger, Path(plan_path), names, len(profiles))
    return {
        "tensorrt_version": version, "compute_capability": cc, "typing": mode,
        "profiles": [[p.min_seq, p.opt_seq, p.max_seq] for p in profiles],
        "profile_batch": [profiles[0].min_batch, profiles[0].opt_batch, profiles[0].max_batch],
        "max_batch_size": profiles[0].max_batch, "workspace_mib": workspace_mib,
        "fp32_layers": constrained or "from the graph (strong typing)", "build_seconds": round(seconds, 1),
        "input_names": list(names),
    }


def _check_engine(trt: Any, logger: Any, plan: Path, input_names: tuple[str, ...], n_profiles: int) -> None:
    """Deserialize the plan once: it loads here, has the profiles and the I/O tensors expected."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise ExportError(f"the TensorRT plan {plan.name} just built does not deserialize: {'; '.join(logger.errors)}")
    io = {engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i)) for i in range(engine.num_io_tensors)}
    want_in = set(input_names)
    got_in = {n for n, m in io.items() if m == trt.TensorIOMode.INPUT}
    got_out = {n for n, m in io.items() if m == trt.TensorIOMode.OUTPUT}
    if got_in != want_in or got_out != {"start_logits", "end_logits"} or engine.num_optimization_profiles != n_profiles:
        raise ExportError(f"TensorRT plan {plan.name}: inputs {sorted(got_in)}, outputs {sorted(got_out)}, "
                          f"{engine.num_optimization_profiles} profiles; expected {sorted(want_in)}, start/end logits, {n_profiles}")


def build_into(writer: Any, precision: str, *, max_seq_len: int, input_names: tuple[str, ...], progress: Any = None,
               **kwargs: Any) -> ArtifactEntry:
    """Build one plan inside a bundle being written (``export.bundle.BundleWriter``) and register it."""
    src_prec = INPUT_GRAPHS[precision]
    src = writer.path(f"model.trt.{src_prec}.onnx")
    if not src.is_file():
        raise ExportError(f"internal: the TensorRT {precision} input graph model.trt.{src_prec}.onnx was not written")
    profiles = make_profiles(max_seq_len)
    info = build_plan(src, writer.path(PLAN_PATHS[precision]), precision, input_names=input_names, profiles=profiles, **kwargs)
    return writer.add_artifact(PLAN_PATHS[precision], format="tensorrt", precision=precision, source=src.name, **info)


def build_trt(bundle_dir: str | Path, precisions: tuple[str, ...] = ("fp16",), *, force: bool = False,
              boundaries: tuple[int, ...] = DEFAULT_BUCKETS, max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int = DEFAULT_OPT_BATCH,
              workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: str | Path | None = None) -> list[dict[str, Any]]:
    """``python -m export build-trt``: add TensorRT plans to an existing bundle, on the target GPU;
    returns their manifest entries (as JSON).

    Plans are written beside the bundle's files and the manifest is replaced atomically last, so
    an interrupted build leaves the bundle as it was (plus a stray temporary file at most).
    """
    from engine.bundle import load_bundle, sha256_file
    from export.bundle import write_manifest

    require_tensorrt()
    bundle = load_bundle(bundle_dir, verify=True)
    manifest = bundle.manifest
    entries: list[ArtifactEntry] = []
    for precision in precisions:
        if precision not in PLAN_PATHS:
            raise ExportError(f"TensorRT precision {precision!r} is not supported (choose from {', '.join(PLAN_PATHS)})")
        src = bundle.find("onnx-trt", INPUT_GRAPHS[precision])
        if src is None:
            raise ExportError(f"bundle {bundle.root} has no TensorRT {precision} input graph (onnx-trt/{INPUT_GRAPHS[precision]}); "
                              f"export again with: python -m export MODEL_DIR --out {bundle.root} --tensorrt-onnx {precision} --force")
        if bundle.find("tensorrt", precision) is not None and not force:
            raise ExportError(f"bundle {bundle.root} already has a TensorRT {precision} plan; pass --force to rebuild it")
        profiles = make_profiles(bundle.max_seq_len, boundaries=boundaries, max_batch=max_batch, opt_batch=opt_batch)
        rel = PLAN_PATHS[precision]
        fd, tmp = tempfile.mkstemp(dir=bundle.root, prefix=f".{rel}.")
        os.close(fd)
        try:
            info = build_plan(src.path, tmp, precision, input_names=bundle.input_names, profiles=profiles,
                              workspace_mib=workspace_mib, timing_cache=timing_cache)
            os.replace(tmp, bundle.root / rel)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        entry = ArtifactEntry(path=rel, format="tensorrt", precision=precision, sha256=sha256_file(bundle.root / rel),
                              bytes=(bundle.root / rel).stat().st_size, details={"source": src.path.name, **info})
        others = tuple(a for a in manifest.artifacts if (a.format, a.precision) != ("tensorrt", precision))
        manifest = replace(manifest, artifacts=(*others, entry))
        write_manifest(bundle.root, manifest)
        entries.append(entry)
    load_bundle(bundle.root, verify=True)
    return [e.to_json() for e in entries]
