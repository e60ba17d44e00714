"""export.triton: the Triton model repositories, without a server (a real tritonserver serves the
CPU repository in test_triton_server.py, test_triton_cpu.py runs its model.py). (1) Every config.pbtxt is parsed with Triton's
ModelConfig protobuf schema (tritonclient) and the GPU ensemble's graph is checked with Triton's
load-time rules; (2) the generated Python-backend model.py runs under a stand-in for
triton_python_backend_utils (for the ensemble, with the repository's own ONNX file run by ONNX
Runtime in between, requests of equal shape batched together as Triton's dynamic batcher does):
the answers must equal engine.Engine's on the same bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import lookup_bundle, lookup_tables, planted, write_lookup_onnx

pytest.importorskip("tritonclient.grpc.model_config_pb2")
from triton_helpers import (  # noqa: E402
    ANSWER,
    PAIRS,
    FakeRequest,
    bundle,  # noqa: F401 (a fixture)
    decode_request,
    engine,  # noqa: F401 (a fixture)
    load_python_model,
    mc,
    parse,
    pb_utils,  # noqa: F401 (a fixture)
    run_ensemble,
    strings,
)

from engine import Engine  # noqa: E402
from export.__main__ import main as export_main  # noqa: E402
from export.errors import ExportError  # noqa: E402
from export.triton import (  # noqa: E402
    DECODE,
    ENSEMBLE,
    MARKER,
    MODEL,
    TOKENIZE,
    TritonOptions,
    write_repository,
)
from export.triton_check import validate_repository  # noqa: E402

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
    (tokenized,) = load_python_model(repo, TOKENIZE).execute([FakeRequest(**strings(*PAIRS[0]))])
    (bad,) = decode.execute([decode_request(PAIRS[0][1], tokenized, np.zeros((3, 64), np.float32), np.zeros((3, 64), np.float32))])
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
    assert {t.name: mc.DataType.Name(t.data_type) for t in parsed[DECODE].input}["start_logits"] == "TYPE_FP16"
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
