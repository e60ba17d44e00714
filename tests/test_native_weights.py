"""The native encoder's weights without PyTorch (engine.native_weights, engine.native_bundle)
against the export stage's PyTorch path, the oracle: tiny random span models of every family
saved as safetensors (float32, float16, bfloat16) map to the same tensors bit for bit; a native
bundle built from a checkpoint answers exactly as the exported bundle on the native backend; the
refusals are typed and name the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import Engine
from engine.bundle import load_bundle
from engine.errors import BundleError, UnsupportedCheckpointError
from engine.native_bundle import build_native_bundle, read_safetensors
from engine.native_weights import FAMILIES, EncoderConfig, native_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from family_checkpoints import native_checkpoint as make_checkpoint  # noqa: E402 - tests/ is on sys.path (rootdir-relative imports)

SEQ = 128
QUESTIONS = [
    ("Where was Marie Curie born?", "Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891 to study physics."),
    ("What did she study?", "Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891 to study physics."),
    ("When did the bridge open?", "The Golden Gate Bridge opened in 1937 and was the longest suspension bridge until 1964."),
]


def _torch_path(ckpt: Path) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
    """The export stage's mapping: the checkpoint loaded by PyTorch (as export loads it)."""
    from export.native import native_weights as export_native_weights
    from export.onnx import inspect_checkpoint, load_model

    spec = inspect_checkpoint(ckpt)
    return export_native_weights(load_model(spec), spec)


def _numpy_path(ckpt: Path) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
    config = json.loads((ckpt / "config.json").read_text())
    return native_weights(read_safetensors(ckpt / "model.safetensors"), config)


def _assert_same(a: tuple[EncoderConfig, dict[str, np.ndarray]], b: tuple[EncoderConfig, dict[str, np.ndarray]]) -> None:
    assert a[0] == b[0]
    assert sorted(a[1]) == sorted(b[1])
    for name in a[1]:
        assert a[1][name].dtype == b[1][name].dtype == np.float32, name
        assert np.array_equal(a[1][name], b[1][name]), name


def _resave(ckpt: Path, dtype: Any) -> None:
    """Save the checkpoint's weights again in ``dtype`` (as the shipped default model is, in fp16)."""
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(str(ckpt), local_files_only=True)
    model.to(dtype).save_pretrained(str(ckpt), safe_serialization=True)


def test_the_family_table_agrees_with_the_export_stage() -> None:
    from export.onnx import SUPPORTED

    for model_type, fam in FAMILIES.items():
        exp = SUPPORTED[model_type]
        assert (exp.architecture, exp.input_names, exp.position_offset) == (fam.architecture, fam.input_names, fam.position_offset)
        assert getattr(exp, "not_native", None) is None, f"export says {model_type} is not native, but the mapping covers it"
    native_in_export = {t for t, f in SUPPORTED.items() if getattr(f, "not_native", None) is None}
    assert native_in_export == set(FAMILIES), "a family the export writes native weights for needs its entry in FAMILIES"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mapping_from_safetensors_equals_the_torch_path(tmp_path: Path, family: str) -> None:
    ckpt = make_checkpoint(tmp_path / family, family)
    assert (ckpt / "model.safetensors").is_file()
    _assert_same(_numpy_path(ckpt), _torch_path(ckpt))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_map_like_the_torch_path(tmp_path: Path, dtype: str) -> None:
    ckpt = make_checkpoint(tmp_path / "electra", "electra")  # ELECTRA: the embedding projection too
    _resave(ckpt, getattr(torch, dtype))
    header = (ckpt / "model.safetensors").read_bytes()[:4096]
    assert {"float16": b'"F16"', "bfloat16": b'"BF16"'}[dtype] in header
    _assert_same(_numpy_path(ckpt), _torch_path(ckpt))


def test_legacy_layernorm_names_are_read(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "bert", "bert")
    config = json.loads((ckpt / "config.json").read_text())
    state = read_safetensors(ckpt / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    assert legacy.keys() != state.keys()
    _assert_same(native_weights(legacy, config), native_weights(state, config))


def test_what_the_encoder_does_not_compute_is_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "bert", "bert")
    config = json.loads((ckpt / "config.json").read_text())
    state = read_safetensors(ckpt / "model.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="computes GELU .* only; this model uses 'relu'"):
        native_weights(state, {**config, "hidden_act": "relu"})
    with pytest.raises(UnsupportedCheckpointError, match="absolute position embeddings, not 'relative_key'"):
        native_weights(state, {**config, "position_embedding_type": "relative_key"})
    with pytest.raises(UnsupportedCheckpointError, match="model_type 'gpt2'.*not one the native encoder computes.*BertForQuestionAnswering.*python -m export"):
        native_weights(state, {**config, "model_type": "gpt2"})
    with pytest.raises(UnsupportedCheckpointError, match="expected parameter 'qa_outputs.bias'"):
        native_weights({k: v for k, v in state.items() if k != "qa_outputs.bias"}, config)
    with pytest.raises(UnsupportedCheckpointError, match=r"qa_outputs.weight is \(3, 32\)"):
        native_weights({**state, "qa_outputs.weight": np.zeros((3, 32), np.float32)}, config)
    # a base encoder (no span head) is refused by its config before any weight is read
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedCheckpointError, match="BertModel has no span head"):
        build_native_bundle(ckpt, tmp_path / "out")
    # PyTorch pickles need PyTorch: the message names the export stage
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(UnsupportedCheckpointError, match="pytorch_model.bin.*python -m export"):
        build_native_bundle(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_safetensors_file_is_a_bundle_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        read_safetensors(bad)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "albert"])
def test_native_bundle_answers_exactly_as_the_exported_bundle(tmp_path: Path, family: str) -> None:
    from export.pipeline import ExportOptions, export_bundle

    ckpt = make_checkpoint(tmp_path / "ckpt", family)
    exported = load_bundle(export_bundle(ckpt, tmp_path / "exported", ExportOptions(
        precisions=("fp32",), max_seq_len=SEQ, tensorrt_onnx=(), quiet=True)))
    native = load_bundle(build_native_bundle(ckpt, tmp_path / "native", max_seq_len=SEQ))
    assert sorted(p.name for p in native.root.iterdir()) == ["manifest.json", "model.native.npz", "tokenizer.json"]
    # what the runtime reads from the manifest is the same
    for key in ("model_type", "architecture", "max_seq_len", "vocab_size", "model_vocab_size", "max_positions", "do_lower_case",
                "inputs", "outputs", "num_layers", "hidden_size", "num_heads", "tokenizer"):
        want, got = exported.manifest.to_json()[key], native.manifest.to_json()[key]
        if key == "tokenizer":
            want, got = {k: v for k, v in want.items() if k != "sha256"}, {k: v for k, v in got.items() if k != "sha256"}
        assert got == want, key
    assert native.manifest.source["weights_sha256"] == exported.manifest.source["weights_sha256"]
    a, b = exported.find("native", "fp32"), native.find("native", "fp32")
    assert a is not None and b is not None and a.info["encoder"] == b.info["encoder"]
    with np.load(a.path) as wa, np.load(b.path) as wb:
        assert sorted(wa.files) == sorted(wb.files)
        for name in wa.files:
            assert np.array_equal(wa[name], wb[name]), name
    # the tokenizer encodes the same (the export saves it through transformers)
    from tokenizers import Tokenizer

    ta, tb = Tokenizer.from_file(str(exported.tokenizer_path)), Tokenizer.from_file(str(native.tokenizer_path))
    for q, c in QUESTIONS:
        ea, eb = ta.encode(q, c), tb.encode(q, c)
        assert (ea.ids, ea.type_ids, ea.offsets) == (eb.ids, eb.type_ids, eb.offsets)
    for precision in ("fp32", "int8"):
        with Engine(exported.root, backend="native", precision=precision) as e1, \
                Engine(native.root, backend="native", precision=precision) as e2:
            qs, cs = [q for q, _ in QUESTIONS], [c for _, c in QUESTIONS]
            r1, r2 = e1.answer_batch(qs, cs, top_k=3), e2.answer_batch(qs, cs, top_k=3)
        assert [[(x.text, x.start, x.score) for x in r] for r in r1] == [[(x.text, x.start, x.score) for x in r] for r in r2]


def test_the_native_bundle_goes_in_place_atomically(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "bert")
    out = build_native_bundle(ckpt, tmp_path / "b", max_seq_len=SEQ)
    with pytest.raises(BundleError, match="already exists; pass --force"):
        build_native_bundle(ckpt, out, max_seq_len=SEQ)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(UnsupportedCheckpointError, match="no tokenizer.json"):
        build_native_bundle(ckpt, out, max_seq_len=SEQ, force=True)
    load_bundle(out)  # the old bundle is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")] == []  # no temporary folder left
