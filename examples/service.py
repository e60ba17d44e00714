"""A minimal HTTP question-answering service: Starlette + uvicorn over a BatchingEngine.

An example of embedding SpanRT in an asyncio service, not a product server (no auth, no TLS, no
metrics). Concurrent requests are answered in shared model batches by ``engine.batching``.

    python -m examples.service --model BUNDLE_DIR [--host 127.0.0.1] [--port 8000]
    curl -s localhost:8000/answer -d '{"question": "Who?", "context": "Ada wrote it."}'

POST /answer  JSON {"question": str, "context": str, optional "top_k", "max_answer_len",
              "handle_impossible", "null_threshold", "doc_stride", "max_seq_len", "max_question_len",
              "align_to_words", "timeout" (seconds)} -> 200 {"answers": [{"answer", "score", "start",
              "end", "impossible", "warnings"}, ...]} best first.
              400: bad JSON or input; 413: body too large; 503: queue full (Retry-After) or shutting
              down; 504: not answered within the timeout.
GET  /healthz -> 200 {"status": "ok", backend, precision, device, queue figures}; 503 when closed.

Requires ``pip install starlette uvicorn``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from engine.batching import BatchingEngine, QueueFullError, RequestTimeoutError
from engine.errors import EngineClosedError, InvalidInputError

DEFAULT_MAX_BODY_BYTES = 2 << 20  # a SQuAD context is a few KB; a whole book is not a request
OPTIONS = ("top_k", "max_answer_len", "handle_impossible", "null_threshold", "doc_stride", "max_seq_len",
           "max_question_len", "align_to_words")

logger = logging.getLogger("spanrt.service")


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)


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
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, "bad_json", f"the body is not JSON: {e}")
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
        except InvalidInputError as e:
            return _error(400, "invalid_input", str(e))
        except QueueFullError as e:
            return _error(503, "overloaded", str(e), headers={"Retry-After": "1"})
        except RequestTimeoutError as e:
            return _error(504, "timeout", str(e))
        except EngineClosedError as e:
            return _error(503, "shutting_down", str(e))
        return JSONResponse({"answers": _answers(result)})

    async def healthz(request: Request) -> JSONResponse:
        if engine.closed:
            return _error(503, "shutting_down", "the engine is closed")
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
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the model, then serve until SIGINT/SIGTERM (queued requests are answered first)."""
    import uvicorn

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model = args.model
    if model is None:
        from engine.default_model import default_bundle

        model = default_bundle()
    engine = BatchingEngine(model, backend=args.backend, precision=args.precision, threads=args.threads,
                            max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                            max_queue_size=args.max_queue_size, timeout_s=args.timeout_s)
    engine.engine.warmup()
    logger.info("serving %r on http://%s:%d", engine, args.host, args.port)
    app = create_app(engine, max_body_bytes=args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ws="none", lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
