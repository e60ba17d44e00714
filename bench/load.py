"""`python -m bench load`: closed-loop load, plain Engine vs BatchingEngine (vs a Triton server with
``--triton``), same clients, same questions.

Each of ``--clients`` threads asks one SQuAD dev question at a time and asks the next as soon as
its answer arrives (a closed loop: the offered load is what the engine can take). A phase stops
after ``--requests`` answers or ``--duration`` seconds, whichever comes first. Phases:

* ``single``: one client on the plain Engine: the batch-1 latency of an idle engine;
* ``plain``: ``--clients`` clients calling the plain Engine (every call a batch of 1);
* ``batching``: the same clients calling a BatchingEngine over the same Engine;
* ``triton`` (with ``--triton``): the same clients, each with its own gRPC connection, calling a
  real tritonserver (engine.serve) on 127.0.0.1 that serves the same bundle from a ``python -m
  export triton --target cpu`` repository: Triton's dynamic batcher with the BatchingEngine's
  max_batch_size and delay, one Engine instance with the same backend, precision and threads.
  Its CPU time is the client process's plus the server's and its stubs'.

The phases alternate ``--repeats`` times (the machine's background load drifts). Latency is per
call, tokenization and decoding included. Targets: batching throughput >= 2x the plain one,
batching p99 latency <= 2x the single-client p50, and (with --triton) Triton's throughput >= 0.75x
the BatchingEngine's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.dataset import DEFAULT_DATA
from bench.load_triton import TritonCaller, process_tree_cpu, triton_server
from bench.machine import git_info, machine_info, package_versions
from engine.api import DEFAULT_MAX_BATCH_SIZE

TARGET_SPEEDUP = 2.0
SHUFFLE_SEED = 20261127
TARGET_P99_OVER_SINGLE_P50 = 2.0
TARGET_TRITON_OVER_BATCHING = 0.75


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of `python -m bench load`."""
    p = argparse.ArgumentParser(prog="python -m bench load",
                                description="Closed-loop load: N clients on a plain Engine vs a BatchingEngine.")
    p.add_argument("--model", default=None, help="bundle or Hugging Face checkpoint folder (default: embedded model)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default=None)
    p.add_argument("--threads", type=int, default=None, help="Engine intra-op threads (default: all cores)")
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients (default 16)")
    p.add_argument("--requests", type=int, default=640, help="answers per phase at most (default 640)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase at most (default 60)")
    p.add_argument("--single-requests", type=int, default=100, help="answers of the one-client phase (default 100)")
    p.add_argument("--warmup", type=int, default=32, help="untimed calls before the first phase (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="plain/batching pairs, alternating (default 2)")
    p.add_argument("--max-batch-size", type=int, default=None, help="BatchingEngine max_batch_size (default: --clients)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="BatchingEngine max_delay_ms (default 2)")
    p.add_argument("--workers", type=int, default=1, help="BatchingEngine workers (default 1)")
    p.add_argument("--engine-batch", type=int, default=32,
                   help="Engine max_batch_size: windows per model call; batched calls are length-sorted first (default 32)")
    p.add_argument("--cost-questions", type=int, default=96,
                   help="questions of the CPU-cost phase: one thread, batch 1 vs batches of --max-batch-size (0: skip)")
    p.add_argument("--cost-only", action="store_true", help="run the CPU-cost phase only (no load phases)")
    p.add_argument("--triton", action="store_true",
                   help="add a phase against a real tritonserver serving the same bundle (x86-64 Linux, nvidia-pytriton)")
    p.add_argument("--triton-python-env", type=Path, default=None,
                   help="the Triton stub's Python (default: $SPANRT_TRITON_PYTHON_ENV or sys.prefix/spanrt-triton-env)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD-format file whose questions are asked")
    p.add_argument("--out", type=Path, default=None, help="write load.json here")
    args = p.parse_args(argv)
    for name in ("clients", "requests", "single_requests", "repeats", "workers", "engine_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.triton and args.engine_batch != DEFAULT_MAX_BATCH_SIZE:
        p.error(f"--triton serves Engines with max_batch_size {DEFAULT_MAX_BATCH_SIZE}; leave --engine-batch at its default")
    if args.duration <= 0 or args.warmup < 0 or args.max_delay_ms < 0 or args.cost_questions < 0:
        p.error("--duration must be positive; --warmup, --max-delay-ms and --cost-questions >= 0")
    return args


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of latencies, in milliseconds."""
    if not latencies_s:
        raise ValueError("no call finished in this phase; raise --duration")
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def closed_loop(call: Any, pairs: list[tuple[str, str]], *, clients: int, requests: int, duration: float,
                cpu_seconds: Any = time.process_time) -> dict[str, Any]:
    """Run ``clients`` threads, each calling ``call(question, context)`` back to back, until
    ``requests`` calls were started or ``duration`` seconds passed; latencies and throughput.
    ``cpu_seconds()``: the CPU time the phase is charged (default: this process's)."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    answers: dict[int, str] = {}
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client() -> None:
        start.wait()
        while True:
            with lock:
                i = next_index[0]
                if i >= requests or time.perf_counter() >= deadline[0]:
                    return
                next_index[0] += 1
            q, c = pairs[i % len(pairs)]
            t0 = time.perf_counter()
            try:
                a = call(q, c)
            except Exception as e:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            t1 = time.perf_counter()
            with lock:
                latencies.append(t1 - t0)
                answers[i] = a.text

    threads = [threading.Thread(target=client, name=f"load-client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + duration
    cpu0 = cpu_seconds()
    t_start = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    cpu = cpu_seconds() - cpu0
    if not latencies:
        raise RuntimeError(f"no call of this phase succeeded ({len(errors)} failed; first: {errors[:3]})")
    # CPU seconds per answer (all threads of the process): the cost of an answer, which unlike
    # throughput does not depend on how much of a shared machine this process was given.
    return {"clients": clients, "completed": len(latencies), "errors": len(errors), "first_errors": errors[:3],
            "elapsed_s": elapsed, "throughput_qps": len(latencies) / elapsed, "cpu_s": cpu,
            "cpu_ms_per_answer": 1000 * cpu / max(1, len(latencies)), **percentiles(latencies), "answers": answers}


def cpu_cost(eng: Any, pairs: list[tuple[str, str]], batch: int) -> dict[str, float]:
    """Process CPU milliseconds per answer at batch 1 (``answer``) and in batches of ``batch``
    (``answer_batch``), same questions, one caller thread: what batching saves per answer, a
    figure that does not depend on how much of a shared machine the process gets."""
    qs, cs = [q for q, _ in pairs], [c for _, c in pairs]
    t0 = time.process_time()
    alone = [eng.answer(q, c).text for q, c in pairs]
    one = time.process_time() - t0
    t0 = time.process_time()
    together = [r[0].text for i in range(0, len(pairs), batch) for r in eng.answer_batch(qs[i : i + batch], cs[i : i + batch])]
    many = time.process_time() - t0
    same = sum(a == b for a, b in zip(alone, together)) / len(pairs)
    return {"questions": len(pairs), "batch": batch, "batch1_cpu_ms_per_answer": 1000 * one / len(pairs),
            "batched_cpu_ms_per_answer": 1000 * many / len(pairs), "cpu_saving": 1 - many / one, "same_answer_rate": same}


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """Run the phases; returns the load document."""
    from bench.soak import _bundle_for
    from engine import Engine
    from engine.dynamic_batching import BatchingEngine
    from export.squad_data import load_squad

    pairs = [(e.question, e.context) for e in load_squad(args.data)]
    # A fixed shuffle: consecutive dev questions share a context, which would flatter batching
    # (answer_batch tokenizes each distinct context once); a service's requests rarely do.
    random.Random(SHUFFLE_SEED).shuffle(pairs)
    bundle = _bundle_for(args.model)
    max_batch = args.max_batch_size or args.clients
    started = time.time()
    phases: list[dict[str, Any]] = []
    cost = None
    if args.cost_questions:
        # One intra-op thread: no idle pool threads spinning into the CPU time being measured.
        with Engine(bundle, backend=args.backend, precision=args.precision, threads=1, max_batch_size=args.engine_batch) as eng1:
            eng1.warmup()
            cost = cpu_cost(eng1, pairs[: args.cost_questions], max_batch)
        print(f"load: CPU cost, one thread: {cost['batch1_cpu_ms_per_answer']:.1f} ms/answer at batch 1, "
              f"{cost['batched_cpu_ms_per_answer']:.1f} ms/answer in batches of {max_batch} (model calls of at most "
              f"{args.engine_batch} windows); same answer batched and alone: {100 * cost['same_answer_rate']:.0f}%",
              file=sys.stderr, flush=True)
    if args.cost_only:
        if cost is None:
            raise ValueError("--cost-only needs --cost-questions > 0")
        return {"settings": {"max_batch_size": max_batch, "engine_batch": args.engine_batch, "model": args.model},
                "cpu_cost": cost}
    with contextlib.ExitStack() as stack:
        triton = stack.enter_context(triton_server(args, bundle, max_batch)) if args.triton else None
        caller = TritonCaller(triton.grpc_url) if triton is not None else None
        if caller is not None:
            stack.callback(caller.close)
            for q, c in pairs[: args.warmup]:
                caller(q, c)
        eng = stack.enter_context(Engine(bundle, backend=args.backend, precision=args.precision, threads=args.threads,
                                         max_batch_size=args.engine_batch))
        used = {"backend": eng.backend, "precision": eng.precision, "device": eng.device, "bundle": str(eng.bundle.root),
                "details": eng.backend_details}
        eng.warmup()
        for q, c in pairs[: args.warmup]:
            eng.answer(q, c)
        single = closed_loop(eng.answer, pairs, clients=1, requests=args.single_requests, duration=args.duration)
        phases.append({"phase": "single", "repeat": 0, **single})
        _progress(phases[-1])
        if triton is not None and caller is not None:  # one client: Triton's per-request cost over the Engine's
            alone = closed_loop(caller, pairs, clients=1, requests=args.single_requests, duration=args.duration,
                                cpu_seconds=lambda pid=triton.process.pid: time.process_time() + process_tree_cpu(pid))
            phases.append({"phase": "triton-single", "repeat": 0, **alone})
            _progress(phases[-1])
        for r in range(args.repeats):
            plain = closed_loop(eng.answer, pairs, clients=args.clients, requests=args.requests, duration=args.duration)
            phases.append({"phase": "plain", "repeat": r, **plain})
            _progress(phases[-1])
            with BatchingEngine(eng, max_batch_size=max_batch, max_delay_ms=args.max_delay_ms, workers=args.workers,
                                max_queue_size=max(1024, 4 * args.clients), timeout_s=None) as be:
                batched = closed_loop(be.answer, pairs, clients=args.clients, requests=args.requests, duration=args.duration)
                stats = be.stats()
            phases.append({"phase": "batching", "repeat": r, **batched, "batching_stats": stats})
            _progress(phases[-1])
            if triton is not None and caller is not None:
                pid = triton.process.pid
                served = closed_loop(caller, pairs, clients=args.clients, requests=args.requests, duration=args.duration,
                                     cpu_seconds=lambda pid=pid: time.process_time() + process_tree_cpu(pid))
                phases.append({"phase": "triton", "repeat": r, **served})
                _progress(phases[-1])
    doc = _summarize(args, phases, used, started, max_batch)
    doc["cpu_cost"] = cost
    return doc


def _progress(phase: dict[str, Any]) -> None:
    extra = f", mean batch {phase['batching_stats']['mean_batch']:.1f}" if "batching_stats" in phase else ""
    print(f"load: {phase['phase']:<8} x{phase['clients']:<3} {phase['completed']} answers in {phase['elapsed_s']:.1f}s: "
          f"{phase['throughput_qps']:.1f} q/s, p50 {phase['p50_ms']:.1f} ms, p99 {phase['p99_ms']:.1f} ms, "
          f"CPU {phase['cpu_ms_per_answer']:.1f} ms/answer{extra}",
          file=sys.stderr, flush=True)


def _summarize(args: argparse.Namespace, phases: list[dict[str, Any]], used: dict[str, Any], started: float,
               max_batch: int) -> dict[str, Any]:
    single = phases[0]
    plain = [p for p in phases if p["phase"] == "plain"]
    batched = [p for p in phases if p["phase"] == "batching"]
    # Answers of the same question index, plain vs batching (padding and, for dynamic INT8, the
    # per-batch activation scales differ, so a few answers may legitimately change).
    same = total = 0
    for p, b in zip(plain, batched):
        for i in p["answers"].keys() & b["answers"].keys():
            total += 1
            same += p["answers"][i] == b["answers"][i]
    plain_qps = float(np.median([p["throughput_qps"] for p in plain]))
    batched_qps = float(np.median([b["throughput_qps"] for b in batched]))
    batched_p99 = float(np.median([b["p99_ms"] for b in batched]))
    summary = {
        "single_p50_ms": single["p50_ms"],
        "plain_qps": plain_qps, "plain_p50_ms": float(np.median([p["p50_ms"] for p in plain])),
        "plain_p99_ms": float(np.median([p["p99_ms"] for p in plain])),
        "batching_qps": batched_qps, "batching_p50_ms": float(np.median([b["p50_ms"] for b in batched])),
        "batching_p99_ms": batched_p99, "speedup": batched_qps / plain_qps,
        "batching_p99_over_single_p50": batched_p99 / single["p50_ms"],
        "mean_batch": float(np.mean([b["batching_stats"]["mean_batch"] for b in batched])),
        "single_cpu_ms_per_answer": single["cpu_ms_per_answer"],
        "plain_cpu_ms_per_answer": float(np.median([p["cpu_ms_per_answer"] for p in plain])),
        "batching_cpu_ms_per_answer": float(np.median([b["cpu_ms_per_answer"] for b in batched])),
        "same_answer_rate": same / total if total else None,
    }
    summary["met_throughput"] = summary["speedup"] >= TARGET_SPEEDUP
    summary["met_latency"] = summary["batching_p99_over_single_p50"] <= TARGET_P99_OVER_SINGLE_P50
    served = [p for p in phases if p["phase"] == "triton"]
    if served:
        alone = next(p for p in phases if p["phase"] == "triton-single")
        # Answers of the same question index, batching vs Triton (the same Engine code; int8
        # answers may differ where the batch mates differ).
        pairs = [(b["answers"], t["answers"]) for b, t in zip(batched, served)]
        common = [(b[i], t[i]) for b, t in pairs for i in b.keys() & t.keys()]
        summary.update({
            "triton_single_p50_ms": alone["p50_ms"], "triton_single_cpu_ms_per_answer": alone["cpu_ms_per_answer"],
            "triton_single_overhead_ms": alone["p50_ms"] - single["p50_ms"],
            "triton_qps": float(np.median([t["throughput_qps"] for t in served])),
            "triton_p50_ms": float(np.median([t["p50_ms"] for t in served])),
            "triton_p99_ms": float(np.median([t["p99_ms"] for t in served])),
            "triton_cpu_ms_per_answer": float(np.median([t["cpu_ms_per_answer"] for t in served])),
            "triton_same_answer_rate": sum(a == b for a, b in common) / len(common) if common else None,
        })
        summary["triton_over_batching"] = summary["triton_qps"] / batched_qps
        summary["met_triton"] = summary["triton_over_batching"] >= TARGET_TRITON_OVER_BATCHING
    for p in phases:
        p.pop("answers")
    return {
        "started_utc": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": package_versions(), "git": git_info(), "engine": used,
        "settings": {"clients": args.clients, "requests": args.requests, "duration_s": args.duration,
                     "single_requests": args.single_requests, "warmup": args.warmup, "repeats": args.repeats,
                     "max_batch_size": max_batch, "max_delay_ms": args.max_delay_ms, "workers": args.workers,
                     "engine_batch": args.engine_batch,
                     "threads": args.threads, "cost_questions": args.cost_questions, "data": str(args.data),
                     "triton": args.triton},
        "targets": {"speedup": TARGET_SPEEDUP, "batching_p99_over_single_p50": TARGET_P99_OVER_SINGLE_P50,
                    "triton_over_batching": TARGET_TRITON_OVER_BATCHING},
        "summary": summary, "phases": phases,
    }


def main(argv: list[str]) -> int:
    """`python -m bench load`; prints the summary (and writes load.json with --out). Exit status 0
    when both targets were met, 1 otherwise (the figures are printed either way)."""
    args = parse_args(argv)
    doc = run_load(args)
    if args.cost_only:
        print(json.dumps(doc, indent=2))
        return 0
    print(json.dumps({"engine": {k: v for k, v in doc["engine"].items() if k != "details"}, "settings": doc["settings"],
                      "summary": doc["summary"], "cpu_cost": doc["cpu_cost"]}, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    s = doc["summary"]
    print(f"load: batching {s['speedup']:.2f}x the plain throughput (target >= {TARGET_SPEEDUP:g}x): "
          f"{'met' if s['met_throughput'] else 'NOT MET'}; batching p99 {s['batching_p99_ms']:.1f} ms = "
          f"{s['batching_p99_over_single_p50']:.2f}x the one-client p50 {s['single_p50_ms']:.1f} ms "
          f"(target <= {TARGET_P99_OVER_SINGLE_P50:g}x): {'met' if s['met_latency'] else 'NOT MET'}", file=sys.stderr)
    met = s["met_throughput"] and s["met_latency"]
    if "triton_qps" in s:
        print(f"load: Triton {s['triton_qps']:.1f} q/s = {s['triton_over_batching']:.2f}x the BatchingEngine's "
              f"(target >= {TARGET_TRITON_OVER_BATCHING:g}x): {'met' if s['met_triton'] else 'NOT MET'}; p50 "
              f"{s['triton_p50_ms']:.1f} ms, p99 {s['triton_p99_ms']:.1f} ms; CPU {s['triton_cpu_ms_per_answer']:.1f} ms/answer "
              f"(client + server) vs {s['batching_cpu_ms_per_answer']:.1f} in process; one client: p50 "
              f"{s['triton_single_p50_ms']:.1f} ms vs {s['single_p50_ms']:.1f} ms in process", file=sys.stderr)
        met = met and s["met_triton"]
    return 0 if met else 1
