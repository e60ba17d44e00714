"""The Engines ``engine.answer`` keeps: one per (bundle folder, backend, precision), loaded on first
use and shared by every later call and thread (``Engine`` is thread-safe)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from engine.api import Engine
from engine.errors import InvalidInputError

__all__ = ["engine_for"]

_engines: dict[tuple[str, str, str | None], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(model: Any, backend: str, precision: str | None) -> Engine:
    """The Engine ``answer(model=..., backend=..., precision=...)`` uses: ``model`` itself when it is one,
    else the one kept for that bundle folder (None: the default model's), loaded on first use."""
    if isinstance(model, Engine):
        if backend != "auto" or precision is not None:
            raise InvalidInputError("backend and precision are set when an Engine is created; do not pass them with model=Engine")
        return model
    if model is None:
        eng = _engines.get(("<default>", backend, precision))  # no file system look-up per call
        if eng is not None and not eng.closed:
            return eng
        from engine.default_model import bundle_for

        eng = engine_for(bundle_for(backend, precision), backend, precision)
        with _engines_lock:
            _engines[("<default>", backend, precision)] = eng
        return eng
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidInputError(f"model must be None (the default model), a bundle folder or an Engine, got {type(model).__name__}")
    try:
        where = str(Path(model).resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: load_bundle says what is wrong
        where = str(model)
    key = (where, backend, precision)
    with _engines_lock:
        eng = _engines.get(key)
        if eng is None or eng.closed:
            eng = _engines[key] = Engine(model, backend=backend, precision=precision)
        return eng


def _after_fork_in_child() -> None:
    global _engines_lock
    _engines_lock = threading.Lock()  # a parent thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)
