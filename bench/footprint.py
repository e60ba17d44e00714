"""`python -m bench footprint`: memory footprint of a bundle per precision: file sizes, and the
resident memory of an ONNX Runtime CPU Engine (each precision in a fresh process).

RSS is read after importing the runtime (the baseline), after loading the Engine, and after
answering ``--questions`` SQuAD dev questions (plus the peak). On Jetson, CPU and GPU share one
DRAM, so these figures and the TensorRT plan's size are what the board's memory must hold; GPU
allocations there are not measured by this command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

from bench.dataset import DEFAULT_DATA


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of `python -m bench footprint`."""
    p = argparse.ArgumentParser(prog="python -m bench footprint", description="Bundle file sizes and ONNX Runtime CPU RSS per precision.")
    p.add_argument("--model", default=None, help="bundle folder (default: the embedded default model's bundle)")
    p.add_argument("--precisions", default="fp32,int8", help="CPU precisions to load (default fp32,int8)")
    p.add_argument("--questions", type=int, default=50, help="SQuAD dev questions answered after loading (default 50)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=None, help="write footprint.json here")
    args = p.parse_args(argv)
    if args.questions < 0:
        p.error("--questions must be >= 0")
    return args


def _measure(bundle: str, precision: str, questions: int, threads: int | None, data: str) -> dict[str, Any]:
    from bench.machine import peak_rss_mb, rss_mb
    from engine import Engine
    from export.squad_data import load_squad

    pairs = [(e.question, e.context) for e in load_squad(data)][:questions]
    import onnxruntime  # noqa: F401 - part of the baseline: every CPU deployment imports it

    base = rss_mb()
    with Engine(bundle, backend="onnxruntime", precision=precision, threads=threads) as eng:
        loaded = rss_mb()
        eng.warmup()
        for q, c in pairs:
            eng.answer(q, c)
        answered = rss_mb()
    return {"precision": precision, "rss_baseline_mb": base, "rss_loaded_mb": loaded, "rss_after_questions_mb": answered,
            "peak_rss_mb": peak_rss_mb(), "model_mb": loaded - base, "questions": len(pairs)}


def run_footprint(args: argparse.Namespace) -> dict[str, Any]:
    """File sizes of every artifact, and one fresh process per CPU precision."""
    from bench.soak import _bundle_for
    from engine.bundle import load_bundle

    bundle = load_bundle(_bundle_for(args.model))
    files = [{"path": a.path.name, "format": a.format, "precision": a.precision, "mb": a.path.stat().st_size / 2**20}
             for a in bundle.artifacts]
    files.append({"path": bundle.tokenizer_path.name, "format": "tokenizer", "precision": "", "mb":
                  bundle.tokenizer_path.stat().st_size / 2**20})
    ctx = mp.get_context("spawn")
    rss = []
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        with ctx.Pool(1) as pool:
            rss.append(pool.apply(_measure, (str(bundle.root), precision, args.questions, args.threads, str(args.data))))
        print(f"footprint: {precision}: {rss[-1]['model_mb']:.0f} MiB for the loaded Engine, peak RSS "
              f"{rss[-1]['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
    return {"bundle": str(bundle.root), "files": files, "onnxruntime_cpu": rss}


def main(argv: list[str]) -> int:
    """`python -m bench footprint`; prints the figures as JSON."""
    args = parse_args(argv)
    doc = run_footprint(args)
    print(json.dumps(doc, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "footprint.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0
