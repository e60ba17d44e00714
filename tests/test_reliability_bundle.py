"""Reliability round 2 (issue 19), the bundle side: pathological JSON, links leaving the bundle or
looping, a bundle that does not fit its model, an artifact that is not the precision its entry
says, and a tokenizer that lost its post-processor. Every case is a BundleError naming the file.

The hypothesis tests write nested and pathological JSON (deep nesting, integers of thousands of
digits, NaN/Infinity, wrong types) into the manifest and the tokenizer and require that loading
ends in a Bundle or a BundleError, never another exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import TOKENIZER_JSON, lookup_bundle, lookup_tables, planted
from test_bundle import VOCAB, edit_manifest, make_bundle, tiny_onnx

from engine import Engine
from engine.bundle import load_bundle
from engine.errors import BundleError
from engine.preprocess import TextEncoder

ANSWER = "Zanzibar Island"
CONTEXT = "After a long voyage the ship sailed to Zanzibar Island, then home again."


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_tokenizer_json(root: Path, text: str) -> None:
    """Replace tokenizer.json and record its sha256, so the loader reads what was written."""
    (root / "tokenizer.json").write_text(text)
    edit_manifest(root, lambda m: m["tokenizer"].update(sha256=_sha(root / "tokenizer.json")))


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- defect 1: pathological JSON and wrong types are BundleErrors ------------------------------------
@pytest.mark.parametrize(("raw_change", "message"), [
    (lambda s: s.replace('"model_type"', f'"deep": {_deep(100_000)}, "model_type"'), "nested too deeply"),
    (lambda s: s.replace('"max_seq_len": 384', '"max_seq_len": ' + "9" * 5000), "malformed JSON"),
    (lambda s: s.replace('"max_seq_len": 384', '"max_seq_len": ' + "9" * 4000), "max_seq_len' must be between 1 and"),
    (lambda s: s.replace('"vocab_size": 14', '"vocab_size": NaN'), "NaN is not a JSON number"),
    (lambda s: s.replace('"max_seq_len": 384', '"max_seq_len": Infinity'), "Infinity is not a JSON number"),
    (lambda s: s.replace('"max_seq_len": 384', '"max_seq_len": 1e400'), "'max_seq_len' is float"),
    (lambda s: s.replace('"cls_token": "[CLS]"', '"cls_token": ["[CLS]"]'), "tokenizer.cls_token is list, expected str"),
    (lambda s: s.replace('"cls_token": "[CLS]"', '"cls_token": {"a": 1}'), "tokenizer.cls_token is dict"),
    (lambda s: s.replace('"cls_token_id": 2', '"cls_token_id": ' + "7" * 400), "outside the vocabulary"),
    (lambda s: s.replace('"format_version": 1', '"format_version": -Infinity'), "-Infinity is not a JSON number"),
])
def test_pathological_manifest_json_is_a_bundle_error(tmp_path: Path, raw_change: Any, message: str) -> None:
    root = make_bundle(tmp_path / "b")
    text = (root / "manifest.json").read_text()
    changed = raw_change(text)
    assert changed != text
    (root / "manifest.json").write_text(changed)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(root)
    assert "manifest.json" in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: _deep(100_000), "nested too deeply"),
    (lambda t: t.replace('"[CLS]": 2', '"[CLS]": Infinity'), "Infinity is not a JSON number"),
    (lambda t: t.replace('"[CLS]": 2', '"[CLS]": 2.5'), r"model.vocab\['\[CLS\]'\] is 2.5, not a token id"),
    (lambda t: t.replace('"[CLS]": 2', '"[CLS]": ' + "9" * 4500), "malformed JSON"),
    (lambda t: t.replace('"[CLS]": 2', '"[CLS]": ' + "9" * 4000), "not a token id"),
    (lambda t: t.replace('"[CLS]": 2', '"[CLS]": -3'), "not a token id"),
    (lambda t: '{"model": [1, 2]}', "'model' is list, not an object"),
    (lambda t: '[]', "the top level is list"),
    (lambda t: '{"model": {"vocab": [[1, 0.0]]}}', r"model.vocab\[0\] is \[1, 0.0\], not a \[piece, score\] pair"),
    (lambda t: '{"model": {"vocab": {"a": 0}}, "added_tokens": [{"content": ["x"], "id": 1}]}', r"added_tokens\[0\]"),
    (lambda t: '{"model": {"vocab": {"a": 0}}, "added_tokens": {"x": 1}}', "added_tokens is dict, not a list"),
])
def test_pathological_tokenizer_json_is_a_bundle_error(tmp_path: Path, change: Any, message: str) -> None:
    root = make_bundle(tmp_path / "b")
    _write_tokenizer_json(root, change((root / "tokenizer.json").read_text()))
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(root)
    assert "tokenizer.json" in str(info.value)


@pytest.mark.parametrize("which", ["tokenizer", "artifact", "manifest", "folder"])
def test_a_symlink_loop_is_a_bundle_error(tmp_path: Path, which: str) -> None:
    root = make_bundle(tmp_path / "b")
    if which == "tokenizer":
        (root / "loop.json").symlink_to("loop.json")
        edit_manifest(root, lambda m: m["tokenizer"].update(path="loop.json"))
    elif which == "artifact":
        (root / "a").symlink_to("b")
        (root / "b").symlink_to("a")
        edit_manifest(root, lambda m: m["artifacts"][0].update(path="a"))
    elif which == "manifest":
        (root / "manifest.json").unlink()
        (root / "manifest.json").symlink_to("manifest.json")
    else:
        (tmp_path / "x").symlink_to("y")
        (tmp_path / "y").symlink_to("x")
        root = tmp_path / "x"
    with pytest.raises(BundleError):
        load_bundle(root)
    if which == "manifest":
        with pytest.raises(BundleError):
            load_bundle(root / "manifest.json")


def test_a_manifest_that_is_a_folder_or_too_big_is_a_bundle_error(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    (root / "manifest.json").unlink()
    (root / "manifest.json").mkdir()
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(root)
    shutil.rmtree(root / "manifest.json")
    with open(root / "manifest.json", "wb") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB of zero bytes
    with pytest.raises(BundleError, match="more than the"):
        load_bundle(root)


# ---- defect 2: every file read resolves inside the bundle ---------------------------------------------
@pytest.mark.parametrize("given", ["folder", "manifest path"])
def test_a_manifest_linking_outside_the_bundle_is_refused(tmp_path: Path, given: str) -> None:
    outside = make_bundle(tmp_path / "outside")  # a valid manifest: followed and used before the fix
    root = make_bundle(tmp_path / "b")
    (root / "manifest.json").unlink()
    (root / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(BundleError, match="outside the bundle folder"):
        load_bundle(root if given == "folder" else root / "manifest.json")


def test_a_tokenizer_linking_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    shutil.move(root / "tokenizer.json", tmp_path / "tokenizer.json")
    (root / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(BundleError, match="outside the bundle folder"):
        load_bundle(root)


def test_a_bundle_folder_reached_through_a_link_still_loads(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    (tmp_path / "alias").symlink_to(root)
    assert load_bundle(tmp_path / "alias").root == root.resolve()
    assert load_bundle(tmp_path / "alias" / "manifest.json").root == root.resolve()


# ---- defect 3: the bundle is checked against its model's real sizes ----------------------------------
def test_manifest_sizes_are_checked_against_each_other(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    edit_manifest(root, lambda m: m.update(model_vocab_size=len(VOCAB) - 1))
    with pytest.raises(BundleError, match="embedding table has 13 rows"):
        load_bundle(root)
    edit_manifest(root, lambda m: m.update(model_vocab_size=len(VOCAB), max_positions=128))
    with pytest.raises(BundleError, match="max_seq_len 384 is above the model's 128 positions"):
        load_bundle(root)
    edit_manifest(root, lambda m: m.update(max_positions=512))
    assert load_bundle(root).max_seq_len == 384


def test_native_sizes_are_checked(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    (root / "w.npz").write_bytes(b"weights")
    entry = {"path": "w.npz", "format": "native", "precision": "fp32", "sha256": _sha(root / "w.npz"),
             "encoder": {"vocab_size": len(VOCAB), "max_positions": 512, "position_offset": 0}}
    edit_manifest(root, lambda m: m["artifacts"].append(entry))
    assert load_bundle(root).find("native", "fp32") is not None
    edit_manifest(root, lambda m: m["artifacts"][-1]["encoder"].update(vocab_size=10))
    with pytest.raises(BundleError, match="native model's embedding table has 10 rows"):
        load_bundle(root)
    edit_manifest(root, lambda m: m["artifacts"][-1]["encoder"].update(vocab_size=len(VOCAB), max_positions=300))
    with pytest.raises(BundleError, match="above the native model's 300 positions"):
        load_bundle(root)


def _position_lookup_onnx(path: Path, start: np.ndarray, end: np.ndarray, positions: int) -> None:
    """The lookup model plus a position table of ``positions`` rows (gathered at 0..S-1, times 0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("start_logits", "end_logits")]
    inits = [numpy_helper.from_array(start, "s_table"), numpy_helper.from_array(end, "e_table"),
             numpy_helper.from_array(np.zeros(positions, np.float32), "pos_table"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([1], np.int64), "idx1")]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
        helper.make_node("Gather", ["pos_table", "pos"], ["pos_vals"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["token_type_ids"], ["t"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["m", "t"], ["mt"]),
        helper.make_node("Gather", ["s_table", "input_ids"], ["s0"], axis=0),
        helper.make_node("Gather", ["e_table", "input_ids"], ["e0"], axis=0),
        helper.make_node("Add", ["s0", "pos_vals"], ["s1"]),
        helper.make_node("Add", ["e0", "pos_vals"], ["e1"]),
        helper.make_node("Sub", ["mt", "mt"], ["z"]),
        helper.make_node("Add", ["s1", "z"], ["start_logits"]),
        helper.make_node("Add", ["e1", "z"], ["end_logits"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "lookup_with_positions", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _replace_model(root: Path, rows: int, positions: int) -> None:
    s, e = lookup_tables(**planted(ANSWER))
    _position_lookup_onnx(root / "model.fp32.onnx", s[:rows], e[:rows], positions)
    edit_manifest(root, lambda m: m["artifacts"][0].update(sha256=_sha(root / "model.fp32.onnx")))


def test_a_model_smaller_than_its_tokenizer_fails_at_load(tmp_path: Path) -> None:
    root = lookup_bundle(tmp_path / "b", **planted(ANSWER), max_seq_len=64)
    _replace_model(root, rows=30_000, positions=512)  # the tokenizer has 30,522 tokens
    with pytest.raises(BundleError, match="fails on token id 30521.*embedding table is smaller than the vocabulary"):
        Engine(root, backend="onnxruntime", threads=1)


def test_a_max_seq_len_above_the_models_positions_fails_at_load(tmp_path: Path) -> None:
    root = lookup_bundle(tmp_path / "b", **planted(ANSWER), max_seq_len=96)
    _replace_model(root, rows=30_522, positions=64)
    with pytest.raises(BundleError, match="max_seq_len=96 .*above the model's positions"):
        Engine(root, backend="onnxruntime", threads=1)
    edit_manifest(root, lambda m: m.update(max_seq_len=64))
    with Engine(root, backend="onnxruntime", threads=1) as e:  # within its positions: it loads and answers
        assert e.answer("Where did the ship sail?", CONTEXT).text == ANSWER


# ---- defect 5: damaged bundles are not silently accepted ----------------------------------------------
@pytest.mark.parametrize(("entry", "source", "message"), [
    (1, "model.fp32.onnx", "says int8, but the graph has no quantized operators"),
    (0, "model.int8.onnx", r"says fp32, but the graph has quantized operators \(DequantizeLinear, QuantizeLinear\)"),
])
def test_an_artifact_that_is_not_its_precision_is_refused(tmp_path: Path, entry: int, source: str, message: str) -> None:
    root = make_bundle(tmp_path / "b")
    target = root / json.loads((root / "manifest.json").read_text())["artifacts"][entry]["path"]
    shutil.copyfile(root / source, target)  # the entry's file swapped, its sha256 updated: only the graph tells
    edit_manifest(root, lambda m: m["artifacts"][entry].update(sha256=_sha(target)))
    with pytest.raises(BundleError, match=message):
        load_bundle(root)


def test_fp16_and_non_onnx_files_are_checked(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    (root / "model.fp16.onnx").write_bytes(tiny_onnx("fp16"))
    entry = {"path": "model.fp16.onnx", "format": "onnx", "precision": "fp16", "sha256": _sha(root / "model.fp16.onnx")}
    edit_manifest(root, lambda m: m["artifacts"].append(entry))
    assert load_bundle(root).find("onnx", "fp16") is not None
    (root / "model.fp16.onnx").write_bytes(tiny_onnx("fp32"))
    edit_manifest(root, lambda m: m["artifacts"][-1].update(sha256=_sha(root / "model.fp16.onnx")))
    with pytest.raises(BundleError, match="says fp16, but the graph has no float16 weights"):
        load_bundle(root)
    (root / "model.fp16.onnx").write_bytes(b"\x08" + b"\xff" * 40)  # not a protobuf
    edit_manifest(root, lambda m: m["artifacts"][-1].update(sha256=_sha(root / "model.fp16.onnx")))
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        load_bundle(root)


def test_the_real_int8_lookup_model_passes_and_runs_as_int8(tmp_path: Path) -> None:
    root = lookup_bundle(tmp_path / "b", **planted(ANSWER), precisions=("fp32", "int8"))
    with Engine(root, backend="onnxruntime", precision="int8", threads=1) as e:
        assert e.answer("Where did the ship sail?", CONTEXT).text == ANSWER and e.precision == "int8"


def _without_post_processor(root: Path) -> None:
    tj = json.loads((root / "tokenizer.json").read_text())
    tj["post_processor"] = None
    _write_tokenizer_json(root, json.dumps(tj))


def test_a_tokenizer_without_its_post_processor_is_refused(tmp_path: Path) -> None:
    root = lookup_bundle(tmp_path / "b", **planted(ANSWER))
    _without_post_processor(root)
    load_bundle(root)  # the JSON is fine; the pair layout is what is wrong
    with pytest.raises(BundleError, match=r"without the model's cls \(101\) and sep \(102\) tokens"):
        Engine(root, backend="onnxruntime", threads=1)


def test_a_tokenizer_whose_template_changed_is_refused_against_the_recorded_one(tmp_path: Path) -> None:
    root = lookup_bundle(tmp_path / "b", **planted(ANSWER))
    recorded = {"prefix": [101], "middle": [102], "suffix": [102]}
    edit_manifest(root, lambda m: m["tokenizer"].update(pair_template=recorded))
    with Engine(root, backend="onnxruntime", threads=1) as e:  # the recorded layout: loads
        assert e.answer("Where did the ship sail?", CONTEXT).text == ANSWER
    tj = json.loads((root / "tokenizer.json").read_text())
    tj["post_processor"]["pair"] = [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}]
    _write_tokenizer_json(root, json.dumps(tj))
    with pytest.raises(BundleError, match="but the model was exported with"):
        Engine(root, backend="onnxruntime", threads=1)
    edit_manifest(root, lambda m: m["tokenizer"].update(pair_template={"prefix": [101], "middle": ["x"], "suffix": []}))
    with pytest.raises(BundleError, match="malformed: tokenizer.pair_template"):
        load_bundle(root)


# ---- fuzzing: nested and pathological JSON anywhere in the manifest or the tokenizer ------------------
_leaves = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "9" * 4400, "9" * 4000, "1e400", _deep(3000), '"' + "x" * 50 + '"']).map(
        lambda raw: _Raw(raw)),
)


class _Raw:
    """A JSON fragment written as is (json.dumps cannot write NaN-free pathological numbers)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _dump(value: Any) -> str:
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join(_dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_dump(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


json_values = st.recursive(_leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)
MANIFEST_PATHS = [("model_type",), ("max_seq_len",), ("vocab_size",), ("model_vocab_size",), ("max_positions",), ("inputs",),
                  ("outputs",), ("do_lower_case",), ("tokenizer",), ("tokenizer", "path"), ("tokenizer", "cls_token"),
                  ("tokenizer", "cls_token_id"), ("tokenizer", "pair_template"), ("artifacts",), ("artifacts", 0),
                  ("artifacts", 0, "path"), ("artifacts", 0, "precision"), ("artifacts", 2, "tensorrt_version"),
                  ("format_version",), ("new_key",)]
TOKENIZER_PATHS = [("model",), ("model", "vocab"), ("model", "vocab", "[CLS]"), ("added_tokens",), ("added_tokens", 0),
                   ("added_tokens", 0, "id"), ("added_tokens", 0, "content"), ("post_processor",), ("normalizer",),
                   ("pre_tokenizer",), ("model", "unk_token"), ("new_key",)]


def _put(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``doc`` with ``value`` at ``path`` (a missing container on the way is created)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, list) and isinstance(head, int) and head < len(doc):
        doc[head] = _put(doc[head], rest, value)
    elif isinstance(doc, dict):
        doc[str(head)] = _put(doc.get(str(head), {}), rest, value)
    return doc


@pytest.fixture(scope="module")
def template_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("fuzz") / "b")


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def _fuzzed_copy(template: Path, factory: pytest.TempPathFactory, name: str, path: tuple[Any, ...], value: Any) -> Path:
    """A copy of the template bundle whose file ``name`` holds ``value`` at ``path``."""
    root = factory.mktemp("fuzzed")
    shutil.copytree(template, root, dirs_exist_ok=True)
    text = _dump(_put(json.loads((root / name).read_text()), path, value))
    if name == "tokenizer.json":
        _write_tokenizer_json(root, text)
    else:
        (root / name).write_text(text)
    return root


@FUZZ
@given(path=st.sampled_from(MANIFEST_PATHS), value=json_values)
def test_fuzzed_manifest_json_loads_or_is_a_bundle_error(template_bundle: Path, tmp_path_factory: pytest.TempPathFactory,
                                                         path: tuple[Any, ...], value: Any) -> None:
    root = _fuzzed_copy(template_bundle, tmp_path_factory, "manifest.json", path, value)
    try:
        load_bundle(root)
    except BundleError:
        pass


@FUZZ
@given(path=st.sampled_from(TOKENIZER_PATHS), value=json_values)
def test_fuzzed_tokenizer_json_loads_or_is_a_bundle_error(template_bundle: Path, tmp_path_factory: pytest.TempPathFactory,
                                                          path: tuple[Any, ...], value: Any) -> None:
    root = _fuzzed_copy(template_bundle, tmp_path_factory, "tokenizer.json", path, value)
    try:
        bundle = load_bundle(root)
    except BundleError:
        return
    try:
        TextEncoder(bundle.tokenizer_path)
    except BundleError:
        pass


def test_a_tokenizer_that_cannot_encode_the_pair_is_a_bundle_error(template_bundle: Path,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Found by the fuzz test in CI: a WordPiece model without its [UNK] token makes the tokenizers
    library raise a bare Exception on the template's encode."""
    root = _fuzzed_copy(template_bundle, tmp_path_factory, "tokenizer.json", ("model", "unk_token"), "")
    with pytest.raises(BundleError, match="cannot encode a \\(question, context\\) pair"):
        TextEncoder(load_bundle(root).tokenizer_path)


def test_the_fuzzed_files_reach_the_checks(tmp_path: Path) -> None:
    """The strategies' pathological fragments do reach the loader (not only invalid JSON)."""
    root = make_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(_dump(_put(m, ("tokenizer", "cls_token"), [_Raw("9" * 4000)])))
    with pytest.raises(BundleError, match="cls_token is list"):
        load_bundle(root)
    assert os.path.getsize(TOKENIZER_JSON) > 0
