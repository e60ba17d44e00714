"""A stand-in for transformers' ``pipeline("question-answering")``, which transformers 5.3 removed:
the same call, the same result dicts and shapes, answered by an ``engine.Engine``."""

from __future__ import annotations

import os
from typing import Any

from engine.api import DEFAULT_MAX_BATCH_SIZE, Engine
from engine.errors import InvalidInputError
from engine.options import DEFAULTS
from engine.postprocess import Answer

__all__ = ["QAPipeline", "pipeline"]

PIPELINE_MAX_ANSWER_LEN = 15  # the transformers pipeline's default, kept by engine.pipeline


def _as_dicts(result: Any) -> Any:
    if isinstance(result, Answer):
        return result.to_dict()
    dicts = [_as_dicts(r) for r in result]
    return dicts


class QAPipeline:
    """A stand-in for transformers' ``pipeline("question-answering")``: same call, same dicts.

    Results follow the pipeline's shapes, quirks included: one dict for one answer, a list of
    dicts for top_k > 1 (a single dict when only one answer exists), a list per question for lists.
    Defaults are the pipeline's too (max_answer_len=15, align_to_words=True).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, *args: Any, question: Any = None, context: Any = None, **options: Any) -> Any:
        """Answer like the pipeline: ``qa(question=..., context=...)``, ``qa(q, c)`` or ``qa({"question": q, "context": c})``."""
        if args:
            if question is not None or context is not None:
                raise InvalidInputError("pass question/context either positionally or by name, not both")
            if len(args) == 2:
                question, context = args
            elif len(args) == 1 and isinstance(args[0], dict):
                question, context = _from_dict(args[0])
            elif len(args) == 1 and isinstance(args[0], (list, tuple)) and all(isinstance(a, dict) for a in args[0]):
                pairs = [_from_dict(a) for a in args[0]]
                question, context = [p[0] for p in pairs], [p[1] for p in pairs]
            else:
                raise InvalidInputError("pass question= and context= (or a {'question': ..., 'context': ...} dict)")
        if question is None or context is None:
            raise InvalidInputError("both question and context are required")
        options.setdefault("max_answer_len", PIPELINE_MAX_ANSWER_LEN)
        result = self.engine.answer(question, context, **options)
        top_k = options.get("top_k", DEFAULTS.top_k)
        if isinstance(question, (list, tuple)) or isinstance(context, (list, tuple)):
            return [_pipeline_shape(_as_dicts(r), top_k) for r in result]  # type: ignore[union-attr]
        return _pipeline_shape(_as_dicts(result), top_k)

    def close(self) -> None:
        """Close the underlying Engine."""
        self.engine.close()


def _from_dict(item: dict[str, Any]) -> tuple[Any, Any]:
    if "question" not in item or "context" not in item:
        raise InvalidInputError("an input dict needs the keys 'question' and 'context'")
    return item["question"], item["context"]


def _pipeline_shape(dicts: Any, top_k: int) -> Any:
    if top_k != 1 and isinstance(dicts, list) and len(dicts) == 1:
        return dicts[0]  # the pipeline returns a bare dict when only one answer exists
    return dicts


def pipeline(task: str = "question-answering", model: str | os.PathLike[str] | Engine | None = None, *,
             backend: str = "auto", precision: str | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
             threads: int | None = None) -> QAPipeline:
    """The one-line migration from ``transformers.pipeline("question-answering", model=...)``:
    ``model`` is a SpanRT bundle folder (``python -m export CHECKPOINT``), None for the default model."""
    if task != "question-answering":
        raise InvalidInputError(f"SpanRT serves the 'question-answering' task only, not {task!r}")
    if isinstance(model, Engine):
        return QAPipeline(model)
    if model is None:
        from engine.default_model import bundle_for

        model = bundle_for(backend, precision)
    return QAPipeline(Engine(model, backend=backend, precision=precision, max_batch_size=max_batch_size, threads=threads))
