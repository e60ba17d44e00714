"""Typed errors of the export stage (subclasses of the runtime's SpanRTError)."""

from __future__ import annotations

from engine.errors import SpanRTError


class ExportError(SpanRTError):
    """The export could not produce a valid bundle; the message says why and what to do."""


class UnsupportedModelError(ExportError, ValueError):
    """The checkpoint is not a supported span model (architecture, missing span head, limits)."""


class VerificationError(ExportError):
    """An exported graph does not reproduce the PyTorch model within tolerance; nothing is written."""
