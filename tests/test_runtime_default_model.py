"""The embedded default model on real SQuAD v1.1 dev questions: golden answers, and the same answers
from every CPU backend and precision (slow: builds the default bundle once, then answers ~100 questions)."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine
from bench.squad_eval import f1_v1, normalize_answer
from engine import Engine
from engine.errors import BundleError
from export.squad_data import SquadExample, load_squad

pytestmark = pytest.mark.slow

DEV = Path(__file__).resolve().parents[1] / "bench" / "data" / "squad" / "dev-v1.1.json.gz"
SAMPLE = 100


@pytest.fixture(scope="module")
def default_bundle() -> Path:
    from engine.default_model import default_bundle, default_checkpoint_dir

    try:
        default_checkpoint_dir()
    except BundleError as e:
        pytest.skip(f"the default model's weights are not in this checkout: {e}")
    return default_bundle(quiet=True)


@pytest.fixture(scope="module")
def dev() -> list[SquadExample]:
    return load_squad(DEV)[:SAMPLE]


# Easy questions any usable SQuAD model gets right (the first article of the dev set).
GOLDEN = [
    ("Which NFL team represented the AFC at Super Bowl 50?", "Denver Broncos"),
    ("Which NFL team represented the NFC at Super Bowl 50?", "Carolina Panthers"),
    ("What day was the game played on?", "February 7, 2016"),
    ("What does AFC stand for?", "American Football Conference"),
]


def test_golden_answers_with_the_default_model(default_bundle: Path, dev: list[SquadExample]) -> None:
    by_question = {e.question: e for e in dev}
    for q, gold in GOLDEN:
        ex = by_question[q]
        a = engine.answer(q, ex.context)  # model=None: the embedded default model
        assert ex.context[a.start:a.end] == a.text
        assert normalize_answer(a.text) in {normalize_answer(g) for g in ex.answers}, (q, a.text, gold)


def _run(eng: Engine, dev: list[SquadExample]) -> list[engine.Answer]:
    return eng.answer([e.question for e in dev], [e.context for e in dev])  # type: ignore[return-value]


def _f1(dev: list[SquadExample], answers: list[engine.Answer]) -> float:
    return 100 * sum(max(f1_v1(a.text, g) for g in e.answers) for e, a in zip(dev, answers)) / len(dev)


def test_backends_and_precisions_agree(default_bundle: Path, dev: list[SquadExample]) -> None:
    with Engine(default_bundle, backend="onnxruntime", precision="fp32") as fp32:
        ref = _run(fp32, dev)
    with Engine(default_bundle, backend="onnxruntime", precision="int8") as int8:
        q = _run(int8, dev)
    same = sum(a.text == b.text for a, b in zip(ref, q)) / len(dev)
    assert same >= 0.85, f"int8 gives the fp32 answer for only {same:.0%} of the questions"
    assert _f1(dev, q) >= _f1(dev, ref) - 3.0
    assert _f1(dev, ref) >= 50.0
    pytest.importorskip("torch")
    with Engine(default_bundle, backend="torch", precision="fp32") as torch_fp32:
        t = _run(torch_fp32, dev)
    same_t = sum((a.text, a.start) == (b.text, b.start) for a, b in zip(ref, t)) / len(dev)
    assert same_t >= 0.98, f"ONNX fp32 and PyTorch fp32 agree on only {same_t:.0%} of the answers"


def test_openvino_bf16_agrees_with_fp32(default_bundle: Path, dev: list[SquadExample]) -> None:
    pytest.importorskip("onnxruntime_ep_openvino", reason="needs the openvino extra")
    from engine.errors import BackendUnavailableError

    with Engine(default_bundle, backend="onnxruntime", precision="fp32") as fp32:
        ref = _run(fp32, dev)
    try:
        ov = Engine(default_bundle, backend="onnxruntime-openvino", precision="bf16")
    except BackendUnavailableError as e:
        pytest.skip(f"no native BF16 on this CPU: {e}")
    with ov:
        got = _run(ov, dev)
    same = sum((a.text, a.start) == (b.text, b.start) for a, b in zip(ref, got)) / len(dev)
    assert same >= 0.95, f"OpenVINO bf16 gives the fp32 answer for only {same:.0%} of the questions"
    assert _f1(dev, got) >= _f1(dev, ref) - 1.0


def _native_paths() -> list[str]:
    try:
        from engine import _encoder
    except ImportError:
        return []
    return list(_encoder.runnable_isas())


@pytest.mark.parametrize("isa", ["amx", "avx512_bf16", "avx512_vnni", "avx2_vnni", "avx2", "neon_i8mm", "neon", "generic"])
def test_native_int8_agrees_with_fp32_and_ignores_its_batch(default_bundle: Path, dev: list[SquadExample], isa: str) -> None:
    """Every path this CPU runs, on the real default model: native int8 gives ONNX Runtime fp32's
    answers (>= 95 %) and F1 within 1 point, and a question alone gets its batched answer bit for bit."""
    if isa not in _native_paths():
        pytest.skip(f"the native {isa} path cannot run here")
    questions = dev if isa != "generic" else dev[:40]  # the untuned path: fewer questions
    with Engine(default_bundle, backend="onnxruntime", precision="fp32") as fp32:
        ref = _run(fp32, questions)
    with Engine(default_bundle, backend="native", precision="int8", cpu_isa=isa) as nat:
        assert nat.backend_details["isa"] == isa
        got = _run(nat, questions)
        # one question at a time: the same answers and scores, bit for bit (no batch-dependent scales)
        for ex, a in list(zip(questions, got))[:10]:
            single = nat.answer(ex.question, ex.context)
            assert (single.text, single.start, single.score) == (a.text, a.start, a.score)
    same = sum((a.text, a.start) == (b.text, b.start) for a, b in zip(ref, got)) / len(questions)
    assert same >= 0.95, f"native int8 ({isa}) gives the fp32 answer for only {same:.0%} of the questions"
    assert _f1(questions, got) >= _f1(questions, ref) - 1.0
