"""The answering core, written once for ``Engine`` and the Triton models (export/triton_model.py):

* ``normalize_inputs`` and ``prepare``: questions and contexts -> checked text -> tokens (through
  the context cache) -> ``Example``s with their doc-stride windows;
* ``decode``: one batch's start/end logits -> the top spans of each window (engine.decode), with
  the candidate widening that word alignment needs;
* ``rank``: one example's candidates -> its answers, best first, with the null answer and the
  empty-answer fallback.

How windows become model calls (engine.windows) and which model runs them (engine.backends) is the
caller's: ``Engine`` batches windows of many questions, Triton's ensemble those of many requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.decode import SpanSearchResult, span_search
from engine.errors import InvalidInputError, RequestTooLargeError
from engine.options import AnswerOptions
from engine.postprocess import Answer, Candidates, finalize
from engine.preprocess import ContextCache, EncodedContext, Example, TextEncoder, make_example

__all__ = ["Label", "WindowLimit", "as_list", "char_spans", "decode", "host_arrays", "label_for", "normalize_inputs",
           "prepare", "rank"]

PREFIX_CHARS_PER_TOKEN = 6  # the prefix refuse_huge_contexts tokenizes: English averages ~4.5 characters per token
NO_SPAN_WARNING = "no span of the context could be an answer"

Label = Callable[[str, int], str]  # how an error names the i-th question or context of a call


def label_for(single: bool, offset: int = 0) -> Label:
    """'context' for a call about one pair, 'context[12]' for the 12th of a list (``offset``: where
    this group of questions starts in the call)."""
    if single:
        return lambda what, i: what
    return lambda what, i: f"{what}[{offset + i}]"


# ---- inputs ---------------------------------------------------------------------------------------
def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        hint = " (decode it first: value.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise InvalidInputError(f"{what} must be a str, got {type(value).__name__}{hint}")
    if not value or value.isspace():
        raise InvalidInputError(f"{what} is empty or only whitespace; pass text to answer from")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInputError(
                f"{what} holds a lone surrogate ({value[e.start]!r} at index {e.start}): not valid Unicode text. Decode "
                "the source as UTF-8 (or JSON with surrogate pairs intact), or clean it with "
                "s.encode('utf-8', 'replace').decode('utf-8')") from None
    return value


def as_list(value: Any, what: str) -> list[Any] | None:
    """``value`` as a list when it is a list/tuple of items, None when it is a single item."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, bytes, bytearray)) or value is None or isinstance(value, (int, float)):
        return None
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    raise InvalidInputError(f"{what} must be a str or a list of str, got {type(value).__name__}")


def normalize_inputs(question: Any, context: Any) -> tuple[list[str], list[str], bool]:
    """(questions, contexts, single): lists of equal length, every item a usable str.

    A single context with a list of questions (or the reverse) is broadcast, as in the pipeline.
    """
    qs, cs = as_list(question, "question"), as_list(context, "context")
    single = qs is None and cs is None
    if qs is None and cs is None:
        qs, cs = [question], [context]
    elif qs is None:
        qs = [question] * len(cs)  # type: ignore[arg-type]
    elif cs is None:
        cs = [context] * len(qs)
    elif len(qs) != len(cs):
        raise InvalidInputError(f"got {len(qs)} questions and {len(cs)} contexts; pass lists of the same length "
                                "(or one context for all questions)")
    for i, q in enumerate(qs):  # type: ignore[arg-type]
        _check_text(q, "question" if single else f"question[{i}]")
    for i, c in enumerate(cs):  # type: ignore[arg-type]
        _check_text(c, "context" if single else f"context[{i}]")
    return qs, cs, single  # type: ignore[return-value]


# ---- prepare: tokens and windows ------------------------------------------------------------------
@dataclass(frozen=True)
class WindowLimit:
    """An Engine's bound on the work one question may cause: at most ``max_windows`` windows of
    up to ``max_seq_len`` tokens (a longer context is a ``RequestTooLargeError``)."""

    max_windows: int
    max_seq_len: int


def prepare(encoder: TextEncoder, questions: Sequence[str], contexts: Sequence[str], opts: AnswerOptions, *,
            label: Label, cache: ContextCache | None = None, limit: WindowLimit | None = None) -> list[Example]:
    """Tokenize the questions and the contexts not in ``cache`` (each distinct context once) and
    cut every pair into windows. ``opts`` must be resolved (max_seq_len set). Raises
    InvalidInputError for a text without a token the model knows, RequestTooLargeError beyond
    ``limit``."""
    known: dict[str, EncodedContext] = {}
    missing: dict[str, None] = {}
    for c in contexts:
        if c not in known and c not in missing:
            hit = cache.get(c) if cache is not None else None
            if hit is None:
                missing[c] = None
            else:
                known[c] = hit
    if limit is not None:
        refuse_huge_contexts(encoder, list(missing), contexts, limit, label)
    q_ids, encoded = encoder.encode(list(questions), list(missing))
    for ctx in encoded:
        known[ctx.text] = ctx
        if cache is not None:
            cache.put(ctx)
    examples = []
    for i, (q, c) in enumerate(zip(q_ids, contexts)):
        ctx = known[c]
        if len(q) == 0:
            raise InvalidInputError(f"{label('question', i)} has no tokens the model knows (only control or unknown "
                                    "characters); pass a question in words")
        if len(ctx.ids) == 0:
            raise InvalidInputError(f"{label('context', i)} has no tokens the model knows (only control or unknown "
                                    "characters); pass a context in words")
        example = make_example(encoder.template, q, ctx, max_seq_len=opts.max_seq_len,  # type: ignore[arg-type]
                               max_question_len=opts.max_question_len, doc_stride=opts.doc_stride)
        if limit is not None and len(example.window_starts) > limit.max_windows:
            raise RequestTooLargeError(
                f"{label('context', i)} needs {len(example.window_starts)} model windows ({len(ctx.ids)} tokens), more "
                f"than this Engine's max_windows={limit.max_windows}; send a shorter context (split the document and ask "
                "each part), or raise max_windows")
        examples.append(example)
    return examples


def refuse_huge_contexts(encoder: TextEncoder, texts: list[str], contexts: Sequence[str], limit: WindowLimit,
                         label: Label) -> None:
    """Refuse a context far beyond the window limit before tokenizing all of it: max_windows windows
    hold at most max_windows * max_seq_len tokens, so if a prefix of the text already has more
    (cut mid-word, a prefix has at most a few tokens more than it has in the whole text), the
    whole surely needs more windows. A 1.9 MB context is refused after tokenizing ~1/10 of it;
    a context near the limit is measured exactly after tokenization (``prepare``)."""
    tokens = limit.max_windows * limit.max_seq_len
    prefix_chars = tokens * PREFIX_CHARS_PER_TOKEN
    for text in texts:
        if len(text) <= prefix_chars:
            continue
        _, (head,) = encoder.encode([], [text[:prefix_chars]])
        if len(head.ids) > tokens + 8:
            raise RequestTooLargeError(
                f"{label('context', list(contexts).index(text))} has more than {tokens} tokens in its first {prefix_chars} "
                f"characters alone ({len(text)} in all): more than this Engine's max_windows={limit.max_windows} windows can "
                "hold; send a shorter context (split the document), or raise max_windows")


# ---- decode: logits -> span candidates ------------------------------------------------------------
def decode(start_logits: Any, end_logits: Any, context_mask: Any, opts: AnswerOptions, *, stream: Any = None) -> SpanSearchResult:
    """The top spans of each window of one batch ([windows, seq] logits, host or device), with the
    log-sum-exps that make their scores probabilities, and the null scores when asked for."""
    return span_search(start_logits, end_logits, context_mask, max_answer_len=min(opts.max_answer_len, start_logits.shape[1]),
                       top_k=opts.candidates_per_window(), return_lse=True, return_null=opts.handle_impossible,
                       stream=stream)


def host_arrays(result: SpanSearchResult, with_null: bool) -> tuple[np.ndarray, ...]:
    """``decode``'s outputs as host NumPy arrays: spans, scores, start_lse, end_lse, null scores."""
    arrays = [result.spans, result.scores, result.start_lse, result.end_lse, result.null_scores if with_null else None]
    return tuple(None if a is None else np.asarray(a) for a in arrays)  # type: ignore[return-value]


# ---- rank: candidates -> answers ------------------------------------------------------------------
def char_spans(context: EncodedContext, align_to_words: bool) -> tuple[np.ndarray, np.ndarray]:
    """The [start, end) characters each context token points at: its whole word's with
    ``align_to_words``, else its own."""
    return context.word_char_spans if align_to_words else (context.offsets[:, 0], context.offsets[:, 1])


def rank(cand: Candidates, text: str, chars: tuple[np.ndarray, np.ndarray], warnings: tuple[str, ...],
         opts: AnswerOptions, *, backend: str, precision: str) -> list[Answer]:
    """One example's answers, best first (up to top_k); when no token span has characters,
    the empty answer with a warning saying so (there is nothing to point at)."""
    ranked = finalize(cand, text, chars[0], chars[1], warnings, top_k=opts.top_k, handle_impossible=opts.handle_impossible,
                      null_threshold=opts.null_threshold, backend=backend, precision=precision)
    return ranked or [Answer("", 0, 0, 0.0, backend, precision, True, (*warnings, NO_SPAN_WARNING))]
