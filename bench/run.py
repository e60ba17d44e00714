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
from bench.machine import OtherCPUMeter, cpu_model, git_info, gpus, machine_info, package_versions, physical_cores
from bench.peak import measure_peaks, model_work
from bench.prepare import prepare_all
from bench.results import SCHEMA_VERSION, build_systems, check_targets
from bench.systems import BASELINE, SYSTEMS, QASettings, select

# Presets: (questions, repeats). The default must finish within 10 minutes on a 2-core CPU of any
# class (issue 20). The idle 2-core Xeon run of 2026-11-28 (300 questions x 3 repeats, 9 systems at
# 1/8/32, 2 warm-up calls) took 8 min 35 s, 477 s of it inside the systems' calls; the same calls
# under today's schedule (slow peers and the torch reference at batch 1 and 32 only, 1 warm-up
# call) come to 425 s, the two CTranslate2 peers add about 90 s (estimated from their time relative to
# the baseline's here), and issue 20's 2-core Zen 4 took 12 min 42 s for what the Xeon ran in 8 min
# 37 s (1.47x): 300 questions would take ~13 min there, 200 take ~9 min. The interleaved
# repeats and medians stay; the sample shrinks to 200 (the spread per figure is in every report).
PRESETS = {"default": (200, 3), "quick": (60, 1), "full": (None, 1)}
DEFAULT_BATCH_SIZES = (1, 8, 32)
WARMUP_CALLS = 1
RESULTS_ROOT = Path("bench-results")  # relative to the working directory: where a run without --out writes
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
                   f"(default {PRESETS['default'][0]}, {PRESETS['default'][1]} repeats: under 10 minutes on a 2-core CPU)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (figures are medians)")
    p.add_argument("--systems", type=_name_list, default=None, help="comma-separated systems to run (default: all)")
    p.add_argument("--batch-sizes", type=positive_int_list, default=None, metavar="1,8,32",
                   help="questions per call; batch 1 (latency) is always run. Default 1,8,32, where the slow peers "
                        "answer at 1 and 32 only; given explicitly, every system answers at every size")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD-format file, v1.1 or v2.0 (detected); .gz ok")
    p.add_argument("--model", default=None, help="SpanRT bundle folder or Hugging Face checkpoint folder (default: embedded model)")
    p.add_argument("--out", type=Path, default=None, help="write results.json, report.md, plots and predictions here "
                   f"(default: {RESULTS_ROOT}/<date>-<cpu>-<n>/ in the working directory)")
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
    args.all_batch_sizes = args.batch_sizes is not None  # every system at every size
    if args.batch_sizes is None:
        args.batch_sizes = list(DEFAULT_BATCH_SIZES)
    if 1 not in args.batch_sizes:
        args.batch_sizes = [1, *args.batch_sizes]
    return args


def default_out_dir(root: Path = RESULTS_ROOT, day: dt.date | None = None, cpu: str | None = None) -> Path:
    """``root/<date>-<cpu>-<n>``: the first n (1, 2, ...) not taken yet; <cpu> is the CPU model, shortened to a slug."""
    day = day or dt.date.today()
    words = "".join(c if c.isalnum() else " " for c in (cpu or cpu_model()).lower()).split()
    slug = "-".join(w for w in words if w not in ("processor", "cpu", "core", "tm", "r"))[:40].strip("-") or "cpu"
    n = 1
    while (root / f"{day.isoformat()}-{slug}-{n}").exists():
        n += 1
    return root / f"{day.isoformat()}-{slug}-{n}"


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
    t_prepare = time.perf_counter()
    prepared = _prepare([r.spec.name for r in pending], args.model)
    t_prepare = time.perf_counter() - t_prepare
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
    if not args.all_batch_sizes:
        for r in runs:
            if r.spec.ends_only:
                r.batch_sizes = [1, max(args.batch_sizes)]
    peaks = measure_peaks(threads)
    _log("bench: peaks " + ", ".join(f"{k} {v['ops_per_s'] / 1e12:.2f} Tops/s ({v['isa']})" if "ops_per_s" in v else f"{k}: {v['reason']}"
                                     for k, v in ((k, peaks[k]) for k in ("int8", "fp32"))) + f", {threads} threads")
    checkpoint = (prepared.get("model") or {}).get("checkpoint")
    work = model_work(Path(checkpoint) if checkpoint else None, [e.question for e in questions.examples],
                      [e.context for e in questions.examples], settings.max_seq_len, settings.doc_stride)

    t_measure = time.perf_counter()
    measure(runs, settings, questions=[e.question for e in questions.examples], contexts=[e.context for e in questions.examples],
            batch_sizes=args.batch_sizes, repeats=repeats, warmup_calls=args.warmup_calls, threads=threads,
            progress=not args.no_progress and sys.stderr.isatty(), log=_log)
    t_measure = time.perf_counter() - t_measure

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    other = meter.share()
    if other > BUSY_OTHER:
        notes.append(f"other processes used {100 * other:.0f}% of the machine's CPU during the run: they competed with the "
                     "systems measured, so absolute figures are low and ratios are noisy; measure again on an idle machine")
    systems = build_systems(runs, questions, work, peaks)
    machine = machine_info()
    machine["load_average_before"], machine["load_average_after"] = load_before, load_after
    machine["cpu_used_by_other_processes"] = other
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "python -m bench " + shlex.join(argv) if argv else "python -m bench",
        "started_utc": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "phases_s": {"prepare": t_prepare, "peaks": peaks["s"], "measure": t_measure},
        "machine": machine,
        "peaks": peaks,
        "model_work": work,
        "versions": package_versions(),
        "git": git_info(),
        "model": prepared.get("model") or {"label": str(args.model)},
        "settings": {
            "preset": preset, "qa": settings.to_dict(), "threads": threads, "batch_sizes": args.batch_sizes,
            "repeats": repeats, "warmup_calls": args.warmup_calls, "every_system_at_every_batch_size": args.all_batch_sizes,
            "n_questions": len(questions.examples),
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
    doc = {**results, "systems": [{k: v for k, v in s.items() if not k.startswith("_")} for s in results["systems"]]}
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
    out = args.out if args.out is not None else default_out_dir()
    written = write_outputs(results, out)
    print(f"\nreport: {out / 'report.md'}\n(results.json, plots and predictions beside it: {len(written)} files in {out}/)")
    if not any(s["available"] for s in results["systems"]):
        print("\nno system could run here: see the reasons above", file=sys.stderr)
        return 1
    failed = [s["name"] for s in results["systems"] if s["status"] == "failed"]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (see the reason above and {out / 'results.json'})", file=sys.stderr)
        return 1
    return 0
