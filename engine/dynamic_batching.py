"""Dynamic batching inside the process: many concurrent ``answer()`` calls, one model batch.

A service that answers one question per request calls the model with batch 1 on every thread,
and the threads fight over the same cores (or the same GPU stream). ``BatchingEngine`` puts each
call in a bounded queue; a worker thread takes what arrived within ``max_delay_ms`` of the oldest
waiting call (at most ``max_batch_size`` calls), answers them with one ``Engine.answer_batch``
(tokenization, the model and the decoder each run once for the whole batch) and routes every
answer back to its caller. Calls with different options are answered in separate batches.

Back-pressure is explicit: when ``max_queue_size`` calls are waiting, ``answer`` raises
:class:`QueueFullError` at once (a service maps it to HTTP 503) instead of growing memory. A call
that is not answered within its ``timeout`` raises :class:`RequestTimeoutError`; if it was still
waiting it leaves the queue and is never run. ``await answer_async(...)`` is the same for asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from engine.answering import normalize_inputs
from engine.api import Engine, Result
from engine.bundle import Bundle
from engine.errors import (
    CallCancelledError,
    EngineClosedError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
    WorkerDiedError,
    brief,
)
from engine.options import option_defaults, reject_unknown

__all__ = ["BatchingEngine", "QueueFullError", "RequestTimeoutError", "WorkerDiedError"]

logger = logging.getLogger("engine")

DEFAULT_MAX_DELAY_MS = 2.0
DEFAULT_MAX_QUEUE_SIZE = 1024
DEFAULT_TIMEOUT_S = 30.0
MAX_DELAY_MS = 60_000.0  # a minute: waiting longer for batch mates is a mistake, not a setting
MAX_TIMEOUT_S = 86_400.0  # a day (and below threading.TIMEOUT_MAX); None means no limit

# Every answering option a call may pass, with its default (engine.options owns them). Calls are
# grouped by their full option set; the values are checked when their batch runs, so a bad value
# fails its own call alone (see _run).
_OPTION_DEFAULTS = option_defaults()


_USE_DEFAULT: Any = object()  # "timeout not given": use the engine's timeout_s


@dataclass(eq=False)
class _Request:
    question: str
    context: str
    options: dict[str, Any]
    key: Hashable
    future: concurrent.futures.Future[Result]
    enqueued: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # its caller stopped waiting (timeout): its windows need not be computed


def _options_key(options: dict[str, Any]) -> Hashable:
    """Calls whose options compare equal share a batch; unhashable values get a batch of their own."""
    items = tuple(sorted(options.items()))
    try:
        hash(items)
    except TypeError:
        return object()
    return items


class BatchingEngine:
    """Coalesces concurrent ``answer`` calls (threads or asyncio tasks) into batched model calls.

    ``engine``: an ``Engine`` (shared; not closed by ``close()``) or a bundle folder / ``Bundle``
    (an Engine is created with ``engine_options`` and closed with this object).
    ``max_batch_size``: most calls per batch (default: the Engine's max_batch_size).
    ``max_delay_ms``: how long the oldest waiting call may wait for others to join its batch.
    ``max_queue_size``: waiting calls beyond this are refused with ``QueueFullError``.
    ``timeout_s``: default per-call timeout in seconds (None: wait as long as it takes).
    ``workers``: batches prepared and run at the same time (2 overlaps one batch's tokenization
    with another's model run; 1 is right for most CPUs).
    """

    def __init__(self, engine: Engine | str | os.PathLike[str] | Bundle, *, max_batch_size: int | None = None,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, workers: int = 1, **engine_options: Any) -> None:
        if isinstance(engine, Engine):
            if engine_options:
                raise InvalidInputError(f"engine options ({', '.join(sorted(engine_options))}) are set when an Engine is "
                                        "created; pass a bundle folder instead of an Engine to set them here")
            if engine.closed:
                raise EngineClosedError("the Engine given to BatchingEngine is closed; create a new Engine")
            self.engine, self._owns_engine = engine, False
        else:
            self.engine, self._owns_engine = Engine(engine, **engine_options), True
        try:
            self.max_batch_size = _positive_int("max_batch_size", self.engine.max_batch_size if max_batch_size is None
                                                else max_batch_size, 4096)
            self.max_queue_size = _positive_int("max_queue_size", max_queue_size, 1 << 24)
            self.workers = _positive_int("workers", workers, 64)
            self.max_delay_s = _seconds("max_delay_ms", max_delay_ms, MAX_DELAY_MS, allow_none=False) / 1000.0
            self.timeout_s = _seconds("timeout_s", timeout_s, MAX_TIMEOUT_S, allow_none=True)
        except InvalidInputError:
            if self._owns_engine:
                self.engine.close()
            raise
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._closing = False
        self._failure: WorkerDiedError | None = None
        self._pid = os.getpid()
        self._stats = {"submitted": 0, "answered": 0, "failed": 0, "rejected": 0, "timed_out": 0, "batches": 0,
                       "batched_requests": 0, "largest_batch": 0, "retried_alone": 0, "cancelled": 0}
        self._threads = [threading.Thread(target=self._worker, name=f"spanrt-batching-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    # ---- public API ---------------------------------------------------------------------------
    def answer(self, question: str, context: str, *, timeout: float | None = _USE_DEFAULT, **options: Any) -> Result:
        """Answer one question from one context (an ``Answer``, or a list of them when top_k > 1).

        Blocks until the batch holding this call has run. ``timeout`` (seconds, None: no limit)
        defaults to the engine's ``timeout_s``. Options are ``Engine.answer``'s.
        """
        timeout = self._timeout(timeout)
        request = self._submit(question, context, options)
        try:
            return request.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(request, timeout) from None

    async def answer_async(self, question: str, context: str, *, timeout: float | None = _USE_DEFAULT,
                           **options: Any) -> Result:
        """``answer`` for asyncio: the event loop keeps running while the batch is answered."""
        timeout = self._timeout(timeout)
        request = self._submit(question, context, options)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(request.future), timeout)
        except asyncio.TimeoutError:  # wait_for's (builtins.TimeoutError from Python 3.11 on)
            raise self._timed_out(request, timeout) from None
        except asyncio.CancelledError:  # the task was cancelled: nobody waits for this answer
            request.abandoned = True
            raise

    def stats(self) -> dict[str, float]:
        """Counters since creation: calls submitted/answered/failed/rejected/timed out, calls whose
        model work stopped because their callers gave up (cancelled), batches run, mean and largest
        batch, calls retried alone after their batch failed, the queue depth, and ``healthy``."""
        with self._cond:
            s: dict[str, float] = dict(self._stats)
            s["queued"] = len(self._queue)
            s["healthy"] = self._failure is None
        s["mean_batch"] = s["batched_requests"] / s["batches"] if s["batches"] else 0.0
        return s

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closing

    @property
    def healthy(self) -> bool:
        """False once a worker thread died (see ``failure``): no call can be answered any more."""
        return self._failure is None

    @property
    def failure(self) -> WorkerDiedError | None:
        """Why the workers stopped, or None while they run."""
        return self._failure

    def close(self, *, drain: bool = True) -> None:
        """Stop taking calls; answer the waiting ones (``drain=True``) or fail them with
        EngineClosedError; wait for the workers, then close the Engine if this object created it."""
        with self._cond:
            already = self._closing
            self._closing = True
            if not drain:
                self._fail_queued(EngineClosedError("the BatchingEngine was closed before this call was answered"))
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        if self._owns_engine and not already:
            self.engine.close()

    def __enter__(self) -> BatchingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BatchingEngine({self.engine!r}, max_batch_size={self.max_batch_size}, "
                f"max_delay_ms={self.max_delay_s * 1000:g}, max_queue_size={self.max_queue_size})")

    # ---- submitting ---------------------------------------------------------------------------
    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout_s if timeout is _USE_DEFAULT else _seconds("timeout", timeout, MAX_TIMEOUT_S, allow_none=True)

    def _submit(self, question: Any, context: Any, options: dict[str, Any]) -> _Request:
        if isinstance(question, (list, tuple)) or isinstance(context, (list, tuple)):
            raise InvalidInputError("BatchingEngine.answer takes one question and one context (str); for lists of "
                                    "questions call Engine.answer_batch, which batches them already")
        normalize_inputs(question, context)  # type and emptiness errors belong to the caller, now
        reject_unknown(set(options) - set(_OPTION_DEFAULTS))
        full = {**_OPTION_DEFAULTS, **options}
        request = _Request(question, context, full, _options_key(full), concurrent.futures.Future())
        if self._pid != os.getpid():  # checked before taking a lock a parent thread may have held
            raise WorkerDiedError(f"this BatchingEngine was created in process {self._pid}; its worker threads do not exist "
                                  "in this forked child. Create the BatchingEngine after the fork (gunicorn: without "
                                  "--preload, or in a post_fork hook)")
        with self._cond:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise EngineClosedError("this BatchingEngine was closed; create a new one to answer more questions")
            if len(self._queue) >= self.max_queue_size:
                self._stats["rejected"] += 1
                raise QueueFullError(
                    f"{len(self._queue)} calls are waiting (max_queue_size={self.max_queue_size}): the engine is "
                    "overloaded. Retry later (HTTP 503), lower the request rate, or add engines/replicas")
            self._queue.append(request)
            self._stats["submitted"] += 1
            self._cond.notify()
        request.future.add_done_callback(lambda f: self._dequeue_if_cancelled(request))
        return request

    def _timed_out(self, request: _Request, timeout: float | None) -> RequestTimeoutError:
        request.abandoned = True  # a running batch stops once all of its callers gave up
        dropped = request.future.cancel()  # succeeds only while the call is still waiting in the queue
        with self._cond:
            self._stats["timed_out"] += 1
        where = "still queued; it was dropped" if dropped else "its batch was running; the answer is discarded"
        return RequestTimeoutError(f"no answer within timeout={timeout}s ({where}). The engine is overloaded or the "
                                   "context is very long; raise the timeout or add capacity")

    def _dequeue_if_cancelled(self, request: _Request) -> None:
        """A call cancelled while waiting (timeout, task cancelled) frees its queue place at once."""
        if request.future.cancelled():
            with self._cond:  # an RLock: safe even if cancel() was called under it
                try:
                    self._queue.remove(request)
                except ValueError:  # already taken by a worker, which skips cancelled calls
                    pass

    def _fail_queued(self, error: BaseException) -> None:
        while self._queue:
            r = self._queue.popleft()
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(error)
                self._stats["failed"] += 1

    # ---- the worker ---------------------------------------------------------------------------
    def _take(self) -> list[_Request] | None:
        """The next batch: waits for a first call, then until the batch is full or the oldest
        call has waited max_delay; None when closing and nothing is left."""
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return None
                deadline = self._queue[0].enqueued + self.max_delay_s
                while self._queue and len(self._queue) < self.max_batch_size and not self._closing:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch: list[_Request] = []
                while self._queue and len(batch) < self.max_batch_size:
                    r = self._queue.popleft()
                    if r.future.set_running_or_notify_cancel():  # False: timed out while waiting
                        batch.append(r)
                if batch:
                    self._stats["batches"] += 1
                    self._stats["batched_requests"] += len(batch)
                    self._stats["largest_batch"] = max(self._stats["largest_batch"], len(batch))
                    return batch

    def _worker(self) -> None:
        batch: list[_Request] = []
        try:
            while True:
                batch = self._take() or []
                if not batch:
                    return
                groups: dict[Hashable, list[_Request]] = {}
                for r in batch:
                    groups.setdefault(r.key, []).append(r)
                for group in groups.values():
                    try:
                        self._run(group)
                    except Exception as e:  # never leave a caller waiting, whatever happened
                        logger.exception("spanrt batching worker: unexpected error")
                        self._finish(group, error=e)
        except BaseException as e:  # the worker itself broke: fail everything now and later, loudly
            self._die(e, batch)

    def _die(self, error: BaseException, batch: list[_Request]) -> None:
        logger.critical("spanrt batching worker %s died: %r", threading.current_thread().name, error, exc_info=error)
        failure = WorkerDiedError(f"the batching worker stopped on an unexpected error ({type(error).__name__}: {error}); "
                                  "no call can be answered by this BatchingEngine any more: close it and create a new one")
        failure.__cause__ = error
        with self._cond:
            if self._failure is None:
                self._failure = failure
            self._fail_queued(self._failure)
            self._cond.notify_all()
        for r in batch:  # calls this worker had taken but not answered
            if r.future.done():
                continue
            r.future.set_exception(self._failure)
            with self._cond:
                self._stats["failed"] += 1

    def _run(self, group: list[_Request]) -> None:
        options = group[0].options
        try:
            ranked = self.engine.answer_batch([r.question for r in group], [r.context for r in group], **options,
                                              should_stop=lambda: all(r.abandoned for r in group))
        except EngineClosedError as e:
            self._finish(group, error=e)
            return
        except CallCancelledError as e:  # every caller of the group gave up: its windows were dropped
            self._finish(group, error=e, counter="cancelled")
            return
        except Exception as e:
            if len(group) == 1:
                self._finish(group, error=e)
                return
            # One bad call (a question without known tokens, an option out of range) must not fail
            # the others: answer each alone, so each gets its own answer or its own error.
            with self._cond:
                self._stats["retried_alone"] += len(group)
            for r in group:
                try:
                    self._finish([r], results=[self.engine.answer(r.question, r.context, **options)])
                except Exception as e1:
                    self._finish([r], error=e1)
            return
        top1 = options["top_k"] == 1
        self._finish(group, results=[answers[0] if top1 else answers for answers in ranked])

    def _finish(self, group: list[_Request], *, results: list[Result] | None = None, error: BaseException | None = None,
                counter: str = "failed") -> None:
        answered = failed = 0
        for i, r in enumerate(group):
            if r.future.done():
                continue
            if error is not None:
                r.future.set_exception(error)
                failed += 1
            else:
                r.future.set_result(results[i])  # type: ignore[index]
                answered += 1
        with self._cond:
            self._stats["answered"] += answered
            self._stats[counter] += failed


def _positive_int(name: str, value: Any, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise InvalidInputError(f"{name} must be an int between 1 and {hi}, got {brief(value)}")
    return value


def _seconds(name: str, value: Any, hi: float, *, allow_none: bool) -> Any:
    """A duration in [0, hi]: checked before anything is queued, so no later wait can overflow."""
    if value is None and allow_none:
        return None
    number = math.nan
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
    if not 0 <= number <= hi:  # NaN, +-inf and wrong types fail here
        extra = " (or None for no limit)" if allow_none else ""
        raise InvalidInputError(f"{name} must be a number between 0 and {hi:g}{extra}, got {brief(value)}")
    return number
