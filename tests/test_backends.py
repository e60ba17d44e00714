"""Backend selection and loading: defaults, explicit requests that cannot run, damaged model files,
and (on machines with a GPU) device backends against the CPU result."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import lookup_bundle, planted

from engine import Engine
from engine.backends import open_backend
from engine.backends._cuda_arrays import DeviceArray
from engine.bundle import load_bundle
from engine.errors import BackendUnavailableError, BundleError

ANSWER = "Zanzibar Island"
CONTEXT = "Long ago the ship sailed to Zanzibar Island and back."


def has_ort_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def has_openvino() -> bool:
    return importlib.util.find_spec("onnxruntime_ep_openvino") is not None


def openvino_device() -> bool:
    """The OpenVINO plugin is installed and offers a CPU device (it offers none on AMD CPUs)."""
    if not has_openvino():
        return False
    import onnxruntime
    import onnxruntime_ep_openvino

    from engine.backends.onnxruntime_openvino import cpu_device

    try:
        cpu_device(onnxruntime, onnxruntime_ep_openvino)
    except BackendUnavailableError:
        return False
    return True


def openvino_bf16() -> bool:
    """The OpenVINO plugin is installed and computes BF16 natively on this CPU."""
    if not has_openvino():
        return False
    import onnxruntime
    import onnxruntime_ep_openvino

    from engine.backends.onnxruntime_openvino import cpu_device, supports_bf16

    try:
        return supports_bf16(cpu_device(onnxruntime, onnxruntime_ep_openvino))
    except BackendUnavailableError:  # e.g. AMD CPUs: the plugin offers no device at all
        return False


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lookup_bundle(tmp_path_factory.mktemp("both"), **planted(ANSWER), precisions=("fp32", "int8"))


def test_cpu_default_is_int8_when_the_bundle_has_it(both: Path) -> None:
    with Engine(both, backend="onnxruntime", threads=1) as e:
        assert (e.backend, e.precision, e.device) == ("onnxruntime", "int8", "cpu")
        assert e.backend_details["file"] == "model.int8.onnx"
        assert e.backend_details["provider"] == "CPUExecutionProvider"
        assert e.answer("where?", CONTEXT).precision == "int8"
    with Engine(both, backend="onnxruntime", precision="fp32", threads=1) as e:
        assert e.backend_details["file"] == "model.fp32.onnx"


def test_cpu_default_is_fp32_without_int8(tmp_path: Path) -> None:
    with Engine(lookup_bundle(tmp_path, **planted(ANSWER)), backend="onnxruntime", threads=1) as e:
        assert e.precision == "fp32"


@pytest.mark.skipif(has_ort_cuda() or importlib.util.find_spec("tensorrt") is not None or openvino_bf16(),
                    reason="a GPU backend or OpenVINO with BF16 is installed")
def test_auto_on_a_cpu_machine_picks_onnxruntime_and_records_why(both: Path) -> None:
    with Engine(both, threads=1) as e:
        assert (e.backend, e.precision) == ("onnxruntime", "int8")
        notes = "\n".join(e.backend_notes)
        assert "tensorrt" in notes and "onnxruntime-cuda" in notes and "onnxruntime-openvino" in notes


@pytest.mark.skipif(has_ort_cuda() or importlib.util.find_spec("tensorrt") is not None or not openvino_bf16(),
                    reason="needs the OpenVINO plugin on a CPU with BF16, and no GPU backend")
def test_auto_picks_openvino_bf16_when_installed_and_int8_when_asked(both: Path) -> None:
    with Engine(both, threads=1) as e:
        assert (e.backend, e.precision, e.backend_details["provider"]) == ("onnxruntime-openvino", "bf16", "OpenVINOExecutionProvider")
    with Engine(both, precision="int8", threads=1) as e:  # OpenVINO does not run the int8 graph: the CPU provider does
        assert (e.backend, e.precision) == ("onnxruntime", "int8")
        assert any("onnxruntime-openvino: not used for int8" in n for n in e.backend_notes)


@pytest.mark.skipif(has_openvino(), reason="the OpenVINO plugin is installed")
def test_openvino_without_the_plugin_is_an_error(both: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime-ep-openvino"):
        Engine(both, backend="onnxruntime-openvino")


@pytest.mark.skipif(not openvino_device(), reason="needs the OpenVINO plugin with a CPU device (none on AMD CPUs)")
def test_openvino_matches_the_cpu_provider_and_pads_to_its_multiple(tmp_path: Path) -> None:
    b = lookup_bundle(tmp_path, **planted(ANSWER), precisions=("fp32", "int8"))
    questions = [f"q{i}?" for i in range(24)]
    contexts = [CONTEXT * (1 + i % 5) for i in range(24)]
    with Engine(b, backend="onnxruntime", precision="fp32", threads=1) as cpu, \
            Engine(b, backend="onnxruntime-openvino", precision="fp32", threads=1) as ov:
        assert (ov.backend, ov.precision, ov.device) == ("onnxruntime-openvino", "fp32", "cpu")
        assert ov.backend_details["provider"] == "OpenVINOExecutionProvider" and ov.backend_details["cpu_ep_fallback"] is False
        shapes: list[tuple[int, ...]] = []
        real = ov._backend.run
        ov._backend.run = lambda feeds, consume: (shapes.append(feeds["input_ids"].shape), real(feeds, consume))[1]
        want = cpu.answer(questions, contexts, top_k=3)
        got = ov.answer(questions, contexts, top_k=3)
    assert shapes and all(s[1] % 16 == 0 or s[1] == ov.max_seq_len for s in shapes)
    for w, g in zip(want, got):
        assert [(a.text, a.start, a.end) for a in g] == [(a.text, a.start, a.end) for a in w]
        assert np.allclose([a.score for a in g], [a.score for a in w], rtol=1e-4)


@pytest.mark.skipif(not openvino_device(), reason="needs the OpenVINO plugin with a CPU device (none on AMD CPUs)")
def test_openvino_refuses_int8_and_bf16_without_native_bf16(both: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="use backend='onnxruntime' for the int8 model"):
        Engine(both, backend="onnxruntime-openvino", precision="int8")
    if not openvino_bf16():
        with pytest.raises(BackendUnavailableError, match="needs a CPU with native BF16"):
            Engine(both, backend="onnxruntime-openvino", precision="bf16")


def test_explicit_precision_the_bundle_lacks_is_an_error(both: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="runs int8 or fp32, not fp16"):
        open_backend(load_bundle(both), "onnxruntime", "fp16")
    with pytest.raises(BackendUnavailableError, match="needs the int8 onnx model.*has onnx precisions: fp32"):
        open_backend(load_bundle(lookup_bundle(both.parent / "fp32_only", **planted(ANSWER))), "onnxruntime", "int8")


def test_cpu_refuses_fp16_instead_of_substituting(tmp_path: Path) -> None:
    b = lookup_bundle(tmp_path, **planted(ANSWER), precisions=("fp32", "fp16"))
    with pytest.raises(BackendUnavailableError, match="runs int8 or fp32, not fp16"):
        Engine(b, backend="onnxruntime", precision="fp16")


@pytest.mark.skipif(has_ort_cuda(), reason="onnxruntime-gpu is installed")
def test_onnxruntime_cuda_without_onnxruntime_gpu_is_an_error(both: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        Engine(both, backend="onnxruntime-cuda")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_without_tensorrt_is_an_error(both: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        Engine(both, backend="tensorrt")


def test_unknown_backend_is_an_error(both: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tpu'"):
        open_backend(load_bundle(both), "tpu")


def test_torch_backend_needs_the_source_checkpoint(both: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    with pytest.raises(BackendUnavailableError, match="source checkpoint"):
        Engine(both, backend="torch")


def test_torch_backend_refuses_a_changed_source_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    b = lookup_bundle(tmp_path / "b", **planted(ANSWER))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"not the exported weights")
    m = json.loads((b / "manifest.json").read_text())
    m["source"] = {"path": str(ckpt), "weights_sha256": "0" * 64}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="changed since the export"):
        Engine(b, backend="torch")


def test_an_onnx_file_onnxruntime_cannot_load_is_a_bundle_error(tmp_path: Path) -> None:
    b = lookup_bundle(tmp_path, **planted(ANSWER))
    (b / "model.fp32.onnx").write_bytes(b"\x08\x07garbage")
    bundle = load_bundle(b, verify=False)  # skip the sha256 check to reach ONNX Runtime's parser
    with pytest.raises(BundleError, match="model.fp32.onnx: ONNX Runtime cannot load it"):
        open_backend(bundle, "onnxruntime")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Engine(b)


def test_float16_logits_are_decoded(tmp_path: Path) -> None:
    # an fp16 graph run by the CPU provider: the decoder reads float16 logits directly
    import onnxruntime

    from engine.backends.onnxruntime_cpu import OnnxRuntimeCPU

    b = load_bundle(lookup_bundle(tmp_path, **planted(ANSWER), precisions=("fp32", "fp16")))
    backend = OnnxRuntimeCPU(b, "fp32", threads=1)
    so = onnxruntime.SessionOptions()
    backend.session = onnxruntime.InferenceSession(str(b.find("onnx", "fp16").path), so, providers=["CPUExecutionProvider"])
    with Engine(b, backend="onnxruntime", precision="fp32", threads=1) as e:
        e._backend = backend
        a = e.answer("where?", CONTEXT)
    assert a.text == ANSWER


def test_device_array_interface() -> None:
    owner = object()
    d = DeviceArray(1234, (2, 5), "<f2", 7, owner)
    cai = d.__cuda_array_interface__
    assert cai == {"shape": (2, 5), "typestr": "<f2", "data": (1234, False), "strides": None, "version": 3, "stream": 7}
    assert d.owner is owner


# ---- GPU backends: answers equal the CPU's ---------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not has_ort_cuda(), reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_onnxruntime_cuda_matches_cpu(tmp_path: Path) -> None:
    b = lookup_bundle(tmp_path, **planted(ANSWER), precisions=("fp32", "fp16"))
    questions = [f"q{i}?" for i in range(40)]
    contexts = [CONTEXT * (1 + i % 7) for i in range(40)]
    with Engine(b, backend="onnxruntime", precision="fp32", threads=1) as cpu, Engine(b, backend="onnxruntime-cuda") as gpu:
        assert (gpu.backend, gpu.precision, gpu.backend_details["provider"]) == ("onnxruntime-cuda", "fp16", "CUDAExecutionProvider")
        want = cpu.answer(questions, contexts, top_k=3)
        got = gpu.answer(questions, contexts, top_k=3)
    for w, g in zip(want, got):
        assert [(a.text, a.start, a.end) for a in g] == [(a.text, a.start, a.end) for a in w]
        assert np.allclose([a.score for a in g], [a.score for a in w], rtol=2e-2)


@pytest.mark.skipif(not openvino_device(), reason="needs the OpenVINO plugin with a CPU device (none on AMD CPUs)")
def test_openvino_engine_is_shared_safely_between_threads(both: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    questions = [f"q{i}?" for i in range(8)]
    contexts = [CONTEXT * (1 + i % 6) for i in range(8)]
    with Engine(both, backend="onnxruntime-openvino", precision="fp32", threads=2) as e:
        want = [(a.text, a.start, round(a.score, 5)) for a in e.answer(questions, contexts)]

        def worker(seed: int) -> list[tuple[str, int, float]]:
            out = []
            for k in range(40):
                i = (seed + k) % len(questions)
                a = e.answer(questions[i], contexts[i])
                out.append((a.text, a.start, round(a.score, 5)) == want[i])
            return out

        with ThreadPoolExecutor(6) as pool:
            results = [ok for r in pool.map(worker, range(6)) for ok in r]
    assert len(results) == 240 and all(results)


@pytest.mark.skipif(not openvino_device(), reason="needs the OpenVINO plugin with a CPU device (none on AMD CPUs)")
def test_openvino_warmup_runs_every_padded_length_once(both: Path) -> None:
    with Engine(both, backend="onnxruntime-openvino", precision="fp32", threads=1) as e:
        shapes: list[tuple[int, ...]] = []
        real = e._backend.run
        e._backend.run = lambda feeds, consume: (shapes.append(feeds["input_ids"].shape), real(feeds, consume))[1]
        e.warmup()
        singles = {s[1] for s in shapes if s[0] == 1}
        assert set(range(16, e.max_seq_len + 1, 16)) | {e.max_seq_len} <= singles
        assert all(s[1] % 16 == 0 or s[1] == e.max_seq_len for s in shapes)


@pytest.mark.skipif(not openvino_device() or has_ort_cuda() or importlib.util.find_spec("tensorrt") is not None,
                    reason="needs the OpenVINO plugin, and no GPU backend")
def test_a_graph_openvino_cannot_take_whole_is_unavailable_and_auto_moves_on(both: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    real = onnxruntime.InferenceSession

    def session(path, sess_options=None, providers=None, **kw):  # type: ignore[no-untyped-def]
        if not providers:  # the OpenVINO backend: providers come from the session options
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes that are assigned to the "
                               "default CPU EP, but fallback to CPU EP has been explicitly disabled by the user.")
        return real(path, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    with pytest.raises(BackendUnavailableError, match="could not start OpenVINOExecutionProvider for model.fp32.onnx"):
        Engine(both, backend="onnxruntime-openvino", precision="fp32")
    with Engine(both, threads=1) as e:
        assert e.backend == "onnxruntime"
        assert any("onnxruntime-openvino" in n and "fallback to CPU EP" in n for n in e.backend_notes) or not openvino_bf16()
