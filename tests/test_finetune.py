"""Fine-tuning: span targets against the gold answers, and an interrupted run resumed exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.default_model import CHECKPOINT_DIR  # noqa: E402
from export.finetune import FinetuneConfig, build_features, train  # noqa: E402
from export.squad_data import load_squad  # noqa: E402

CONTEXTS = [
    "The Amazon rainforest covers much of the Amazon basin of South America. "
    "This basin encompasses 7,000,000 square kilometres, of which 5,500,000 are covered by the rainforest.",
    "Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903 "
    "and the Nobel Prize in Chemistry in 1911, and she remains the only person to win in two sciences.",
]
QAS = [
    (0, "How many square kilometres does the basin encompass?", "7,000,000"),
    (0, "Which continent is the Amazon basin in?", "South America"),
    (1, "Where was Marie Curie born?", "Warsaw"),
    (1, "When did Curie win the chemistry prize?", "1911"),
    (1, "What is Curie the only person to do?", "win in two sciences"),
]


def _squad_file(path: Path, repeat: int = 8) -> Path:
    paragraphs = []
    for c_idx, ctx in enumerate(CONTEXTS):
        qas = []
        for n in range(repeat):
            for q_idx, (ci, q, a) in enumerate(QAS):
                if ci == c_idx:
                    qas.append({"id": f"q{q_idx}-{n}", "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}]})
        paragraphs.append({"context": ctx, "qas": qas})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def _tiny_model_dir(path: Path) -> Path:
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertForQuestionAnswering(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(CHECKPOINT_DIR / name, path / name)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    _tiny_model_dir(root / "model")
    _squad_file(root / "train.json")
    return root


def _config(root: Path, out: str, **kw: object) -> FinetuneConfig:
    base = dict(model_dir=str(root / "model"), train_files=[str(root / "train.json")], out_dir=str(root / out),
                max_seq_len=48, doc_stride=16, max_steps=4, batch_size=4, save_every=2, warmup_ratio=0.25, threads=1)
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_targets_point_at_the_answer_tokens_or_cls(workdir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    cfg = _config(workdir, "unused")
    examples = load_squad(workdir / "train.json")
    feats = build_features(examples[:5], tok, cfg)
    assert len(feats) > 5, "short windows must split the contexts into several windows"
    with_answer = [f for f in feats if f.start > 0]
    assert with_answer and len(with_answer) < len(feats), "some windows hold the answer, some point at [CLS]"
    golds = {a.lower().replace(" ", "") for _, _, a in QAS}
    for f in feats:
        assert 0 <= f.start <= f.end < len(f.input_ids)
        if f.start > 0:
            text = tok.decode(f.input_ids[f.start : f.end + 1].tolist()).replace(" ", "")
            assert text in golds, text
            assert f.token_type_ids[f.start] == 1


def test_resume_continues_the_interrupted_run_exactly(workdir: Path) -> None:
    from safetensors.torch import load_file

    straight = train(_config(workdir, "straight"))
    resumed_dir = workdir / "resumed"
    train(_config(workdir, "resumed"))
    # simulate a stop after step 2: drop what came later, then resume
    shutil.rmtree(resumed_dir / "checkpoint-4")
    shutil.rmtree(resumed_dir / "final")
    resumed = train(_config(workdir, "resumed"), resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    init = load_file(workdir / "model" / "model.safetensors")
    assert any(not torch.equal(init[k], a[k]) for k in a if k in init), "training changed no weight"
    assert "resumed from" in (resumed_dir / "train.log").read_text()


def test_resume_refuses_a_changed_recipe(workdir: Path) -> None:
    train(_config(workdir, "changed", max_steps=2))
    with pytest.raises(ValueError, match="learning_rate"):
        train(_config(workdir, "changed", max_steps=2, learning_rate=5e-4), resume=True)
