"""Typed errors of the SpanRT runtime. Every message says what was wrong and what to do."""

from __future__ import annotations

from typing import Any


class SpanRTError(Exception):
    """Base class of every error SpanRT raises on purpose."""


class InvalidInputError(SpanRTError, ValueError):
    """A question, context or option passed to the runtime is not usable."""


class BundleError(SpanRTError):
    """A bundle is missing, damaged, from another format version or for another environment."""


class UnsupportedCheckpointError(BundleError, ValueError):
    """A checkpoint folder the runtime cannot build a bundle from (architecture, activation,
    missing or misshapen weights, no fast tokenizer)."""


class BackendUnavailableError(SpanRTError):
    """A backend or precision that was asked for cannot run here (missing package, GPU, plan)."""


class EngineClosedError(SpanRTError, RuntimeError):
    """The Engine was closed; create a new one."""


class UnknownOptionError(InvalidInputError, TypeError):
    """An option name the runtime does not know was passed (a typo, or a pipeline-only option)."""


class RequestTooLargeError(InvalidInputError):
    """One question's context needs more model windows than the Engine's ``max_windows`` allows."""


class CallCancelledError(SpanRTError, RuntimeError):
    """A call's ``should_stop`` callback asked it to stop (its callers gave up); no answer."""


class QueueFullError(SpanRTError, RuntimeError):
    """The batching queue is full: the service is overloaded; retry later or add capacity."""


class RequestTimeoutError(SpanRTError, TimeoutError):
    """A call was not answered within its timeout (it was dropped if it had not started)."""


class WorkerDiedError(SpanRTError, RuntimeError):
    """A batching worker thread stopped on an unexpected error: every waiting and later call
    fails with this error, and ``healthy`` is False; create a new BatchingEngine."""


def brief(value: Any, limit: int = 40) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters (a 5,000-digit int
    or a megabyte string in a message helps nobody)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}... ({len(text)} characters)"
