"""One system in its own process: load it, answer passes of questions on request, report timings and memory.

Running every system in a separate process keeps their peak RSS and load time apart and lets the
parent interleave repeats across systems while the others sit idle. The parent talks to the
worker over a multiprocessing pipe with small dict messages (``op`` says which).
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from typing import Any

PROGRESS_EVERY_S = 0.2


def serve(conn: Connection, spec_name: str, artifacts: Any, settings: Any, threads: int, max_batch_size: int,
          questions: list[str], contexts: list[str]) -> None:
    """Worker main loop (the target of a spawned process)."""
    # same thread count for every library the system may use; set before anything imports them
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the tokenizers library's thread pool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "Device set to use cpu", deprecation notes
    # library deprecation chatter would break the parent's progress bars; results are unaffected
    warnings.simplefilter("ignore")
    try:
        _serve(conn, spec_name, artifacts, settings, threads, max_batch_size, questions, contexts)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records the failure
        try:
            conn.send({"op": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        except (OSError, EOFError):
            pass
    finally:
        conn.close()


def _serve(conn: Connection, spec_name: str, artifacts: Any, settings: Any, threads: int, max_batch_size: int,
           questions: list[str], contexts: list[str]) -> None:
    from bench.machine import peak_rss_mb, rss_mb
    from bench.base import SystemUnavailable
    from bench.systems import SYSTEMS_BY_NAME, make_system

    rss_start = rss_mb()
    spec = SYSTEMS_BY_NAME[spec_name]
    system = make_system(spec, artifacts, settings, threads=threads, max_batch_size=max_batch_size)
    try:
        t0 = time.perf_counter()
        system.import_libraries()
        t1 = time.perf_counter()
        details = system.load()
        t2 = time.perf_counter()
        system.answer(questions[:1], contexts[:1], 1)
        t3 = time.perf_counter()
    except SystemUnavailable as exc:
        conn.send({"op": "unavailable", "reason": str(exc)})
        return
    system.reset_stages()
    conn.send({"op": "loaded", "import_s": t1 - t0, "load_s": t2 - t1, "cold_start_ms": (t3 - t2) * 1e3,
               "rss_start_mb": rss_start, "rss_after_load_mb": rss_mb(), "details": details})
    while True:
        msg = conn.recv()
        if msg["op"] == "close":
            peak = peak_rss_mb()
            rss_end = rss_mb()
            system.close()
            conn.send({"op": "closed", "peak_rss_mb": peak, "rss_end_mb": rss_end})
            return
        if msg["op"] != "pass":
            raise ValueError(f"unknown message {msg['op']!r}")
        conn.send(run_pass(system, conn, questions, contexts, msg["indices"], msg["batch_size"]))


def run_pass(system: Any, conn: Connection | None, questions: list[str], contexts: list[str], indices: list[int],
             batch_size: int) -> dict[str, Any]:
    """Answer ``indices`` in calls of ``batch_size`` questions; per-call wall times, answers, stage seconds."""
    system.reset_stages()
    call_s: list[float] = []
    preds: list[list[Any]] = []
    last = time.perf_counter()
    done = 0
    for lo in range(0, len(indices), batch_size):
        chunk = indices[lo : lo + batch_size]
        qs, cs = [questions[i] for i in chunk], [contexts[i] for i in chunk]
        t = time.perf_counter()
        answers = system.answer(qs, cs, batch_size)
        call_s.append(time.perf_counter() - t)
        if len(answers) != len(chunk):
            raise RuntimeError(f"{system.spec.name} returned {len(answers)} answers for {len(chunk)} questions")
        preds.extend([a.text, a.start, a.end, a.score] for a in answers)
        done += len(chunk)
        if conn is not None and time.perf_counter() - last >= PROGRESS_EVERY_S:
            conn.send({"op": "progress", "done": done})
            last = time.perf_counter()
    return {"op": "pass_done", "batch_size": batch_size, "n": len(indices), "call_s": call_s,
            "predictions": preds, "stage_s": system.stage_seconds()}
