"""SpanRT as a bench system: an ``engine.Engine`` on one backend and precision, asked exactly as a user would."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from bench.base import Prediction, System, SystemUnavailable

# the package each backend loads the model with; imported in import_libraries when installed
_BACKEND_PACKAGES = {"onnxruntime": "onnxruntime", "onnxruntime-cuda": "onnxruntime", "tensorrt": "tensorrt",
                     "torch": "torch", "torch-cuda": "torch"}


class SpanRTSystem(System):
    """``Engine(bundle, backend=..., precision=..., max_batch_size=..., threads=...)``: answer() for one
    question, answer_batch() for more; its own stage counters give the tokenize/model/decode split."""

    engine: Any = None

    def import_libraries(self) -> None:
        importlib.import_module("engine.api")
        package = _BACKEND_PACKAGES.get(self.spec.backend)
        if package and importlib.util.find_spec(package) is not None:
            importlib.import_module(package)  # a missing one is reported by the Engine itself

    def load(self) -> dict[str, Any]:
        from engine import BackendUnavailableError, Engine

        if self.artifacts.bundle is None:
            raise SystemUnavailable("no SpanRT bundle was prepared")
        try:
            # context_cache=0: every question is tokenized in full, as the peers do; SQuAD's several
            # questions per paragraph would otherwise skip tokenization the peers pay for.
            self.engine = Engine(self.artifacts.bundle, backend=self.spec.backend, precision=self.spec.precision,
                                 max_batch_size=self.max_batch_size, threads=self.threads, context_cache=0, cpu_isa=self.spec.cpu_isa)
        except BackendUnavailableError as exc:
            raise SystemUnavailable(str(exc)) from exc
        eng = self.engine
        if (eng.backend, eng.precision) != (self.spec.backend, self.spec.precision):
            raise RuntimeError(f"asked for {self.spec.backend} {self.spec.precision}, the Engine runs {eng.backend} {eng.precision}")
        return {"backend": eng.backend, "precision": eng.precision, "device": eng.device, "bundle": str(eng.bundle.root),
                "max_batch_size": eng.max_batch_size, "max_seq_len": eng.max_seq_len,
                "backend_details": _jsonable(eng.backend_details)}

    def _options(self) -> dict[str, Any]:
        s = self.settings
        return {"top_k": s.top_k, "max_answer_len": s.max_answer_len, "max_seq_len": s.max_seq_len, "doc_stride": s.doc_stride,
                "max_question_len": s.max_question_len, "align_to_words": s.align_to_words,
                "handle_impossible_answer": s.handle_impossible_answer}

    def answer(self, questions: list[str], contexts: list[str], batch_size: int) -> list[Prediction]:
        if len(questions) == 1:
            ranked = [[self.engine.answer(questions[0], contexts[0], **self._options())]]
        else:
            ranked = self.engine.answer_batch(questions, contexts, **self._options())
        return [Prediction(text=r[0].text, start=r[0].start, end=r[0].end, score=float(r[0].score)) for r in ranked]

    def stage_seconds(self) -> dict[str, float]:
        return self.engine.stage_seconds() if self.engine is not None else super().stage_seconds()

    def reset_stages(self) -> None:
        if self.engine is not None:
            self.engine.reset_stage_seconds()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
