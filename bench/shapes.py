"""`python -m bench shapes`: the model's cost per padded token by batch size and sequence length.

This is the measurement behind a backend's ``max_batch_tokens`` (the ONNX Runtime CPU backend's
1,024): a grid of model calls on random token ids, median of several runs per cell, through the
same backend class the Engine uses (same session settings, same graph). No tokenization or
decoding: the model alone.

    python -m bench shapes [--model BUNDLE] [--backend onnxruntime] [--precision int8] [--cpu-isa avx2]
                           [--seq 96,160,256,384] [--batch 1,2,4,8,16,32] [--threads N] [--no-peak] [--out FILE.json]

With the bundle's native weights (they give the model's shape), each cell is also set against this
CPU's measured peak of the precision (bench.peak: operations of the encoder's matrix products over
model time).
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
from engine.windows import Batch


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


def add_peak_shares(cells: list[dict[str, Any]], shape: dict[str, int], peak: dict[str, Any]) -> None:
    """Each cell's model throughput in operations/s (bench.peak's counting: 2 per multiply-add of the
    encoder's matrix products, real tokens only) and its share of this CPU's measured peak."""
    from bench.peak import encoder_ops

    for c in cells:
        ops = encoder_ops(shape, [c["seq"]] * c["batch"])
        c["ops_per_s"] = ops / (c["median_ms"] / 1e3)
        c["share_of_peak"] = c["ops_per_s"] / peak["ops_per_s"] if "ops_per_s" in peak else None


def table(cells: list[dict[str, Any]]) -> str:
    seqs = sorted({c["seq"] for c in cells})
    batches = sorted({c["batch"] for c in cells})
    by = {(c["seq"], c["batch"]): c["us_per_token"] for c in cells}
    lines = ["us per padded token (median); rows: sequence length, columns: batch size",
             "seq \\ batch " + " ".join(f"{b:>7d}" for b in batches)]
    for s in seqs:
        lines.append(f"{s:>11d} " + " ".join(f"{by[(s, b)]:7.1f}" for b in batches))
    if all(c.get("share_of_peak") is not None for c in cells):
        share = {(c["seq"], c["batch"]): c["share_of_peak"] for c in cells}
        lines.append("share of this CPU's measured peak of the precision (model operations / model time)")
        for s in seqs:
            lines.append(f"{s:>11d} " + " ".join(f"{share[(s, b)]:7.0%}" for b in batches))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="SpanRT bundle folder (default: the embedded model's bundle)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--seq", type=positive_int_list, default=[96, 160, 256, 384])
    ap.add_argument("--batch", type=positive_int_list, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-isa", default=None, help="the native encoder's instruction-set cap (as SPANRT_CPU_ISA)")
    ap.add_argument("--no-peak", action="store_true", help="skip measuring this CPU's peak (a second per precision)")
    ap.add_argument("--out", type=Path, help="write the cells (raw times included) as JSON here")
    args = ap.parse_args(argv)

    from bench.machine import machine_info
    from engine.backends import open_backend
    from engine.bundle import load_bundle
    from engine.default_model import default_bundle

    bundle = load_bundle(args.model or default_bundle())
    backend, _ = open_backend(bundle, args.backend, args.precision, threads=args.threads, device_id=0, cpu_isa=args.cpu_isa)
    try:
        cells = measure(backend, args.seq, args.batch)
        threads = int(backend.details.get("threads") or backend.details.get("intra_op_threads") or 1)
    finally:
        backend.close()
    peak: dict[str, Any] = {}
    native = bundle.find("native", "fp32")
    if not args.no_peak and native is not None and backend.precision in ("int8", "fp32"):
        from bench.peak import measure_peaks

        peak = measure_peaks(threads)[backend.precision]
        from engine.native_weights import EncoderConfig

        cfg = EncoderConfig.from_json(native.info.get("encoder"), root=bundle.root)
        add_peak_shares(cells, {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size}, peak)
    print(f"{bundle.root.name}: {backend.name} {backend.precision}, {backend.details}")
    print(table(cells))
    if peak:
        print(f"peak ({backend.precision}, {threads} threads): " +
              (f"{peak['ops_per_s'] / 1e9:.0f} GOP/s ({peak.get('isa')})" if "ops_per_s" in peak else peak.get("reason", "?")))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": str(bundle.root), "backend": backend.name, "precision": backend.precision,
                                        "details": {k: str(v) for k, v in backend.details.items()},
                                        "machine": machine_info(), "peak": peak, "cells": cells}, indent=1))
        print(f"wrote {args.out}")
    return 0
