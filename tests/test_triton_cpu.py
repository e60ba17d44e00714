"""export.triton --target cpu: the CPU repository (one Python-backend model running engine.Engine),
its config parsed with Triton's schema, and its model.py run under a stand-in for Triton's Python
backend: a dynamic batch of requests is answered as the Engine answers, bad requests alone failing."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")
from triton_helpers import (  # noqa: E402
    PAIRS,
    FakeRequest,
    bundle,  # noqa: F401 (a fixture)
    engine,  # noqa: F401 (a fixture)
    load_python_model,
    mc,
    pb_utils,  # noqa: F401 (a fixture)
)

from engine import Engine  # noqa: E402
from export.errors import ExportError  # noqa: E402
from export.__main__ import main as export_main  # noqa: E402
from export.triton import CPU_MODEL, MARKER, TritonOptions, write_repository  # noqa: E402
from export.triton_check import validate_repository  # noqa: E402


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
