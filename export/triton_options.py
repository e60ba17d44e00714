"""What ``python -m export triton`` can be told, and the names of what it writes (the models, their
answer outputs, the marker file), shared by the writer (export/triton.py), the configs
(export/triton_config.py) and the checks (export/triton_check.py)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.options import DEFAULTS
from export.errors import ExportError

ENSEMBLE, TOKENIZE, MODEL, DECODE = "spanrt_qa", "spanrt_tokenize", "spanrt_model", "spanrt_decode"
CPU_MODEL = ENSEMBLE  # the CPU repository's one model answers under the ensemble's name: clients need not care
DEFAULT_MAX_CONTEXT_BYTES = 256 * 1024  # the CPU model refuses longer contexts (a request, not a document store)
MARKER = "spanrt_triton.json"  # written at the repository root (Triton only loads folders)
DEFAULT_BUCKETS = (64, 128, 256)  # plus max_seq_len; a plan's own profile bounds take precedence
ANSWER_OUTPUTS = (("ANSWER", "TYPE_STRING"), ("SCORE", "TYPE_FP32"), ("START", "TYPE_INT64"), ("END", "TYPE_INT64"),
                  ("IMPOSSIBLE", "TYPE_BOOL"))


@dataclass(frozen=True)
class TritonOptions:
    """What ``python -m export triton`` can be told (answering options are fixed per repository)."""

    target: str = "gpu"  # "gpu": the ensemble below; "cpu": one Python-backend model running engine.Engine
    model: str = "auto"  # "auto" (as engine.backends' auto order: a TensorRT plan on a GPU when present), "onnx" or "tensorrt"
    precision: str | None = None  # None: the chosen backend's best the bundle has; --target cpu: the Engine's default
    kind: str = "gpu"  # where spanrt_model runs: "gpu" or "cpu" (the Python stages always run on CPU)
    instances: int = 1  # spanrt_model instances (per GPU)
    python_instances: int = 2  # instances of each Python stage
    max_batch_size: int = 32  # windows per model batch (capped by a plan's profiles)
    max_queue_delay_us: int = 1000  # how long the dynamic batcher waits for batch mates
    max_queue_size: int = 0  # requests waiting at spanrt_model before Triton rejects more; 0: unbounded
    length_buckets: tuple[int, ...] | None = None  # None: the plan's profile bounds, else 64,128,256 (+ max_seq_len)
    max_question_len: int = DEFAULTS.max_question_len  # the answering options: engine.options
    doc_stride: int | None = DEFAULTS.doc_stride
    top_k: int = DEFAULTS.top_k
    max_answer_len: int = DEFAULTS.max_answer_len
    handle_impossible: bool = DEFAULTS.handle_impossible
    null_threshold: float = DEFAULTS.null_threshold
    align_to_words: bool = DEFAULTS.align_to_words
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
