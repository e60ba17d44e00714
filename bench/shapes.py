"""`python -m bench shapes`: the model's cost per padded token by batch size and sequence length.

This is the measurement behind a backend's ``max_batch_tokens`` (the ONNX Runtime CPU backend's
1,024): a grid of model calls on random token ids, median of several runs per cell, through the
same backend class the Engine uses (same session settings, same graph). No tokenization or
decoding: the model alone.

    python -m bench shapes [--model BUNDLE] [--backend onnxruntime] [--precision int8]
                           [--seq 96,160,256,384] [--batch 1,2,4,8,16,32] [--threads N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import positive_int_list
from engine.batcher import Batch


def measure(backend: Any, seqs: list[int], batches: list[int], *, min_runs: int = 3, tokens_per_cell: int = 6144,
            vocab: int = 30000, seed: int = 0) -> list[dict[str, Any]]:
    """Median microseconds per padded token for every (seq, batch) cell; one warm-up call per cell."""
    rng = np.random.default_rng(seed)
    cells = []
    for s in seqs:
        for b in batches:
            batch = Batch.of_ids(rng.integers(1000, max(1001, vocab), size=(b, s), dtype=np.int64))
            feeds = batch.feeds(backend.input_names, backend.input_dtypes)
            backend.run(feeds, lambda start, end, stream: None)  # warm-up: allocations for this shape
            runs = max(min_runs, tokens_per_cell // (b * s))
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                backend.run(feeds, lambda start, end, stream: None)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            cells.append({"seq": s, "batch": b, "runs": runs, "median_ms": med * 1e3, "us_per_token": med * 1e6 / (b * s),
                          "raw_s": times})
    return cells


def table(cells: list[dict[str, Any]]) -> str:
    seqs = sorted({c["seq"] for c in cells})
    batches = sorted({c["batch"] for c in cells})
    by = {(c["seq"], c["batch"]): c["us_per_token"] for c in cells}
    lines = ["us per padded token (median); rows: sequence length, columns: batch size",
             "seq \\ batch " + " ".join(f"{b:>7d}" for b in batches)]
    for s in seqs:
        lines.append(f"{s:>11d} " + " ".join(f"{by[(s, b)]:7.1f}" for b in batches))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="SpanRT bundle folder (default: the embedded model's bundle)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--seq", type=positive_int_list, default=[96, 160, 256, 384])
    ap.add_argument("--batch", type=positive_int_list, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, help="write the cells (raw times included) as JSON here")
    args = ap.parse_args(argv)

    from bench.machine import machine_info
    from engine.backends import open_backend
    from engine.bundle import load_bundle
    from engine.default_model import default_bundle

    bundle = load_bundle(args.model or default_bundle())
    backend, _ = open_backend(bundle, args.backend, args.precision, threads=args.threads, device_id=0)
    try:
        cells = measure(backend, args.seq, args.batch)
    finally:
        backend.close()
    print(f"{bundle.root.name}: {backend.name} {backend.precision}, {backend.details}")
    print(table(cells))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": str(bundle.root), "backend": backend.name, "precision": backend.precision,
                                        "details": {k: str(v) for k, v in backend.details.items()},
                                        "machine": machine_info(), "cells": cells}, indent=1))
        print(f"wrote {args.out}")
    return 0
