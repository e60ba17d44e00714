"""`python -m bench decode`: span-search decoder micro-benchmark.

Times, on the same realistic logits (a [CLS] question [SEP] context [SEP] pad layout, a few
peaked answer candidates per window), SpanRT's C++ decoder, the Hugging Face QA pipelines'
`decode_spans` (imported from transformers, once per window as the pipeline calls it, on
probabilities computed outside the timed region) and a vectorized NumPy baseline (outer sum +
band mask + argmax/argpartition over the whole batch). Prints microseconds per window and the
ratios (best of --repeats rounds, and the fastest single call; medians in the JSON); --json
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.options import DEFAULTS


def realistic_logits(batch: int, seq_len: int, context_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start/end logits and context mask shaped like a QA model's output on padded windows."""
    rng = np.random.default_rng(seed)
    start = rng.normal(-4.0, 2.0, (batch, seq_len)).astype(np.float32)
    end = rng.normal(-4.0, 2.0, (batch, seq_len)).astype(np.float32)
    mask = np.zeros((batch, seq_len), bool)
    for row in range(batch):
        question = int(rng.integers(8, min(40, seq_len - context_len - 2) + 1))
        first = question + 2  # [CLS] question [SEP]
        mask[row, first : first + context_len] = True
        for _ in range(3):  # a few answer candidates: a start peak and an end peak a few tokens on
            i = int(rng.integers(first, first + context_len))
            j = min(i + int(rng.integers(0, 12)), first + context_len - 1)
            start[row, i] += rng.uniform(6, 12)
            end[row, j] += rng.uniform(6, 12)
    start[:, 0] += 2.0  # [CLS]: the null answer is usually a contender
    end[:, 0] += 2.0
    return start, end, mask


def numpy_decode(start: np.ndarray, end: np.ndarray, mask: np.ndarray, band: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The vectorized NumPy baseline: outer sum, band and mask, argmax (k=1) or argpartition."""
    batch, seq_len = start.shape
    scores = start[:, :, None] + end[:, None, :]
    valid = band[None] & mask[:, :, None] & mask[:, None, :]
    flat = np.where(valid, scores, np.float32(-np.inf)).reshape(batch, -1)
    if top_k == 1:
        index = flat.argmax(axis=1)[:, None]
    else:
        index = np.argpartition(-flat, top_k, axis=1)[:, :top_k]
        order = np.argsort(-np.take_along_axis(flat, index, axis=1), axis=1, kind="stable")
        index = np.take_along_axis(index, order, axis=1)
    spans = np.stack(np.divmod(index, seq_len), axis=-1)
    return spans, np.take_along_axis(flat, index, axis=1)


def hf_decode_spans() -> Callable[..., Any]:
    """transformers' decode_spans: in question_answering before 5.x, document_question_answering in 5.x."""
    try:
        from transformers.pipelines.question_answering import decode_spans
    except ImportError:
        from transformers.pipelines.document_question_answering import decode_spans
    return decode_spans


def softmax_probabilities(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What the HF pipeline feeds decode_spans: softmax over the allowed tokens plus [CLS]."""
    keep = mask.copy()
    keep[:, 0] = True
    masked = np.where(keep, logits, -10000.0)
    shifted = np.exp(masked - masked.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def time_call(function: Callable[[], Any], repeats: int, min_seconds: float = 0.3) -> dict[str, float]:
    """Seconds per call: best and median of `repeats` rounds (each looping for ~min_seconds /
    repeats), and the fastest single call.

    The best round is the figure least disturbed by other processes (timeit's advice), the median
    shows how loaded the machine was, and the fastest single call approaches the cost on an idle
    core (a round of many calls on a busy machine rarely escapes preemption).
    """
    function()  # warm-up
    t0 = time.perf_counter()
    function()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_seconds / repeats / once))
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            function()
        rounds.append((time.perf_counter() - t0) / inner)
    calls = []
    for _ in range(max(repeats, min(300, int(min_seconds / once)))):
        t0 = time.perf_counter()
        function()
        calls.append(time.perf_counter() - t0)
    return {"best": min(rounds), "median": statistics.median(rounds), "best_call": min(calls)}


def run(batch: int, seq_len: int, context_len: int, max_answer_len: int, top_ks: list[int], repeats: int) -> dict[str, Any]:
    """Times the three decoders at each k; returns the figures (microseconds per window)."""
    from engine.decode import span_search

    start, end, mask = realistic_logits(batch, seq_len, context_len)
    positions = np.arange(seq_len)
    band = (positions[None, :] >= positions[:, None]) & (positions[None, :] - positions[:, None] < max_answer_len)
    decode_spans = hf_decode_spans()
    p_start, p_end = softmax_probabilities(start, mask), softmax_probabilities(end, mask)
    undesired = mask.astype(np.int64)  # HF's name: 1 where a token may be part of the answer

    rows = []
    for top_k in top_ks:
        ours = span_search(start, end, mask, max_answer_len=max_answer_len, top_k=top_k)
        baseline = numpy_decode(start, end, mask, band, top_k)
        hf_top1 = [decode_spans(p_start[r], p_end[r], top_k, max_answer_len, undesired[r])[:2] for r in range(batch)]
        agree_numpy = float(np.mean(np.all(ours[0][:, 0] == baseline[0][:, 0], axis=-1)))
        agree_hf = float(np.mean([len(s) > 0 and (s[0], e[0]) == tuple(ours[0][r, 0]) for r, (s, e) in enumerate(hf_top1)]))

        t_ours = time_call(lambda: span_search(start, end, mask, max_answer_len=max_answer_len, top_k=top_k), repeats)
        t_numpy = time_call(lambda: numpy_decode(start, end, mask, band, top_k), repeats)

        def hf_batch() -> None:
            for r in range(batch):
                decode_spans(p_start[r], p_end[r], top_k, max_answer_len, undesired[r])

        t_hf = time_call(hf_batch, repeats)
        rows.append({
            "top_k": top_k,
            "spanrt_us_per_window": 1e6 * t_ours["best"] / batch,
            "numpy_us_per_window": 1e6 * t_numpy["best"] / batch,
            "hf_decode_spans_us_per_window": 1e6 * t_hf["best"] / batch,
            "speedup_vs_numpy": t_numpy["best"] / t_ours["best"],
            "speedup_vs_hf": t_hf["best"] / t_ours["best"],
            "median_us_per_window": {"spanrt": 1e6 * t_ours["median"] / batch,
                                     "numpy": 1e6 * t_numpy["median"] / batch,
                                     "hf_decode_spans": 1e6 * t_hf["median"] / batch},
            "best_call_us_per_window": {"spanrt": 1e6 * t_ours["best_call"] / batch,
                                        "numpy": 1e6 * t_numpy["best_call"] / batch,
                                        "hf_decode_spans": 1e6 * t_hf["best_call"] / batch},
            "top1_agreement_numpy": agree_numpy,
            "top1_agreement_hf": agree_hf,
        })
    import transformers

    return {
        "config": {"batch": batch, "seq_len": seq_len, "context_tokens": context_len,
                   "max_answer_len": max_answer_len, "repeats": repeats},
        "environment": {
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "numpy": np.__version__,
            "transformers": transformers.__version__,
        },
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| k | SpanRT C++ (us/window) | NumPy vectorized | HF decode_spans | vs NumPy | vs HF | top-1 = NumPy | top-1 = HF |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['top_k']} | {row['spanrt_us_per_window']:.2f} | {row['numpy_us_per_window']:.1f} | "
            f"{row['hf_decode_spans_us_per_window']:.1f} | {row['speedup_vs_numpy']:.0f}x | "
            f"{row['speedup_vs_hf']:.0f}x | {row['top1_agreement_numpy']:.0%} | {row['top1_agreement_hf']:.0%} |"
        )
    lines.append("")
    for row in result["rows"]:
        best = row["best_call_us_per_window"]
        lines.append(
            f"k={row['top_k']}, fastest single call (closest to an idle core): SpanRT {best['spanrt']:.2f} us/window, "
            f"NumPy {best['numpy']:.1f} ({best['numpy'] / best['spanrt']:.0f}x), "
            f"HF {best['hf_decode_spans']:.1f} ({best['hf_decode_spans'] / best['spanrt']:.0f}x)"
        )
    env = result["environment"]
    cfg = result["config"]
    lines.append(
        f"\nB={cfg['batch']}, S={cfg['seq_len']}, L={cfg['max_answer_len']}, {cfg['context_tokens']} context tokens; "
        f"{env['cpu_count']} CPUs, load average {env['load_average_1m']:.1f}, "
        f"numpy {env['numpy']}, transformers {env['transformers']}"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--context-tokens", type=int, default=300)
    parser.add_argument("--max-answer-len", type=int, default=DEFAULTS.max_answer_len)
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.context_tokens + 10 > args.seq_len:
        parser.error("--context-tokens must leave room for [CLS], a question and [SEP] (seq_len - 10 at most)")
    result = run(args.batch, args.seq_len, args.context_tokens, args.max_answer_len, args.top_k, args.repeats)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
