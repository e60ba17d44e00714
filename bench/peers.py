"""The peers: the Hugging Face question-answering pipeline over PyTorch, or over Optimum's ONNX Runtime model.

These are the real libraries a user runs today, called the way their documentation shows: the
transformers `pipeline("question-answering")` and Optimum's `ORTModelForQuestionAnswering` in
that same pipeline; int8 is Optimum's dynamic quantization (`ORTQuantizer` with
`AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)`). Exports are made once
from the same checkpoint into a cache folder, outside the timed part.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.base import Prediction, System, SystemUnavailable

BENCH_EXTRA_HINT = 'pip install "spanrt[bench]"  (on CPU-only machines: pip install torch==2.13.0 first)'
OPTIMUM_INT8_FILE = "model_quantized.onnx"


def _missing(exc: ImportError, what: str) -> SystemUnavailable:
    return SystemUnavailable(f"{what} is not installed (import of {exc.name!r} failed). Install it with: {BENCH_EXTRA_HINT}")


def _check_pipeline_exists() -> None:
    try:
        from transformers.pipelines.question_answering import QuestionAnsweringPipeline  # noqa: F401
    except ImportError as exc:
        version = importlib.metadata.version("transformers")
        raise SystemUnavailable(
            f"transformers {version} has no question-answering pipeline (removed in 5.3; 5.2.0 is the last with it). "
            f"Install the bench extra, which pins transformers 4.57.x: {BENCH_EXTRA_HINT}") from exc


def optimum_onnx(checkpoint: Path, cache_root: Path, precision: str) -> tuple[Path, str, float]:
    """Export ``checkpoint`` with Optimum (and quantize it for int8) into the cache; (folder, file, seconds).

    Cached by checkpoint sha256 and optimum version, so only the first run pays for the export.
    """
    from engine.default_model import checkpoint_sha256

    try:
        version = importlib.metadata.version("optimum-onnx")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemUnavailable(f"optimum-onnx is not installed. Install it with: {BENCH_EXTRA_HINT}") from exc
    base = cache_root / "bench" / "optimum" / f"{checkpoint.name}-{checkpoint_sha256(checkpoint)[:16]}-optimum-onnx-{version}"
    fp32_dir, int8_dir = base / "fp32", base / "int8"
    t0 = time.perf_counter()
    if not (fp32_dir / "model.onnx").is_file():
        _atomic_build(fp32_dir, lambda tmp: _export_fp32(checkpoint, tmp))
    if precision == "fp32":
        return fp32_dir, "model.onnx", time.perf_counter() - t0
    if precision != "int8":
        raise ValueError(f"no Optimum recipe for precision {precision!r}")
    if not (int8_dir / OPTIMUM_INT8_FILE).is_file():
        _atomic_build(int8_dir, lambda tmp: _quantize_int8(fp32_dir, tmp))
    return int8_dir, OPTIMUM_INT8_FILE, time.perf_counter() - t0


def _atomic_build(target: Path, build: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another run finished first: keep theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_fp32(checkpoint: Path, out: Path) -> None:
    try:
        from optimum.onnxruntime import ORTModelForQuestionAnswering
    except ImportError as exc:
        raise _missing(exc, "Optimum's ONNX Runtime support (optimum-onnx[onnxruntime])") from exc
    model = ORTModelForQuestionAnswering.from_pretrained(checkpoint, export=True, provider="CPUExecutionProvider")
    model.save_pretrained(out)


def _quantize_int8(fp32_dir: Path, out: Path) -> None:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    quantizer = ORTQuantizer.from_pretrained(fp32_dir, file_name="model.onnx")
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    quantizer.quantize(save_dir=out, quantization_config=config)
    if not (out / OPTIMUM_INT8_FILE).is_file():
        raise RuntimeError(f"ORTQuantizer wrote no {OPTIMUM_INT8_FILE} into {out}: {sorted(p.name for p in out.iterdir())}")


class PipelineSystem(System):
    """transformers' QuestionAnsweringPipeline over a PyTorch model or an Optimum ORTModel."""

    pipe: Any = None

    def import_libraries(self) -> None:
        try:
            import torch  # noqa: F401
            import transformers
        except ImportError as exc:
            raise _missing(exc, "the Hugging Face peer (torch + transformers)") from exc
        _check_pipeline_exists()
        transformers.logging.set_verbosity_error()  # "Device set to use cpu" and friends
        if self.spec.backend == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
                from optimum.onnxruntime import ORTModelForQuestionAnswering  # noqa: F401
            except ImportError as exc:
                raise _missing(exc, "Optimum's ONNX Runtime support (optimum-onnx[onnxruntime])") from exc

    def load(self) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer

        if self.spec.device != "cpu":
            raise SystemUnavailable(f"the bench runs the peers on CPU only, not {self.spec.device}")
        torch.set_num_threads(self.threads)
        checkpoint = self.artifacts.checkpoint
        if checkpoint is None:
            raise SystemUnavailable("no Hugging Face checkpoint for the peers (pass --model with a checkpoint folder)")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        details: dict[str, Any] = {"threads": torch.get_num_threads(), "checkpoint": str(checkpoint)}
        if self.spec.backend == "pytorch":
            from transformers import AutoModelForQuestionAnswering, pipeline

            model = AutoModelForQuestionAnswering.from_pretrained(checkpoint, dtype=torch.float32).eval()
            self.pipe = pipeline("question-answering", model=model, tokenizer=tokenizer, device="cpu")
            dtype = next(model.parameters()).dtype
            if dtype != torch.float32:
                raise RuntimeError(f"the baseline model loaded as {dtype}, not float32")
            details.update(backend="pytorch", precision="fp32", device="cpu")
        elif self.spec.backend == "onnxruntime":
            import onnxruntime as ort
            from optimum.onnxruntime import ORTModelForQuestionAnswering
            from optimum.onnxruntime import pipeline as ort_pipeline

            if self.artifacts.onnx_dir is None:
                raise SystemUnavailable("the Optimum export was not prepared")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            model = ORTModelForQuestionAnswering.from_pretrained(
                self.artifacts.onnx_dir, file_name=self.artifacts.onnx_file, session_options=options, provider="CPUExecutionProvider")
            self.pipe = ort_pipeline("question-answering", model=model, tokenizer=tokenizer)
            providers = list(model.providers) if hasattr(model, "providers") else list(model.model.get_providers())
            if providers[:1] != ["CPUExecutionProvider"]:
                raise RuntimeError(f"the Optimum model got providers {providers}, not CPUExecutionProvider")
            details.update(backend="onnxruntime", providers=providers, precision=self.spec.precision,
                           onnx=str(Path(self.artifacts.onnx_dir) / str(self.artifacts.onnx_file)), device="cpu",
                           quantization="dynamic, AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)"
                           if self.spec.precision == "int8" else None)
        else:
            raise ValueError(f"unknown peer backend {self.spec.backend!r}")
        self._instrument()
        details["pipeline"] = type(self.pipe).__name__
        return details

    def _instrument(self) -> None:
        """Count time in the pipeline's own stages: preprocess (tokenize), _forward (model), postprocess (decode)."""
        pipe = self.pipe
        preprocess, forward, postprocess = pipe.preprocess, pipe._forward, pipe.postprocess

        def timed_preprocess(*args: Any, **kwargs: Any) -> Iterator[Any]:
            # a generator (one item per window): time each step, not the generator's creation
            it = iter(preprocess(*args, **kwargs))
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self._stage_s["tokenize"] += time.perf_counter() - t
                    return
                self._stage_s["tokenize"] += time.perf_counter() - t
                yield item

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self._stage_s["model"] += time.perf_counter() - t

        def timed_postprocess(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return postprocess(*args, **kwargs)
            finally:
                self._stage_s["decode"] += time.perf_counter() - t

        pipe.preprocess, pipe._forward, pipe.postprocess = timed_preprocess, timed_forward, timed_postprocess

    def answer(self, questions: list[str], contexts: list[str], batch_size: int) -> list[Prediction]:
        s = self.settings
        out = self.pipe(
            question=questions, context=contexts, batch_size=batch_size, top_k=s.top_k, max_answer_len=s.max_answer_len,
            max_seq_len=s.max_seq_len, doc_stride=s.doc_stride, max_question_len=s.max_question_len,
            align_to_words=s.align_to_words, handle_impossible_answer=s.handle_impossible_answer,
        )
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(questions):
            raise RuntimeError(f"the pipeline returned {len(out)} answers for {len(questions)} questions")
        preds = []
        for d in out:
            if isinstance(d, list):  # top_k > 1 gives a list per question: keep the best
                d = d[0]
            preds.append(Prediction(text=d["answer"], start=int(d["start"]), end=int(d["end"]), score=float(d["score"])))
        return preds

    def close(self) -> None:
        self.pipe = None
