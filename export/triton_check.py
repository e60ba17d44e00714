"""Checks of a Triton model repository without a server: every config.pbtxt parsed with Triton's
ModelConfig schema, the files each model needs, and the ensemble's tensor graph under the rules
Triton's ValidateEnsembleConfig applies at load time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.bundle import load_bundle
from engine.errors import BundleError
from export.errors import ExportError
from export.triton_options import CPU_MODEL


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
