"""SpanRT runtime: ``answer(question, context)`` and ``Engine`` over exported bundles.

Importing ``engine`` is cheap: the errors are imported now, the runtime (NumPy, tokenizers, the
backends) when ``answer``, ``Engine``, ``Answer``, ``pipeline`` or ``BatchingEngine`` is first
used. torch and transformers are never imported on this path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine import errors
from engine.errors import (
    BackendUnavailableError,
    BundleError,
    CallCancelledError,
    EngineClosedError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
    SpanRTError,
    UnknownOptionError,
    UnsupportedCheckpointError,
    WorkerDiedError,
)

if TYPE_CHECKING:
    from engine.api import Answer, Engine, answer
    from engine.dynamic_batching import BatchingEngine
    from engine.hf_pipeline import QAPipeline, pipeline
    from engine.options import AnswerOptions

__all__ = [
    "Answer", "AnswerOptions", "BackendUnavailableError", "BatchingEngine", "BundleError", "CallCancelledError", "Engine",
    "EngineClosedError", "InvalidInputError", "QAPipeline", "QueueFullError", "RequestTimeoutError", "RequestTooLargeError",
    "SpanRTError", "UnknownOptionError", "UnsupportedCheckpointError", "WorkerDiedError", "answer", "errors", "pipeline",
]

# the runtime's public names, each imported from its module on first use
_LAZY = {"Answer": "engine.api", "Engine": "engine.api", "answer": "engine.api", "AnswerOptions": "engine.options",
         "BatchingEngine": "engine.dynamic_batching", "QAPipeline": "engine.hf_pipeline", "pipeline": "engine.hf_pipeline"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
