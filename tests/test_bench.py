"""`python -m bench` end to end on a tiny local model: every system is run or reported, results.json is complete."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import run as bench_run
from bench.squad_eval import score
from bench.systems import BASELINE, SYSTEMS, SYSTEMS_BY_NAME
from engine.default_model import CHECKPOINT_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
CPU_SYSTEMS = [s.name for s in SYSTEMS if s.device == "cpu"]
# CPU systems whose runtime depends on the CPU's vendor or features; every other one must run on every x86-64 CPU
CPU_OPTIONAL = {s.name for s in SYSTEMS if s.device == "cpu" and s.backend in ("onnxruntime-openvino", "native")}


def make_tiny_checkpoint(path: Path) -> Path:
    """A random 2-layer BertForQuestionAnswering with the default model's real tokenizer."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512)
    BertForQuestionAnswering(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (CHECKPOINT_DIR / name).is_file():
            shutil.copyfile(CHECKPOINT_DIR / name, path / name)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A tiny checkpoint, its bundle (built by the export stage into a private cache, as the bench does) and that cache."""
    from engine.default_model import default_bundle

    root = tmp_path_factory.mktemp("bench")
    ckpt = make_tiny_checkpoint(root / "tiny-ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPANRT_CACHE_DIR", str(root / "cache"))  # bundles and Optimum exports go here, not to ~/.cache
        bundle = default_bundle(checkpoint=ckpt, quiet=True)  # the bench run below finds it in the cache
        yield {"root": root, "checkpoint": ckpt, "bundle": Path(bundle)}


@pytest.fixture(scope="module")
def quick_run(tiny: dict[str, Path]) -> dict[str, Any]:
    """`python -m bench --quick --limit 20 --model CHECKPOINT --out DIR` once for the module (the bundle is built and cached)."""
    out = tiny["root"] / "out"
    code = bench_run.main(["--quick", "--limit", "20", "--model", str(tiny["checkpoint"]), "--out", str(out), "--no-progress"])
    return {"code": code, "out": out, "results": json.loads((out / "results.json").read_text())}


def test_quick_run_measures_every_cpu_system(quick_run: dict[str, Any]) -> None:
    res = quick_run["results"]
    assert quick_run["code"] == 0
    by = {s["name"]: s for s in res["systems"]}
    assert list(by) == [s.name for s in SYSTEMS]  # every system listed, none dropped, registry order
    for name in CPU_SYSTEMS:
        s = by[name]
        if name in CPU_OPTIONAL and not s["available"]:  # OpenVINO offers no device on AMD CPUs
            assert s["reason"], name
            continue
        assert s["available"] and s["status"] == "ok", (name, s.get("reason"))
        sizes = {"1", "32"} if SYSTEMS_BY_NAME[name].ends_only else {"1", "8", "32"}  # slow peers skip the middle
        assert set(s["throughput_qps"]) == set(s["accuracy_by_batch_size"]) == set(s["agreement_by_batch_size"]) == sizes
        assert all(lo <= s["throughput_qps"][b] <= hi for b, (lo, hi) in s["throughput_qps_range"].items())
        assert all(v > 0 and math.isfinite(v) for v in s["throughput_qps"].values())
        lat = s["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert 0 <= s["exact_match"] <= 100 and 0 <= s["f1"] <= 100
        assert s["peak_rss_mb"] > 50 and s["load_s"] >= 0 and s["cold_start_ms"] > 0
        assert len(s["raw"]["call_s"]["1"][0]) == 20  # one timing per question at batch 1, kept raw
        assert len(s["raw"]["call_s"]["32"][0]) == 1
        assert 0 <= s["agreement"] <= 1
        assert s["ratios"]["throughput_qps"].keys() == s["throughput_qps"].keys()
    base = by[BASELINE]
    assert base["ratios"]["throughput_qps"] == {"1": 1.0, "8": 1.0, "32": 1.0} and base["agreement"] == 1.0
    assert by["spanrt-onnxruntime-int8"]["backend"] == "onnxruntime" and by["spanrt-onnxruntime-int8"]["precision"] == "int8"
    shares = by["spanrt-onnxruntime-int8"]["time_shares"]["32"]
    assert shares["model"] > 0 and abs(sum(shares.values()) - 1) < 1e-6
    for name in ("spanrt-onnxruntime-int8", "ctranslate2-int8", "spanrt-onnxruntime-fp32"):
        model = by[name]["model_throughput"]["32"]  # model-only throughput, a share of the precision's peak
        assert model["tokens_per_s"] > 0, name
        if "ops_per_s" in res["peaks"][by[name]["precision"]]:
            assert 0 < model["share_of_peak"] < 1.5, name
    native = by["spanrt-native-int8"]
    if native["available"]:  # its logits never depend on the batch
        assert native["answers_depend_on_batch_size"] is False


def test_quick_run_reports_the_machine_and_accuracy_by_batch_size(quick_run: dict[str, Any]) -> None:
    res = quick_run["results"]
    assert res["machine"]["isa_features"] is None or "AVX2" in res["machine"]["isa_features"] or "NEON" in res["machine"]["isa_features"]
    import importlib.util

    for kind in ("int8", "fp32"):
        if importlib.util.find_spec("engine._peak") is None:  # an install older than the module: said, not hidden
            assert "not built" in res["peaks"][kind]["reason"]
            continue
        assert res["peaks"][kind]["ops_per_s"] > 1e9 and res["peaks"][kind]["isa"]
    work = res["model_work"]
    assert work["tokens"] > 0 and work["ops"] > 0 and work["shape"] == {"layers": 2, "hidden": 32, "ffn": 64}
    assert set(res["phases_s"]) == {"prepare", "peaks", "measure"} and res["duration_s"] >= res["phases_s"]["measure"]
    report = (quick_run["out"] / "report.md").read_text()
    for section in ("## Accuracy by batch size", "## Share of the machine", "Spread: the lowest and highest", "peak on "):
        assert section in report
    for s in res["systems"]:
        if s["available"] and s["answers_depend_on_batch_size"]:
            assert "CHANGES" in report and s["name"] in report.split("Answers change with the batch size:")[1]

def test_quick_run_settings_machine_and_versions_are_recorded(quick_run: dict[str, Any]) -> None:
    res = quick_run["results"]
    assert res["settings"]["qa"] == {"top_k": 1, "max_answer_len": 30, "max_seq_len": 384, "doc_stride": 128,
                                     "max_question_len": 64, "align_to_words": True, "handle_impossible_answer": False}
    assert res["settings"]["n_questions"] == 20 and res["settings"]["data"]["version"] == "1.1"
    assert res["machine"]["cpu_model"] and res["machine"]["physical_cores"] >= 1
    assert res["versions"]["onnxruntime"] and res["versions"]["transformers"]
    assert res["baseline"] == BASELINE
    assert {t["target"] for t in res["targets"]}  # targets evaluated, met or not


def test_unavailable_systems_are_reported_with_a_reason(quick_run: dict[str, Any]) -> None:
    res = quick_run["results"]
    gpu = bool(res["machine"]["gpus"])
    for s in res["systems"]:
        if s["device"] == "cuda" and not gpu:
            assert s["available"] is False and s["status"] == "unavailable"
            assert "GPU" in s["reason"]
    report = (quick_run["out"] / "report.md").read_text()
    for s in res["systems"]:
        assert s["name"] in report
        if not s["available"]:
            assert s["reason"] in report


def test_predictions_files_score_like_results(quick_run: dict[str, Any]) -> None:
    from bench.dataset import load_questions, subset_json

    res, out = quick_run["results"], quick_run["out"]
    questions = load_questions(res["settings"]["data"]["path"], limit=20)
    ds = subset_json(questions.dataset_json, {e.qid for e in questions.examples})
    for s in res["systems"]:
        if not s["available"]:
            assert not (out / "predictions" / f"{s['name']}.json").exists()
            continue
        preds = json.loads((out / "predictions" / f"{s['name']}.json").read_text())
        assert set(preds) == {e.qid for e in questions.examples}
        got = score(ds, preds)
        assert got["exact_match"] == pytest.approx(s["exact_match"]) and got["f1"] == pytest.approx(s["f1"])
    assert {"throughput.png", "latency_cdf.png", "time_shares.png"} <= {p.name for p in out.iterdir()}


def test_a_run_without_out_writes_its_report_under_bench_results(tiny: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--limit", "2", "--repeats", "1", "--batch-sizes", "1", "--warmup-calls", "0", "--no-progress",
            "--model", str(tiny["bundle"]), "--systems", "spanrt-onnxruntime-fp32"]
    assert bench_run.main(argv) == 0
    (out,) = (tmp_path / "bench-results").iterdir()
    assert out.name.endswith("-1") and (out / "results.json").is_file() and (out / "report.md").is_file()
    assert f"report: {Path('bench-results') / out.name / 'report.md'}" in capsys.readouterr().out


def test_peers_without_a_checkpoint_are_reported_not_dropped(tiny: dict[str, Path], tmp_path: Path) -> None:
    # a bundle whose source checkpoint is gone: SpanRT runs, the peers say why they cannot
    bundle = tmp_path / "moved-bundle"
    shutil.copytree(tiny["bundle"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "no-such-checkpoint")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    args = bench_run.parse_args(["--limit", "4", "--repeats", "1", "--batch-sizes", "1", "--warmup-calls", "0", "--no-progress",
                                 "--model", str(bundle), "--systems", f"{BASELINE},spanrt-onnxruntime-fp32"])
    res = bench_run.run_bench(args, [])
    by = {s["name"]: s for s in res["systems"]}
    assert by[BASELINE]["available"] is False and "checkpoint" in by[BASELINE]["reason"]
    assert by["spanrt-onnxruntime-fp32"]["available"] is True
    assert by["spanrt-onnxruntime-fp32"]["ratios"] is None  # no baseline, no ratios (and no crash)


def test_soak_samples_rss_and_reports_growth(tiny: dict[str, Path], tmp_path: Path) -> None:
    from bench import soak

    assert soak.parse_args(["--questions", "20"]).warmup_calls == 20  # one cycle by default
    args = soak.parse_args(["--model", str(tiny["bundle"]), "--calls", "60", "--questions", "20", "--sample-every", "10",
                            "--backend", "onnxruntime", "--precision", "int8", "--threads", "1"])
    doc = soak.run_soak(args)
    assert [s["calls"] for s in doc["samples"]] == [0, 10, 20, 30, 40, 50, 60]
    assert doc["engine"]["backend"] == "onnxruntime" and doc["engine"]["precision"] == "int8"
    after = [s["rss_mb"] for s in doc["samples"] if s["calls"] >= 20]
    assert doc["rss_ref_mb"] == after[0] and doc["rss_end_mb"] == after[-1]
    assert doc["growth"] == pytest.approx((after[-1] - after[0]) / after[0])
    assert doc["met"] == (doc["growth"] < soak.TARGET_GROWTH)


def test_shapes_grid_measures_every_cell(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.shapes import main as shapes_main

    out = tmp_path / "shapes.json"
    assert shapes_main(["--model", str(tiny["bundle"]), "--precision", "fp32", "--seq", "16,32", "--batch", "1,4",
                        "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = {(c["seq"], c["batch"]): c for c in data["cells"]}
    assert set(cells) == {(16, 1), (16, 4), (32, 1), (32, 4)}
    for (s, b), c in cells.items():
        assert len(c["raw_s"]) == c["runs"] >= 3 and all(t > 0 for t in c["raw_s"])
        assert math.isclose(c["us_per_token"], sorted(c["raw_s"])[len(c["raw_s"]) // 2] * 1e6 / (s * b), rel_tol=0.5)
    assert data["details"]["disabled_optimizers"] == "['SkipLayerNormFusion']"
    assert "us per padded token" in capsys.readouterr().out
