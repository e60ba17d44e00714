"""Typed errors of the SpanRT runtime. Every message says what was wrong and what to do."""

from __future__ import annotations


class SpanRTError(Exception):
    """Base class of every error SpanRT raises on purpose."""


class InvalidInputError(SpanRTError, ValueError):
    """A question, context or option passed to the runtime is not usable."""


class BundleError(SpanRTError):
    """A bundle is missing, damaged, from another format version or for another environment."""


class BackendUnavailableError(SpanRTError):
    """A backend or precision that was asked for cannot run here (missing package, GPU, plan)."""


class EngineClosedError(SpanRTError, RuntimeError):
    """The Engine was closed; create a new one."""


class UnknownOptionError(InvalidInputError, TypeError):
    """An option name the runtime does not know was passed (a typo, or a pipeline-only option)."""
