"""Same answers as the Hugging Face question-answering pipeline (transformers 4.x), on a tiny
BERT exported to a bundle: text, offsets and scores, top-k, align_to_words and the null answer.

The tiny model's span head is scaled up so its probabilities are peaked: near-ties would make
the comparison depend on float rounding rather than on the rules being compared.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "QuestionAnsweringPipeline"):  # removed in transformers 5.3
    pytest.skip("this transformers has no question-answering pipeline", allow_module_level=True)

from runtime_helpers import TOKENIZER_JSON

from engine import Engine
from export.squad_data import load_squad

DEV = Path(__file__).resolve().parents[1] / "bench" / "data" / "squad" / "dev-v1.1.json.gz"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint folder, bundle folder) of a tiny random BERT span model."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    from export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("tiny_bert")
    ckpt = root / "checkpoint"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=512)
    model = BertForQuestionAnswering(cfg)
    with torch.no_grad():
        model.qa_outputs.weight.mul_(40.0)
    model.save_pretrained(ckpt)
    for name in TOKENIZER_FILES:
        src = TOKENIZER_JSON.parent / name
        if src.exists():
            shutil.copyfile(src, ckpt / name)
    bundle = export_bundle(ckpt, root / "bundle", ExportOptions(precisions=("fp32",), max_seq_len=384, quiet=True))
    return ckpt, bundle


@pytest.fixture(scope="module")
def hf_pipeline(tiny: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    import warnings

    from transformers import AutoTokenizer, BertForQuestionAnswering, pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForQuestionAnswering.from_pretrained(tiny[0]).eval()
        tok = AutoTokenizer.from_pretrained(tiny[0])
        return pipeline("question-answering", model=model, tokenizer=tok, device="cpu")


@pytest.fixture(scope="module")
def questions() -> list[tuple[str, str]]:
    """SQuAD dev questions whose context fits one 384-token window."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_JSON))
    tok.no_truncation()
    tok.no_padding()
    out, seen = [], set()
    for ex in load_squad(DEV):
        if ex.context in seen:
            continue
        seen.add(ex.context)
        if len(tok.encode(ex.question, ex.context).ids) <= 384:
            out.append((ex.question, ex.context))
        if len(out) == 12:
            break
    return out


def hf_call(pipe, q: str, c: str, **kw: object) -> list[dict]:  # type: ignore[no-untyped-def]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = pipe(question=q, context=c, **kw)
    return r if isinstance(r, list) else [r]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("align", [True, False])
def test_top_k_matches_the_pipeline(tiny, hf_pipeline, questions, backend: str, align: bool) -> None:  # type: ignore[no-untyped-def]
    with Engine(tiny[1], backend=backend, precision="fp32", threads=1) as eng:
        for q, c in questions:
            want = hf_call(hf_pipeline, q, c, top_k=3, max_answer_len=30, align_to_words=align)
            got = [a.to_dict() for a in eng.answer(q, c, top_k=3, max_answer_len=30, align_to_words=align)]
            assert [(d["answer"], d["start"], d["end"]) for d in got] == [(d["answer"], d["start"], d["end"]) for d in want]
            assert [d["score"] for d in got] == pytest.approx([d["score"] for d in want], rel=2e-3, abs=1e-6)


def test_handle_impossible_matches_the_pipeline(tiny, hf_pipeline, questions) -> None:  # type: ignore[no-untyped-def]
    with Engine(tiny[1], backend="torch", threads=1) as eng:
        for q, c in questions:
            want = hf_call(hf_pipeline, q, c, top_k=2, handle_impossible_answer=True, max_answer_len=15)
            got = [a.to_dict() for a in eng.answer(q, c, top_k=2, handle_impossible_answer=True, max_answer_len=15)]
            assert [(d["answer"], d["start"], d["end"]) for d in got] == [(d["answer"], d["start"], d["end"]) for d in want]
            assert [d["score"] for d in got] == pytest.approx([d["score"] for d in want], rel=2e-3, abs=1e-6)


def test_batched_answers_match_single_ones(tiny, questions) -> None:  # type: ignore[no-untyped-def]
    # padding to the batch's longest window must not change the answers of a real model
    with Engine(tiny[1], backend="onnxruntime", precision="fp32", threads=1) as eng:
        single = [eng.answer(q, c) for q, c in questions]
        batch = eng.answer([q for q, _ in questions], [c for _, c in questions])
    assert [(a.text, a.start, a.end) for a in batch] == [(a.text, a.start, a.end) for a in single]
    assert [a.score for a in batch] == pytest.approx([a.score for a in single], rel=1e-4)


def test_drop_in_pipeline_with_default_options(tiny, hf_pipeline, questions) -> None:  # type: ignore[no-untyped-def]
    from engine import pipeline

    qa = pipeline("question-answering", model=str(tiny[1]), backend="onnxruntime", precision="fp32", threads=1)
    try:
        for q, c in questions:
            (want,) = hf_call(hf_pipeline, q, c)  # the pipeline's defaults: max_answer_len=15, align_to_words=True
            got = qa(question=q, context=c)
            assert (got["answer"], got["start"], got["end"]) == (want["answer"], want["start"], want["end"])
            assert got["score"] == pytest.approx(want["score"], rel=2e-3, abs=1e-6)
    finally:
        qa.close()
