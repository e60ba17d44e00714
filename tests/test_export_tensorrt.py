"""export.tensorrt: the pure logic (profiles, buckets, version rules) everywhere; plan builds only
where TensorRT and a GPU exist (marker `tensorrt`, skipped cleanly otherwise)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import BackendUnavailableError
from export.errors import ExportError
from export.tensorrt import (
    Profile,
    default_timing_cache,
    length_buckets,
    make_profiles,
    parse_version,
    profile_for_length,
    typing_mode,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_length_buckets_cover_every_length_once() -> None:
    assert length_buckets(384) == [(1, 64), (65, 128), (129, 256), (257, 384)]
    assert length_buckets(128) == [(1, 64), (65, 128)]  # 128 closes the last bucket, 256 is dropped
    assert length_buckets(100, (64, 32, 64)) == [(1, 32), (33, 64), (65, 100)]  # sorted, deduplicated
    assert length_buckets(16) == [(1, 16)]
    for max_len in (1, 63, 64, 65, 200, 384, 512):
        buckets = length_buckets(max_len)
        covered = [n for lo, hi in buckets for n in range(lo, hi + 1)]
        assert covered == list(range(1, max_len + 1))
    with pytest.raises(ExportError):
        length_buckets(0)
    with pytest.raises(ExportError):
        length_buckets(384, (0, 128))


def test_profiles_are_tuned_for_each_buckets_longest_length() -> None:
    profiles = make_profiles(384, max_batch=16, opt_batch=4)
    assert profiles[0] == Profile(1, 64, 64, 1, 4, 16)
    assert profiles[-1].shapes() == ((1, 257), (4, 384), (16, 384))
    with pytest.raises(ExportError, match="opt_batch"):
        make_profiles(384, max_batch=4, opt_batch=8)


def test_profile_for_length_accepts_manifest_lists() -> None:
    profiles = make_profiles(384)
    manifest_form = [[p.min_seq, p.opt_seq, p.max_seq] for p in profiles]
    for seq, want in ((1, 0), (64, 0), (65, 1), (200, 2), (384, 3)):
        assert profile_for_length(profiles, seq) == want
        assert profile_for_length(manifest_form, seq) == want
    with pytest.raises(ValueError, match="385"):
        profile_for_length(profiles, 385)


def test_version_rules() -> None:
    assert parse_version("10.3.0.30") == (10, 3, 0)
    assert parse_version("11.0") == (11, 0, 0)
    assert typing_mode("10.3.0") == "weak"  # JetPack 6: FP16 flag + fp32 layer constraints
    assert typing_mode("10.11.0") == "weak"
    assert typing_mode("10.12.0") == "strong"  # weak typing deprecated from here
    assert typing_mode("11.0.0") == "strong"  # the only mode in 11
    with pytest.raises(ExportError):
        parse_version("ten")


def test_timing_cache_path_is_per_version_and_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPANRT_CACHE_DIR", str(tmp_path))
    assert default_timing_cache("10.3.0", "8.7") == tmp_path / "tensorrt" / "timing-trt10.3.0-sm87.cache"


def test_importing_export_never_imports_tensorrt() -> None:
    code = "import sys, export, export.tensorrt, export.pipeline, export.__main__; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_an_error_with_the_fix(tmp_path: Path) -> None:
    from export.tensorrt import build_trt, require_tensorrt

    with pytest.raises(BackendUnavailableError, match=r"pip install 'spanrt\[tensorrt\]'"):
        require_tensorrt()
    with pytest.raises(BackendUnavailableError):
        build_trt(tmp_path, ("fp16",))


def test_cli_build_trt_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main

    assert main(["build-trt", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.tensorrt
def test_build_plans_on_this_gpu(tmp_path: Path) -> None:
    """Export a tiny BERT with the TensorRT input graphs, then build both plans (GPU + TensorRT)."""
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("torch")
    from engine.bundle import check_tensorrt_plan, load_bundle
    from export.pipeline import ExportOptions, export_bundle
    from export.tensorrt import build_trt, compute_capability
    from test_export import make_checkpoint  # tests/ is on sys.path (rootdir-relative imports, as runtime_helpers)

    try:
        cc = compute_capability()
    except BackendUnavailableError as e:
        pytest.skip(f"no usable GPU: {e}")
    ckpt = make_checkpoint(tmp_path / "ckpt", "bert")
    bundle = export_bundle(ckpt, tmp_path / "b", ExportOptions(max_seq_len=128, tensorrt_onnx=("fp16", "int8"), quiet=True))
    entries = build_trt(bundle, ("fp16", "int8"), timing_cache=tmp_path / "timing.cache")
    b = load_bundle(bundle)
    for precision, entry in zip(("fp16", "int8"), entries):
        plan = b.find("tensorrt", precision)
        assert plan is not None and plan.path.stat().st_size > 0
        assert entry["compute_capability"] == cc and entry["tensorrt_version"] == trt.__version__
        assert entry["profiles"] == [[1, 64, 64], [65, 128, 128]]
        check_tensorrt_plan(plan, tensorrt_version=trt.__version__, compute_capability=cc)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    with pytest.raises(ExportError, match="already has a TensorRT fp16 plan"):
        build_trt(bundle, ("fp16",))
