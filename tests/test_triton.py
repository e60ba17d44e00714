"""export.triton: the Triton model repositories, without a server (a real tritonserver serves the
CPU repository in test_triton_server.py). (1) Every config.pbtxt is parsed with Triton's
ModelConfig protobuf schema (tritonclient) and the GPU ensemble's graph is checked with Triton's
load-time rules; (2) the generated Python-backend model.py runs under a stand-in for
triton_python_backend_utils (for the ensemble, with the repository's own ONNX file run by ONNX
Runtime in between, requests of equal shape batched together as Triton's dynamic batcher does):
the answers must equal engine.Engine's on the same bundle."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import lookup_bundle, lookup_tables, planted, write_lookup_onnx

pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from engine import Engine  # noqa: E402
from export.errors import ExportError  # noqa: E402
from export.__main__ import main as export_main  # noqa: E402
from export.triton import (  # noqa: E402
    CPU_MODEL,
    DECODE,
    ENSEMBLE,
    MARKER,
    MODEL,
    TOKENIZE,
    TritonOptions,
    write_repository,
)
from export.triton_check import validate_repository  # noqa: E402

ANSWER = "Zanzibar Island"
PAIRS = [
    ("Where did the ship sail?", "After a long voyage the ship sailed to Zanzibar Island, then home again."),
    ("Where?", "Zanzibar Island."),
    ("Which island?", "filler words go here and there. " * 30 + "At the very end: Zanzibar Island, warm and green."),
    ("Where was it?", "It was on Zanzibar Island. " + "More filler text follows here. " * 25 + "Again Zanzibar Island."),
    ("Is there an answer?", "Nothing relevant is written in this short sentence."),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lookup_bundle(tmp_path_factory.mktemp("triton-bundle"), **planted(ANSWER), max_seq_len=64)


@pytest.fixture(scope="module")
def engine(bundle: Path) -> Iterator[Engine]:
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        yield e


def parse(repo: Path, name: str) -> Any:
    cfg = mc.ModelConfig()
    text_format.Parse((repo / name / "config.pbtxt").read_text(), cfg)
    return cfg


# ---- a stand-in for Triton's Python backend -----------------------------------------------------------
class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class FakeRequest:
    def __init__(self, **arrays: np.ndarray) -> None:
        self.inputs = {k: FakeTensor(k, v) for k, v in arrays.items()}


class FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: FakeError | None = None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor = FakeTensor  # type: ignore[attr-defined]
    mod.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    mod.TritonError = FakeError  # type: ignore[attr-defined]
    mod.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mod)
    return mod


def load_python_model(repo: Path, name: str) -> Any:
    """The model.py of ``name`` imported and initialized as Triton's Python backend does it."""
    path = repo / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"triton_{name}_model", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.TritonPythonModel()
    config = json_format.MessageToJson(parse(repo, name), preserving_proto_field_name=True)
    model.initialize({"model_config": config, "model_repository": str(repo / name), "model_version": "1",
                      "model_name": name})
    return model


def strings(question: str, context: str) -> dict[str, np.ndarray]:
    return {"QUESTION": np.array([question.encode()], dtype=np.object_), "CONTEXT": np.array([context.encode()], dtype=np.object_)}


def run_ensemble(repo: Path, pairs: list[tuple[str, str]]) -> list[FakeResponse]:
    """tokenize -> spanrt_model (the repository's ONNX file on ONNX Runtime, equal shapes batched
    together as Triton's dynamic batcher does) -> decode, for all pairs at once."""
    import onnxruntime as ort

    tokenize, decode = load_python_model(repo, TOKENIZE), load_python_model(repo, DECODE)
    model_cfg = parse(repo, MODEL)
    requests = [FakeRequest(**strings(q, c)) for q, c in pairs]
    tokenized = tokenize.execute(requests)
    session = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [t.name for t in model_cfg.input]
    logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    ok = [i for i, r in enumerate(tokenized) if r.error is None]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in ok:
        by_shape.setdefault(tokenized[i].outputs["input_ids"].shape[1:], []).append(i)
    for group in by_shape.values():
        while group:  # batches of at most max_batch_size windows, as the dynamic batcher forms them
            batch, total = [], 0
            while group and total + tokenized[group[0]].outputs["input_ids"].shape[0] <= model_cfg.max_batch_size:
                total += tokenized[group[0]].outputs["input_ids"].shape[0]
                batch.append(group.pop(0))
            feeds = {n: np.concatenate([tokenized[i].outputs[n] for i in batch]) for n in names}
            start, end = session.run(["start_logits", "end_logits"], feeds)
            at = 0
            for i in batch:
                w = tokenized[i].outputs["input_ids"].shape[0]
                logits[i] = (start[at:at + w], end[at:at + w])
                at += w
    out: list[FakeResponse] = []
    for i, (q, c) in enumerate(pairs):
        if tokenized[i].error is not None:
            out.append(tokenized[i])
            continue
        s, e = logits[i]
        out.append(decode.execute([FakeRequest(**strings(q, c), start_logits=s, end_logits=e)])[0])
    return out


# ---- the repository ------------------------------------------------------------------------------------
def test_repository_parses_with_tritons_schema_and_matches_the_bundle(bundle: Path, tmp_path: Path) -> None:
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(kind="cpu", max_batch_size=16, instances=2,
                                                                     max_queue_size=64))
    parsed = validate_repository(repo)
    assert sorted(parsed) == sorted([ENSEMBLE, TOKENIZE, MODEL, DECODE])
    model = parsed[MODEL]
    assert (model.platform, model.max_batch_size) == ("onnxruntime_onnx", 16)
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in model.input] == [
        ("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1]), ("token_type_ids", "TYPE_INT64", [-1])]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in model.output] == [
        ("start_logits", "TYPE_FP32", [-1]), ("end_logits", "TYPE_FP32", [-1])]
    assert model.dynamic_batching.max_queue_delay_microseconds == 1000
    assert model.dynamic_batching.default_queue_policy.max_queue_size == 64
    (group,) = model.instance_group
    assert (group.kind, group.count) == (mc.ModelInstanceGroup.KIND_CPU, 2)
    served = hashlib.sha256((repo / MODEL / "1" / "model.onnx").read_bytes()).hexdigest()
    assert served == json.loads((bundle / "manifest.json").read_text())["artifacts"][0]["sha256"]
    for name in (TOKENIZE, DECODE):
        cfg = parsed[name]
        assert (cfg.backend, cfg.max_batch_size) == ("python", 0)
        assert cfg.parameters["spanrt_stage"].string_value == name.split("_")[1]
        assert cfg.parameters["max_seq_len"].string_value == "64"
        assert cfg.parameters["max_windows"].string_value == "16"
        assert (repo / name / "1" / "tokenizer.json").read_bytes() == (bundle / "tokenizer.json").read_bytes()
    ens = parsed[ENSEMBLE]
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == [TOKENIZE, MODEL, DECODE]
    assert [t.name for t in ens.input] == ["QUESTION", "CONTEXT"]
    assert [t.name for t in ens.output] == ["ANSWER", "SCORE", "START", "END", "IMPOSSIBLE"]
    assert json.loads((repo / MARKER).read_text())["platform"] == "onnxruntime_onnx"


def test_answers_through_the_repository_equal_the_engines(bundle: Path, engine: Engine, tmp_path: Path,
                                                          pb_utils: types.ModuleType) -> None:
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(kind="cpu"))
    responses = run_ensemble(repo, PAIRS)
    for (q, c), r in zip(PAIRS, responses):
        assert r.error is None, r.error.message()
        want = engine.answer(q, c)
        got = r.outputs
        assert got["ANSWER"].tolist() == [want.text.encode()]
        assert (int(got["START"][0]), int(got["END"][0]), bool(got["IMPOSSIBLE"][0])) == (want.start, want.end, want.impossible)
        assert float(got["SCORE"][0]) == pytest.approx(want.score, rel=1e-5)
    assert responses[2].outputs["ANSWER"][0] == ANSWER.encode()  # found in a later window of a long context


def test_top_k_and_impossible_answers_equal_the_engines(bundle: Path, engine: Engine, tmp_path: Path,
                                                        pb_utils: types.ModuleType) -> None:
    opts = TritonOptions(kind="cpu", top_k=3, handle_impossible=True, null_threshold=0.5, doc_stride=16, max_answer_len=5)
    repo = write_repository(bundle, tmp_path / "repo", opts)
    for (q, c), r in zip(PAIRS, run_ensemble(repo, PAIRS)):
        assert r.error is None, r.error.message()
        want = engine.answer(q, c, top_k=3, handle_impossible=True, null_threshold=0.5, doc_stride=16, max_answer_len=5)
        assert r.outputs["ANSWER"].tolist() == [a.text.encode() for a in want]
        assert r.outputs["IMPOSSIBLE"].tolist() == [a.impossible for a in want]
        assert r.outputs["SCORE"].tolist() == pytest.approx([a.score for a in want], rel=1e-5)


def test_windows_are_padded_to_length_buckets_so_requests_batch_together(bundle: Path, tmp_path: Path,
                                                                          pb_utils: types.ModuleType) -> None:
    b = lookup_bundle(tmp_path / "b128", **planted(ANSWER), max_seq_len=128)
    repo = write_repository(b, tmp_path / "repo", TritonOptions(kind="cpu", length_buckets=(32, 64)))
    tokenize = load_python_model(repo, TOKENIZE)
    shapes = [r.outputs["input_ids"].shape for r in tokenize.execute([FakeRequest(**strings(q, c)) for q, c in [
        ("Where?", "Zanzibar Island."), ("Where did it go?", "It went to Zanzibar Island, they say."),
        ("Where?", "word " * 40 + "Zanzibar Island."), ("Where?", "word " * 300)]])]
    assert shapes[0] == shapes[1] == (1, 32)  # two short requests: same shape, one model batch
    assert shapes[2] == (1, 64)
    assert shapes[3][1] == 128 and shapes[3][0] > 1  # a long context: several windows of max_seq_len


def test_request_errors_come_back_as_that_requests_error(bundle: Path, tmp_path: Path, pb_utils: types.ModuleType) -> None:
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(kind="cpu", max_batch_size=2))
    responses = run_ensemble(repo, [("Where?", "   "), ("Where?", "word " * 200 + "Zanzibar Island."),
                                    ("Where did the ship sail?", PAIRS[0][1])])
    assert "InvalidInputError" in responses[0].error.message() and "context is empty" in responses[0].error.message()
    assert "at most 2 per request" in responses[1].error.message()
    assert responses[2].error is None and responses[2].outputs["ANSWER"][0] == ANSWER.encode()
    decode = load_python_model(repo, DECODE)
    (bad,) = decode.execute([FakeRequest(**strings(*PAIRS[0]), start_logits=np.zeros((3, 64), np.float32),
                                         end_logits=np.zeros((3, 64), np.float32))])
    assert "disagree" in bad.error.message()


def test_tensorrt_plan_is_served_with_every_profile(tmp_path: Path) -> None:
    root = lookup_bundle(tmp_path / "trt", **planted(ANSWER), max_seq_len=128, precisions=("fp32",))
    s, e = lookup_tables(**planted(ANSWER))
    write_lookup_onnx(root / "model.trt.fp16.onnx", s, e, logits_dtype="float16")
    (root / "model.fp16.plan").write_bytes(b"not a real plan: Triton is not run here")
    manifest = json.loads((root / "manifest.json").read_text())
    sha = {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in ("model.trt.fp16.onnx", "model.fp16.plan")}
    manifest["artifacts"] += [
        {"path": "model.trt.fp16.onnx", "format": "onnx-trt", "precision": "fp16", "sha256": sha["model.trt.fp16.onnx"]},
        {"path": "model.fp16.plan", "format": "tensorrt", "precision": "fp16", "sha256": sha["model.fp16.plan"],
         "source": "model.trt.fp16.onnx", "tensorrt_version": "10.3.0", "compute_capability": "8.7",
         "profiles": [[1, 64, 64], [65, 128, 128]], "max_batch_size": 16},
    ]
    (root / "manifest.json").write_text(json.dumps(manifest))
    repo = write_repository(root, tmp_path / "repo")
    parsed = validate_repository(repo)
    model = parsed[MODEL]
    assert (model.platform, model.max_batch_size) == ("tensorrt_plan", 16)  # capped by the plan's profiles
    assert [list(g.profile) for g in model.instance_group] == [["0", "1"]]
    assert mc.DataType.Name(model.output[0].data_type) == "TYPE_FP16"
    assert mc.DataType.Name(parsed[DECODE].input[2].data_type) == "TYPE_FP16"
    assert parsed[TOKENIZE].parameters["length_buckets"].string_value == "64,128"
    assert (repo / MODEL / "1" / "model.plan").read_bytes() == (root / "model.fp16.plan").read_bytes()
    marker = json.loads((repo / MARKER).read_text())
    assert (marker["tensorrt_version"], marker["compute_capability"]) == ("10.3.0", "8.7")
    onnx_repo = write_repository(root, tmp_path / "onnx-repo", TritonOptions(model="onnx", precision="fp32"))
    assert validate_repository(onnx_repo)[MODEL].platform == "onnxruntime_onnx"
    with pytest.raises(ExportError, match="GPU only"):
        TritonOptions(model="tensorrt", kind="cpu")
    assert parse(write_repository(root, tmp_path / "b2", TritonOptions(length_buckets=(32, 200))), TOKENIZE) \
        .parameters["length_buckets"].string_value == "32,128"  # bounds >= max_seq_len dropped, max_seq_len added
    manifest["artifacts"][-1]["profiles"] = [[16, 64, 64], [65, 128, 128]]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="outside every optimization profile"):
        write_repository(root, tmp_path / "bad", TritonOptions(length_buckets=(8,)))


@pytest.mark.parametrize(("model", "old", "new", "message"), [
    (DECODE, "data_type: TYPE_FP32\n  dims: [ -1, -1 ]", "data_type: TYPE_FP16\n  dims: [ -1, -1 ]", "data type"),
    (DECODE, "dims: [ -1, -1 ]", "dims: [ -1, -1, -1 ]", "shape"),
    (MODEL, "dynamic_batching {", "dynamic_batchin {", "not a valid Triton model config"),
    (MODEL, "kind: KIND_CPU", "kind: KIND_TPU", "not a valid Triton model config"),
    (ENSEMBLE, 'input_map {\n      key: "CONTEXT"\n      value: "CONTEXT"\n    }\n    output_map',
     "output_map", "not mapped"),
    (ENSEMBLE, 'model_name: "spanrt_decode"', 'model_name: "spanrt_decoder"', "not in the repository"),
    (TOKENIZE, 'name: "spanrt_tokenize"', 'name: "tokenize"', "differs from its folder"),
])
def test_validation_catches_broken_configs(bundle: Path, tmp_path: Path, model: str, old: str, new: str, message: str) -> None:
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(kind="cpu"))
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ExportError, match=message):
        validate_repository(repo)


def test_target_folder_rules(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    write_repository(bundle, out, TritonOptions(kind="cpu"))
    with pytest.raises(ExportError, match="--force"):
        write_repository(bundle, out, TritonOptions(kind="cpu"))
    write_repository(bundle, out, TritonOptions(kind="cpu", force=True))
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a repository written by"):
        write_repository(bundle, other, TritonOptions(kind="cpu", force=True))
    assert (other / "precious.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_command_line(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["triton", str(bundle), "--out", str(tmp_path / "repo"), "--kind", "cpu", "--top-k", "2", "--validate"]) == 0
    assert "validated" in capsys.readouterr().out
    assert parse(tmp_path / "repo", DECODE).parameters["top_k"].string_value == "2"


def test_python_m_export_triton_runs_as_a_command(bundle: Path, tmp_path: Path) -> None:
    import subprocess

    run = subprocess.run([sys.executable, "-m", "export", "triton", str(bundle), "--out", str(tmp_path / "repo"), "--kind", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{ENSEMBLE} = {TOKENIZE} -> {MODEL} (onnxruntime_onnx, model.fp32.onnx) -> {DECODE}" in run.stdout
    assert (tmp_path / "repo" / MODEL / "1" / "model.onnx").is_file()
    run = subprocess.run([sys.executable, "-m", "export", "triton", str(bundle), "--out", str(tmp_path / "repo")],
                         capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stderr.strip()) == (1, f"error: {tmp_path / 'repo'} already exists; pass --force to replace it")


def test_model_py_needs_no_torch_and_no_triton_to_import(tmp_path: Path, bundle: Path) -> None:
    import subprocess

    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(kind="cpu"))
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('m', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "bad = [x for x in ('torch', 'transformers', 'triton_python_backend_utils') if x in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(repo / TOKENIZE / "1" / "model.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    shutil.rmtree(repo)


# ---- the CPU repository (--target cpu) ---------------------------------------------------------------------
def test_cpu_repository_is_one_python_model_over_the_copied_bundle(bundle: Path, tmp_path: Path) -> None:
    env = tmp_path / "stub-env"
    opts = TritonOptions(target="cpu", instances=2, max_batch_size=8, max_queue_delay_us=300, max_queue_size=50,
                         threads=1, top_k=2, python_env=str(env), max_context_bytes=1000)
    repo = write_repository(bundle, tmp_path / "repo", opts)
    parsed = validate_repository(repo)
    assert list(parsed) == [CPU_MODEL]
    cfg = parsed[CPU_MODEL]
    assert (cfg.backend, cfg.max_batch_size) == ("python", 8)
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims), t.optional) for t in cfg.input] == [
        ("QUESTION", "TYPE_STRING", [1], False), ("CONTEXT", "TYPE_STRING", [1], False), ("TOP_K", "TYPE_INT32", [1], True),
        ("MAX_ANSWER_LEN", "TYPE_INT32", [1], True), ("HANDLE_IMPOSSIBLE", "TYPE_BOOL", [1], True)]
    assert [t.name for t in cfg.output] == ["ANSWER", "SCORE", "START", "END", "IMPOSSIBLE"]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 300
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 50
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["spanrt_stage"] == "engine" and params["backend"] == "auto" and params["threads"] == "1"
    assert params["top_k"] == "2" and params["max_context_bytes"] == "1000"
    assert params["EXECUTION_ENV_PATH"] == str(env.resolve())
    copied = repo / CPU_MODEL / "1" / "bundle"
    assert (copied / "manifest.json").read_bytes() == (bundle / "manifest.json").read_bytes()
    assert (copied / "model.fp32.onnx").read_bytes() == (bundle / "model.fp32.onnx").read_bytes()
    assert json.loads((repo / MARKER).read_text())["target"] == "cpu"
    (copied / "model.fp32.onnx").unlink()  # a hard link to the bundle's file: never write through it
    (copied / "model.fp32.onnx").write_bytes(b"damaged")
    with pytest.raises(ExportError, match="sha256 mismatch"):
        validate_repository(repo)
    with pytest.raises(ExportError, match="--target must be"):
        TritonOptions(target="tpu")
    with pytest.raises(ExportError, match="--model tensorrt is for --target gpu"):
        TritonOptions(target="cpu", model="tensorrt")
    with pytest.raises(ExportError, match="--backend must be"):
        write_repository(bundle, tmp_path / "r2", TritonOptions(target="cpu", backend="magic"))
    assert export_main(["triton", str(bundle), "--out", str(tmp_path / "r3"), "--target", "cpu", "--validate"]) == 0


def rows(pairs: list[tuple[str, str]], **options: np.ndarray) -> FakeRequest:
    return FakeRequest(QUESTION=np.array([[q.encode()] for q, _ in pairs], dtype=np.object_),
                       CONTEXT=np.array([[c.encode()] for _, c in pairs], dtype=np.object_), **options)


def test_cpu_model_answers_a_dynamic_batch_as_the_engine_and_isolates_bad_requests(
        bundle: Path, engine: Engine, tmp_path: Path, pb_utils: types.ModuleType) -> None:
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(target="cpu", threads=1, max_context_bytes=2000))
    model = load_python_model(repo, CPU_MODEL)
    long_context = "filler words. " * 200
    requests = [
        rows(PAIRS[:2]),
        rows([("Where?", "   ")]),  # Engine refuses it: answered alone, only this request fails
        rows(PAIRS[2:5], TOP_K=np.array([[3], [3], [1]], np.int32), HANDLE_IMPOSSIBLE=np.array([[True], [False], [True]])),
        FakeRequest(QUESTION=np.array([[b"Where \xff?"]], dtype=np.object_), CONTEXT=np.array([[b"Zanzibar"]], dtype=np.object_)),
        rows([("Where?", long_context)]),
        rows(PAIRS[:1], MAX_ANSWER_LEN=np.array([[0]], np.int32)),
    ]
    out = model.execute(requests)
    assert len(out) == len(requests)
    for i in (1, 3, 4, 5):
        assert out[i].error is not None and out[i].error.code == "INVALID_ARG" and not out[i].outputs
    assert "is empty or only whitespace" in out[1].error.message()
    assert "not valid UTF-8" in out[3].error.message()
    assert "at most 2000 bytes" in out[4].error.message()
    assert "max_answer_len" in out[5].error.message()

    def check(got: dict[str, np.ndarray], row: int, want: list[Any]) -> None:
        k = len(want)
        assert got["ANSWER"][row][:k].tolist() == [a.text.encode() for a in want]
        assert got["START"][row][:k].tolist() == [a.start for a in want] and got["END"][row][:k].tolist() == [a.end for a in want]
        assert got["IMPOSSIBLE"][row][:k].tolist() == [a.impossible for a in want]
        assert got["SCORE"][row][:k].tolist() == pytest.approx([a.score for a in want], rel=1e-5)
        assert got["START"][row][k:].tolist() == [-1] * (got["START"].shape[1] - k)  # padding

    assert out[0].error is None and out[0].outputs["ANSWER"].shape == (2, 1)
    for row, pair in enumerate(PAIRS[:2]):
        check(out[0].outputs, row, [engine.answer(*pair)])
    assert out[2].error is None and out[2].outputs["ANSWER"].shape == (3, 3)
    check(out[2].outputs, 0, engine.answer(*PAIRS[2], top_k=3, handle_impossible=True))  # type: ignore[arg-type]
    check(out[2].outputs, 1, engine.answer(*PAIRS[3], top_k=3))  # type: ignore[arg-type]
    check(out[2].outputs, 2, [engine.answer(*PAIRS[4], handle_impossible=True)])
    model.finalize()


# ---- what spanrt_model serves: engine.backends' registry decides ------------------------------------------
def test_the_served_model_is_chosen_by_the_backend_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from engine.bundle import load_bundle
    from export.triton_config import choose_backend

    root = lookup_bundle(tmp_path / "b", **planted(ANSWER), precisions=("fp32", "int8", "fp16"))
    manifest = json.loads((root / "manifest.json").read_text())
    for precision in ("fp32", "int8"):  # plans listed fp32 first: the backend's own order (fp16, int8, fp32) decides
        (root / f"model.{precision}.plan").write_bytes(b"not a real plan")
        manifest["artifacts"].append({"path": f"model.{precision}.plan", "format": "tensorrt", "precision": precision,
                                      "sha256": hashlib.sha256(b"not a real plan").hexdigest()})
    (root / "manifest.json").write_text(json.dumps(manifest))
    b = load_bundle(root)

    def served(**options: Any) -> tuple[str, str]:
        backend, artifact = choose_backend(b, TritonOptions(**options))
        return backend.name, artifact.path.name

    assert served() == ("tensorrt", "model.int8.plan")
    assert served(precision="fp32") == ("tensorrt", "model.fp32.plan")
    assert served(precision="fp16") == ("onnxruntime-cuda", "model.fp16.onnx")  # no fp16 plan: the next backend in auto order
    assert served(model="onnx") == ("onnxruntime-cuda", "model.fp16.onnx")
    assert served(kind="cpu") == ("onnxruntime", "model.int8.onnx")
    with pytest.raises(ExportError, match="onnxruntime-cuda runs fp16 or fp32"):  # as Engine refuses int8 on ONNX Runtime CUDA
        served(model="onnx", precision="int8")
    with pytest.raises(ExportError, match="onnxruntime runs int8 or fp32"):
        served(kind="cpu", precision="fp16")
    monkeypatch.setattr(OnnxRuntimeCPU, "PRECISIONS", ("fp32", "int8"))  # the backend's one declaration
    assert served(kind="cpu") == ("onnxruntime", "model.fp32.onnx")
    with pytest.raises(ExportError, match="build-trt"):
        choose_backend(load_bundle(lookup_bundle(tmp_path / "c", **planted(ANSWER))), TritonOptions(model="tensorrt"))
