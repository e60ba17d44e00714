"""How close a system comes to the machine: this CPU's int8/fp32 peak and the model's operations per pass.

The peak comes from engine._peak, a multiply-add loop (vpdpbusd / sdot for int8, FMA for fp32) on
every thread the systems use, run for about a second per precision while nothing else of the
bench runs, each thread's rate taken over the CPU time it got (a busy machine still shows its peak). The model's work is counted the same way, one multiply-add = 2 operations: the
encoder's matrix products (Q, K, V, output projection, the two feed-forward layers, and the two
attention products Q·Kᵀ and P·V, which grow with the window length), for every window of the
sample, windows of 384 tokens with a 128-token stride as every system cuts them. Embeddings,
layer norms, softmax, GELU and the QA head are left out (under 2 % of the operations here).
Only real tokens count, so padding a system computes is a loss, not work.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

PEAK_SECONDS = 1.0  # per precision, after a warm-up of a tenth of that
KINDS = ("int8", "fp32")
# the precision a system computes in -> the peak it is set against
PEAK_OF_PRECISION = {"int8": "int8", "fp32": "fp32"}


def measure_peaks(threads: int, seconds: float = PEAK_SECONDS) -> dict[str, Any]:
    """{"int8": {"ops_per_s", "isa"} or {"reason"}, "fp32": ..., "threads", "seconds", "s"} for this CPU.

    Each loop thread's rate is taken over the CPU time it got, so other processes on the machine do
    not lower the peak; threads are capped at the CPUs this process may use (one CPU per thread).
    """
    t0 = time.perf_counter()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(threads, usable))
    out: dict[str, Any] = {"threads": threads, "seconds": seconds}
    try:
        _peak = importlib.import_module("engine._peak")
    except ImportError as exc:
        reason = f"engine._peak is not built ({exc}); rebuild the package: pip install -e ."
        return {**out, **{kind: {"reason": reason} for kind in KINDS}, "s": 0.0}
    for kind in KINDS:
        try:
            ops, isa = _peak.peak_ops(kind, threads=threads, seconds=seconds)
        except RuntimeError as exc:  # no kernel for this CPU
            out[kind] = {"reason": str(exc)}
        else:
            out[kind] = {"ops_per_s": ops, "isa": isa}
    out["s"] = time.perf_counter() - t0
    return out


def encoder_shape(checkpoint: Path) -> dict[str, int]:
    """Layers, hidden size and feed-forward size from a Hugging Face config.json (BERT-style or DistilBERT names)."""
    cfg = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    pick = {"layers": ("num_hidden_layers", "n_layers"), "hidden": ("hidden_size", "dim"), "ffn": ("intermediate_size", "hidden_dim")}
    shape = {}
    for key, names in pick.items():
        value = next((cfg[n] for n in names if n in cfg), None)
        if not isinstance(value, int):
            raise ValueError(f"{checkpoint}/config.json names no {key} ({' or '.join(names)})")
        shape[key] = value
    return shape


def encoder_ops(shape: dict[str, int], window_lengths: list[int]) -> float:
    """Operations (2 per multiply-add) of the encoder's matrix products over windows of these token counts."""
    h, f, layers = shape["hidden"], shape["ffn"], shape["layers"]
    per_token = 2 * (4 * h * h + 2 * h * f)  # Q, K, V, output projection; feed-forward in and out
    return float(layers * sum(n * per_token + 2 * 2 * n * n * h for n in window_lengths))  # + Q·Kᵀ and P·V


def window_lengths(checkpoint: Path, questions: list[str], contexts: list[str], max_seq_len: int, doc_stride: int) -> list[int]:
    """Real tokens of every window of the sample, cut as the Hugging Face pipeline cuts them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    enc = tok(questions, contexts, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
              return_overflowing_tokens=True, padding=False)
    return [len(ids) for ids in enc["input_ids"]]


def model_work(checkpoint: Path | None, questions: list[str], contexts: list[str], max_seq_len: int,
               doc_stride: int) -> dict[str, Any]:
    """{"windows", "tokens", "ops", "ops_per_token", "shape"} of one pass over the sample, or {"reason"}."""
    if checkpoint is None:
        return {"reason": "no Hugging Face checkpoint to read the model's shape and tokenizer from"}
    try:
        shape = encoder_shape(checkpoint)
        lengths = window_lengths(checkpoint, questions, contexts, max_seq_len, doc_stride)
    except (ImportError, OSError, ValueError) as exc:
        return {"reason": f"model work not counted: {type(exc).__name__}: {exc}"}
    ops = encoder_ops(shape, lengths)
    tokens = sum(lengths)
    return {"windows": len(lengths), "tokens": tokens, "ops": ops, "ops_per_token": ops / tokens, "shape": shape}


def model_throughput(passes: list[dict[str, Any]], work: dict[str, Any], peaks: dict[str, Any],
                     precision: str) -> dict[str, Any] | None:
    """One batch size's model-only figures: tokens/s and ops/s in the model stage (median over repeats),
    and the share of this precision's peak; None when the system shows no model time or no work was counted."""
    model_s = [p["stage_s"].get("model", 0.0) for p in passes]
    if "ops" not in work or not model_s or min(model_s) <= 0:
        return None
    s = statistics.median(model_s)
    out: dict[str, Any] = {"model_s": s, "tokens_per_s": work["tokens"] / s, "ops_per_s": work["ops"] / s}
    peak = peaks.get(PEAK_OF_PRECISION.get(precision, ""), {})
    out["share_of_peak"] = out["ops_per_s"] / peak["ops_per_s"] if "ops_per_s" in peak else None
    return out
