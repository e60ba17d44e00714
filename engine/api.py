"""The runtime's public face: ``answer(question, context)`` and ``Engine``.

One call flows one way: validate -> tokenize (engine.preprocess) -> windows sorted by length and
padded per batch (engine.windows) -> backend -> span search (engine.decode, C++ or CUDA) ->
answers (engine.postprocess). Questions are processed in groups of ``GROUP_SIZE`` and windows in
batches of ``max_batch_size``, so memory stays bounded for 10,000 questions or a 1 MB context.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.backends import BACKENDS, open_backend
from engine.backends.base import check_logits
from engine.windows import Batch, WindowTable, build_batch, plan_batches
from engine.bundle import PRECISIONS, Bundle, load_bundle
from engine.errors import BackendUnavailableError, BundleError, CallCancelledError, EngineClosedError, InvalidInputError, RequestTooLargeError, UnknownOptionError, brief
from engine.postprocess import Answer, Candidates, collect, finalize
from engine.preprocess import (
    DEFAULT_MAX_QUESTION_LEN,
    ContextCache,
    EncodedContext,
    Example,
    TextEncoder,
    check_template,
    make_example,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Answer", "Engine", "answer"]

logger = logging.getLogger("engine")

GROUP_SIZE = 256  # questions tokenized and answered together (bounds memory for huge calls)
MAX_TOP_K = 1000  # more answers than this per question is a mistake, not a request
PREFIX_CHARS_PER_TOKEN = 6  # the prefix _refuse_huge_contexts tokenizes: English averages ~4.5 characters per token
MAX_TOKENS_OPTION = 1 << 20  # the upper bound of the token-count options (max_answer_len, doc_stride, ...)
DEFAULT_MAX_ANSWER_LEN = 30
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_CONTEXT_CACHE = 256  # tokenized contexts kept per Engine (0: none), see ContextCache
STAGES = ("tokenize", "model", "decode")

# Options with the Hugging Face pipeline's names that mean something else (or nothing) here.
_HF_HINTS = {
    "topk": "use top_k (the pipeline's deprecated alias is not accepted)",
    "padding": "windows are always padded to the longest window of their batch; remove it",
    "X": "pass question= and context=",
    "data": "pass question= and context=",
}

QuestionArg = str | Sequence[str]
Result = Answer | list[Answer]

# The bundle's model precisions, and bf16: computed from the fp32 model by a backend (OpenVINO)
ENGINE_PRECISIONS = (*PRECISIONS, "bf16")


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


def _as_list(value: Any, what: str) -> list[Any] | None:
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
    qs, cs = _as_list(question, "question"), _as_list(context, "context")
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


def _int_option(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an int, got {type(value).__name__} {brief(value)}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidInputError(f"{name} must be {bound}, got {brief(value)}")
    return value


def _float_option(name: str, value: Any, lo: float, hi: float) -> float:
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


def _bool_option(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{name} must be True or False, got {type(value).__name__} {brief(value)}")
    return bool(value)


class Options:
    """Validated answering options of one call (names as in the Hugging Face pipeline)."""

    __slots__ = ("align_to_words", "doc_stride", "handle_impossible", "max_answer_len", "max_question_len",
                 "max_seq_len", "null_threshold", "top_k")

    def __init__(self, engine_max_seq_len: int, num_special: int, *, top_k: Any, max_answer_len: Any, handle_impossible: Any,
                 handle_impossible_answer: Any, null_threshold: Any, doc_stride: Any, max_seq_len: Any,
                 max_question_len: Any, align_to_words: Any, unknown: dict[str, Any]) -> None:
        if unknown:
            hints = "; ".join(f"{k}: {_HF_HINTS[k]}" for k in unknown if k in _HF_HINTS)
            raise UnknownOptionError(
                f"unknown option(s) {', '.join(sorted(unknown))}" + (f" ({hints})" if hints else "")
                + "; known: top_k, max_answer_len, handle_impossible (or handle_impossible_answer), null_threshold, "
                "doc_stride, max_seq_len, max_question_len, align_to_words")
        self.top_k = _int_option("top_k", top_k, 1, MAX_TOP_K)
        self.max_answer_len = _int_option("max_answer_len", max_answer_len, 1, MAX_TOKENS_OPTION)
        hi = _bool_option("handle_impossible", handle_impossible)
        if handle_impossible_answer is not None:
            hia = _bool_option("handle_impossible_answer", handle_impossible_answer)
            if handle_impossible and not hia:
                raise InvalidInputError("handle_impossible=True and handle_impossible_answer=False disagree; pass one of them")
            hi = hia
        self.handle_impossible = hi
        # A difference of two probabilities: beyond +-1 every value means the same (always / never null).
        self.null_threshold = _float_option("null_threshold", null_threshold, -1.0, 1.0)
        self.max_seq_len = engine_max_seq_len if max_seq_len is None else _int_option(
            "max_seq_len", max_seq_len, num_special + 2, engine_max_seq_len)
        self.doc_stride = None if doc_stride is None else _int_option("doc_stride", doc_stride, 0, MAX_TOKENS_OPTION)
        self.max_question_len = _int_option("max_question_len", max_question_len, 1, MAX_TOKENS_OPTION)
        self.align_to_words = _bool_option("align_to_words", align_to_words)


class Engine:
    """A loaded bundle on one backend: tokenizer, model session and decoder, ready to answer.

    ``backend``: "auto" (TensorRT, then ONNX Runtime CUDA, then the native encoder, then ONNX
    Runtime CPU: the first that can run; the choice is logged and kept in ``backend_notes``), or one
    of engine.backends.BACKENDS (an error when it cannot run).
    ``precision``: None for the backend's default (CPU: int8 when the bundle has it, GPU: fp16).
    ``threads``: intra-op threads, default the CPU cores this process may use.
    ``context_cache``: how many recently seen contexts (up to 100,000 characters each) keep their
    tokens, so more questions about the same document skip its tokenization; 0 turns it off.
    ``max_batch_tokens``: padded tokens per model run (windows x the longest of them); None takes
    the backend's measured default (the CPU backends: 1024; GPU backends: no limit beyond
    ``max_batch_size``). Windows are sorted by length and cut by both limits.
    ``max_windows``: the most model windows one question's context may need (None: no limit); a
    longer context is a ``RequestTooLargeError`` raised after tokenization, before any model work
    (a service's bound on the work one request may cause).
    ``cpu_isa``: the highest instruction-set path the native encoder may use ("amx", "avx512_bf16",
    "avx512_vnni", "avx2_vnni", "avx2", "neon_i8mm", "neon", "generic"; None: $SPANRT_CPU_ISA, else the best
    this CPU runs).
    One Engine is safe to share between threads; ``close()`` (or ``with``) frees it.
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto", precision: str | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, threads: int | None = None, device_id: int = 0,
                 context_cache: int = DEFAULT_CONTEXT_CACHE, max_batch_tokens: int | None = None,
                 max_windows: int | None = None, cpu_isa: str | None = None) -> None:
        if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
            raise InvalidInputError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {brief(backend)}")
        if precision is not None and precision not in ENGINE_PRECISIONS:
            raise InvalidInputError(f"precision must be None or one of {', '.join(ENGINE_PRECISIONS)}, got {brief(precision)}")
        max_batch_size = _int_option("max_batch_size", max_batch_size, 1, 4096)
        if threads is not None:
            threads = _int_option("threads", threads, 1, 1024)
        device_id = _int_option("device_id", device_id, 0, 1023)
        context_cache = _int_option("context_cache", context_cache, 0, 1_000_000)
        if max_batch_tokens is not None:
            max_batch_tokens = _int_option("max_batch_tokens", max_batch_tokens, 1, 1 << 24)
        self.max_windows = None if max_windows is None else _int_option("max_windows", max_windows, 1, 1 << 24)
        if isinstance(bundle, Bundle):
            self.bundle = bundle
        elif isinstance(bundle, (str, os.PathLike)):
            self.bundle = load_bundle(bundle)
        else:
            raise InvalidInputError(f"bundle must be a bundle folder path or an engine.bundle.Bundle, got {type(bundle).__name__}")
        self._encoder = TextEncoder(self.bundle.tokenizer_path)
        self._template = self._encoder.template
        check_template(self._template, self.bundle.tokenizer_path, cls_token_id=self.bundle.cls_token_id,
                       sep_token_id=self.bundle.sep_token_id, expected=self.bundle.pair_template)
        self._context_cache = ContextCache(context_cache) if context_cache else None
        if cpu_isa is not None and not isinstance(cpu_isa, str):
            raise InvalidInputError(f"cpu_isa must be None or a path name such as 'avx2', got {brief(cpu_isa)}")
        self._backend, self.backend_notes = open_backend(self.bundle, backend, precision, threads=threads, device_id=device_id,
                                                         cpu_isa=cpu_isa)
        limit = self._backend.max_batch_size
        self.max_batch_size = min(max_batch_size, limit) if limit else max_batch_size
        self.max_seq_len = min(self.bundle.max_seq_len, self._backend.max_seq_len or self.bundle.max_seq_len)
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else self._backend.max_batch_tokens
        self._pad_id = self.bundle.pad_token_id
        try:
            self._check_model_sizes()
        except BaseException:
            self._backend.close()
            raise
        from engine.decode import span_search  # the C++/CUDA decoder (engine._kernels)

        self._span_search = span_search
        self._state = threading.Condition()
        self._pid = os.getpid()
        _live_engines.add(self)
        self._active = 0
        self._closed = False
        self._stage_lock = threading.Lock()
        self._stages = dict.fromkeys(STAGES, 0.0)
        logger.info("spanrt engine: %s on %s %s (%s)", self.bundle.root, self.backend, self.precision, self._backend.details)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend that runs the model, e.g. "onnxruntime"."""
        return self._backend.name

    @property
    def precision(self) -> str:
        """The model precision that runs: "fp32", "fp16" or "int8"."""
        return self._backend.precision

    @property
    def device(self) -> str:
        """Where the model runs: "cpu" or "cuda"."""
        return self._backend.device

    @property
    def backend_details(self) -> dict[str, Any]:
        """What the backend actually uses (provider, threads, file, versions)."""
        return dict(self._backend.details)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    # ---- answering ----------------------------------------------------------------------------
    def answer(self, question: QuestionArg, context: QuestionArg, *, top_k: int = 1,
               max_answer_len: int = DEFAULT_MAX_ANSWER_LEN, handle_impossible: bool = False,
               handle_impossible_answer: bool | None = None, null_threshold: float = 0.0, doc_stride: int | None = None,
               max_seq_len: int | None = None, max_question_len: int = DEFAULT_MAX_QUESTION_LEN,
               align_to_words: bool = True, **unknown: Any) -> Result | list[Result]:
        """Answer one question (an ``Answer``, or a list of up to ``top_k`` when top_k > 1) or lists of
        questions/contexts (a list of those), as the Hugging Face pipeline shapes its results.

        Options keep the pipeline's names and meanings except: max_answer_len defaults to 30 tokens
        (the pipeline: 15), questions longer than max_question_len tokens are truncated (with a
        warning in ``Answer.warnings``), and ``null_threshold`` shifts the null answer's rank.
        """
        questions, contexts, single = normalize_inputs(question, context)
        opts = Options(self.max_seq_len, self._template.num_special, top_k=top_k, max_answer_len=max_answer_len,
                       handle_impossible=handle_impossible, handle_impossible_answer=handle_impossible_answer,
                       null_threshold=null_threshold, doc_stride=doc_stride, max_seq_len=max_seq_len,
                       max_question_len=max_question_len, align_to_words=align_to_words, unknown=unknown)
        ranked = self._answer_all(questions, contexts, opts, single)
        shaped: list[Result] = [r[0] if opts.top_k == 1 else r for r in ranked]
        return shaped[0] if single else shaped

    def answer_batch(self, questions: Sequence[str], contexts: Sequence[str] | str, *, top_k: int = 1,
                     max_answer_len: int = DEFAULT_MAX_ANSWER_LEN, handle_impossible: bool = False,
                     handle_impossible_answer: bool | None = None, null_threshold: float = 0.0, doc_stride: int | None = None,
                     max_seq_len: int | None = None, max_question_len: int = DEFAULT_MAX_QUESTION_LEN,
                     align_to_words: bool = True, should_stop: Callable[[], bool] | None = None,
                     **unknown: Any) -> list[list[Answer]]:
        """Answer many questions in one call: per question, its answers best first (up to top_k).

        Same options as ``answer``; windows of all questions are batched together.
        ``should_stop``: called before each model batch; when it returns True the call stops with
        ``CallCancelledError`` (a service whose callers gave up stops computing their windows).
        """
        if not isinstance(questions, (list, tuple)):
            raise InvalidInputError(f"questions must be a list of str, got {type(questions).__name__}")
        qs, cs, _ = normalize_inputs(list(questions), contexts if isinstance(contexts, str) else _as_list(contexts, "contexts"))
        opts = Options(self.max_seq_len, self._template.num_special, top_k=top_k, max_answer_len=max_answer_len,
                       handle_impossible=handle_impossible, handle_impossible_answer=handle_impossible_answer,
                       null_threshold=null_threshold, doc_stride=doc_stride, max_seq_len=max_seq_len,
                       max_question_len=max_question_len, align_to_words=align_to_words, unknown=unknown)
        if should_stop is not None and not callable(should_stop):
            raise InvalidInputError(f"should_stop must be None or a callable returning bool, got {type(should_stop).__name__}")
        return self._answer_all(qs, cs, opts, False, should_stop)

    def warmup(self) -> None:
        """Run a one-window call and a full batch once, so the first real call pays no set-up; on
        backends that compile per input shape (``pad_multiple`` > 1), also every padded length of
        a one-window call."""
        context = "SpanRT answers questions from a context. " * 8
        self.answer("What does SpanRT answer?", context)
        self.answer_batch(["What does SpanRT answer?"] * self.max_batch_size, context)
        step = self._backend.pad_multiple
        if step > 1:
            for length in sorted({*range(step, self.max_seq_len + 1, step), self.max_seq_len}):
                batch = Batch.of_ids(np.full((1, length), self._pad_id, dtype=np.int64))
                self._backend.run(batch.feeds(self._backend.input_names, self._backend.input_dtypes), lambda start, end, stream: None)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds spent in tokenize (and batch building) / model / decode (and post-processing)."""
        with self._stage_lock:
            return dict(self._stages)

    def reset_stage_seconds(self) -> None:
        """Zero the stage counters."""
        with self._stage_lock:
            self._stages = dict.fromkeys(STAGES, 0.0)

    def close(self) -> None:
        """Stop accepting calls, wait for calls in flight to stop (at their next batch), free the model."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._state.wait()
        self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine({str(self.bundle.root)!r}, backend={self.backend!r}, precision={self.precision!r})"

    # ---- internals ----------------------------------------------------------------------------
    def _check_model_sizes(self) -> None:
        """Run the model once on the largest input the tokenizer and windows can make: max_seq_len
        tokens, the highest token id among them. A tokenizer larger than the model's embedding
        table, or a max_seq_len above its position table, fails here, at load, with a BundleError
        (not later, inside the runtime, on an unlucky input); so do outputs of the wrong kind."""
        backend, n = self._backend, self.max_seq_len
        top = self.bundle.vocab_size - 1

        def probe(length: int, token: int) -> str | None:
            ids = np.full((1, length), token, dtype=np.int64)
            ids[0, 0], ids[0, -1] = self.bundle.cls_token_id, self.bundle.sep_token_id
            batch = Batch.of_ids(ids)
            try:
                backend.run(batch.feeds(backend.input_names, backend.input_dtypes),
                            lambda start, end, stream: check_logits(backend, start, end, ids.shape, None))
            except BundleError:
                raise
            except Exception as e:  # noqa: BLE001 - each runtime raises its own types; the message is kept
                return f"{type(e).__name__}: {str(e)[:300]}"
            return None

        failed = probe(n, top)
        if failed is None:
            return
        where = f"bundle {self.bundle.root}: {backend.name} ({backend.details.get('file', 'the model')})"
        fix = "Fix: export the bundle again with the model's own tokenizer and a --max-seq-len within its positions"
        if probe(min(n, 4), top) is not None:
            raise BundleError(f"{where}: the model fails on token id {top}, the tokenizer's highest ({self.bundle.vocab_size} "
                              f"tokens): its embedding table is smaller than the vocabulary ({failed}). {fix}")
        if probe(n, self.bundle.cls_token_id) is not None:
            raise BundleError(f"{where}: the model fails on a window of max_seq_len={n} tokens: the bundle's max_seq_len is "
                              f"above the model's positions ({failed}). {fix}")
        raise BundleError(f"{where}: the model fails on a {n}-token window holding token id {top} ({failed}). {fix}")

    def _refuse_huge_contexts(self, texts: list[str], contexts: list[str], offset: int, single: bool) -> None:
        """Refuse a context far beyond max_windows before tokenizing all of it: max_windows windows
        hold at most max_windows * max_seq_len tokens, so if a prefix of the text already has more
        (cut mid-word, a prefix has at most a few tokens more than it has in the whole text), the
        whole surely needs more windows. A 1.9 MB context is refused after tokenizing ~1/10 of it;
        a context near the limit is measured exactly after tokenization (``_prepare``)."""
        limit = self.max_windows * self.max_seq_len  # type: ignore[operator]
        prefix_chars = limit * PREFIX_CHARS_PER_TOKEN
        for text in texts:
            if len(text) <= prefix_chars:
                continue
            _, (head,) = self._encoder.encode([], [text[:prefix_chars]])
            if len(head.ids) > limit + 8:
                i = contexts.index(text)
                raise RequestTooLargeError(
                    f"{'context' if single else f'context[{offset + i}]'} has more than {limit} tokens in its first "
                    f"{prefix_chars} characters alone ({len(text)} in all): more than this Engine's max_windows="
                    f"{self.max_windows} windows can hold; send a shorter context (split the document), or raise max_windows")

    def _after_fork(self) -> None:
        """In a forked child: new locks (a parent thread may have held one at the fork; it does not
        exist here) and no calls in flight. The backend reopens its own state on first use."""
        self._state = threading.Condition()
        self._stage_lock = threading.Lock()
        self._active = 0
        if self._context_cache is not None:
            self._context_cache.after_fork()

    def _enter(self) -> None:
        if self._pid != os.getpid() and self.device != "cpu":
            raise BackendUnavailableError(
                f"this Engine runs on {self.device} and was created in process {self._pid}: a CUDA context cannot be used "
                "in a forked child. Create the Engine after the fork (gunicorn: without --preload, or in post_fork)")
        with self._state:
            if self._closed:
                raise EngineClosedError("this Engine was closed; create a new Engine to answer more questions")
            self._active += 1

    def _leave(self) -> None:
        with self._state:
            self._active -= 1
            self._state.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("this Engine was closed while the call was running; create a new Engine and ask again")

    def _add_stages(self, tokenize: float, model: float, decode: float) -> None:
        with self._stage_lock:
            s = self._stages
            s["tokenize"] += tokenize
            s["model"] += model
            s["decode"] += decode

    def _answer_all(self, questions: list[str], contexts: list[str], opts: Options, single: bool,
                    should_stop: Callable[[], bool] | None = None) -> list[list[Answer]]:
        self._enter()
        try:
            out: list[list[Answer]] = []
            for lo in range(0, len(questions), GROUP_SIZE):
                out.extend(self._answer_group(questions[lo : lo + GROUP_SIZE], contexts[lo : lo + GROUP_SIZE], opts, lo, single,
                                              should_stop))
            return out
        finally:
            self._leave()

    def _prepare(self, questions: list[str], contexts: list[str], opts: Options, offset: int, single: bool) -> list[Example]:
        cache = self._context_cache
        known: dict[str, EncodedContext] = {}
        missing: dict[str, None] = {}
        for c in contexts:
            if c not in known and c not in missing:
                hit = cache.get(c) if cache is not None else None
                if hit is None:
                    missing[c] = None
                else:
                    known[c] = hit
        if self.max_windows is not None:
            self._refuse_huge_contexts(list(missing), contexts, offset, single)
        q_ids, encoded = self._encoder.encode(questions, list(missing))
        for ctx in encoded:
            known[ctx.text] = ctx
            if cache is not None:
                cache.put(ctx)
        examples = []
        for i, (q, c) in enumerate(zip(q_ids, contexts)):
            ctx = known[c]
            if len(q) == 0:
                raise InvalidInputError(f"{'question' if single else f'question[{offset + i}]'} has no tokens the model "
                                        "knows (only control or unknown characters); pass a question in words")
            if len(ctx.ids) == 0:
                raise InvalidInputError(f"{'context' if single else f'context[{offset + i}]'} has no tokens the model "
                                        "knows (only control or unknown characters); pass a context in words")
            example = make_example(self._template, q, ctx, max_seq_len=opts.max_seq_len,
                                   max_question_len=opts.max_question_len, doc_stride=opts.doc_stride)
            if self.max_windows is not None and len(example.window_starts) > self.max_windows:
                raise RequestTooLargeError(
                    f"{'context' if single else f'context[{offset + i}]'} needs {len(example.window_starts)} model windows "
                    f"({len(ctx.ids)} tokens), more than this Engine's max_windows={self.max_windows}; send a shorter "
                    "context (split the document and ask each part), or raise max_windows")
            examples.append(example)
        return examples

    def _answer_group(self, questions: list[str], contexts: list[str], opts: Options, offset: int,
                      single: bool, should_stop: Callable[[], bool] | None = None) -> list[list[Answer]]:
        t0 = time.perf_counter()
        examples = self._prepare(questions, contexts, opts, offset, single)
        table = WindowTable.from_examples(examples, self._template)
        context_pos = np.asarray([e.context_pos for e in examples], dtype=np.int64)[table.example]
        candidates = [Candidates() for _ in examples]
        backend = self._backend
        # With align_to_words, candidates that snap to the same words merge: look further down.
        k = opts.top_k * 2 + 10 if opts.align_to_words else opts.top_k
        tokenize_s = time.perf_counter() - t0
        model_s = decode_s = 0.0
        for rows in plan_batches(table.length, self.max_batch_size, self.max_batch_tokens,
                                 self._backend.call_cost_tokens):
            self._check_open()
            if should_stop is not None and should_stop():
                raise CallCancelledError("the call was stopped before its next model batch (should_stop returned True)")
            t0 = time.perf_counter()
            batch = build_batch(examples, table, rows, self._template, self._pad_id, backend.pad_multiple, self.max_seq_len)
            feeds = batch.feeds(backend.input_names, backend.input_dtypes)
            t1 = time.perf_counter()
            tokenize_s += t1 - t0
            decode_t = [0.0]

            def consume(start: Any, end: Any, stream: int | None, batch: Any = batch, decode_t: list[float] = decode_t) -> Any:
                t = time.perf_counter()
                check_logits(backend, start, end, batch.input_ids.shape, answer_positions(batch.context_mask))
                mask = batch.context_mask if backend.device == "cpu" else backend.to_device(batch.context_mask)
                result = self._span_search(start, end, mask, max_answer_len=min(opts.max_answer_len, start.shape[1]),
                                           top_k=k, return_lse=True, return_null=opts.handle_impossible, stream=stream)
                decode_t[0] += time.perf_counter() - t
                return result

            result = backend.run(feeds, consume)
            t2 = time.perf_counter()
            collect(candidates, table.example, table.start, rows, context_pos[rows], *_host(result, opts.handle_impossible))
            t3 = time.perf_counter()
            model_s += (t2 - t1) - decode_t[0]
            decode_s += decode_t[0] + (t3 - t2)
        t0 = time.perf_counter()
        answers = []
        for ex, cand in zip(examples, candidates):
            ranked = finalize(ex, cand, top_k=opts.top_k, align_to_words=opts.align_to_words,
                              handle_impossible=opts.handle_impossible, null_threshold=opts.null_threshold,
                              backend=backend.name, precision=backend.precision)
            if not ranked:  # no token span has characters: nothing to point at
                ranked = [Answer("", 0, 0, 0.0, backend.name, backend.precision, True,
                                 (*ex.warnings, "no span of the context could be an answer"))]
            answers.append(ranked)
        decode_s += time.perf_counter() - t0
        self._add_stages(tokenize_s, model_s, decode_s)
        return answers


def answer_positions(context_mask: np.ndarray) -> np.ndarray:
    """The positions an answer is read from: the context tokens, and [CLS] at 0 (the null answer
    and the softmax's extra term)."""
    used = context_mask.copy()
    used[:, 0] = True
    return used


def _host(result: Any, with_null: bool) -> tuple[np.ndarray, ...]:
    """span_search's outputs as host NumPy arrays: spans, scores, start_lse, end_lse, null scores."""
    arrays = [result.spans, result.scores, result.start_lse, result.end_lse, result.null_scores if with_null else None]
    return tuple(None if a is None else np.asarray(a) for a in arrays)  # type: ignore[return-value]


# ---- fork() --------------------------------------------------------------------------------------
_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _engines_lock
    _engines_lock = threading.Lock()
    for eng in list(_live_engines):
        eng._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

# ---- the module-level function ------------------------------------------------------------------
_engines: dict[tuple[str, str, str | None], Engine] = {}
_engines_lock = threading.Lock()


def _engine_for(model: Any, backend: str, precision: str | None) -> Engine:
    if isinstance(model, Engine):
        if backend != "auto" or precision is not None:
            raise InvalidInputError("backend and precision are set when an Engine is created; do not pass them with model=Engine")
        return model
    if model is None:
        eng = _engines.get(("<default>", backend, precision))  # no file system look-up per call
        if eng is not None and not eng.closed:
            return eng
        from engine.default_model import bundle_for

        eng = _engine_for(bundle_for(backend, precision), backend, precision)
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


def answer(question: QuestionArg, context: QuestionArg, *, model: str | os.PathLike[str] | Engine | None = None,
           backend: str = "auto", precision: str | None = None, top_k: int = 1,
           max_answer_len: int = DEFAULT_MAX_ANSWER_LEN, handle_impossible: bool = False,
           handle_impossible_answer: bool | None = None, null_threshold: float = 0.0, doc_stride: int | None = None,
           max_seq_len: int | None = None, max_question_len: int = DEFAULT_MAX_QUESTION_LEN, align_to_words: bool = True,
           **unknown: Any) -> Result | list[Result]:
    """Answer question(s) from context(s) with ``model``: None for the embedded default model, a
    bundle folder (its Engine is loaded once and reused) or an ``Engine``. See ``Engine.answer``."""
    eng = _engine_for(model, backend, precision)
    return eng.answer(question, context, top_k=top_k, max_answer_len=max_answer_len, handle_impossible=handle_impossible,
                      handle_impossible_answer=handle_impossible_answer, null_threshold=null_threshold,
                      doc_stride=doc_stride, max_seq_len=max_seq_len, max_question_len=max_question_len,
                      align_to_words=align_to_words, **unknown)
