"""The one bundle schema (engine.manifest) and the native encoder's config (engine.native_weights.EncoderConfig):
JSON round trips, manifests written by earlier versions read back unchanged, a bad field is a
BundleError that names it, and the config's names are the ones the C++ binding reads."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from engine.errors import BundleError
from engine.manifest import FORMAT_VERSION, ArtifactEntry, Manifest, TokenizerEntry
from engine.native_weights import EncoderConfig

REPO = Path(__file__).resolve().parents[1]
# manifest.json of the default model's bundles as the export and engine.native_bundle wrote them
# before the schema existed (recipes r3 and r4 of python -m export, r1 of the native bundle)
WRITTEN_BEFORE = sorted((REPO / "tests" / "data" / "manifests").glob("*.json"))
SHA = "ab" * 32
CONFIG = EncoderConfig(vocab_size=30522, max_positions=512, type_vocab_size=2, embedding_size=384, hidden_size=384, num_layers=6,
                       num_heads=12, intermediate_size=1536, position_offset=0, layer_norm_eps=1e-12, activation="gelu")


def _manifest() -> Manifest:
    """A manifest with every field set, unknown keys included."""
    tok = TokenizerEntry(path="tokenizer.json", sha256=SHA, cls_token="[CLS]", cls_token_id=101, sep_token="[SEP]", sep_token_id=102,
                         pad_token="[PAD]", pad_token_id=0, pair_template={"prefix": (101,), "middle": (102,), "suffix": (102,)},
                         extra={"added_later": [1, 2]})
    native = ArtifactEntry(path="model.native.npz", format="native", precision="fp32", sha256=SHA, bytes=90_000_000,
                           details={"encoder": CONFIG.to_json(), "computes": ["int8", "bf16", "fp32"]})
    plan = ArtifactEntry(path="model.fp16.plan", format="tensorrt", precision="fp16", sha256="cd" * 32,
                         details={"tensorrt_version": "10.3.0", "compute_capability": "8.7", "profiles": [[1, 64, 64]]})
    return Manifest(model_type="bert", architecture="BertForQuestionAnswering", max_seq_len=384, vocab_size=30522,
                    model_vocab_size=30522, max_positions=512, do_lower_case=True, inputs=("input_ids", "attention_mask", "token_type_ids"),
                    num_layers=6, hidden_size=384, num_heads=12, tokenizer=tok, artifacts=(native, plan),
                    source={"path": "/ckpt", "weights_sha256": SHA, "weights": ["model.safetensors"]}, native_encoder={"written": True},
                    versions={"python": "3.11.7"}, verification={"native": {"checked": False}}, build={"by": "test"},
                    accuracy={"fp32": {"f1": 80.0}}, extra={"a_new_section": {"x": 1}})


def test_a_manifest_survives_the_json_round_trip() -> None:
    m = _manifest()
    data = json.loads(json.dumps(m.to_json()))  # through real JSON text: lists, not tuples
    assert Manifest.from_json(data, root="b") == m
    assert data["a_new_section"] == {"x": 1} and data["tokenizer"]["added_later"] == [1, 2]  # unknown keys kept
    bare = replace(m, architecture=None, source=None, accuracy=None, do_lower_case=None, extra={},
                   tokenizer=replace(m.tokenizer, cls_token=None, pair_template=None))
    data = bare.to_json()
    assert "architecture" not in data and "accuracy" not in data and "cls_token" not in data["tokenizer"]
    assert data["do_lower_case"] is None  # written as unknown, as the exporters always did
    assert Manifest.from_json(data, root="b") == bare


@pytest.mark.parametrize("path", WRITTEN_BEFORE, ids=lambda p: p.stem)
def test_manifests_written_before_the_schema_read_back_unchanged(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    m = Manifest.from_json(data, root=path.parent)
    assert m.to_json() == data  # nothing lost, nothing added
    assert Manifest.from_json(m.to_json(), root=path.parent) == m
    if data.get("build") or list(data)[-1] == "artifacts":  # written in the schema's order: byte for byte
        assert json.dumps(m.to_json(), indent=2) + "\n" == text
    native = m.find("native", "fp32")
    if native is not None:
        assert EncoderConfig.from_json(native.details["encoder"], root=path.parent).to_json() == native.details["encoder"]


def test_the_written_manifests_cover_both_writers() -> None:
    kinds = {("build" in json.loads(p.read_text())) for p in WRITTEN_BEFORE}
    assert kinds == {True, False}  # engine.native_bundle's and python -m export's


def _broken(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(_manifest().to_json())
    change(data)
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("max_seq_len"), "bundle b: manifest.json: malformed: missing key 'max_seq_len'. Fix: export the bundle again"),
    (lambda d: d.update(vocab_size=True), "malformed: 'vocab_size' is bool, expected int"),
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), f"bundle format version {FORMAT_VERSION + 1} is newer than this SpanRT reads"),
    (lambda d: d.update(format="something-else"), "not a SpanRT bundle manifest"),
    (lambda d: d.update(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (lambda d: d.update(outputs=["logits"]), "malformed: outputs ['logits']"),
    (lambda d: d.update(source="here"), "malformed: 'source' is str, expected dict"),
    (lambda d: d["tokenizer"].pop("pad_token_id"), "missing key tokenizer.'pad_token_id'"),
    (lambda d: d["tokenizer"].update(sep_token_id=30522), "tokenizer sep_token_id 30522 is outside the vocabulary (size 30522)"),
    (lambda d: d["tokenizer"].update(cls_token=["[CLS]"]), "malformed: tokenizer.cls_token is list, expected str"),
    (lambda d: d["tokenizer"].update(pair_template={"prefix": [1]}), "malformed: tokenizer.pair_template"),
    (lambda d: d["artifacts"][1].update(format="gguf"), "artifacts[1]: unknown format/precision 'gguf'/'fp16'"),
    (lambda d: d["artifacts"][0].update(sha256="xyz"), "malformed: artifacts[0].sha256 'xyz'"),
    (lambda d: d["artifacts"][0].update(bytes=-1), "malformed: artifacts[0].'bytes' is -1, expected a file size"),
    (lambda d: d["artifacts"].append(d["artifacts"][0]), "two artifacts with format 'native' and precision 'fp32'"),
    (lambda d: d.update(artifacts=[]), "the bundle lists no model artifacts"),
])
def test_a_bad_field_is_a_bundle_error_that_names_it(change: Any, message: str) -> None:
    with pytest.raises(BundleError, match=re.escape(message)):
        Manifest.from_json(_broken(change), root="b")


def test_a_manifest_that_is_not_an_object_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="malformed: the top level is not a JSON object"):
        Manifest.from_json([1, 2], root="b")


def test_the_encoder_config_round_trips_and_refuses_what_the_encoder_cannot_run() -> None:
    assert EncoderConfig.from_json(json.loads(json.dumps(CONFIG.to_json())), root="b") == CONFIG
    older = {k: v for k, v in CONFIG.to_json().items() if k != "activation"}  # bundles from before ALBERT's tanh GELU
    assert EncoderConfig.from_json(older, root="b").activation == "gelu"
    with pytest.raises(BundleError, match=r"config is missing or lacks \('vocab_size'.*Fix: export the bundle again"):
        EncoderConfig.from_json({k: v for k, v in older.items() if k != "num_heads"}, root="b")
    with pytest.raises(BundleError, match="computes gelu or gelu_tanh, the manifest says 'relu'"):
        EncoderConfig.from_json({**older, "activation": "relu"}, root="b")
    with pytest.raises(BundleError, match="has num_layers '6', not an integer"):
        EncoderConfig.from_json({**older, "num_layers": "6"}, root="b")
    with pytest.raises(BundleError, match="missing or lacks"):
        EncoderConfig.from_json(None, root="b")


def _binding_reads() -> dict[str, str]:
    """spanrt::EncoderConfig member -> the config key kernels/encoder/bindings.cpp reads into it."""
    text = (REPO / "kernels" / "encoder" / "bindings.cpp").read_text(encoding="utf-8")
    reads = dict(re.findall(r'\bc\.(\w+) = config_int\(config, "(\w+)"\)', text))
    reads.update(re.findall(r'\bc\.(\w+) = config\["(\w+)"\]', text))
    activation = re.search(r'config\.contains\("(\w+)"\) \? config\["\1"\]\.cast<std::string>\(\)', text)
    assert activation is not None and re.search(r"\bc\.gelu_tanh = activation == ", text), "bindings.cpp reads the activation otherwise"
    reads["gelu_tanh"] = activation.group(1)
    return reads


def _header_members() -> list[str]:
    """The members of spanrt::EncoderConfig in kernels/include/spanrt/encoder.h."""
    text = (REPO / "kernels" / "include" / "spanrt" / "encoder.h").read_text(encoding="utf-8")
    body = re.search(r"struct EncoderConfig \{(.*?)\};", text, re.S)
    assert body is not None
    return re.findall(r"^\s*(?:int64_t|float|bool) (\w+) =", body.group(1), re.M)


def test_the_encoder_config_names_are_the_keys_the_cpp_binding_reads() -> None:
    reads = _binding_reads()
    assert set(reads) == set(_header_members())  # every member of the C++ config is read from the dict
    assert sorted(reads.values()) == sorted(f.name for f in fields(EncoderConfig))
    # the C++ members named otherwise (EncoderConfig's docstring lists them)
    renamed = {member: key for member, key in reads.items() if member != key}
    assert renamed == {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads", "intermediate": "intermediate_size",
                       "gelu_tanh": "activation"}
    for member, key in renamed.items():
        assert f"{key} (``{member}``)" in (EncoderConfig.__doc__ or "").replace("\n    ", " ") or member == "gelu_tanh"
