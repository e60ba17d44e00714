"""From raw measurements to figures: throughput, latency percentiles, accuracy, agreement, ratios, targets.

Every figure is a median over the interleaved repeats; the raw per-call times stay in the results
so anyone can recompute them.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from bench.dataset import Questions, subset_json
from bench.harness import SystemRun
from bench.peak import model_throughput
from bench.squad_eval import score
from bench.base import STAGES
from bench.systems import BASELINE

SCHEMA_VERSION = 2  # 2: machine peaks, model share of peak, accuracy and agreement per batch size, CTranslate2 peers
PERCENTILES = (50, 90, 99)
TARGET_BATCH = 32
INT8_SYSTEMS = ("spanrt-onnxruntime-int8", "spanrt-native-int8")
NATIVE_INT8 = "spanrt-native-int8"
NATIVE_INT8_AVX2 = ("spanrt-native-int8-avx2", "spanrt-native-int8-avx2-vnni")
FP32_SYSTEMS = ("spanrt-onnxruntime-fp32", "spanrt-native-fp32")
CT2_INT8 = "ctranslate2-int8"


def throughput(passes: list[dict[str, Any]]) -> list[float]:
    """Questions per second of each pass: questions / total time inside the system's calls."""
    return [p["n"] / sum(p["call_s"]) for p in passes if p["call_s"]]


def latency_p50_range(passes: list[dict[str, Any]]) -> list[float] | None:
    """[min, max] over repeats of each repeat's p50 one-question latency (ms): the spread of the median figure."""
    p50 = [float(np.percentile(np.asarray(p["call_s"]) * 1e3, 50)) for p in passes if p["call_s"]]
    return [min(p50), max(p50)] if p50 else None


def latency_ms(passes: list[dict[str, Any]]) -> dict[str, float]:
    """p50/p90/p99 (and mean) of one-question calls: per repeat, then the median over repeats."""
    per_rep = [np.asarray(p["call_s"], dtype=np.float64) * 1e3 for p in passes if p["call_s"]]
    if not per_rep:
        return {}
    out = {f"p{q}": float(statistics.median(float(np.percentile(r, q)) for r in per_rep)) for q in PERCENTILES}
    out["mean"] = float(statistics.median(float(r.mean()) for r in per_rep))
    out["max"] = float(max(float(r.max()) for r in per_rep))
    return out


def stage_shares(passes: list[dict[str, Any]]) -> dict[str, float] | None:
    """Share of the calls' wall time in tokenize / model / decode (and the rest), summed over repeats."""
    total = sum(sum(p["call_s"]) for p in passes)
    if total <= 0:
        return None
    sums = {k: sum(p["stage_s"].get(k, 0.0) for p in passes) for k in STAGES}
    if sum(sums.values()) <= 0:
        return None  # the system does not let us see its stages
    shares = {k: v / total for k, v in sums.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def predictions_of(pass_: dict[str, Any], qids: list[str]) -> dict[str, str]:
    """{question id: answer text} of one pass."""
    return {q: p[0] for q, p in zip(qids, pass_["predictions"], strict=True)}


def _spans(pass_: dict[str, Any]) -> list[tuple[str, int | None, int | None]]:
    return [(p[0], p[1], p[2]) for p in pass_["predictions"]]


def _accuracy(dataset_json: dict[str, Any], preds: dict[str, str]) -> dict[str, float]:
    out = score(dataset_json, preds)
    return {k: v for k, v in out.items() if k != "version"}


def changed_share(mine: dict[str, Any], reference: dict[str, Any]) -> float:
    """Share of questions whose answer span differs between two passes over the same questions."""
    a, b = _spans(mine), _spans(reference)
    return sum(x[1:] != y[1:] for x, y in zip(a, b, strict=True)) / len(a) if a else 0.0


def summarize_system(run: SystemRun, questions: Questions, dataset_json: dict[str, Any], work: dict[str, Any] | None = None,
                     peaks: dict[str, Any] | None = None) -> dict[str, Any]:
    """One system's entry of results.json (without ratios and agreement, which need the baseline).

    ``work`` and ``peaks`` (bench.peak) give the model-only throughput as a share of the machine's peak.
    """
    spec = run.spec
    details = run.loaded.get("details", {}) if run.loaded else {}
    entry: dict[str, Any] = {
        "name": spec.name, "family": spec.family, "description": spec.description,
        "available": run.status == "ok", "status": run.status,
        "backend": details.get("backend", spec.backend), "precision": details.get("precision", spec.precision),
        "device": details.get("device", spec.device),
    }
    if run.reason:
        entry["reason"] = run.reason
    if run.traceback:
        entry["traceback"] = run.traceback
    if run.status != "ok":
        return entry
    qids = [e.qid for e in questions.examples]
    entry["details"] = details
    isa = (details.get("backend_details") or {}).get("isa")  # the native encoder's code path, when it says
    entry["isa"] = isa if isinstance(isa, str) else None
    passes = dict(sorted(run.passes.items()))
    entry["batch_sizes"] = list(passes)
    first = passes.get(1, [None])[0] or passes[min(passes)][0]
    preds = predictions_of(first, qids)
    acc = _accuracy(dataset_json, preds)
    entry.update({"exact_match": acc.pop("exact_match"), "f1": acc.pop("f1"), "accuracy": acc})
    entry["accuracy_by_batch_size"] = {
        str(b): {**{k: v for k, v in _accuracy(dataset_json, predictions_of(ps[0], qids)).items() if k in ("exact_match", "f1")},
                 "changed_vs_batch_1": changed_share(ps[0], first)}
        for b, ps in passes.items()
    }
    changed = [v["changed_vs_batch_1"] for v in entry["accuracy_by_batch_size"].values()]
    entry["answers_depend_on_batch_size"] = any(c > 0 for c in changed) if len(changed) > 1 else None
    entry["answers_stable_across_repeats"] = {
        str(b): all(_spans(p) == _spans(ps[0]) for p in ps) if len(ps) > 1 else None for b, ps in passes.items()
    }
    entry["throughput_qps"] = {str(b): float(statistics.median(throughput(ps))) for b, ps in passes.items()}
    entry["throughput_qps_range"] = {str(b): [min(throughput(ps)), max(throughput(ps))] for b, ps in passes.items()}
    entry["latency_ms"] = latency_ms(passes.get(1, []))
    entry["latency_p50_ms_range"] = latency_p50_range(passes.get(1, []))
    entry["time_shares"] = {str(b): stage_shares(ps) for b, ps in passes.items()}
    entry["model_throughput"] = {str(b): model_throughput(ps, work or {}, peaks or {}, entry["precision"]) for b, ps in passes.items()}
    entry.update({
        "import_s": run.loaded["import_s"], "load_s": run.loaded["load_s"], "cold_start_ms": run.loaded["cold_start_ms"],
        "prepare_s": run.artifacts.prepare_s if run.artifacts else None, "warmup_s": run.warmup_s,
        "peak_rss_mb": run.closed.get("peak_rss_mb"), "rss_after_load_mb": run.loaded["rss_after_load_mb"],
        "rss_end_mb": run.closed.get("rss_end_mb"), "rss_start_mb": run.loaded["rss_start_mb"],
    })
    entry["raw"] = {
        "call_s": {str(b): [p["call_s"] for p in ps] for b, ps in passes.items()},
        "stage_s": {str(b): [p["stage_s"] for p in ps] for b, ps in passes.items()},
    }
    entry["_predictions"] = {q: {"text": p[0], "start": p[1], "end": p[2], "score": p[3]}
                             for q, p in zip(qids, first["predictions"], strict=True)}
    entry["_texts_by_batch_size"] = {str(b): [p[0] for p in ps[0]["predictions"]] for b, ps in passes.items()}
    return entry


def add_ratios(systems: list[dict[str, Any]], baseline: str = BASELINE) -> None:
    """Ratios and answer agreement of every available system against the baseline, in place."""
    base = next((s for s in systems if s["name"] == baseline and s["available"]), None)
    for s in systems:
        if not s["available"]:
            continue
        if base is None:
            s["ratios"] = None
            s["agreement"] = s["agreement_by_batch_size"] = None
            continue
        s["ratios"] = {
            "throughput_qps": {b: s["throughput_qps"][b] / v for b, v in base["throughput_qps"].items() if b in s["throughput_qps"]},
            **{f"latency_{k}": s["latency_ms"][k] / base["latency_ms"][k] for k in ("p50", "p90", "p99")
               if k in s["latency_ms"] and base["latency_ms"].get(k)},
            "peak_rss": (s["peak_rss_mb"] / base["peak_rss_mb"]) if s.get("peak_rss_mb") and base.get("peak_rss_mb") else None,
            "exact_match_delta": s["exact_match"] - base["exact_match"],
            "f1_delta": s["f1"] - base["f1"],
        }
        mine, theirs = s["_predictions"], base["_predictions"]
        s["agreement"] = sum(mine[q]["text"] == theirs[q]["text"] for q in mine) / len(mine)
        reference = [p["text"] for p in theirs.values()]  # the baseline's one-question-at-a-time answers
        s["agreement_by_batch_size"] = {b: sum(x == y for x, y in zip(texts, reference, strict=True)) / len(texts)
                                        for b, texts in s.get("_texts_by_batch_size", {}).items()}
        s["agreement_span"] = sum((mine[q]["start"], mine[q]["end"]) == (theirs[q]["start"], theirs[q]["end"]) for q in mine) / len(mine)


def _get(systems: dict[str, dict[str, Any]], name: str, *path: str) -> float | None:
    cur: Any = systems.get(name)
    if not cur or not cur.get("available"):
        return None
    for key in path:
        if not isinstance(cur, dict) or cur.get(key) is None:
            return None
        cur = cur[key]
    return float(cur)


def check_targets(systems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured)."""
    by = {s["name"]: s for s in systems}
    big = str(TARGET_BATCH)  # the targets are at batch 32; other runs leave them "not measured"
    base_thr = _get(by, BASELINE, "throughput_qps", big)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows: list[tuple[str, str, float, float | None]] = []
    # The fp32 targets, for each SpanRT fp32 system: ONNX Runtime's and the native encoder's.
    for fp32 in FP32_SYSTEMS:
        rows += [
            (f"{fp32} throughput at batch {big} vs baseline", ">=", 2.5, ratio(_get(by, fp32, "throughput_qps", big), base_thr)),
            (f"|{fp32} EM - baseline EM|", "<=", 0.1, _abs_diff(_get(by, fp32, "exact_match"), _get(by, BASELINE, "exact_match"))),
            (f"|{fp32} F1 - baseline F1|", "<=", 0.1, _abs_diff(_get(by, fp32, "f1"), _get(by, BASELINE, "f1"))),
        ]
    # The int8 targets, for each SpanRT int8 system: ONNX Runtime's (the wording) and the
    # native AMX encoder's, each against the same baseline and peers.
    for int8 in INT8_SYSTEMS:
        outside = _get(by, int8, "time_shares", big, "model")
        rows += [
            (f"{int8} throughput at batch {big} vs baseline", ">=", 6.0, ratio(_get(by, int8, "throughput_qps", big), base_thr)),
            (f"{int8} p50 latency at batch 1 vs baseline", "<=", 0.25,
             ratio(_get(by, int8, "latency_ms", "p50"), _get(by, BASELINE, "latency_ms", "p50"))),
            (f"spanrt-onnxruntime-fp32 F1 - {int8} F1", "<=", 1.0, _diff(_get(by, "spanrt-onnxruntime-fp32", "f1"), _get(by, int8, "f1"))),
            (f"{int8} vs optimum-onnxruntime-int8 throughput at batch {big}", ">=", 2.0,
             ratio(_get(by, int8, "throughput_qps", big), _get(by, "optimum-onnxruntime-int8", "throughput_qps", big))),
            (f"{int8} share of time outside the model at batch {big}", "<=", 0.10, None if outside is None else 1.0 - outside),
        ]
    # The native encoder on every CPU (its issue's targets, written for AVX-512 VNNI machines: AMD
    # Zen 4/5 and Intel without AMX; the report's machine section and each system's "isa" say which
    # path ran), and its AVX2 path capped on the same machine.
    rows += [
        (f"{NATIVE_INT8} throughput at batch {big} vs baseline (AVX-512 VNNI class)", ">=", 12.0,
         ratio(_get(by, NATIVE_INT8, "throughput_qps", big), base_thr)),
        (f"{NATIVE_INT8} p50 latency at batch 1 vs baseline (AVX-512 VNNI class)", "<=", 0.20,
         ratio(_get(by, NATIVE_INT8, "latency_ms", "p50"), _get(by, BASELINE, "latency_ms", "p50"))),
        (f"{NATIVE_INT8} vs spanrt-onnxruntime-int8 throughput at batch {big}", ">=", 2.0,
         ratio(_get(by, NATIVE_INT8, "throughput_qps", big), _get(by, "spanrt-onnxruntime-int8", "throughput_qps", big))),
    ]
    rows += [(f"{avx2} throughput at batch {big} vs baseline", ">=", 6.0, ratio(_get(by, avx2, "throughput_qps", big), base_thr))
             for avx2 in NATIVE_INT8_AVX2]
    # SpanRT's best int8 against CTranslate2's int8, at batch 32 and at batch 1.
    for b, target in ((big, 2.0), ("1", 1.5)):
        best = [v for v in (_get(by, n, "throughput_qps", b) for n in INT8_SYSTEMS) if v is not None]
        rows.append((f"best SpanRT int8 vs {CT2_INT8} throughput at batch {b}", ">=", target,
                     ratio(max(best) if best else None, _get(by, CT2_INT8, "throughput_qps", b))))
    out = []
    for what, op, target, value in rows:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"target": what, "op": op, "threshold": target, "value": value, "met": met})
    return out


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _abs_diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else abs(a - b)


def build_systems(runs: list[SystemRun], questions: Questions, work: dict[str, Any] | None = None,
                  peaks: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every system's entry, available or not, with ratios against the baseline (and shares of the peak when
    ``work`` and ``peaks`` are given)."""
    dataset_json = subset_json(questions.dataset_json, {e.qid for e in questions.examples})
    systems = [summarize_system(r, questions, dataset_json, work, peaks) for r in runs]
    add_ratios(systems)
    return systems
