"""What the Triton tests share: a tiny bundle whose answer is planted, a stand-in for Triton's
Python backend (triton_python_backend_utils), and the generated model.py loaded and run as Triton
runs it (for the GPU ensemble: tokenize -> the repository's ONNX file on ONNX Runtime, equal shapes
batched together as Triton's dynamic batcher does -> decode)."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import lookup_bundle, planted

pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from engine import Engine  # noqa: E402
from export.triton import DECODE, MODEL, TOKENIZE  # noqa: E402
from export.triton_model import HANDOFF  # noqa: E402

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
    decode.stages.encoder = None  # decode answers from the tokenize step's HANDOFF tensors: it never tokenizes
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
        out.append(decode.execute([decode_request(c, tokenized[i], s, e)])[0])
    return out


def decode_request(context: str, tokenized: FakeResponse, start: np.ndarray, end: np.ndarray) -> FakeRequest:
    """The decode step's request as the ensemble maps it: CONTEXT, the tokenize step's HANDOFF tensors, the logits."""
    handoff = {name: tokenized.outputs[name] for name, _, _ in HANDOFF}
    return FakeRequest(CONTEXT=strings("", context)["CONTEXT"], **handoff, start_logits=start, end_logits=end)
