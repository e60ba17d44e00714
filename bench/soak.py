"""`python -m bench soak`: many calls on one Engine; does resident memory stay flat after warm-up?

The Engine answers a fixed sample of SQuAD dev questions (``--questions``, cycled) one call after
another; RSS is sampled every ``--sample-every`` calls. The warm-up is one full cycle by default, so
every input shape of the run has been seen once (ONNX Runtime's arena and the tokenizer's caches grow
to the largest input, once; that is not a leak). Growth is measured from the end of the warm-up to
the end (target: under 5%), with the least-squares slope over the post-warm-up samples as a second view.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.dataset import DEFAULT_DATA, SAMPLE_SEED
from bench.machine import git_info, machine_info, package_versions, peak_rss_mb, rss_mb

TARGET_GROWTH = 0.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of `python -m bench soak`."""
    p = argparse.ArgumentParser(prog="python -m bench soak", description="Long-run memory check of one SpanRT Engine.")
    p.add_argument("--calls", type=int, default=20_000, help="answer() calls in all (default 20,000)")
    p.add_argument("--questions", type=int, default=1_000, help="size of the fixed question sample that is cycled")
    p.add_argument("--warmup-calls", type=int, default=None,
                   help="calls before the reference RSS is taken (default: one cycle through the questions)")
    p.add_argument("--batch-size", type=int, default=1, help="questions per call (1: answer(), more: answer_batch())")
    p.add_argument("--sample-every", type=int, default=250, help="RSS sample interval, in calls")
    p.add_argument("--model", default=None, help="bundle or Hugging Face checkpoint folder (default: embedded model)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD-format file whose questions are asked")
    p.add_argument("--out", type=Path, default=None, help="write soak.json and soak.png here")
    args = p.parse_args(argv)
    for name in ("calls", "batch_size", "sample_every", "questions"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup_calls is None:
        args.warmup_calls = -(-args.questions // args.batch_size)  # one cycle
    if not 0 <= args.warmup_calls < args.calls:
        p.error("--warmup-calls must be >= 0 and below --calls")
    return args


def _bundle_for(model: str | None) -> Path:
    from bench.prepare import resolve_model
    from engine.default_model import default_bundle

    source = resolve_model(model)
    return source.bundle if source.bundle is not None else default_bundle(checkpoint=source.checkpoint)


def growth(samples: list[tuple[int, float]], warmup_calls: int) -> dict[str, float]:
    """RSS growth after warm-up: relative end-vs-reference change and the fitted slope (MiB per 1,000 calls)."""
    after = [(c, r) for c, r in samples if c >= warmup_calls]
    if len(after) < 2:
        raise ValueError("need at least two RSS samples after the warm-up; lower --sample-every")
    ref, end = after[0][1], after[-1][1]
    calls = np.asarray([c for c, _ in after], dtype=np.float64)
    rss = np.asarray([r for _, r in after], dtype=np.float64)
    slope = float(np.polyfit(calls, rss, 1)[0]) * 1000
    return {"rss_ref_mb": ref, "rss_end_mb": end, "growth": (end - ref) / ref, "slope_mb_per_1k_calls": slope,
            "rss_max_after_warmup_mb": float(rss.max())}


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak; returns the soak document."""
    from bench.dataset import load_questions
    from engine import Engine

    examples = list(load_questions(args.data, limit=args.questions).examples)
    bundle = _bundle_for(args.model)
    rss_start = rss_mb()
    started = time.time()
    samples: list[tuple[int, float]] = []
    with Engine(bundle, backend=args.backend, precision=args.precision, threads=args.threads) as eng:
        rss_loaded = rss_mb()
        t0 = time.perf_counter()
        k = 0
        last_print = t0
        for call in range(args.calls):
            if call % args.sample_every == 0:
                samples.append((call, rss_mb()))
            if args.batch_size == 1:
                e = examples[k % len(examples)]
                eng.answer(e.question, e.context)
            else:
                batch = [examples[(k + i) % len(examples)] for i in range(args.batch_size)]
                eng.answer_batch([e.question for e in batch], [e.context for e in batch])
            k += args.batch_size
            now = time.perf_counter()
            if now - last_print > 5:
                print(f"soak: {call + 1}/{args.calls} calls, RSS {rss_mb():.1f} MiB", file=sys.stderr, flush=True)
                last_print = now
        elapsed = time.perf_counter() - t0
        samples.append((args.calls, rss_mb()))
        used = {"backend": eng.backend, "precision": eng.precision, "device": eng.device, "bundle": str(eng.bundle.root)}
    g = growth(samples, args.warmup_calls)
    return {
        "started_utc": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": package_versions(), "git": git_info(), "engine": used,
        "settings": {"calls": args.calls, "warmup_calls": args.warmup_calls, "batch_size": args.batch_size,
                     "sample_every": args.sample_every, "threads": args.threads, "data": str(args.data),
                     "questions_cycled": len(examples), "sample_seed": SAMPLE_SEED},
        "elapsed_s": elapsed, "calls_per_s": args.calls / elapsed,
        "rss_start_mb": rss_start, "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
        **g, "target_growth": TARGET_GROWTH, "met": g["growth"] < TARGET_GROWTH,
        "samples": [{"calls": c, "rss_mb": r} for c, r in samples],
    }


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["calls"] for s in doc["samples"]], [s["rss_mb"] for s in doc["samples"]], marker=".")
    ax.axvline(doc["settings"]["warmup_calls"], color="gray", linestyle="--", label="end of warm-up")
    ax.set_xlabel("calls")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"Soak: {doc['engine']['backend']} {doc['engine']['precision']}, growth after warm-up {100 * doc['growth']:.2f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """`python -m bench soak`; exit status 1 when RSS grew by the target or more."""
    args = parse_args(argv)
    doc = run_soak(args)
    summary = {k: doc[k] for k in ("engine", "elapsed_s", "calls_per_s", "rss_after_load_mb", "rss_ref_mb", "rss_end_mb",
                                   "growth", "slope_mb_per_1k_calls", "peak_rss_mb", "met")}
    print(json.dumps({"settings": doc["settings"], **summary}, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        _plot(doc, args.out / "soak.png")
    print(f"soak: RSS growth after {args.warmup_calls} warm-up calls: {100 * doc['growth']:.2f}% "
          f"(target < {100 * TARGET_GROWTH:.0f}%): {'met' if doc['met'] else 'NOT MET'}", file=sys.stderr)
    return 0 if doc["met"] else 1
