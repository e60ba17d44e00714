"""The bench's arithmetic and options: throughput, percentiles, shares, ratios, targets, sampling, soak growth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import results as R
from bench.dataset import DEFAULT_DATA, load_questions, subset_json
from bench.ct2 import best_span
from bench.harness import SystemRun
from bench.run import default_out_dir, parse_args
from bench.soak import growth
from bench.systems import BASELINE, SYSTEMS_BY_NAME, select


def _pass(call_s: list[float], n: int | None = None, preds: list[list] | None = None, stages: dict | None = None) -> dict:
    return {"n": n if n is not None else len(call_s), "call_s": call_s, "predictions": preds or [],
            "stage_s": stages or {"tokenize": 0.0, "model": 0.0, "decode": 0.0}}


def test_throughput_is_questions_over_time_inside_calls() -> None:
    assert R.throughput([_pass([0.5, 0.5], n=10), _pass([1.0, 1.0], n=10)]) == [10.0, 5.0]


def test_latency_percentiles_are_medians_over_repeats() -> None:
    reps = [_pass(list(np.arange(1, 101) / 1e3)), _pass(list(np.arange(1, 101) / 1e3 * 3)), _pass(list(np.arange(1, 101) / 1e3 * 2))]
    lat = R.latency_ms(reps)
    assert lat["p50"] == pytest.approx(np.percentile(np.arange(1, 101) * 2.0, 50))  # the middle repeat
    assert lat["p99"] == pytest.approx(np.percentile(np.arange(1, 101) * 2.0, 99))
    assert lat["max"] == pytest.approx(300.0)


def test_stage_shares_add_up_and_unknown_stages_give_none() -> None:
    p = _pass([1.0, 1.0], stages={"tokenize": 0.2, "model": 1.5, "decode": 0.1})
    sh = R.stage_shares([p])
    assert sh == pytest.approx({"tokenize": 0.1, "model": 0.75, "decode": 0.05, "other": 0.1})
    assert R.stage_shares([_pass([1.0])]) is None  # a system that shows no stages


def _system(name: str, thr: dict, p50: float, em: float, f1: float, texts: list[str], spans: list[tuple]) -> dict:
    return {"name": name, "available": True, "throughput_qps": thr, "latency_ms": {"p50": p50, "p90": 2 * p50, "p99": 3 * p50},
            "peak_rss_mb": 100.0, "exact_match": em, "f1": f1,
            "_predictions": {f"q{i}": {"text": t, "start": s[0], "end": s[1]} for i, (t, s) in enumerate(zip(texts, spans))}}


def test_ratios_and_agreement_against_the_baseline() -> None:
    base = _system(BASELINE, {"1": 10.0, "32": 20.0}, 40.0, 70.0, 80.0, ["a", "b", "c", "d"], [(0, 1), (2, 3), (4, 5), (6, 7)])
    fast = _system("spanrt-onnxruntime-int8", {"1": 50.0, "32": 130.0}, 8.0, 69.5, 79.0, ["a", "b", "x", "d"], [(0, 1), (2, 4), (9, 9), (6, 7)])
    down = {"name": "spanrt-tensorrt-fp16", "available": False}
    systems = [base, fast, down]
    R.add_ratios(systems)
    assert fast["ratios"]["throughput_qps"] == {"1": 5.0, "32": 6.5}
    assert fast["ratios"]["latency_p50"] == pytest.approx(0.2)
    assert fast["ratios"]["f1_delta"] == pytest.approx(-1.0)
    assert fast["agreement"] == 0.75 and fast["agreement_span"] == 0.5
    assert "ratios" not in down
    targets = {t["target"]: t for t in R.check_targets(systems)}
    t6 = targets["spanrt-onnxruntime-int8 throughput at batch 32 vs baseline"]
    assert t6["value"] == pytest.approx(6.5) and t6["met"] is True
    assert targets["spanrt-onnxruntime-int8 p50 latency at batch 1 vs baseline"]["met"] is True
    assert targets["spanrt-onnxruntime-fp32 throughput at batch 32 vs baseline"]["met"] is None  # not measured


def test_targets_not_met_are_reported_as_such() -> None:
    base = _system(BASELINE, {"1": 10.0, "32": 20.0}, 40.0, 70.0, 80.0, ["a"], [(0, 1)])
    slow = _system("spanrt-onnxruntime-int8", {"1": 20.0, "32": 40.0}, 20.0, 70.0, 80.0, ["a"], [(0, 1)])
    targets = {t["target"]: t for t in R.check_targets([base, slow])}
    assert targets["spanrt-onnxruntime-int8 throughput at batch 32 vs baseline"]["met"] is False
    assert targets["spanrt-onnxruntime-int8 p50 latency at batch 1 vs baseline"]["met"] is False


def test_sample_is_fixed_in_file_order_and_scored_on_its_own_questions() -> None:
    a = load_questions(DEFAULT_DATA, limit=50)
    b = load_questions(DEFAULT_DATA, limit=50)
    assert [e.qid for e in a.examples] == [e.qid for e in b.examples]
    full = load_questions(DEFAULT_DATA)
    order = {e.qid: i for i, e in enumerate(full.examples)}
    idx = [order[e.qid] for e in a.examples]
    assert idx == sorted(idx) and idx[-1] > 1000  # spread over the file, not its first articles
    assert a.version == "1.1" and full.total_in_file == 10570
    ds = subset_json(a.dataset_json, {e.qid for e in a.examples})
    from bench.squad_eval import score

    gold = {e.qid: e.answers[0] for e in a.examples}
    assert score(ds, gold)["total"] == 50 and score(ds, gold)["exact_match"] == 100.0


def test_v2_files_are_detected() -> None:
    q = load_questions(Path(DEFAULT_DATA).with_name("dev-v2.0.json.gz"), limit=10)
    assert q.v2


def test_options() -> None:
    a = parse_args(["--batch-sizes", "32,8", "--systems", f"{BASELINE},spanrt-onnxruntime-int8"])
    assert a.batch_sizes == [1, 8, 32] and a.all_batch_sizes  # batch 1 (latency) always runs; every system at every size
    default = parse_args([])
    assert default.batch_sizes == [1, 8, 32] and not default.all_batch_sizes and default.out is None
    assert [s.name for s in select(a.systems)] == [BASELINE, "spanrt-onnxruntime-int8"]
    for bad in (["--systems", "no-such-system"], ["--batch-sizes", "0,8"], ["--limit", "0"], ["--quick", "--full"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_soak_growth_from_the_end_of_warm_up() -> None:
    samples = [(0, 50.0), (100, 90.0), (200, 100.0), (300, 101.0), (400, 102.0)]
    g = growth(samples, warmup_calls=200)
    assert g["rss_ref_mb"] == 100.0 and g["rss_end_mb"] == 102.0
    assert g["growth"] == pytest.approx(0.02)
    assert g["slope_mb_per_1k_calls"] == pytest.approx(10.0)
    with pytest.raises(ValueError):
        growth(samples, warmup_calls=400)


def _run_with_answers(name: str, qids: list[str], by_batch: dict[int, list[str]], contexts: dict[str, str]) -> SystemRun:
    """A finished SystemRun whose passes answered with these texts (spans found in the question's context)."""
    run = SystemRun(spec=SYSTEMS_BY_NAME[name], status="ok")
    run.loaded = {"details": {"backend_details": {"isa": "avx512_vnni"}}, "import_s": 0.1, "load_s": 0.2, "cold_start_ms": 3.0,
                  "rss_after_load_mb": 100.0, "rss_start_mb": 50.0}
    for b, texts in by_batch.items():
        preds = [[t, contexts[q].find(t), contexts[q].find(t) + len(t), 1.0] for q, t in zip(qids, texts)]
        run.passes[b] = [{"n": len(qids), "call_s": [0.1], "predictions": preds,
                          "stage_s": {"tokenize": 0.01, "model": 0.08, "decode": 0.01}}]
    return run


def test_accuracy_agreement_and_changes_per_batch_size() -> None:
    q = load_questions(DEFAULT_DATA, limit=4)
    ds = subset_json(q.dataset_json, {e.qid for e in q.examples})
    qids = [e.qid for e in q.examples]
    ctx = {e.qid: e.context for e in q.examples}
    gold = [e.answers[0] for e in q.examples]
    wrong = [gold[0], gold[1], ctx[qids[2]][:7], gold[3]]  # one answer differs at batch 8
    base = R.summarize_system(_run_with_answers(BASELINE, qids, {1: gold, 8: gold}, ctx), q, ds)
    int8 = R.summarize_system(_run_with_answers("spanrt-onnxruntime-int8", qids, {1: gold, 8: wrong, 32: gold}, ctx), q, ds,
                              {"tokens": 800, "ops": 8e9}, {"int8": {"ops_per_s": 1e12, "isa": "avx512_vnni"}})
    acc = int8["accuracy_by_batch_size"]
    assert acc["1"]["exact_match"] == 100.0 and acc["8"]["exact_match"] == 75.0 and acc["32"]["exact_match"] == 100.0
    assert acc["8"]["changed_vs_batch_1"] == 0.25 and acc["32"]["changed_vs_batch_1"] == 0.0
    assert int8["answers_depend_on_batch_size"] is True and base["answers_depend_on_batch_size"] is False
    assert int8["exact_match"] == 100.0  # the headline figure stays the one-question-at-a-time answers
    assert int8["isa"] == "avx512_vnni"  # the backend's code path, when it reports one
    assert int8["model_throughput"]["8"] == pytest.approx({"model_s": 0.08, "tokens_per_s": 1e4, "ops_per_s": 1e11,
                                                           "share_of_peak": 0.1})
    R.add_ratios([base, int8])
    assert int8["agreement_by_batch_size"] == {"1": 1.0, "8": 0.75, "32": 1.0}
    assert base["agreement_by_batch_size"] == {"1": 1.0, "8": 1.0}
    one = R.summarize_system(_run_with_answers("spanrt-native-int8", qids, {1: gold}, ctx), q, ds)
    assert one["answers_depend_on_batch_size"] is None  # one batch size: nothing to compare


def test_ctranslate2_peer_span_decode_is_the_best_valid_pair() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(4, 40))
        start, end = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
        q = int(rng.integers(1, n - 2))
        seq_ids = [None] + [0] * q + [None] + [1] * (n - q - 2)  # [CLS] question [SEP] context (no final [SEP])
        max_len = int(rng.integers(1, 8))
        valid = [(float(start[i] + end[j]), i, j) for i in range(n) for j in range(i, min(n, i + max_len))
                 if seq_ids[i] == 1 and seq_ids[j] == 1]
        got = best_span(start, end, seq_ids, max_len, n_best=n)  # all candidates: the brute-force best
        want = max(valid, key=lambda v: v[0]) if valid else None
        assert (got is None) == (want is None)
        if want is not None:
            assert got[0] == pytest.approx(want[0]) and start[got[1]] + end[got[2]] == pytest.approx(want[0])
        few = best_span(start, end, seq_ids, max_len, n_best=2)  # fewer candidates never find a better span
        assert few is None or (want is not None and few[0] <= want[0] + 1e-6)


def test_default_out_dir_is_dated_named_after_the_cpu_and_never_reused(tmp_path: Path) -> None:
    import datetime as dt

    day = dt.date(2026, 12, 3)
    first = default_out_dir(tmp_path, day, "Intel(R) Xeon(R) Platinum 8480+")
    assert first == tmp_path / "2026-12-03-intel-xeon-platinum-8480-1"
    first.mkdir()
    assert default_out_dir(tmp_path, day, "Intel(R) Xeon(R) Platinum 8480+").name.endswith("-8480-2")
    assert default_out_dir(tmp_path, day, "AMD EPYC 9R45 96-Core Processor").name == "2026-12-03-amd-epyc-9r45-96-1"
