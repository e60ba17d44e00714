"""XLM-RoBERTa, CamemBERT, ALBERT, MPNet, DeBERTa-v2 (v3 settings) and ModernBERT, end to end:
tiny random checkpoint + locally trained tokenizer (tests/family_checkpoints.py) -> export (fp32,
int8, fp16, TensorRT fp16 graph, each verified against PyTorch) -> bundle -> ``Engine.answer``,
against the transformers question-answering pipeline (4.57) on the same checkpoint.

The pairs: SQuAD v1.1 dev questions whose context fits one 384-token window under the family's
tokenizer (the pipeline adds an answer's scores across overlapping windows, SpanRT keeps the
larger, by design), plus the edge cases of family_checkpoints.EDGE_CASES (spacing, "▁", accents,
CJK, emoji, right-to-left text).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "QuestionAnsweringPipeline"):  # removed in transformers 5.3
    pytest.skip("this transformers has no question-answering pipeline", allow_module_level=True)

from family_checkpoints import EDGE_CASES, FAMILIES, make_checkpoint  # noqa: E402

from engine import Engine  # noqa: E402
from engine.bundle import load_bundle  # noqa: E402
from engine.native_weights import FAMILIES as NATIVE_FAMILIES  # noqa: E402
from engine.postprocess import whole_characters  # noqa: E402
from engine.preprocess import TextEncoder  # noqa: E402
from export.onnx import SUPPORTED  # noqa: E402
from export.pipeline import ExportOptions, export_bundle  # noqa: E402
from export.squad_data import load_squad  # noqa: E402

DEV = Path(__file__).resolve().parents[1] / "bench" / "data" / "squad" / "dev-v1.1.json.gz"
SEQ = 384
SQUAD_PAIRS = 45  # + len(EDGE_CASES) = 57 pairs per family
TIE = 1e-4  # relative: answers the pipeline scores this close are a tie it cannot order


class Family:
    """One family's checkpoint, bundle, transformers pipeline and question/context pairs."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.ckpt = make_checkpoint(root / f"{name}-checkpoint", name)
        self.bundle = export_bundle(self.ckpt, root / f"{name}-bundle",
                                    ExportOptions(precisions=("fp32", "int8", "fp16"), max_seq_len=SEQ, quiet=True))
        self._pipeline: Any = None
        self._pairs: list[tuple[str, str]] | None = None

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForQuestionAnswering.from_pretrained(self.ckpt, attn_implementation="eager").eval()
                tok = AutoTokenizer.from_pretrained(self.ckpt)
                self._pipeline = pipeline("question-answering", model=model, tokenizer=tok, device="cpu")
        return self._pipeline

    @property
    def pairs(self) -> list[tuple[str, str]]:
        if self._pairs is None:
            tok = self.pipeline.tokenizer
            out, seen = [], set()
            for ex in load_squad(DEV):
                if ex.context in seen:
                    continue
                seen.add(ex.context)
                if len(tok(ex.question, ex.context)["input_ids"]) <= SEQ:
                    out.append((ex.question, ex.context))
                if len(out) == SQUAD_PAIRS:
                    break
            self._pairs = out + [(q, c) for _, q, c in EDGE_CASES]
        return self._pairs

    def hf(self, question: str, context: str, **kw: Any) -> list[dict[str, Any]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = self.pipeline(question=question, context=context, max_seq_len=SEQ, **kw)
        return r if isinstance(r, list) else [r]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    """The pipeline's tiny models on one torch thread: on a shared 2-core machine two threads
    spin against other processes (measured: 116-147 ms per pipeline call instead of 5-8)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Each family, built and exported once for the module (pytest groups the tests by family)."""
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def _spans(answers: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    return [(d["answer"], d["start"], d["end"]) for d in answers]


def _as_spanrt(answers: list[dict[str, Any]], context: str) -> list[dict[str, Any]]:
    """The pipeline's answers as SpanRT gives them: widened to whole characters (an answer never
    starts or ends inside a ZWJ emoji sequence or before a combining mark: engine.postprocess),
    then answers that became the same text merged as the pipeline merges same-text answers
    (scores added), best first. Fewer than it got when two merged: SpanRT's next answer is one
    the pipeline did not return, so only this many are compared."""
    merged: dict[str, dict[str, Any]] = {}
    for d in answers:
        a, z = whole_characters(context, d["start"], d["end"]) if d["answer"] else (d["start"], d["end"])
        key = context[a:z].lower()
        if key in merged:
            merged[key]["score"] += d["score"]
        else:
            merged[key] = {"answer": context[a:z], "start": a, "end": z, "score": d["score"]}
    return sorted(merged.values(), key=lambda d: -d["score"])


def test_fp32_answers_equal_the_pipeline(fam: Family) -> None:
    f, family = fam, fam.name
    assert len(f.pairs) >= 50
    compared = ties = 0
    with Engine(f.bundle, backend="onnxruntime", precision="fp32", threads=1) as eng:
        for align in (True, False):
            for q, c in f.pairs:
                kw: dict[str, Any] = {"max_answer_len": 30, "align_to_words": align}
                want = _as_spanrt(f.hf(q, c, top_k=3, **kw), c)
                got = [a.to_dict() for a in eng.answer(q, c, top_k=3, max_seq_len=SEQ, **kw)]
                assert len(got) >= len(want)
                deeper: dict[tuple[str, int, int], float] | None = None
                for g, w in zip(got, want):
                    compared += 1
                    if align:
                        # spans that snap to the same words add up; SpanRT looks further down the
                        # candidates for them than the pipeline's top_k (engine.api), never less
                        assert g["score"] >= w["score"] * (1 - 2e-3), (family, q, c, g, w)
                    else:
                        assert g["score"] == pytest.approx(w["score"], rel=2e-3, abs=1e-6), (family, q, c, g, w)
                    if _spans([g]) == _spans([w]):
                        continue
                    # Another answer only where the pipeline scores it the same (a tie it cannot
                    # order: DeBERTa's relative positions give repeated words near-equal logits).
                    if deeper is None:
                        deeper = {_spans([d])[0]: d["score"] for d in _as_spanrt(f.hf(q, c, top_k=8, **kw), c)}
                    (key,) = _spans([g])
                    assert key in deeper and deeper[key] == pytest.approx(w["score"], rel=TIE), (family, align, q, c, g, w)
                    ties += 1
    assert ties <= compared // 50, f"{ties} ties in {compared} answers"


def test_pipeline_defaults_and_the_null_answer(fam: Family) -> None:
    from engine import pipeline

    f, family = fam, fam.name
    qa = pipeline("question-answering", model=str(f.bundle), backend="onnxruntime", precision="fp32", threads=1)
    try:
        for q, c in f.pairs[::3]:
            want = _as_spanrt(f.hf(q, c), c)  # max_answer_len=15, align_to_words=True
            got = qa(question=q, context=c, max_seq_len=SEQ)
            assert _spans([got]) == _spans(want)
            want2 = _as_spanrt(f.hf(q, c, top_k=2, handle_impossible_answer=True), c)
            got2 = qa(question=q, context=c, top_k=2, handle_impossible_answer=True, max_seq_len=SEQ)
            assert _spans(got2[: len(want2)]) == _spans(want2)
    finally:
        qa.close()


@pytest.mark.parametrize("precision", ["fp32", "int8"])  # fp16 is for GPUs (verified by the export on ONNX Runtime CPU)
def test_answers_slice_the_context(fam: Family, precision: str) -> None:
    # context[start:end] == text for every answer of every precision, whatever the spacing and script
    f, family = fam, fam.name
    with Engine(f.bundle, backend="onnxruntime", precision=precision, threads=1) as eng:
        assert eng.precision == precision
        for _, q, c in EDGE_CASES:
            for align in (True, False):
                answers = eng.answer(q, c, top_k=5, max_answer_len=30, align_to_words=align)
                assert answers
                for a in answers:
                    assert 0 <= a.start < a.end <= len(c) and c[a.start : a.end] == a.text, (family, q, c, a)


def test_word_spans_are_the_pipeline_words(fam: Family) -> None:
    # align_to_words snaps a token to its word's characters: SpanRT's word spans (context encoded
    # alone) equal transformers' token_to_word/word_to_chars on the pipeline's pair encoding
    f, family = fam, fam.name
    tok = f.pipeline.tokenizer
    enc = TextEncoder(load_bundle(f.bundle).tokenizer_path)
    for _, q, c in EDGE_CASES:
        _, (ctx,) = enc.encode([q], [c])
        be = tok(q, c, return_offsets_mapping=True)
        seq = be.sequence_ids(0)
        positions = [i for i, s in enumerate(seq) if s == 1]
        assert len(positions) == len(ctx.ids)
        starts, ends = ctx.word_char_spans
        for k, i in enumerate(positions):
            assert tuple(ctx.offsets[k]) == tuple(be["offset_mapping"][i])
            word = be.token_to_word(i)
            span = be.word_to_chars(word, sequence_index=1)
            assert (starts[k], ends[k]) == (span.start, span.end), (family, c, k)


def test_manifest_records_the_family(fam: Family) -> None:
    f, family = fam, fam.name
    b = load_bundle(f.bundle)
    m = b.manifest.to_json()  # the manifest as written
    entry = SUPPORTED[family]
    assert m["model_type"] == family and m["architecture"] == entry.architecture
    assert b.precisions("onnx") == ("fp32", "int8", "fp16") and b.precisions("onnx-trt") == ("fp16",)
    config = json.loads((f.ckpt / "config.json").read_text())
    types = "token_type_ids" in entry.input_names and config.get("type_vocab_size", 1) > 0
    assert list(b.input_names) == ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])
    v = m["verification"]
    for key in ("onnx_fp32", "onnx_fp32_optimized"):
        assert v[key]["max_abs_diff"] <= 1e-4 and v[key]["span_agreement"] == 1.0
    assert v["onnx_int8"]["span_agreement"] >= 0.5 and v["onnx_fp16"]["span_agreement"] >= 0.9
    fp32 = b.find("onnx", "fp32").info
    int8 = b.find("onnx", "int8").info
    assert int8["quantization"]["recipe"] == "dynamic" and int8["quantization"]["per_channel"] is True
    if entry.optimizer:
        assert fp32["optimized"] is True and "bert fusions" in fp32["optimizer"]
        assert fp32["fusions"].get("LayerNormalization", 0) >= 2 * config["num_hidden_layers"]
    else:
        assert fp32["optimized"] is False and fp32["optimizer"].startswith("none: plain traced graph") and fp32["fusions"] == {}
    attention = fp32["fusions"].get("Attention", 0)
    if entry.attention_fuses:  # ALBERT: the layer after the embedding projection does not match ORT's pattern
        assert attention == config["num_hidden_layers"] or (family == "albert" and attention == config["num_hidden_layers"] - 1)
    else:
        assert attention == 0
    # the native encoder: written where its mapping covers the family (the tiny ALBERT uses gelu_new,
    # as real ALBERT checkpoints do: the encoder computes GELU's tanh approximation too), else not,
    # and the manifest says why
    if family in NATIVE_FAMILIES:
        assert b.precisions("native") == ("fp32",) and m["native_encoder"] == {"written": True}
        assert "native" in v
    else:
        assert b.precisions("native") == () and m["native_encoder"]["written"] is False
        why = entry.not_native
        assert m["native_encoder"]["reason"] == f"{family}: {why}"


def test_auto_picks_a_backend_that_runs_the_bundle_and_says_why(fam: Family) -> None:
    f = fam
    b = load_bundle(f.bundle)
    native_here = _native_runs_here()
    with Engine(f.bundle, backend="auto", threads=1) as eng:
        if b.precisions("native") and native_here is None:
            assert eng.backend == "native"
        else:
            assert eng.backend == "onnxruntime"
            (note,) = [n for n in eng.backend_notes if n.startswith("native:")]
            record = b.manifest.native_encoder
            assert (native_here or "") in note if record["written"] else record["reason"] in note
        q, c = f.pairs[0]
        assert eng.answer(q, c).text


def test_native_fp32_answers_equal_onnxruntime_fp32(fam: Family) -> None:
    # where the export wrote native weights (XLM-RoBERTa, CamemBERT), the native encoder answers
    # as the verified ONNX graph does (the export checked its logits against PyTorch too)
    f = fam
    if not load_bundle(f.bundle).precisions("native"):
        pytest.skip(f"no native weights for {f.name}: {load_bundle(f.bundle).manifest.native_encoder['reason']}")
    if _native_runs_here() is not None:
        pytest.skip(f"the native encoder does not run here: {_native_runs_here()}")
    with Engine(f.bundle, backend="onnxruntime", precision="fp32", threads=1) as ort, \
            Engine(f.bundle, backend="native", precision="fp32", threads=1) as native:
        qs, cs = [q for q, _ in f.pairs], [c for _, c in f.pairs]
        want, got = ort.answer_batch(qs, cs, top_k=3), native.answer_batch(qs, cs, top_k=3)
    assert [[(a.text, a.start, a.end) for a in r] for r in got] == [[(a.text, a.start, a.end) for a in r] for r in want]
    for r, w in zip(got, want):
        assert [a.score for a in r] == pytest.approx([a.score for a in w], rel=1e-3)


def _native_runs_here() -> str | None:
    """None when "auto" would use the native encoder on this CPU, else why not."""
    from engine.backends.native import auto_skip_reason
    from engine.errors import BackendUnavailableError

    try:
        return auto_skip_reason()
    except BackendUnavailableError as e:
        return str(e)


def test_unsupported_model_type_lists_every_family(tmp_path: Path) -> None:
    from export.errors import UnsupportedModelError
    from export.onnx import inspect_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError) as e:
        inspect_checkpoint(tmp_path)
    for model_type, fam in SUPPORTED.items():
        assert f"{fam.architecture} ({model_type})" in str(e.value)
    assert "'gpt2'" in str(e.value)


def test_the_pair_template_is_read_when_short_texts_take_several_tokens(tmp_path: Path) -> None:
    # a SentencePiece vocabulary without "▁a" splits "a" into "▁" + "a": the layout is still read
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from engine.preprocess import learn_template

    vocab = [("<unk>", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("▁", -1.0), ("a", -2.0), ("b", -2.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    assert tok.encode("a", add_special_tokens=False).tokens == ["▁", "a"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    t = learn_template(tok, tmp_path / "tokenizer.json")
    assert (t.prefix.tolist(), t.middle.tolist(), t.suffix.tolist()) == ([1], [2], [2])
    assert (t.prefix_types.tolist(), t.middle_types.tolist(), t.suffix_types.tolist()) == ([0], [0], [1])
    assert (t.question_type, t.context_type, t.num_special) == (0, 1, 3)
    assert isinstance(t.prefix, np.ndarray)
