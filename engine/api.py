"""The runtime's public face: ``answer(question, context)`` and ``Engine``.

One call flows one way: options checked (engine.options) -> inputs checked, tokenized and cut into
doc-stride windows (engine.answering.prepare, engine.preprocess) -> windows sorted by length and
padded per batch (engine.windows) -> backend (engine.backends) -> span search
(engine.answering.decode: engine.decode, C++ or CUDA) -> answers (engine.answering.rank:
engine.postprocess). Questions are processed in groups of ``GROUP_SIZE`` and windows in batches of
``max_batch_size``, so memory stays bounded for 10,000 questions or a 1 MB context.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.answering import WindowLimit, as_list, char_spans, decode, host_arrays, label_for, normalize_inputs, prepare, rank
from engine.backends import BACKENDS, PRECISIONS, open_backend
from engine.backends.base import check_logits
from engine.bundle import Bundle, load_bundle
from engine.errors import BackendUnavailableError, BundleError, CallCancelledError, EngineClosedError, InvalidInputError, brief
from engine.options import DEFAULTS, AnswerOptions, check_int, option_arguments
from engine.postprocess import Answer, Candidates, collect
from engine.preprocess import ContextCache, TextEncoder, check_template
from engine.windows import Batch, WindowTable, build_batch, plan_batches

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Answer", "Engine", "answer"]

logger = logging.getLogger("engine")

GROUP_SIZE = 256  # questions tokenized and answered together (bounds memory for huge calls)
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_CONTEXT_CACHE = 256  # tokenized contexts kept per Engine (0: none), see ContextCache
STAGES = ("tokenize", "model", "decode")

QuestionArg = str | Sequence[str]
Result = Answer | list[Answer]

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
        if precision is not None and precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be None or one of {', '.join(PRECISIONS)}, got {brief(precision)}")
        max_batch_size = check_int("max_batch_size", max_batch_size, 1, 4096)
        if threads is not None:
            threads = check_int("threads", threads, 1, 1024)
        device_id = check_int("device_id", device_id, 0, 1023)
        context_cache = check_int("context_cache", context_cache, 0, 1_000_000)
        if max_batch_tokens is not None:
            max_batch_tokens = check_int("max_batch_tokens", max_batch_tokens, 1, 1 << 24)
        self.max_windows = None if max_windows is None else check_int("max_windows", max_windows, 1, 1 << 24)
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
    def answer(self, question: QuestionArg, context: QuestionArg, *, top_k: int = DEFAULTS.top_k,
               max_answer_len: int = DEFAULTS.max_answer_len, handle_impossible: bool = DEFAULTS.handle_impossible,
               handle_impossible_answer: bool | None = None, null_threshold: float = DEFAULTS.null_threshold,
               doc_stride: int | None = DEFAULTS.doc_stride, max_seq_len: int | None = DEFAULTS.max_seq_len,
               max_question_len: int = DEFAULTS.max_question_len, align_to_words: bool = DEFAULTS.align_to_words,
               **unknown: Any) -> Result | list[Result]:
        """Answer one question (an ``Answer``, or a list of up to ``top_k`` when top_k > 1) or lists of
        questions/contexts (a list of those), as the Hugging Face pipeline shapes its results.

        Options (engine.options.AnswerOptions) keep the pipeline's names and meanings except:
        max_answer_len has a longer default (the pipeline: 15 tokens), questions longer than
        max_question_len tokens are truncated (with a warning in ``Answer.warnings``), and
        ``null_threshold`` shifts the null answer's rank.
        """
        questions, contexts, single = normalize_inputs(question, context)
        opts = self._options(locals(), unknown)
        ranked = self._answer_all(questions, contexts, opts, single)
        shaped: list[Result] = [r[0] if opts.top_k == 1 else r for r in ranked]
        return shaped[0] if single else shaped

    def answer_batch(self, questions: Sequence[str], contexts: Sequence[str] | str, *, top_k: int = DEFAULTS.top_k,
                     max_answer_len: int = DEFAULTS.max_answer_len, handle_impossible: bool = DEFAULTS.handle_impossible,
                     handle_impossible_answer: bool | None = None, null_threshold: float = DEFAULTS.null_threshold,
                     doc_stride: int | None = DEFAULTS.doc_stride, max_seq_len: int | None = DEFAULTS.max_seq_len,
                     max_question_len: int = DEFAULTS.max_question_len, align_to_words: bool = DEFAULTS.align_to_words,
                     should_stop: Callable[[], bool] | None = None, **unknown: Any) -> list[list[Answer]]:
        """Answer many questions in one call: per question, its answers best first (up to top_k).

        Same options as ``answer``; windows of all questions are batched together.
        ``should_stop``: called before each model batch; when it returns True the call stops with
        ``CallCancelledError`` (a service whose callers gave up stops computing their windows).
        """
        if not isinstance(questions, (list, tuple)):
            raise InvalidInputError(f"questions must be a list of str, got {type(questions).__name__}")
        qs, cs, _ = normalize_inputs(list(questions), contexts if isinstance(contexts, str) else as_list(contexts, "contexts"))
        opts = self._options(locals(), unknown)
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

    def _options(self, arguments: dict[str, Any], unknown: dict[str, Any]) -> AnswerOptions:
        """The checked options of a call (``arguments``: its locals()), for this Engine's model."""
        return AnswerOptions.of_call(arguments, unknown).resolve(self.max_seq_len, self._template.num_special)

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

    def _answer_all(self, questions: list[str], contexts: list[str], opts: AnswerOptions, single: bool,
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

    def _answer_group(self, questions: list[str], contexts: list[str], opts: AnswerOptions, offset: int,
                      single: bool, should_stop: Callable[[], bool] | None = None) -> list[list[Answer]]:
        t0 = time.perf_counter()
        limit = None if self.max_windows is None else WindowLimit(self.max_windows, self.max_seq_len)
        examples = prepare(self._encoder, questions, contexts, opts, label=label_for(single, offset), cache=self._context_cache,
                           limit=limit)
        table = WindowTable.from_examples(examples, self._template)
        context_pos = np.asarray([e.context_pos for e in examples], dtype=np.int64)[table.example]
        candidates = [Candidates() for _ in examples]
        backend = self._backend
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
                result = decode(start, end, mask, opts, stream=stream)
                decode_t[0] += time.perf_counter() - t
                return result

            result = backend.run(feeds, consume)
            t2 = time.perf_counter()
            collect(candidates, table.example, table.start, rows, context_pos[rows], *host_arrays(result, opts.handle_impossible))
            t3 = time.perf_counter()
            model_s += (t2 - t1) - decode_t[0]
            decode_s += decode_t[0] + (t3 - t2)
        t0 = time.perf_counter()
        answers = [rank(cand, ex.context.text, char_spans(ex.context, opts.align_to_words), ex.warnings, opts,
                        backend=backend.name, precision=backend.precision) for ex, cand in zip(examples, candidates)]
        decode_s += time.perf_counter() - t0
        self._add_stages(tokenize_s, model_s, decode_s)
        return answers


def answer_positions(context_mask: np.ndarray) -> np.ndarray:
    """The positions an answer is read from: the context tokens, and [CLS] at 0 (the null answer
    and the softmax's extra term)."""
    used = context_mask.copy()
    used[:, 0] = True
    return used


# ---- fork() --------------------------------------------------------------------------------------
_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for eng in list(_live_engines):
        eng._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

# ---- the module-level function ------------------------------------------------------------------
def answer(question: QuestionArg, context: QuestionArg, *, model: str | os.PathLike[str] | Engine | None = None,
           backend: str = "auto", precision: str | None = None, top_k: int = DEFAULTS.top_k,
           max_answer_len: int = DEFAULTS.max_answer_len, handle_impossible: bool = DEFAULTS.handle_impossible,
           handle_impossible_answer: bool | None = None, null_threshold: float = DEFAULTS.null_threshold,
           doc_stride: int | None = DEFAULTS.doc_stride, max_seq_len: int | None = DEFAULTS.max_seq_len,
           max_question_len: int = DEFAULTS.max_question_len, align_to_words: bool = DEFAULTS.align_to_words,
           **unknown: Any) -> Result | list[Result]:
    """Answer question(s) from context(s) with ``model``: None for the embedded default model, a
    bundle folder (its Engine is loaded once and reused) or an ``Engine``. See ``Engine.answer``."""
    from engine.shared_engines import engine_for  # it imports this module

    eng = engine_for(model, backend, precision)
    return eng.answer(question, context, **option_arguments(locals()), **unknown)
