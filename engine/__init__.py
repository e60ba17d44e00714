"""SpanRT runtime: ``answer(question, context)`` and ``Engine`` over exported bundles.

Importing ``engine`` is cheap: the errors are imported now, the runtime (NumPy, tokenizers, the
backends) when ``answer``, ``Engine``, ``Answer`` or ``pipeline`` is first used. torch and
transformers are never imported on this path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine import errors
from engine.errors import (
    BackendUnavailableError,
    BundleError,
    EngineClosedError,
    InvalidInputError,
    UnknownOptionError,
)

if TYPE_CHECKING:
    from engine.api import Answer, Engine, QAPipeline, answer, pipeline
    from engine.batching import BatchingEngine

__all__ = [
    "Answer", "BackendUnavailableError", "BatchingEngine", "BundleError", "Engine", "EngineClosedError", "InvalidInputError",
    "QAPipeline", "UnknownOptionError", "answer", "errors", "pipeline",
]

_LAZY = {"Answer", "Engine", "QAPipeline", "answer", "pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from engine import api

        return getattr(api, name)
    if name == "BatchingEngine":
        from engine.batching import BatchingEngine

        return BatchingEngine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
