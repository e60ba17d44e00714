"""Tokenization and doc-stride windows: (question, context) -> model windows with offset maps.

The bundle's tokenizer (the ``tokenizers`` library, never transformers) encodes questions and
contexts separately, without special tokens; the special-token layout of a (question, context)
pair is learnt once from the tokenizer's own pair encoding (:class:`Template`), so BERT's
``[CLS] q [SEP] c [SEP]`` and RoBERTa's ``<s> q </s></s> c </s>`` need no special cases. Windows
are described by arrays (context token start/stop per window) and only turned into padded model
inputs batch by batch (engine.windows), so a 1 MB context never exists as one tensor.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BundleError, InvalidInputError

DEFAULT_DOC_STRIDE = 128
# Up to this many texts are encoded one by one: for a single (question, context) pair the
# tokenizers thread pool costs more than it saves (measured: 0.20 ms serial vs 0.28 ms batched).
SERIAL_ENCODE_MAX = 2


@dataclass(frozen=True)
class Template:
    """Where a tokenizer puts its special tokens (and token types) around a question/context pair."""

    prefix: np.ndarray  # ids before the question, e.g. [CLS]
    middle: np.ndarray  # ids between question and context, e.g. [SEP] (RoBERTa: </s></s>)
    suffix: np.ndarray  # ids after the context, e.g. [SEP]
    prefix_types: np.ndarray
    middle_types: np.ndarray
    suffix_types: np.ndarray
    question_type: int
    context_type: int

    @property
    def num_special(self) -> int:
        """Special tokens per window."""
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def learn_template(tokenizer: object, tokenizer_path: Path) -> Template:
    """Read the pair layout off the tokenizer's pair template (one encode of two short texts; they
    may take several tokens each, as a SentencePiece vocabulary can split even "a")."""
    try:
        pair = tokenizer.encode("a", "b", add_special_tokens=True)  # type: ignore[attr-defined]
    except Exception as e:  # the tokenizers library raises a bare Exception (e.g. WordPiece without its [UNK] token)
        raise BundleError(f"tokenizer {tokenizer_path} cannot encode a (question, context) pair: {e}. "
                          "Fix: export the bundle again") from e
    seq = pair.sequence_ids
    ids = np.asarray(pair.ids, dtype=np.int64)
    types = np.asarray(pair.type_ids, dtype=np.int64)
    q = [i for i, s in enumerate(seq) if s == 0]
    c = [i for i, s in enumerate(seq) if s == 1]
    if not q or not c or q != list(range(q[0], q[-1] + 1)) or c != list(range(c[0], c[-1] + 1)) or q[-1] > c[0]:
        raise BundleError(f"tokenizer {tokenizer_path}: its post-processor has no (question, context) pair template "
                          f"(sequence ids {seq}). Fix: export the bundle again with a question-answering tokenizer")
    return Template(
        prefix=ids[: q[0]], middle=ids[q[-1] + 1 : c[0]], suffix=ids[c[-1] + 1 :],
        prefix_types=types[: q[0]], middle_types=types[q[-1] + 1 : c[0]], suffix_types=types[c[-1] + 1 :],
        question_type=int(types[q[0]]), context_type=int(types[c[0]]),
    )


def check_template(template: Template, tokenizer_path: Path, *, cls_token_id: int, sep_token_id: int,
                   expected: dict[str, tuple[int, ...]] | None) -> None:
    """The tokenizer's pair layout is the one the model was exported with (``expected``, recorded
    in the manifest), or, for bundles that did not record it, one that holds the model's [CLS] and
    [SEP] tokens. A tokenizer.json whose post-processor was removed encodes pairs without them:
    it would load and answer, with much lower scores."""
    got = {"prefix": tuple(template.prefix.tolist()), "middle": tuple(template.middle.tolist()),
           "suffix": tuple(template.suffix.tolist())}
    fix = "export the bundle again with the model's own tokenizer (python -m export MODEL_DIR --out BUNDLE --force)"
    if expected is not None and got != expected:
        raise BundleError(f"tokenizer {tokenizer_path}: it puts {got} around a question/context pair, but the model was "
                          f"exported with {expected} (its post-processor was changed or removed). Fix: {fix}")
    special = got["prefix"] + got["middle"] + got["suffix"]
    if cls_token_id not in special or sep_token_id not in special:
        raise BundleError(f"tokenizer {tokenizer_path}: its (question, context) pair template has the special tokens "
                          f"{list(special)}, without the model's cls ({cls_token_id}) and sep ({sep_token_id}) tokens (its "
                          f"post-processor was removed or changed). Fix: {fix}")


@dataclass(frozen=True)
class EncodedContext:
    """A context's tokens: ids, character offsets into the context string, and word spans."""

    text: str
    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n, 2], [start, end) character offsets into ``text``
    encoding: Any = field(repr=False, compare=False)  # the tokenizers.Encoding (word ids, on demand)

    @property
    def word_char_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Per token, the [start, end) characters of its whole word (what align_to_words snaps to).

        Words are the pre-tokenizer's (BERT: whitespace and punctuation splits), as in the Hugging
        Face pipeline's ``word_to_chars``; a token without a word keeps its own offsets. Computed
        once per context. Not a functools.cached_property: on Python 3.11 that holds one lock per
        class, which serializes every thread and deadlocks a child forked while a thread held it.
        Two threads computing it at once store equal values.
        """
        spans = self.__dict__.get("_word_char_spans")
        if spans is None:
            spans = self._word_char_spans()
            object.__setattr__(self, "_word_char_spans", spans)
        return spans

    def _word_char_spans(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.ids)
        if n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        words = self.encoding.word_ids
        try:
            w = np.asarray(words, dtype=np.int64)
        except TypeError:  # a token without a word (None): give it a word of its own
            w = np.asarray([-1 - i if x is None else x for i, x in enumerate(words)], dtype=np.int64)
        first = np.ones(n, dtype=bool)
        first[1:] = w[1:] != w[:-1]
        last = np.ones(n, dtype=bool)
        last[:-1] = first[1:]
        run = np.cumsum(first) - 1
        return self.offsets[first, 0][run], self.offsets[last, 1][run]


@dataclass(frozen=True)
class Example:
    """One question over one context, tokenized, with its windows (context token ranges)."""

    question_ids: np.ndarray  # int64, already truncated to max_question_len
    context: EncodedContext
    window_starts: np.ndarray  # int64 [w], first context token of each window
    window_stops: np.ndarray  # int64 [w], one past the last
    context_pos: int  # position of the first context token inside a window
    head_ids: np.ndarray  # prefix + question + middle
    head_types: np.ndarray
    warnings: tuple[str, ...]


class TextEncoder:
    """The bundle's tokenizer with truncation and padding switched off (windows are ours)."""

    def __init__(self, tokenizer_path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"tokenizer {path}: cannot be loaded ({e}). Fix: export the bundle again") from None
        tok.no_truncation()
        tok.no_padding()
        self.tokenizer = tok
        self.path = path
        self.template = learn_template(tok, path)

    def encode(self, questions: list[str], contexts: list[str]) -> tuple[list[np.ndarray], list[EncodedContext]]:
        """Token ids of each question and tokens/offsets/words of each context, in one batch call."""
        texts = questions + contexts
        if len(texts) <= SERIAL_ENCODE_MAX:  # one question: skip the thread pool's hand-off
            encs = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        else:
            encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        q = [np.asarray(e.ids, dtype=np.int64) for e in encs[: len(questions)]]
        c = []
        for text, e in zip(contexts, encs[len(questions) :]):
            ids = np.asarray(e.ids, dtype=np.int64)
            offsets = np.asarray(e.offsets, dtype=np.int64).reshape(len(ids), 2)
            c.append(EncodedContext(text=text, ids=ids, offsets=offsets, encoding=e))
        return q, c


class ContextCache:
    """Recently tokenized contexts by exact text: services ask many questions about one document,
    and the context is most of the tokenization work. Thread-safe LRU; long texts are not kept."""

    def __init__(self, max_entries: int, max_chars: int = 100_000) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._items: OrderedDict[str, EncodedContext] = OrderedDict()
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """A new lock in a forked child: the parent's may have been held by a thread that is not here."""
        self._lock = threading.Lock()

    def get(self, text: str) -> EncodedContext | None:
        """The cached tokens of ``text``, or None."""
        with self._lock:
            hit = self._items.get(text)
            if hit is not None:
                self._items.move_to_end(text)
            return hit

    def put(self, context: EncodedContext) -> None:
        """Keep ``context`` (dropping the least recently used beyond max_entries)."""
        if self.max_entries <= 0 or len(context.text) > self.max_chars:
            return
        with self._lock:
            self._items[context.text] = context
            self._items.move_to_end(context.text)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)


def plan_windows(num_tokens: int, budget: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Context token ranges of the windows: ``budget`` tokens each, consecutive ones overlapping by
    ``stride`` tokens, the last one ending at the context's end (the rule of tokenizers' overflow)."""
    if num_tokens <= budget:
        return np.zeros(1, np.int64), np.full(1, num_tokens, np.int64)
    step = budget - stride
    starts = np.arange(0, num_tokens, step, dtype=np.int64)
    stops = np.minimum(starts + budget, num_tokens)
    keep = int(np.argmax(stops == num_tokens)) + 1  # stop after the first window reaching the end
    return starts[:keep], stops[:keep]


def make_example(
    template: Template,
    question_ids: np.ndarray,
    context: EncodedContext,
    *,
    max_seq_len: int,
    max_question_len: int,
    doc_stride: int | None,
) -> Example:
    """Truncate the question (recording a warning) and cut the context into doc-stride windows.

    ``doc_stride=None`` means the default overlap: min(128, max_seq_len // 2), and at most half
    of the context tokens a window holds (so a long question never makes the default invalid).
    """
    warnings: tuple[str, ...] = ()
    if len(question_ids) > max_question_len:
        warnings = (f"question truncated from {len(question_ids)} to {max_question_len} tokens (max_question_len)",)
        question_ids = question_ids[:max_question_len]
    budget = max_seq_len - template.num_special - len(question_ids)
    if budget < 1:
        raise InvalidInputError(
            f"max_seq_len={max_seq_len} leaves no room for context tokens after a {len(question_ids)}-token question "
            f"and {template.num_special} special tokens; raise max_seq_len or lower max_question_len")
    if doc_stride is None:
        stride = min(DEFAULT_DOC_STRIDE, max_seq_len // 2, budget // 2)
    else:
        if doc_stride >= budget:
            raise InvalidInputError(
                f"doc_stride={doc_stride} must be smaller than the {budget} context tokens a window holds "
                f"(max_seq_len={max_seq_len} minus question and special tokens); pass a smaller doc_stride")
        stride = doc_stride
    starts, stops = plan_windows(len(context.ids), budget, stride)
    head_ids = np.concatenate([template.prefix, question_ids, template.middle])
    head_types = np.concatenate([
        template.prefix_types,
        np.full(len(question_ids), template.question_type, np.int64),
        template.middle_types,
    ])
    return Example(
        question_ids=question_ids, context=context, window_starts=starts, window_stops=stops,
        context_pos=len(head_ids), head_ids=head_ids, head_types=head_types, warnings=warnings,
    )
