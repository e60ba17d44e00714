"""The systems the bench compares: one spec per system, and the runner class of each kind, by name.

A system is what a user would run to answer SQuAD questions: a peer (the Hugging Face
question-answering pipeline over PyTorch or over Optimum's ONNX Runtime model, or CTranslate2's
Encoder with a NumPy QA head and span decode) or SpanRT on one
backend and precision. Each runs in its own process (bench.worker) so that its load time and
peak memory are its own. The interface every system implements is bench.base.System.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.base import Artifacts, System

from engine.options import DEFAULTS

BASELINE = "transformers-pytorch-fp32"


@dataclass(frozen=True)
class QASettings:
    """Answering settings, identical for every system (names as in the Hugging Face pipeline)."""

    top_k: int = DEFAULTS.top_k  # SpanRT's defaults (engine.options), except:
    max_answer_len: int = DEFAULTS.max_answer_len
    max_seq_len: int = 384  # the Hugging Face pipeline's window and stride, which every system uses
    doc_stride: int = 128
    max_question_len: int = DEFAULTS.max_question_len
    align_to_words: bool = DEFAULTS.align_to_words  # also the Hugging Face pipeline's default
    handle_impossible_answer: bool = DEFAULTS.handle_impossible  # True for SQuAD v2.0 files

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

    @property
    def runner(self) -> str:
        """The name of the RUNNERS entry that runs this system."""
        if self.family == "spanrt":
            return "spanrt"
        return "ctranslate2" if self.backend == "ctranslate2" else "pipeline"


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
# The class that runs each kind of system ("module:Class"), imported only when a system is made: the
# runners import bench.base, never this table, so the table and the systems form no import cycle.
RUNNERS = {"pipeline": "bench.peers:PipelineSystem", "ctranslate2": "bench.ct2:CTranslate2System",
           "spanrt": "bench.spanrt:SpanRTSystem"}


def make_system(spec: SystemSpec, artifacts: Artifacts, settings: QASettings, *, threads: int, max_batch_size: int) -> System:
    """The System object for ``spec``: its runner class imported now, by name (nothing is loaded yet)."""
    module, _, cls = RUNNERS[spec.runner].partition(":")
    runner = getattr(importlib.import_module(module), cls)
    return runner(spec, artifacts, settings, threads=threads, max_batch_size=max_batch_size)


def select(names: list[str] | None) -> list[SystemSpec]:
    """The specs named (all systems when None), in registry order; unknown names are an error."""
    if names is None:
        return list(SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS_BY_NAME)}")
    return [s for s in SYSTEMS if s.name in names]
