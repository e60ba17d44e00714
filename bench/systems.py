"""The systems the bench compares: one spec per system, one small interface every system implements.

A system is what a user would run to answer SQuAD questions: a peer (the Hugging Face
question-answering pipeline over PyTorch or over Optimum's ONNX Runtime model, or CTranslate2's
Encoder with a NumPy QA head and span decode) or SpanRT on one
backend and precision. Each runs in its own process (bench.worker) so that its load time and
peak memory are its own.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BASELINE = "transformers-pytorch-fp32"
STAGES = ("tokenize", "model", "decode")


@dataclass(frozen=True)
class QASettings:
    """Answering settings, identical for every system (names as in the Hugging Face pipeline)."""

    top_k: int = 1
    max_answer_len: int = 30
    max_seq_len: int = 384
    doc_stride: int = 128
    max_question_len: int = 64
    align_to_words: bool = True  # the Hugging Face pipeline's default
    handle_impossible_answer: bool = False  # True for SQuAD v2.0 files

    def to_dict(self) -> dict[str, Any]:
        """The settings as printed and stored in results.json."""
        return asdict(self)


@dataclass(frozen=True)
class SystemSpec:
    """One system: its result name, who makes it, and the backend/precision/device it asks for."""

    name: str
    family: str  # "peer" or "spanrt"
    backend: str  # the runtime underneath, as the system names it
    precision: str
    device: str  # "cpu" or "cuda"
    description: str
    # A slow system whose middle batch sizes add nothing to the comparison (a peer, or SpanRT's
    # reference backend): with the default batch sizes it answers at batch 1 and the largest only,
    # which keeps the default run within 10 minutes on 2 cores. --batch-sizes runs it at every size.
    ends_only: bool = False
    # The native encoder's instruction-set cap (engine option cpu_isa): a lower path measured on the same machine.
    cpu_isa: str | None = None


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec(BASELINE, "peer", "pytorch", "fp32", "cpu",
               "Hugging Face transformers question-answering pipeline, PyTorch fp32 (the baseline)"),
    SystemSpec("optimum-onnxruntime-fp32", "peer", "onnxruntime", "fp32", "cpu",
               "Optimum ORTModelForQuestionAnswering (ONNX Runtime fp32) in the transformers pipeline", ends_only=True),
    SystemSpec("optimum-onnxruntime-int8", "peer", "onnxruntime", "int8", "cpu",
               "Optimum ORTModelForQuestionAnswering, dynamic int8 (ORTQuantizer, avx512_vnni config) in the transformers pipeline", ends_only=True),
    SystemSpec("ctranslate2-fp32", "peer", "ctranslate2", "fp32", "cpu",
               "CTranslate2 Encoder (float32) on the converted encoder, QA head and span decode in NumPy", ends_only=True),
    SystemSpec("ctranslate2-int8", "peer", "ctranslate2", "int8", "cpu",
               "CTranslate2 Encoder (int8 weights, compute_type int8), QA head and span decode in NumPy", ends_only=True),
    SystemSpec("spanrt-onnxruntime-fp32", "spanrt", "onnxruntime", "fp32", "cpu", "SpanRT, ONNX Runtime CPU, fp32"),
    SystemSpec("spanrt-onnxruntime-int8", "spanrt", "onnxruntime", "int8", "cpu", "SpanRT, ONNX Runtime CPU, int8"),
    SystemSpec("spanrt-native-fp32", "spanrt", "native", "fp32", "cpu", "SpanRT, native C++ encoder, fp32"),
    SystemSpec("spanrt-native-int8", "spanrt", "native", "int8", "cpu", "SpanRT, native C++ encoder, int8"),
    SystemSpec("spanrt-native-int8-avx2", "spanrt", "native", "int8", "cpu",
               "SpanRT, native C++ encoder, int8, capped at its plain AVX2 path (cpu_isa='avx2': int16 vpmaddwd, no VNNI)",
               cpu_isa="avx2"),
    SystemSpec("spanrt-native-int8-avx2-vnni", "spanrt", "native", "int8", "cpu",
               "SpanRT, native C++ encoder, int8, capped at its AVX2 path with AVX-VNNI (cpu_isa='avx2_vnni')", cpu_isa="avx2_vnni"),
    SystemSpec("spanrt-onnxruntime-openvino-bf16", "spanrt", "onnxruntime-openvino", "bf16", "cpu",
               "SpanRT, ONNX Runtime with the OpenVINO plugin (CPU), bf16 from the fp32 model"),
    SystemSpec("spanrt-torch-fp32", "spanrt", "torch", "fp32", "cpu", "SpanRT, PyTorch backend (reference), fp32", ends_only=True),
    SystemSpec("spanrt-onnxruntime-cuda-fp16", "spanrt", "onnxruntime-cuda", "fp16", "cuda", "SpanRT, ONNX Runtime CUDA, fp16"),
    SystemSpec("spanrt-tensorrt-fp16", "spanrt", "tensorrt", "fp16", "cuda", "SpanRT, TensorRT, fp16"),
    SystemSpec("spanrt-tensorrt-int8", "spanrt", "tensorrt", "int8", "cuda", "SpanRT, TensorRT, int8"),
    SystemSpec("spanrt-torch-cuda-fp16", "spanrt", "torch-cuda", "fp16", "cuda", "SpanRT, PyTorch CUDA, fp16"),
)
SYSTEMS_BY_NAME = {s.name: s for s in SYSTEMS}


class SystemUnavailable(Exception):
    """The system cannot run on this machine; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class Prediction:
    """One system's best answer to one question (character offsets into the context)."""

    text: str
    start: int | None
    end: int | None
    score: float


@dataclass
class Artifacts:
    """Files a system loads, prepared before it is timed (export time is not load time)."""

    checkpoint: Path | None = None  # Hugging Face checkpoint folder (peers)
    onnx_dir: Path | None = None  # Optimum export folder (optimum peers)
    onnx_file: str | None = None
    model_dir: Path | None = None  # CTranslate2 model folder (CTranslate2 peers)
    bundle: Path | None = None  # SpanRT bundle folder
    prepare_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


class System(abc.ABC):
    """A loaded question-answering system, driven by the bench worker."""

    def __init__(self, spec: SystemSpec, artifacts: Artifacts, settings: QASettings, *, threads: int, max_batch_size: int) -> None:
        self.spec = spec
        self.artifacts = artifacts
        self.settings = settings
        self.threads = threads
        self.max_batch_size = max_batch_size
        self._stage_s = dict.fromkeys(STAGES, 0.0)

    @abc.abstractmethod
    def import_libraries(self) -> None:
        """Import the packages this system needs (timed apart from loading the model)."""

    @abc.abstractmethod
    def load(self) -> dict[str, Any]:
        """Load the model; return what was actually used (backend, precision, provider, threads...)."""

    @abc.abstractmethod
    def answer(self, questions: list[str], contexts: list[str], batch_size: int) -> list[Prediction]:
        """Answer the questions in one call, batching as the system does at ``batch_size``."""

    def close(self) -> None:
        """Free the model."""

    def stage_seconds(self) -> dict[str, float]:
        """Seconds spent in tokenize / model / decode since the last reset (what the system lets us see)."""
        return dict(self._stage_s)

    def reset_stages(self) -> None:
        """Zero the stage counters."""
        self._stage_s = dict.fromkeys(STAGES, 0.0)


def make_system(spec: SystemSpec, artifacts: Artifacts, settings: QASettings, *, threads: int, max_batch_size: int) -> System:
    """The System object for ``spec`` (nothing is imported or loaded yet)."""
    if spec.family == "peer" and spec.backend == "ctranslate2":
        from bench.ct2 import CTranslate2System

        return CTranslate2System(spec, artifacts, settings, threads=threads, max_batch_size=max_batch_size)
    if spec.family == "peer":
        from bench.peers import PipelineSystem

        return PipelineSystem(spec, artifacts, settings, threads=threads, max_batch_size=max_batch_size)
    if spec.family == "spanrt":
        from bench.spanrt import SpanRTSystem

        return SpanRTSystem(spec, artifacts, settings, threads=threads, max_batch_size=max_batch_size)
    raise ValueError(f"unknown system family {spec.family!r} of {spec.name}")


def select(names: list[str] | None) -> list[SystemSpec]:
    """The specs named (all systems when None), in registry order; unknown names are an error."""
    if names is None:
        return list(SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS_BY_NAME)}")
    return [s for s in SYSTEMS if s.name in names]
