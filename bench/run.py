"""`python -m bench`: SpanRT against the peers on the same SQuAD questions — speed, latency, accuracy, cost.

Parsing lives in :func:`parse_args`; :func:`run_bench` does the work and returns the results
document (the content of results.json), so tests and notebooks can call it directly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.dataset import DEFAULT_DATA, SAMPLE_SEED, load_questions
from bench.harness import SystemRun, measure
from bench.machine import OtherCPUMeter, git_info, gpus, machine_info, package_versions, physical_cores
from bench.prepare import prepare_all
from bench.results import SCHEMA_VERSION, build_systems, check_targets
from bench.systems import BASELINE, SYSTEMS, QASettings, select

# Presets: (questions, repeats). Measured on the 2-core reference machine (idle, default model):
# the default (300 questions x 3 repeats, six CPU systems, batch sizes 1, 8 and 32) took 7 min 9 s to
# 7 min 51 s in three runs (bench/results/2026-11-27-cpu2-idle), loads and warm-up included (plus the
# one-time exports on a first run); --quick 1 min 23 s.
PRESETS = {"default": (300, 3), "quick": (60, 1), "full": (None, 1)}
DEFAULT_BATCH_SIZES = (1, 8, 32)
WARMUP_CALLS = 2
BUSY_OTHER = 0.05  # share of the CPU used by other processes above which the figures are flagged as disturbed


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, sorted, each once."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    try:
        select(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of `python -m bench`."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare SpanRT with the Hugging Face question-answering pipeline (PyTorch) and Optimum (ONNX Runtime "
                    "fp32/int8) on the same SQuAD questions: throughput, latency, accuracy, load time, memory.",
        epilog="systems: " + ", ".join(s.name for s in SYSTEMS) + f". Ratios are against {BASELINE}.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"{PRESETS['quick'][0]} questions, 1 repeat (under 3 minutes)")
    size.add_argument("--full", action="store_true", help="every question of the file, 1 repeat")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="ask a fixed sample of N questions "
                   f"(default {PRESETS['default'][0]}, {PRESETS['default'][1]} repeats: 7-8 minutes on an idle 2-core CPU)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (figures are medians)")
    p.add_argument("--systems", type=_name_list, default=None, help="comma-separated systems to run (default: all)")
    p.add_argument("--batch-sizes", type=positive_int_list, default=list(DEFAULT_BATCH_SIZES), metavar="1,8,32",
                   help="questions per call; batch 1 (latency) is always run")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD-format file, v1.1 or v2.0 (detected); .gz ok")
    p.add_argument("--model", default=None, help="SpanRT bundle folder or Hugging Face checkpoint folder (default: embedded model)")
    p.add_argument("--out", type=Path, default=None, help="write results.json, report.md, plots and predictions here")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of every system (default: physical cores)")
    p.add_argument("--warmup-calls", type=int, default=WARMUP_CALLS, help="warm-up calls per batch size and system")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        p.error("--limit must be positive")
    if args.threads is not None and args.threads <= 0:
        p.error("--threads must be positive")
    if args.repeats is not None and args.repeats <= 0:
        p.error("--repeats must be positive")
    if args.warmup_calls < 0:
        p.error("--warmup-calls must be >= 0")
    if 1 not in args.batch_sizes:
        args.batch_sizes = [1, *args.batch_sizes]
    return args


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare(names: list[str], model: str | None) -> dict[str, Any]:
    """Exports and bundles for every system, built in a child process (its memory is nobody's)."""
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(prepare_all, names, model).result()


def _bundle_max_seq_len(runs: list[SystemRun]) -> int | None:
    lens = []
    for r in runs:
        if r.artifacts is not None and r.artifacts.bundle is not None:
            m = json.loads((Path(r.artifacts.bundle) / "manifest.json").read_text(encoding="utf-8"))
            lens.append(int(m["max_seq_len"]))
    return min(lens) if lens else None


def run_bench(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the comparison described by ``args``; returns the results document."""
    started = time.time()
    preset = "quick" if args.quick else "full" if args.full else "default"
    limit, repeats = PRESETS[preset]
    limit = args.limit if args.limit is not None else limit
    repeats = args.repeats or repeats
    threads = args.threads or physical_cores()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meter = OtherCPUMeter()

    questions = load_questions(args.data, limit=limit)
    settings = QASettings(handle_impossible_answer=questions.v2)
    specs = select(args.systems)
    runs = [SystemRun(spec=s) for s in specs]
    have_gpu = bool(gpus())
    for r in runs:
        if r.spec.device == "cuda" and not have_gpu:
            r.status, r.reason = "unavailable", "no NVIDIA GPU on this machine (nvidia-smi lists none)"
    pending = [r for r in runs if r.status == "pending"]
    _log(f"bench: {len(questions.examples)} questions from {questions.path.name} (SQuAD v{questions.version}), "
         f"{len(pending)} of {len(runs)} systems to try, threads={threads}, repeats={repeats}, batch sizes {args.batch_sizes}")
    _log("bench: preparing exports and bundles (cached after the first run; not timed) ...")
    prepared = _prepare([r.spec.name for r in pending], args.model)
    for r in pending:
        got = prepared["systems"][r.spec.name]
        if "artifacts" in got:
            r.artifacts = got["artifacts"]
        else:
            r.status, r.reason = ("failed" if got.get("failed") else "unavailable"), got["reason"]
    notes: list[str] = [
        "Each system runs in its own process: load time, cold start and peak RSS are its own. Systems are loaded one at a "
        "time; repeats are interleaved across systems (rotating order), every figure is the median over repeats.",
        "Batch b = b questions per call. The Hugging Face pipeline (and Optimum inside it) forwards batch_size windows at "
        "a time, padded to the longest window of that batch, in the order given; SpanRT batches all windows of the call, "
        "sorted by length, padded per batch.",
    ]
    max_seq = _bundle_max_seq_len(runs)
    if max_seq is not None and max_seq < settings.max_seq_len:
        notes.append(f"max_seq_len lowered from {settings.max_seq_len} to the bundle's {max_seq} for every system")
        settings = replace(settings, max_seq_len=max_seq)
    _log(f"bench: settings {settings.to_dict()}")

    measure(runs, settings, questions=[e.question for e in questions.examples], contexts=[e.context for e in questions.examples],
            batch_sizes=args.batch_sizes, repeats=repeats, warmup_calls=args.warmup_calls, threads=threads,
            progress=not args.no_progress and sys.stderr.isatty(), log=_log)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    other = meter.share()
    if other > BUSY_OTHER:
        notes.append(f"other processes used {100 * other:.0f}% of the machine's CPU during the run: they competed with the "
                     "systems measured, so absolute figures are low and ratios are noisy; measure again on an idle machine")
    systems = build_systems(runs, questions)
    machine = machine_info()
    machine["load_average_before"], machine["load_average_after"] = load_before, load_after
    machine["cpu_used_by_other_processes"] = other
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "python -m bench " + shlex.join(argv) if argv else "python -m bench",
        "started_utc": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "machine": machine,
        "versions": package_versions(),
        "git": git_info(),
        "model": prepared.get("model") or {"label": str(args.model)},
        "settings": {
            "preset": preset, "qa": settings.to_dict(), "threads": threads, "batch_sizes": args.batch_sizes,
            "repeats": repeats, "warmup_calls": args.warmup_calls, "n_questions": len(questions.examples),
            "sample_seed": SAMPLE_SEED if len(questions.examples) < questions.total_in_file else None,
            "data": {"file": questions.path.name, "path": str(questions.path), "sha256": questions.sha256,
                     "version": questions.version, "questions_in_file": questions.total_in_file},
        },
        "baseline": BASELINE,
        "systems": systems,
        "targets": check_targets(systems),
        "notes": notes,
    }


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json, report.md, PNG plots and predictions/<system>.json (scorable with `python -m bench score`)."""
    from bench.plots import write_plots
    from bench.report import markdown

    out.mkdir(parents=True, exist_ok=True)
    written = []
    pred_dir = out / "predictions"
    for s in results["systems"]:
        preds = s.get("_predictions")
        if preds:
            pred_dir.mkdir(exist_ok=True)
            path = pred_dir / f"{s['name']}.json"
            path.write_text(json.dumps({q: p["text"] for q, p in preds.items()}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    doc = {**results, "systems": [{k: v for k, v in s.items() if k != "_predictions"} for s in results["systems"]]}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    plots = write_plots(results, out)
    (out / "report.md").write_text(markdown(results, plots) + "\n", encoding="utf-8")
    return [out / "results.json", out / "report.md", *(out / p for p in plots), *written]


def main(argv: list[str]) -> int:
    """`python -m bench [options]`; exit status 1 when a system failed (not merely unavailable)."""
    from bench.report import console

    args = parse_args(argv)
    results = run_bench(args, argv)
    print(console(results))
    if args.out is not None:
        written = write_outputs(results, args.out)
        print(f"\nwrote {', '.join(str(p) for p in written[:4])}" + (f" and {len(written) - 4} more" if len(written) > 4 else ""))
    if not any(s["available"] for s in results["systems"]):
        print("\nno system could run here: see the reasons above", file=sys.stderr)
        return 1
    failed = [s["name"] for s in results["systems"] if s["status"] == "failed"]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (see the reason above{' and results.json' if args.out else ''})", file=sys.stderr)
        return 1
    return 0
