"""A minimal HTTP question-answering service: Starlette + uvicorn over a BatchingEngine.

An example of embedding SpanRT in an asyncio service, not a product server (no auth, no TLS, no
metrics). Concurrent requests are answered in shared model batches by ``engine.dynamic_batching``.

    python -m examples.service --model BUNDLE_DIR [--host 127.0.0.1] [--port 8000]
    curl -s localhost:8000/answer -d '{"question": "Who?", "context": "Ada wrote it."}'

POST /answer  JSON {"question": str, "context": str, optional "top_k", "max_answer_len",
              "handle_impossible", "null_threshold", "doc_stride", "max_seq_len", "max_question_len",
              "align_to_words", "timeout" (seconds)} -> 200 {"answers": [{"answer", "score", "start",
              "end", "impossible", "warnings"}, ...]} best first.
              400: bad JSON (also too deeply nested, integers of more than MAX_JSON_DIGITS digits,
              NaN/Infinity) or input, numbers out of range included;
              413: body too large, or a context that needs more than --max-windows model windows
              (the bound on the work one request may cause); 503: queue full (Retry-After),
              shutting down, or the batching worker died; 504: not answered within the timeout
              (the rest of its windows are not computed).
GET  /healthz -> 200 {"status": "ok", backend, precision, device, queue figures}; 503 when closed or
              when the batching worker died.

Requires ``pip install starlette uvicorn``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from engine import (
    BatchingEngine,
    EngineClosedError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
    SpanRTError,
    WorkerDiedError,
)

DEFAULT_MAX_BODY_BYTES = 2 << 20  # a SQuAD context is a few KB; a whole book is not a request
# Model windows one request may cause (--max-windows): bytes do not bound work. A SQuAD context
# needs 1-2 windows; 64 windows of 384 tokens hold ~10,000 context tokens (~50 KB of English).
DEFAULT_MAX_WINDOWS = 64
MAX_JSON_DIGITS = 40  # no option needs a longer number
OPTIONS = ("top_k", "max_answer_len", "handle_impossible", "null_threshold", "doc_stride", "max_seq_len",
           "max_question_len", "align_to_words")

logger = logging.getLogger("spanrt.service")


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)


class _BadJSON(ValueError):
    """The body is not a JSON document this service accepts; the message says why."""


def _refuse_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not a JSON number; send finite numbers")


def _checked_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise _BadJSON(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_JSON_DIGITS})")
    return int(text)


def _checked_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSON(f"the number {text[:20]} is out of range")
    return value


def parse_body(body: bytes) -> Any:
    """The request's JSON; anything that is not plain, bounded JSON is a _BadJSON with the reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadJSON(f"the body is not UTF-8 ({e})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_int=_checked_int,
                          parse_float=_checked_float)
    except json.JSONDecodeError as e:
        raise _BadJSON(f"the body is not JSON: {e}") from None
    except RecursionError:  # json's C parser counts its nesting against the recursion limit
        raise _BadJSON("the JSON is nested too deeply; send a flat object") from None


def _answers(result: Any) -> list[dict[str, Any]]:
    items = result if isinstance(result, list) else [result]
    return [{"answer": a.text, "score": a.score, "start": a.start, "end": a.end, "impossible": a.impossible,
             "warnings": list(a.warnings)} for a in items]


def create_app(engine: BatchingEngine, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, close_on_shutdown: bool = True) -> Starlette:
    """The Starlette app serving ``engine``; it closes the engine on shutdown when ``close_on_shutdown``."""

    async def answer(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _error(413, "too_large", f"request body over {max_body_bytes} bytes")
        body = await request.body()
        if len(body) > max_body_bytes:
            return _error(413, "too_large", f"request body over {max_body_bytes} bytes")
        try:
            payload = parse_body(body)
        except _BadJSON as e:
            return _error(400, "bad_json", str(e))
        if not isinstance(payload, dict):
            return _error(400, "bad_request", "the body must be a JSON object with 'question' and 'context'")
        unknown = sorted(set(payload) - {"question", "context", "timeout", *OPTIONS})
        if unknown:
            return _error(400, "bad_request", f"unknown field(s) {', '.join(unknown)}; known: question, context, timeout, "
                                              + ", ".join(OPTIONS))
        if "question" not in payload or "context" not in payload:
            return _error(400, "bad_request", "both 'question' and 'context' are required")
        options = {k: payload[k] for k in OPTIONS if k in payload}
        timeout = payload.get("timeout", engine.timeout_s)
        try:
            result = await engine.answer_async(payload["question"], payload["context"], timeout=timeout, **options)
        except RequestTooLargeError as e:
            return _error(413, "too_much_work", str(e))
        except InvalidInputError as e:
            return _error(400, "invalid_input", str(e))
        except QueueFullError as e:
            return _error(503, "overloaded", str(e), headers={"Retry-After": "1"})
        except RequestTimeoutError as e:
            return _error(504, "timeout", str(e))
        except EngineClosedError as e:
            return _error(503, "shutting_down", str(e))
        except WorkerDiedError as e:
            return _error(503, "worker_died", str(e))
        return JSONResponse({"answers": _answers(result)})

    async def healthz(request: Request) -> JSONResponse:
        if engine.closed:
            return _error(503, "shutting_down", "the engine is closed")
        if not engine.healthy:
            return _error(503, "worker_died", str(engine.failure))
        stats = engine.stats()
        eng = engine.engine
        return JSONResponse({"status": "ok", "backend": eng.backend, "precision": eng.precision, "device": eng.device,
                             "queued": stats["queued"], "max_queue_size": engine.max_queue_size,
                             "answered": stats["answered"], "batches": stats["batches"], "mean_batch": stats["mean_batch"]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if close_on_shutdown:
            await asyncio.to_thread(engine.close)  # answers what is queued, then frees the model
            logger.info("engine closed: %d calls answered in %d batches", engine.stats()["answered"], engine.stats()["batches"])

    return Starlette(routes=[Route("/answer", answer, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
                     lifespan=lifespan)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of ``python -m examples.service``."""
    p = argparse.ArgumentParser(prog="python -m examples.service", description="Serve a SpanRT bundle over HTTP.")
    p.add_argument("--model", default=None, help="bundle folder (default: the embedded default model)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default=None)
    p.add_argument("--threads", type=int, default=None, help="model intra-op threads (default: all cores)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=None, help="calls per model batch (default: the Engine's)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a call waits for batch mates (default 2)")
    p.add_argument("--max-queue-size", type=int, default=1024, help="waiting calls before 503 (default 1024)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="default per-request timeout (default 30)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--max-windows", type=int, default=DEFAULT_MAX_WINDOWS,
                   help=f"model windows one request's context may need; more is HTTP 413 (default {DEFAULT_MAX_WINDOWS})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the model, then serve until SIGINT/SIGTERM (queued requests are answered first)."""
    import uvicorn

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model = args.model
    if model is None:
        from engine.default_model import bundle_for

        model = bundle_for(args.backend, args.precision)
    try:
        engine = BatchingEngine(model, backend=args.backend, precision=args.precision, threads=args.threads,
                                max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                                max_queue_size=args.max_queue_size, timeout_s=args.timeout_s, max_windows=args.max_windows)
    except SpanRTError as e:  # a bad setting or bundle: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine.engine.warmup()
    logger.info("serving %r on http://%s:%d", engine, args.host, args.port)
    app = create_app(engine, max_body_bytes=args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ws="none", lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
