"""The export stage end to end on tiny randomly initialised span models built here (no download).

BERT, DistilBERT and ELECTRA use the project's shipped uncased WordPiece tokenizer (from
all-MiniLM-L6-v2, Apache-2.0); RoBERTa gets a byte-level BPE trained here on a few SQuAD train
contexts. The span heads are scaled up so that best spans are decided by clear margins, as in a
trained model, rather than by noise-level differences.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine.bundle import load_bundle  # noqa: E402
from engine.default_model import CHECKPOINT_DIR  # noqa: E402
from engine.errors import BackendUnavailableError, BundleError  # noqa: E402
from export.errors import ExportError, UnsupportedModelError, VerificationError  # noqa: E402
from export.pipeline import ExportOptions, export_bundle  # noqa: E402
from export.quantize import QuantConfig  # noqa: E402
from export.samples import SHIPPED_SAMPLE  # noqa: E402

WORDPIECE_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
SEQ = 128  # short windows keep these exports fast; 384 is exercised by the default model's tests


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_wordpiece(dst: Path) -> None:
    for name in WORDPIECE_FILES:
        if (CHECKPOINT_DIR / name).is_file():
            shutil.copyfile(CHECKPOINT_DIR / name, dst / name)


def _contexts(n: int) -> list[str]:
    with gzip.open(SHIPPED_SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["context"] for _, line in zip(range(n), f)]


def _bpe_tokenizer(dst: Path) -> int:
    """A byte-level BPE (RoBERTa style) trained on SQuAD train contexts; returns its size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_contexts(120), vocab_size=800, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    work = dst / "bpe"
    work.mkdir()
    bpe.save_model(str(work))
    tok = RobertaTokenizerFast.from_pretrained(str(work))  # the file-argument constructor changed in transformers 5
    tok.save_pretrained(str(dst))
    shutil.rmtree(work)
    return len(tok)


def make_checkpoint(root: Path, family: str, *, seed: int = 0) -> Path:
    """Save a tiny random ``family`` span model plus tokenizer files to ``root``."""
    import torch
    import transformers as tf

    root.mkdir(parents=True)
    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if family == "bert":
        _copy_wordpiece(root)
        model = tf.BertForQuestionAnswering(tf.BertConfig(vocab_size=30522, max_position_embeddings=512, **small))
    elif family == "distilbert":
        _copy_wordpiece(root)
        model = tf.DistilBertForQuestionAnswering(tf.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    elif family == "electra":
        _copy_wordpiece(root)
        model = tf.ElectraForQuestionAnswering(tf.ElectraConfig(vocab_size=30522, embedding_size=16, max_position_embeddings=512, **small))
    elif family == "roberta":
        size = _bpe_tokenizer(root)
        model = tf.RobertaForQuestionAnswering(tf.RobertaConfig(vocab_size=size, max_position_embeddings=514, pad_token_id=1,
                                                                bos_token_id=0, eos_token_id=2, type_vocab_size=1, **small))
    else:
        raise ValueError(family)
    with torch.no_grad():
        model.qa_outputs.weight.mul_(40.0)
    model.save_pretrained(str(root))
    return root


INPUTS = {
    "bert": ["input_ids", "attention_mask", "token_type_ids"],
    "distilbert": ["input_ids", "attention_mask"],
    "roberta": ["input_ids", "attention_mask"],
    "electra": ["input_ids", "attention_mask", "token_type_ids"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """family -> (checkpoint, bundle) exported with the default precisions (fp32 + int8)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family in INPUTS:
        ckpt = make_checkpoint(root / f"{family}-ckpt", family)
        out[family] = (ckpt, export_bundle(ckpt, root / f"{family}-bundle", ExportOptions(max_seq_len=SEQ, quiet=True)))
    return out


@pytest.mark.parametrize("family", list(INPUTS))
def test_bundle_structure_and_manifest(exported: dict[str, tuple[Path, Path]], family: str) -> None:
    ckpt, path = exported[family]
    b = load_bundle(path)  # the runtime's own loader, every sha256 checked
    m = b.manifest.to_json()  # the manifest as written
    assert b.model_type == family and m["architecture"].lower().startswith(family)
    assert list(b.input_names) == INPUTS[family]
    assert b.max_seq_len == SEQ
    assert b.precisions("onnx") == ("fp32", "int8")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.fp32.onnx", "model.int8.onnx", "model.native.npz",
                                                     "model.trt.fp16.onnx", "tokenizer.json"]
    assert b.precisions("native") == ("fp32",)  # the native encoder's float32 weights (every family)
    assert b.precisions("onnx-trt") == ("fp16",)  # the TensorRT input graph ships by default (build-trt on the target)
    assert m["source"]["weights_sha256"] == _sha(ckpt / "model.safetensors")
    for key in ("torch", "transformers", "onnx", "onnxruntime"):
        assert m["versions"][key]
    # The shipped MiniLM tokenizer.json pads/truncates to 128; the bundle's must do neither.
    tj = json.loads(b.tokenizer_path.read_text())
    assert tj["padding"] is None and tj["truncation"] is None
    fp32 = m["verification"]["onnx_fp32"]
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["span_agreement"] == 1.0
    assert m["verification"]["onnx_fp32_optimized"]["max_abs_diff"] <= 1e-4
    assert {tuple(s) for s in m["verification"]["shapes"]} >= {(1, 64), (4, SEQ), (8, SEQ)}
    fp32_info = b.find("onnx", "fp32").info
    # CPU graph: residual Add + LayerNormalization stay apart (2 per layer, + the embeddings' when not fused; ORT's CPU
    # SkipLayerNormalization kernel is the slower of the two), the runtime keeps them apart too.
    assert fp32_info["fusions"].get("LayerNormalization", 0) >= 4 and "SkipLayerNormalization" not in fp32_info["fusions"]
    attention = fp32_info["fusions"].get("Attention", 0)
    # transformers 4.x DistilBERT masks attention with Where(mask, -inf), a pattern ORT's attention
    # fusion does not match; whatever happened, the manifest must say it.
    assert attention == 2 or family == "distilbert"
    assert fp32_info["fusions_incomplete"] == (None if attention == 2 else {"Attention": attention})


@pytest.mark.parametrize("family", list(INPUTS))
def test_onnx_matches_pytorch_on_fresh_inputs(exported: dict[str, tuple[Path, Path]], family: str) -> None:
    """An oracle independent of the export's own figures: a new shape, padding, both graphs."""
    import onnxruntime as ort
    import torch
    import transformers as tf

    ckpt, path = exported[family]
    b = load_bundle(path)
    model = getattr(tf, b.manifest.architecture).from_pretrained(str(ckpt), attn_implementation="eager").eval()
    rng = np.random.default_rng(1)
    ids = rng.integers(5, min(b.vocab_size, 30000), size=(3, 53)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 40:] = 0
    mask[2, 20:] = 0
    ids[mask == 0] = b.pad_token_id
    types = np.zeros_like(ids)
    types[:, 10:] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    feeds = {k: feeds[k] for k in b.input_names}
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    ref = (out.start_logits.numpy(), out.end_logits.numpy())
    valid = mask.astype(bool)
    for precision, tol in (("fp32", 1e-4), ("int8", None)):
        sess = ort.InferenceSession(str(b.find("onnx", precision).path), providers=["CPUExecutionProvider"])
        got = sess.run(["start_logits", "end_logits"], feeds)
        diff = max(float(np.abs(r - g)[valid].max()) for r, g in zip(ref, got))
        if tol is not None:
            assert diff <= tol, (precision, diff)
        else:  # int8: close, not exact, and the same best start/end token on most rows
            scale = max(float(np.abs(r[valid]).max()) for r in ref)
            assert diff < 0.25 * scale, (diff, scale)


@pytest.mark.parametrize("family", list(INPUTS))
def test_int8_gives_the_same_best_span_on_most_cases(exported: dict[str, tuple[Path, Path]], family: str) -> None:
    b = load_bundle(exported[family][1])
    figures = b.manifest.verification["onnx_int8"]
    assert figures["rows"] >= 16
    assert figures["span_agreement"] >= 0.75
    q = b.find("onnx", "int8").info["quantization"]
    assert q["recipe"] == "dynamic" and q["per_channel"] is True
    assert q["excluded_nodes"], "the span head stays fp32"


def test_damaged_export_is_caught_at_load(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(exported["bert"][1], tmp_path / "copy"))
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.int8\.onnx: sha256 mismatch"):
        load_bundle(copy)


def test_existing_target_needs_force_and_force_replaces(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    ckpt = exported["bert"][0]
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stray.txt").write_text("not a bundle")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_bundle(ckpt, out, ExportOptions(max_seq_len=SEQ, precisions=("fp32",), quiet=True))
    with pytest.raises(ExportError, match="is not a SpanRT bundle; refusing to delete it"):
        export_bundle(ckpt, out, ExportOptions(max_seq_len=SEQ, precisions=("fp32",), quiet=True, force=True))
    (out / "stray.txt").unlink()
    export_bundle(ckpt, out, ExportOptions(max_seq_len=SEQ, precisions=("fp32",), quiet=True, force=True))
    assert load_bundle(out).precisions("onnx") == ("fp32",)
    export_bundle(ckpt, out, ExportOptions(max_seq_len=SEQ, precisions=("fp32", "fp16"), quiet=True, force=True))
    import onnx

    b16 = load_bundle(out)
    assert b16.precisions("onnx") == ("fp32", "fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "no temporary folders left behind"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.fp16.onnx", "model.fp32.onnx", "model.native.npz",
                                                    "model.trt.fp16.onnx", "tokenizer.json"]
    ops = {n.op_type for n in onnx.load(str(b16.find("onnx", "fp16").path)).graph.node}
    cpu_ops = {n.op_type for n in onnx.load(str(b16.find("onnx", "fp32").path)).graph.node}
    # the GPU graph fuses residual + LayerNorm (fast on CUDA); the CPU graph does not
    assert "SkipLayerNormalization" in ops and "SkipLayerNormalization" not in cpu_ops and "LayerNormalization" in cpu_ops


def test_failed_verification_writes_nothing(exported: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import export.onnx as onnx_export

    real = onnx_export.torch_logits
    monkeypatch.setattr(onnx_export, "torch_logits", lambda model, batch: tuple(x + 1e-3 for x in real(model, batch)))
    with pytest.raises(VerificationError, match=r"ONNX fp32 failed verification.*max abs logit difference .* > 0\.0001; no bundle was written"):
        export_bundle(exported["bert"][0], tmp_path / "b", ExportOptions(max_seq_len=SEQ, quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_model_without_span_head_is_refused(tmp_path: Path) -> None:
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertModel

    torch.manual_seed(0)
    base = tmp_path / "base"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(base)
    _copy_wordpiece(base)
    with pytest.raises(UnsupportedModelError, match=r"BertModel has no span head .*BertForQuestionAnswering"):
        export_bundle(base, tmp_path / "out", ExportOptions(max_seq_len=SEQ, quiet=True))
    # A config that claims a span head over a base encoder's weights: transformers would fill the
    # head with random numbers; the export refuses instead.
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = [BertForQuestionAnswering.__name__]
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"span head weights .*qa_outputs.* are not in the checkpoint"):
        export_bundle(base, tmp_path / "out", ExportOptions(max_seq_len=SEQ, quiet=True))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    ckpt = tmp_path / "gpt2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2ForQuestionAnswering"]}))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*not supported.*BertForQuestionAnswering.*DistilBertForQuestionAnswering"
                                                    r".*RobertaForQuestionAnswering.*ElectraForQuestionAnswering"):
        export_bundle(ckpt, tmp_path / "out", ExportOptions(quiet=True))
    with pytest.raises(ExportError, match="no config.json"):
        export_bundle(tmp_path / "nothing", tmp_path / "out", ExportOptions(quiet=True))


def test_max_seq_len_beyond_positions_is_refused(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="exceeds the model's 512 positions"):
        export_bundle(exported["roberta"][0], tmp_path / "out", ExportOptions(max_seq_len=513, quiet=True))


def test_static_int8_and_tensorrt_graphs(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    import onnx

    opts = ExportOptions(max_seq_len=SEQ, precisions=("int8",), int8=QuantConfig(recipe="static"), calibration_samples=16,
                         tensorrt_onnx=("fp16", "int8"), quiet=True)
    b = load_bundle(export_bundle(exported["bert"][0], tmp_path / "b", opts))
    assert b.precisions("onnx") == ("int8",) and b.precisions("onnx-trt") == ("fp16", "int8")
    q = b.find("onnx", "int8").info["quantization"]
    assert q["recipe"] == "static" and q["calibration_batches"] == 16
    assert b.manifest.verification["onnx_int8"]["span_agreement"] >= 0.75

    # FP16 TensorRT graph: LayerNorm and Softmax compute in fp32 (Cast islands), I/O stays fp32.
    g16 = onnx.shape_inference.infer_shapes(onnx.load(str(b.find("onnx-trt", "fp16").path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*g16.graph.value_info, *g16.graph.input, *g16.graph.output]}
    sensitive = [n for n in g16.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert sensitive and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in sensitive)
    matmul_w = [i for i in g16.graph.initializer if len(i.dims) == 2 and i.dims[-1] != 2]
    assert matmul_w and all(i.data_type == onnx.TensorProto.FLOAT16 for i in matmul_w)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in g16.graph.output)
    assert b.manifest.verification["onnx_trt_fp16"]["span_agreement"] >= 0.9

    # INT8 TensorRT graph: symmetric int8 Q/DQ (zero points all 0), per-channel weights.
    g8 = onnx.load(str(b.find("onnx-trt", "int8").path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g8.graph.initializer}
    qnodes = [n for n in g8.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qnodes
    for n in qnodes:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    assert any(inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1 for n in qnodes), "per-channel weight scales"


def test_tensorrt_plans_without_tensorrt_fail_before_any_work(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'spanrt\[tensorrt\]'"):
        export_bundle(exported["bert"][0], tmp_path / "b", ExportOptions(max_seq_len=SEQ, tensorrt=("fp16",), quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_calibration_data_options(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    ckpt = exported["bert"][0]
    with pytest.raises(ExportError, match="not found"):
        export_bundle(ckpt, tmp_path / "a", ExportOptions(max_seq_len=SEQ, calibration_data=str(tmp_path / "none.json"), quiet=True))
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": c, "qas": [{"id": f"q{i}", "question": "What does the river do?", "answers": [{"text": c.split()[0], "answer_start": 0}]}]}
        for i, c in enumerate(_contexts(60))]}]}
    path = tmp_path / "train-sample.json"
    path.write_text(json.dumps(squad))
    opts = ExportOptions(max_seq_len=SEQ, precisions=("int8",), int8=QuantConfig(recipe="static"), calibration_data=str(path),
                         calibration_samples=8, quiet=True)
    b = load_bundle(export_bundle(ckpt, tmp_path / "b", opts))
    assert b.manifest.verification["data"] == str(path)
    with pytest.raises(ExportError, match=r"--calibration-samples 100 > the 28 pairs available"):
        export_bundle(ckpt, tmp_path / "c", ExportOptions(max_seq_len=SEQ, precisions=("int8",), int8=QuantConfig(recipe="static"),
                                                         calibration_data=str(path), calibration_samples=100, quiet=True))


def test_cli_export_and_errors(exported: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main

    ckpt = exported["distilbert"][0]
    assert main([str(ckpt), "--out", str(tmp_path / "b"), "--precisions", "fp32", "--max-seq-len", str(SEQ), "--quiet"]) == 0
    assert load_bundle(tmp_path / "b").precisions("onnx") == ("fp32",)
    assert main([str(ckpt), "--out", str(tmp_path / "b"), "--quiet"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(ckpt), "--out", str(tmp_path / "c"), "--precisions", "fp64"])


def test_accuracy_figures_are_recorded(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    figures = {"int8": {"onnxruntime-cpu": {"dataset": "squad-v1.1-dev", "exact_match": 70.0, "f1": 80.0}}}
    b = load_bundle(export_bundle(exported["bert"][0], tmp_path / "b", ExportOptions(max_seq_len=SEQ, precisions=("fp32",),
                                                                                    tensorrt_onnx=(), accuracy=figures, quiet=True)))
    assert b.manifest.accuracy == figures and b.precisions("onnx-trt") == ()


def test_record_accuracy_keeps_the_bundle_valid(exported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from export.bundle import record_accuracy

    copy = Path(shutil.copytree(exported["electra"][1], tmp_path / "copy"))
    record_accuracy(copy, "int8", {"dataset": "squad-v1.1-dev", "exact_match": 70.0, "f1": 80.0})
    assert load_bundle(copy).manifest.accuracy["int8"]["onnxruntime-cpu"]["f1"] == 80.0
