"""The answering options of one call: every option's name, default, Hugging Face pipeline alias and
check, written once.

``answer``, ``Engine.answer``, ``Engine.answer_batch``, ``BatchingEngine.answer``, the
transformers-pipeline stand-in, the Triton models and the bench all take these names. The public
signatures spell them out as keyword arguments (so help() and type checkers show them) with
``DEFAULTS.<name>`` as each default; tests/test_options.py checks every such signature against
this dataclass, so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass
from typing import Any

import numpy as np

from engine.errors import InvalidInputError, UnknownOptionError, brief

__all__ = ["ALIASES", "DEFAULTS", "MAX_TOKENS_OPTION", "MAX_TOP_K", "AnswerOptions", "check_bool", "check_int",
           "check_number", "option_arguments", "option_defaults", "reject_unknown"]

MAX_TOP_K = 1000  # more answers than this per question is a mistake, not a request
MAX_TOKENS_OPTION = 1 << 20  # the upper bound of the token-count options (max_answer_len, doc_stride, ...)

# The Hugging Face pipeline's names for options that have another name here (accepted as well).
ALIASES = {"handle_impossible_answer": "handle_impossible"}
# Options with the Hugging Face pipeline's names that mean something else (or nothing) here.
_HF_HINTS = {
    "topk": "use top_k (the pipeline's deprecated alias is not accepted)",
    "padding": "windows are always padded to the longest window of their batch; remove it",
    "X": "pass question= and context=",
    "data": "pass question= and context=",
}


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (NumPy integers too, never a bool), else InvalidInputError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an int, got {type(value).__name__} {brief(value)}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidInputError(f"{name} must be {bound}, got {brief(value)}")
    return value


def check_number(name: str, value: Any, lo: float, hi: float) -> float:
    """A real number in [lo, hi]: ints of any size, floats, NumPy scalars; never OverflowError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{name} must be a number between {lo:g} and {hi:g}, got {type(value).__name__} {brief(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf if value > 0 else -math.inf
    if not lo <= number <= hi:  # NaN fails both comparisons
        raise InvalidInputError(f"{name} must be a finite number between {lo:g} and {hi:g}, got {brief(value)}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (NumPy's too), else InvalidInputError."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{name} must be True or False, got {type(value).__name__} {brief(value)}")
    return bool(value)


@dataclass(frozen=True)
class AnswerOptions:
    """Validated answering options (names and meanings as in the Hugging Face pipeline).

    ``max_answer_len``: tokens per answer (the pipeline's default is 15, kept by engine.pipeline).
    ``handle_impossible`` (alias ``handle_impossible_answer``): the null answer competes (SQuAD 2.0).
    ``null_threshold``: shifts the null answer's rank (a difference of two probabilities).
    ``doc_stride``: overlap of consecutive windows in tokens; None: min(128, max_seq_len // 2).
    ``max_seq_len``: tokens per window; None: the model's (``resolve`` fills it in).
    ``max_question_len``: longer questions are truncated, with a warning on the answer.
    ``align_to_words``: answers snap to whole words.
    """

    top_k: int = 1
    max_answer_len: int = 30
    handle_impossible: bool = False
    handle_impossible_answer: InitVar[bool | None] = None  # the pipeline's name of handle_impossible
    null_threshold: float = 0.0
    doc_stride: int | None = None
    max_seq_len: int | None = None
    max_question_len: int = 64
    align_to_words: bool = True

    def __post_init__(self, handle_impossible_answer: bool | None) -> None:
        set_ = object.__setattr__  # frozen: the checked values replace the given ones
        set_(self, "top_k", check_int("top_k", self.top_k, 1, MAX_TOP_K))
        set_(self, "max_answer_len", check_int("max_answer_len", self.max_answer_len, 1, MAX_TOKENS_OPTION))
        impossible = check_bool("handle_impossible", self.handle_impossible)
        if handle_impossible_answer is not None:
            alias = check_bool("handle_impossible_answer", handle_impossible_answer)
            if impossible and not alias:
                raise InvalidInputError("handle_impossible=True and handle_impossible_answer=False disagree; pass one of them")
            impossible = alias
        set_(self, "handle_impossible", impossible)
        # A difference of two probabilities: beyond +-1 every value means the same (always / never null).
        set_(self, "null_threshold", check_number("null_threshold", self.null_threshold, -1.0, 1.0))
        if self.max_seq_len is not None:  # its range depends on the model: checked by resolve()
            set_(self, "max_seq_len", check_int("max_seq_len", self.max_seq_len, -(1 << 63)))
        if self.doc_stride is not None:
            set_(self, "doc_stride", check_int("doc_stride", self.doc_stride, 0, MAX_TOKENS_OPTION))
        set_(self, "max_question_len", check_int("max_question_len", self.max_question_len, 1, MAX_TOKENS_OPTION))
        set_(self, "align_to_words", check_bool("align_to_words", self.align_to_words))

    @classmethod
    def of_call(cls, arguments: Mapping[str, Any], unknown: Mapping[str, Any] | None = None) -> AnswerOptions:
        """The options of a call: ``arguments`` holds them by name (others are ignored, so a
        signature's ``locals()`` will do), ``unknown`` the names no signature knows (an error)."""
        reject_unknown(unknown or ())
        return cls(**option_arguments(arguments))

    def resolve(self, max_seq_len: int, num_special: int) -> AnswerOptions:
        """These options for a model of ``max_seq_len`` tokens whose windows hold ``num_special``
        special tokens: max_seq_len filled in, or checked against that room."""
        if self.max_seq_len is None:
            return dataclasses.replace(self, max_seq_len=max_seq_len)
        check_int("max_seq_len", self.max_seq_len, num_special + 2, max_seq_len)
        return self

    def candidates_per_window(self) -> int:
        """Spans the decoder keeps per window: with align_to_words, candidates that snap to the same
        words merge, so it looks further down than top_k."""
        return self.top_k * 2 + 10 if self.align_to_words else self.top_k


DEFAULTS = AnswerOptions()
# Every option name a call takes (aliases included) with its default, in signature order.
_CALL_DEFAULTS = {name: p.default for name, p in inspect.signature(AnswerOptions).parameters.items()}


def option_defaults() -> dict[str, Any]:
    """Every option name a call takes (aliases included), with its default, in signature order."""
    return dict(_CALL_DEFAULTS)


def option_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``arguments`` that are option names (aliases included)."""
    return {name: arguments[name] for name in _CALL_DEFAULTS if name in arguments}


def reject_unknown(names: Iterable[str]) -> None:
    """UnknownOptionError naming ``names`` (when there are any), with a hint for the Hugging Face
    pipeline's names that mean something else here, and the names that are known."""
    unknown = sorted(names)
    if unknown:
        hints = "; ".join(f"{k}: {_HF_HINTS[k]}" for k in unknown if k in _HF_HINTS)
        known = ", ".join(f"{n} (or {a})" if a else n for n, a in _names_with_aliases())
        raise UnknownOptionError(f"unknown option(s) {', '.join(unknown)}" + (f" ({hints})" if hints else "")
                                 + f"; known: {known}")


def _names_with_aliases() -> list[tuple[str, str | None]]:
    alias_of = {target: alias for alias, target in ALIASES.items()}
    return [(f.name, alias_of.get(f.name)) for f in dataclasses.fields(AnswerOptions)]
