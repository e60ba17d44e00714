"""PNG plots of a results.json: throughput by system and batch size, latency CDF, stage shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the plots into ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in results["systems"] if s["available"]]
    if not systems:
        return []
    names: list[str] = []

    bss = [str(b) for b in results["settings"]["batch_sizes"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(systems) * len(bss) / 2), 4.5))
    width = 0.8 / len(systems)
    x = np.arange(len(bss))
    for i, s in enumerate(systems):
        vals = [s["throughput_qps"].get(b, 0.0) for b in bss]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=s["name"])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [f"batch {b}" for b in bss])
    ax.set_ylabel("questions / s")
    ax.set_title("Throughput by system and batch size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
    names.append("throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in systems:
        reps = s["raw"]["call_s"].get("1")
        if not reps:
            continue
        ms = np.sort(np.concatenate([np.asarray(r) for r in reps]) * 1e3)
        ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=s["name"])
    ax.set_xscale("log")
    ax.set_xlabel("latency of one question (ms, log scale)")
    ax.set_ylabel("fraction of questions")
    ax.set_title("Latency CDF, one question at a time (all repeats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    plt.close(fig)
    names.append("latency_cdf.png")

    big = str(max(results["settings"]["batch_sizes"]))
    with_shares = [s for s in systems if (s.get("time_shares") or {}).get(big)]
    if with_shares:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(with_shares) + 1.5))
        left = np.zeros(len(with_shares))
        for stage in ("tokenize", "model", "decode", "other"):
            vals = np.array([100 * s["time_shares"][big][stage] for s in with_shares])
            ax.barh([s["name"] for s in with_shares], vals, left=left, label=stage)
            left += vals
        ax.set_xlabel(f"% of wall time at batch {big}")
        ax.set_title("Where the time goes")
        ax.legend(fontsize=7, ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.08))
        fig.tight_layout()
        fig.savefig(out / "time_shares.png", dpi=120)
        plt.close(fig)
        names.append("time_shares.png")
    return names
