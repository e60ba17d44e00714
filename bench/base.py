"""The interface every benchmarked system implements, and what it is handed and returns.

A system (bench/peers.py, bench/ct2.py, bench/spanrt.py) subclasses :class:`System`; the table
of systems (bench/systems.py) names them and makes them by name without importing them, so no
system module imports the table and the table imports no system module.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.systems import QASettings, SystemSpec

STAGES = ("tokenize", "model", "decode")


class SystemUnavailable(Exception):
    """The system cannot run on this machine; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class Prediction:
    """One system's best answer to one question (character offsets into the context)."""

    text: str
    start: int | None
    end: int | None
    score: float


@dataclass
class Artifacts:
    """Files a system loads, prepared before it is timed (export time is not load time)."""

    checkpoint: Path | None = None  # Hugging Face checkpoint folder (peers)
    onnx_dir: Path | None = None  # Optimum export folder (optimum peers)
    onnx_file: str | None = None
    model_dir: Path | None = None  # CTranslate2 model folder (CTranslate2 peers)
    bundle: Path | None = None  # SpanRT bundle folder
    prepare_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


class System(abc.ABC):
    """A loaded question-answering system, driven by the bench worker."""

    def __init__(self, spec: SystemSpec, artifacts: Artifacts, settings: QASettings, *, threads: int, max_batch_size: int) -> None:
        self.spec = spec
        self.artifacts = artifacts
        self.settings = settings
        self.threads = threads
        self.max_batch_size = max_batch_size
        self._stage_s = dict.fromkeys(STAGES, 0.0)

    @abc.abstractmethod
    def import_libraries(self) -> None:
        """Import the packages this system needs (timed apart from loading the model)."""

    @abc.abstractmethod
    def load(self) -> dict[str, Any]:
        """Load the model; return what was actually used (backend, precision, provider, threads...)."""

    @abc.abstractmethod
    def answer(self, questions: list[str], contexts: list[str], batch_size: int) -> list[Prediction]:
        """Answer the questions in one call, batching as the system does at ``batch_size``."""

    def close(self) -> None:
        """Free the model."""

    def stage_seconds(self) -> dict[str, float]:
        """Seconds spent in tokenize / model / decode since the last reset (what the system lets us see)."""
        return dict(self._stage_s)

    def reset_stages(self) -> None:
        """Zero the stage counters."""
        self._stage_s = dict.fromkeys(STAGES, 0.0)
