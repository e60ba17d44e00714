"""engine.bundle: loading and verifying bundles, and every way a bundle can be damaged or wrong.

The bundles here are written by hand (no torch, no export): a real tokenizer.json built with the
tokenizers library from a small vocabulary, and model files whose bytes only need a sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from engine.bundle import Bundle, check_tensorrt_plan, load_bundle, load_manifest
from engine.manifest import FORMAT_VERSION
from engine.errors import BundleError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "river", "flows", "north", "##s", "what", "?", "."]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_tokenizer(path: Path, vocab: list[str] = VOCAB) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tok.save(str(path))


def tiny_onnx(precision: str) -> bytes:
    """A few-node ONNX graph of this precision: fp32 (float weights), int8 (a quantized operator),
    fp16 (float16 weights), as the bundle loader tells them apart."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    if precision == "int8":
        inits = [numpy_helper.from_array(np.array(0.5, np.float32), "scale"), numpy_helper.from_array(np.array(0, np.int8), "zero")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]
    else:
        dtype = np.float16 if precision == "fp16" else np.float32
        inits = [numpy_helper.from_array(np.ones(1, dtype), "w")]
        nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "w32"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, f"tiny_{precision}", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def make_bundle(root: Path, **overrides: Any) -> Path:
    """A valid bundle at root: tokenizer, two tiny ONNX graphs, one TensorRT-like plan."""
    root.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(root / "tokenizer.json")
    files = {"model.fp32.onnx": tiny_onnx("fp32"), "model.int8.onnx": tiny_onnx("int8"), "model.fp16.plan": b"plan" * 10}
    for name, data in files.items():
        (root / name).write_bytes(data)
    manifest: dict[str, Any] = {
        "format": "spanrt-bundle", "format_version": FORMAT_VERSION, "model_type": "bert",
        "architecture": "BertForQuestionAnswering", "max_seq_len": 384, "vocab_size": len(VOCAB), "do_lower_case": True,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"], "outputs": ["start_logits", "end_logits"],
        "tokenizer": {"path": "tokenizer.json", "sha256": _sha(root / "tokenizer.json"), "cls_token": "[CLS]", "cls_token_id": 2,
                      "sep_token": "[SEP]", "sep_token_id": 3, "pad_token": "[PAD]", "pad_token_id": 0},
        "artifacts": [
            {"path": "model.fp32.onnx", "format": "onnx", "precision": "fp32", "sha256": _sha(root / "model.fp32.onnx")},
            {"path": "model.int8.onnx", "format": "onnx", "precision": "int8", "sha256": _sha(root / "model.int8.onnx")},
            {"path": "model.fp16.plan", "format": "tensorrt", "precision": "fp16", "sha256": _sha(root / "model.fp16.plan"),
             "tensorrt_version": "10.3.0", "compute_capability": "8.7", "profiles": [[1, 64, 64], [65, 384, 384]], "max_batch_size": 32},
        ],
    }
    manifest.update(overrides)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def edit_manifest(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_valid_bundle_loads_with_absolute_paths_and_lookups(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    b = load_bundle(root)
    assert isinstance(b, Bundle)
    assert b.root == root.resolve() and b.model_type == "bert" and b.max_seq_len == 384 and b.vocab_size == len(VOCAB)
    assert b.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert b.output_names == ("start_logits", "end_logits")
    assert (b.cls_token_id, b.sep_token_id, b.pad_token_id) == (2, 3, 0)
    assert b.tokenizer_path == root.resolve() / "tokenizer.json"
    assert b.find("onnx", "int8").path == root.resolve() / "model.int8.onnx"
    assert b.find("onnx", "fp16") is None
    assert b.precisions("onnx") == ("fp32", "int8")
    assert b.precisions("tensorrt") == ("fp16",)
    assert b.do_lower_case is True
    # load_manifest accepts the folder or the manifest file and returns the checked manifest
    assert load_manifest(root).model_type == "bert"
    assert load_manifest(root / "manifest.json").vocab_size == len(VOCAB)


@pytest.mark.parametrize("damage", ["missing", "altered", "truncated"])
def test_damaged_artifact_is_named_with_the_fix(tmp_path: Path, damage: str) -> None:
    root = make_bundle(tmp_path / "b")
    f = root / "model.int8.onnx"
    if damage == "missing":
        f.unlink()
    elif damage == "altered":
        data = bytearray(f.read_bytes())
        data[10] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(BundleError, match=r"model\.int8\.onnx.*(missing|sha256 mismatch).*python -m export"):
        load_bundle(root)
    with pytest.raises(BundleError, match=r"model\.int8\.onnx"):
        load_manifest(root)


def test_verify_false_skips_hashing_but_not_existence(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    (root / "model.fp32.onnx").write_bytes(b"altered")
    assert load_bundle(root, verify=False).find("onnx", "fp32") is not None
    (root / "model.fp32.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(root, verify=False)


def test_altered_tokenizer_is_caught(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    (root / "tokenizer.json").write_text((root / "tokenizer.json").read_text().replace("river", "rover"))
    with pytest.raises(BundleError, match=r"tokenizer\.json.*sha256"):
        load_bundle(root)


def test_newer_format_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match=r"format version 2 is newer.*upgrade spanrt"):
        load_bundle(root)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe", ""])
def test_malformed_manifest_json(tmp_path: Path, text: str) -> None:
    root = make_bundle(tmp_path / "b")
    (root / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError, match=r"manifest\.json: malformed"):
        load_bundle(root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("vocab_size"), "missing key 'vocab_size'"),
        (lambda m: m.update(max_seq_len="384"), "'max_seq_len' is str"),
        (lambda m: m.update(max_seq_len=True), "'max_seq_len' is bool"),
        (lambda m: m.update(max_seq_len=0), "must be between 1 and"),
        (lambda m: m.update(format="other"), "not a SpanRT bundle"),
        (lambda m: m.update(model_type="gpt2"), "unsupported model_type 'gpt2'"),
        (lambda m: m.update(inputs=["input_ids", "pixel_values"]), "malformed: inputs"),
        (lambda m: m.update(outputs=["logits"]), "malformed: outputs"),
        (lambda m: m["artifacts"][0].update(precision="int4"), "unknown format/precision"),
        (lambda m: m["artifacts"][0].update(sha256="abc"), "sha256 'abc'"),
        (lambda m: m["artifacts"].append(dict(m["artifacts"][0])), "two artifacts with format 'onnx' and precision 'fp32'"),
        (lambda m: m.update(artifacts=[]), "lists no model artifacts"),
        (lambda m: m["tokenizer"].pop("pad_token_id"), "missing key tokenizer.'pad_token_id'"),
    ],
)
def test_malformed_manifest_fields(tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str) -> None:
    root = make_bundle(tmp_path / "b")
    edit_manifest(root, change)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_bundle(root)


@pytest.mark.parametrize("bad_path", ["../outside.onnx", "sub/../../outside.onnx", "/etc/passwd", "C:\\model.onnx", "..\\outside.onnx"])
def test_paths_outside_the_bundle_are_refused(tmp_path: Path, bad_path: str) -> None:
    root = make_bundle(tmp_path / "b")
    (tmp_path / "outside.onnx").write_bytes(b"x")
    edit_manifest(root, lambda m: m["artifacts"][0].update(path=bad_path))
    with pytest.raises(BundleError, match=r"(outside the bundle|absolute)"):
        load_bundle(root, verify=False)


def test_symlink_leaving_the_bundle_is_refused(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    secret = tmp_path / "secret.onnx"
    secret.write_bytes((root / "model.fp32.onnx").read_bytes())
    (root / "model.fp32.onnx").unlink()
    os.symlink(secret, root / "model.fp32.onnx")
    with pytest.raises(BundleError, match="outside the bundle folder"):
        load_bundle(root)


def test_tokenizer_of_another_vocabulary_size_is_refused(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    _write_tokenizer(root / "tokenizer.json", VOCAB + ["extra"])
    edit_manifest(root, lambda m: m["tokenizer"].update(sha256=_sha(root / "tokenizer.json")))
    with pytest.raises(BundleError, match=r"tokenizer has 15 tokens but the model's vocab_size is 14"):
        load_bundle(root)


def test_special_token_ids_must_match_the_tokenizer(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    edit_manifest(root, lambda m: m["tokenizer"].update(cls_token_id=5))
    with pytest.raises(BundleError, match=r"cls token '\[CLS\]' has id 2 in the tokenizer, manifest says 5"):
        load_bundle(root)


def test_missing_bundle_folder_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"manifest\.json: file is missing"):
        load_bundle(tmp_path / "empty")


def test_manifest_is_json_only_never_unpickled(tmp_path: Path) -> None:
    # A pickle payload where JSON is expected is just malformed JSON, never executed.
    import pickle

    root = make_bundle(tmp_path / "b")
    (root / "manifest.json").write_bytes(pickle.dumps({"format": "spanrt-bundle"}))
    with pytest.raises(BundleError, match="malformed"):
        load_bundle(root)


def test_tensorrt_plan_for_another_gpu_or_version_is_refused(tmp_path: Path) -> None:
    plan = load_bundle(make_bundle(tmp_path / "b")).find("tensorrt", "fp16")
    assert plan is not None
    check_tensorrt_plan(plan, tensorrt_version="10.3.0.30", compute_capability=(8, 7))  # same version (build suffix ignored), same GPU
    with pytest.raises(BundleError, match=r"built with TensorRT 10\.3\.0, this machine has TensorRT 10\.7\.0.*build-trt"):
        check_tensorrt_plan(plan, tensorrt_version="10.7.0", compute_capability="8.7")
    with pytest.raises(BundleError, match=r"compute capability 8\.7, this GPU is 9\.0.*build-trt"):
        check_tensorrt_plan(plan, tensorrt_version="10.3.0", compute_capability="9.0")
    onnx_art = load_bundle(tmp_path / "b").find("onnx", "fp32")
    with pytest.raises(ValueError, match="not a TensorRT plan"):
        check_tensorrt_plan(onnx_art, tensorrt_version="10.3.0", compute_capability="8.7")


def test_bundle_module_imports_no_heavy_packages() -> None:
    import subprocess
    import sys

    code = "import sys, engine.bundle; bad = [m for m in ('torch', 'transformers', 'onnx', 'tensorrt') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
