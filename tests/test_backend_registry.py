"""The backend registry: engine.backends' table of lazily imported classes, each class's own
declaration (name, precisions best first, what "auto" uses it for, ``available``) and nothing else
deciding which backend opens and at which precision."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import lookup_bundle, planted

import engine.backends as backends
from engine import Engine
from engine.backends import AUTO_ORDER, BACKENDS, backend_class, open_backend
from engine.backends.base import PRECISIONS, Availability, Backend, BackendOptions
from engine.backends.native import NativeCPU
from engine.backends.onnxruntime_cpu import OnnxRuntimeCPU
from engine.backends.onnxruntime_openvino import OnnxRuntimeOpenVINO
from engine.backends.tensorrt import TensorRT
from engine.bundle import Bundle, load_bundle
from engine.errors import BackendUnavailableError, BundleError

ANSWER = "Zanzibar Island"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(lookup_bundle(tmp_path_factory.mktemp("registry"), **planted(ANSWER), precisions=("fp32", "int8")))


# ---- the real table -----------------------------------------------------------------------------
def test_the_table_names_each_class_and_each_declares_its_precisions_in_the_vocabulary() -> None:
    assert BACKENDS == ("onnxruntime", "native", "onnxruntime-openvino", "onnxruntime-cuda", "tensorrt", "torch", "torch-cuda")
    assert AUTO_ORDER == ("tensorrt", "onnxruntime-cuda", "native", "onnxruntime-openvino", "onnxruntime")
    assert PRECISIONS == ("fp32", "fp16", "int8", "bf16")
    for name in BACKENDS:
        cls = backend_class(name)
        assert issubclass(cls, Backend) and cls.name == name
        assert cls.PRECISIONS and len(set(cls.PRECISIONS)) == len(cls.PRECISIONS) and set(cls.PRECISIONS) <= set(PRECISIONS), name
        assert cls.AUTO_PRECISIONS is None or set(cls.AUTO_PRECISIONS) <= set(cls.PRECISIONS), name
        assert cls.device in ("cpu", "cuda")
    assert {backend_class(n).device for n in ("onnxruntime-cuda", "tensorrt", "torch-cuda")} == {"cuda"}


def test_unknown_backend_is_the_same_error_as_before(bundle: Bundle) -> None:
    with pytest.raises(BackendUnavailableError) as e:
        open_backend(bundle, "tpu")
    assert str(e.value) == ("unknown backend 'tpu'; choose one of: auto, onnxruntime, native, onnxruntime-openvino, "
                            "onnxruntime-cuda, tensorrt, torch, torch-cuda")


def test_importing_every_backend_class_imports_no_runtime_package() -> None:
    # Polygraphy's rule: the table's modules import their packages only when a backend opens
    code = ("import sys; from engine.backends import BACKENDS, backend_class; [backend_class(n) for n in BACKENDS]; "
            "bad = sorted(m for m in ('onnxruntime', 'tensorrt', 'torch', 'transformers', 'cuda', 'onnxruntime_ep_openvino') "
            "if m in sys.modules); sys.exit(f'imported {bad}' if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


class _Bundle:
    """What the declarations read of a bundle: its root and its precisions per artifact format."""

    def __init__(self, **formats: tuple[str, ...]) -> None:
        self.root = Path("/b")
        self.formats = formats

    def precisions(self, fmt: str) -> tuple[str, ...]:
        return self.formats.get(fmt, ())


def test_default_precision_is_the_first_declared_one_the_bundle_has() -> None:
    b: Any = _Bundle(onnx=("fp32", "fp16", "int8"), tensorrt=("int8", "fp32"))
    assert OnnxRuntimeCPU.bundle_precisions(b) == ("int8", "fp32") and OnnxRuntimeCPU.default_precision(b) == "int8"
    assert TensorRT.default_precision(b) == "int8"  # fp16, int8, fp32: the manifest's order does not matter
    assert OnnxRuntimeOpenVINO.bundle_precisions(b) == ("bf16", "fp32")  # computed from the fp32 graph
    assert NativeCPU.bundle_precisions(b) == ()
    assert NativeCPU.bundle_precisions(_Bundle(native=("fp32",))) == ("int8", "bf16", "fp32")  # type: ignore[arg-type]
    with pytest.raises(BackendUnavailableError, match=r"has no tensorrt model .*build-trt /b"):
        TensorRT.default_precision(_Bundle(onnx=("fp32",)))  # type: ignore[arg-type]


def test_a_backend_opens_at_the_precision_its_declaration_puts_first(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        assert e.precision == "int8"
    monkeypatch.setattr(OnnxRuntimeCPU, "PRECISIONS", ("fp32", "int8"))  # the one declaration decides
    with Engine(bundle, backend="onnxruntime", threads=1) as e:
        assert e.precision == "fp32"


# ---- open_backend driven by a table of stand-ins ----------------------------------------------------
class _Stub(Backend):
    """A backend that opens without loading anything, at its default precision."""

    device = "cpu"
    FORMAT = "onnx"
    PRECISIONS = ("int8", "fp32")
    error: Exception | None = None

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.precision = precision or self.default_precision(bundle)
        self.threads = threads
        self.details = {}

    def run(self, feeds: Any, consume: Any) -> Any:
        raise AssertionError("not run in these tests")


class Missing(_Stub):
    name = "missing"

    @classmethod
    def available(cls, bundle: Bundle, options: BackendOptions, *, auto: bool = False) -> Availability:
        return Availability("missing: its package is not installed (test)")


class SlowHere(_Stub):
    name = "slow-here"

    @classmethod
    def available(cls, bundle: Bundle, options: BackendOptions, *, auto: bool = False) -> Availability:
        return Availability("slower than the next one here (test)" if auto else None)


class BF16Only(_Stub):
    name = "bf16-only"
    PRECISIONS = ("bf16", "fp32")
    COMPUTED_FROM = "fp32"
    AUTO_PRECISIONS = ("bf16",)
    AUTO_NOTE = "the next one runs it faster (test)"


class StalePlan(_Stub):
    name = "stale-plan"
    AUTO_SKIPS_BUNDLE_ERRORS = True
    error = BundleError("plan built for another GPU (test)")


class Damaged(_Stub):
    name = "damaged"
    error = BundleError("damaged model file (test)")


class Fine(_Stub):
    name = "fine"


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    table = {c.name: f"{__name__}:{c.__name__}" for c in (Missing, SlowHere, BF16Only, StalePlan, Damaged, Fine)}
    monkeypatch.setattr(backends, "BACKEND_CLASSES", table)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("missing", "slow-here", "stale-plan", "bf16-only", "fine"))
    yield


def test_auto_tries_the_table_in_order_and_says_why_it_skipped_each(bundle: Bundle, stand_ins: None) -> None:
    chosen, notes = open_backend(bundle, "auto", threads=3)
    assert (type(chosen), chosen.precision, chosen.threads) == (BF16Only, "bf16", 3)  # what auto asks of it: bf16
    assert notes == ("missing: missing: its package is not installed (test)",
                     "slow-here: slower than the next one here (test)",
                     "stale-plan: plan built for another GPU (test)")
    chosen, notes = open_backend(bundle, "auto", "int8")
    assert (type(chosen), chosen.precision) == (Fine, "int8")
    assert notes[-1] == "bf16-only: not used for int8 by auto (the next one runs it faster (test))"
    chosen, _ = open_backend(bundle, "auto", "fp32")
    assert type(chosen) is Fine  # bf16-only runs fp32, but auto leaves fp32 to the others


def test_a_named_backend_that_is_not_available_is_an_error_with_the_reason(bundle: Bundle, stand_ins: None) -> None:
    with pytest.raises(BackendUnavailableError, match=r"^missing: its package is not installed \(test\)$"):
        open_backend(bundle, "missing")
    chosen, notes = open_backend(bundle, "slow-here")  # what makes auto pass it over does not stop a request by name
    assert (type(chosen), notes) == (SlowHere, ())
    with pytest.raises(BundleError, match="another GPU"):  # only auto moves on from a stale plan
        open_backend(bundle, "stale-plan")


def test_auto_raises_a_damaged_bundle_and_lists_every_reason_when_nothing_runs(bundle: Bundle, stand_ins: None,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "AUTO_ORDER", ("missing", "damaged", "fine"))
    with pytest.raises(BundleError, match="damaged model file"):
        open_backend(bundle, "auto")
    monkeypatch.setattr(backends, "AUTO_ORDER", ("missing", "slow-here"))
    with pytest.raises(BackendUnavailableError, match=r"no backend can run this bundle here:\n  missing: .*\n  slow-here: slower"):
        open_backend(bundle, "auto")


def test_the_engine_takes_the_precisions_of_the_vocabulary(bundle: Bundle) -> None:
    from engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="precision must be None or one of fp32, fp16, int8, bf16, got 'fp8'"):
        Engine(bundle, precision="fp8")
