"""The native encoder's weights: a checkpoint's tensors under one naming for every family.

The ``native`` backend (engine/backends/native.py, kernels/encoder/) runs a post-LayerNorm
BERT-shaped encoder; BERT (MiniLM, SpanBERT), RoBERTa, ELECTRA, DistilBERT, XLM-RoBERTa, CamemBERT
and ALBERT (one layer's weights shared by all layers) span checkpoints all are one, under
different parameter names. :data:`FAMILIES` says, once per family, where each
tensor lives in a Hugging Face checkpoint; :func:`native_weights` renames them (names in
kernels/include/spanrt/encoder.h), concatenates query/key/value into one matrix and returns
float32 arrays plus the encoder's config (:class:`EncoderConfig`, which the manifest records).
NumPy only: the export stage feeds it a PyTorch state dict, the runtime the checkpoint's
safetensors (engine/native_bundle.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BundleError, UnsupportedCheckpointError, brief
from engine.manifest import fix_hint

NATIVE_FILE = "model.native.npz"  # the bundle artifact
# The encoder's activations: the exact (erf) GELU, or GELU's tanh approximation (ALBERT's gelu_new)
ACTIVATIONS = ("gelu", "gelu_tanh")
# config.json's activation -> the encoder's (gelu_pytorch_tanh is gelu_new's function)
SUPPORTED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_JSON_KINDS: dict[str, tuple[type | tuple[type, ...], str]] = {"int": (int, "an integer"), "float": ((int, float), "a number"),
                                                               "str": (str, "a string")}
# The encoder's per-layer tensors (ours) -> the module path under a family's layer prefix.
LAYER_TENSORS = ("q", "k", "v", "attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm")
_BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
               "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
_DISTILBERT_LAYER = {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "attn_out": "attention.out_lin",
                     "attn_norm": "sa_layer_norm", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2", "ffn_norm": "output_layer_norm"}
_ALBERT_LAYER = {"q": "attention.query", "k": "attention.key", "v": "attention.value", "attn_out": "attention.dense",
                 "attn_norm": "attention.LayerNorm", "ffn_in": "ffn", "ffn_out": "ffn_output", "ffn_norm": "full_layer_layer_norm"}
_BERT_KEYS = {"heads": "num_attention_heads", "hidden": "hidden_size", "layers": "num_hidden_layers", "activation": "hidden_act"}


@dataclass(frozen=True)
class EncoderConfig:
    """The native encoder's config: the sizes of its tensors and its two numeric choices.

    Written in the manifest's native artifact entry (its ``encoder``, by :meth:`to_json`) and
    handed to the C++ encoder as that same dict: the field names are the keys
    kernels/encoder/bindings.cpp reads into ``spanrt::EncoderConfig`` (kernels/include/spanrt/
    encoder.h), whose members are named alike except hidden_size (``hidden``), num_layers
    (``layers``), num_heads (``heads``), intermediate_size (``intermediate``) and activation (the
    flag ``gelu_tanh``). tests/test_native_weights.py checks the names against bindings.cpp."""

    vocab_size: int  # rows of the word embedding table
    max_positions: int  # rows of the position table
    type_vocab_size: int  # rows of the token-type table; 0: the model takes no token types (DistilBERT)
    embedding_size: int  # != hidden_size: embeddings projected to hidden_size (ELECTRA, ALBERT)
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    position_offset: int  # positions the table reserves (RoBERTa: padding_idx + 1)
    layer_norm_eps: float
    activation: str = "gelu"  # one of ACTIVATIONS

    def to_json(self) -> dict[str, Any]:
        """The config as the manifest records it and the encoder binding reads it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, root: Path | str) -> EncoderConfig:
        """The config recorded in a native artifact entry of bundle ``root``; BundleError when it is
        missing, lacks a key, or names an activation the encoder does not compute."""
        sizes = tuple(f.name for f in fields(cls) if f.name != "activation")
        if not isinstance(data, dict) or any(k not in data for k in sizes):
            raise BundleError(f"bundle {root}: the native artifact's 'encoder' config is missing or lacks {sizes}. Fix: {fix_hint(root)}")
        for f in fields(cls):
            v = data.get(f.name, f.default)
            kind, expected = _JSON_KINDS[str(f.type)]
            if not isinstance(v, kind) or isinstance(v, bool):
                raise BundleError(f"bundle {root}: the native artifact's 'encoder' config has {f.name} {brief(v)}, not {expected}. "
                                  f"Fix: {fix_hint(root)}")
        activation = data.get("activation", "gelu")
        if activation not in ACTIVATIONS:
            raise BundleError(f"bundle {root}: the native encoder computes {' or '.join(ACTIVATIONS)}, the manifest says {activation!r}")
        return cls(**{k: data[k] for k in sizes}, activation=activation)


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its tensors and sizes (names as in the Hugging Face checkpoint)."""

    architecture: str  # the span-head class named in config.json's "architectures"
    input_names: tuple[str, ...]
    position_offset: int  # positions the embedding table reserves (RoBERTa: padding_idx + 1)
    prefix: str  # the encoder's parameters: "<prefix>embeddings...", "<prefix><layer>..."
    layer: str  # one layer's prefix under ``prefix``; "{i}" is the layer number
    layer_tensors: Mapping[str, str]  # LAYER_TENSORS -> module path under the layer prefix
    config_keys: Mapping[str, str]  # heads, hidden, layers, activation -> the config.json key
    token_types: bool = True  # has a token_type embedding table
    projection: str | None = None  # embedding -> hidden projection under ``prefix`` (ELECTRA, ALBERT), if present
    # ALBERT: layers share weights, num_hidden_groups groups of them; "{i}" in ``layer`` is then the
    # group of layer i (as transformers computes it) and each layer gets its group's tensors.
    layer_groups: bool = False

    def dims(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        """(heads, hidden size, layers) read from a checkpoint's config.json."""
        try:
            heads, hidden, layers = (int(config[self.config_keys[k]]) for k in ("heads", "hidden", "layers"))
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedCheckpointError(f"config.json of this {self.architecture} lacks a usable {e} entry") from None
        return heads, hidden, layers


# The export stage's own table (export/onnx.py SUPPORTED: every family it exports to ONNX) agrees
# with this one on architecture, inputs and position offset for every family here, and marks the
# others not native (tests/test_native_weights.py checks both ways).
FAMILIES: dict[str, Family] = {
    "bert": Family("BertForQuestionAnswering", ("input_ids", "attention_mask", "token_type_ids"), 0,
                   "bert.", "encoder.layer.{i}.", _BERT_LAYER, _BERT_KEYS),
    "distilbert": Family("DistilBertForQuestionAnswering", ("input_ids", "attention_mask"), 0,
                         "distilbert.", "transformer.layer.{i}.", _DISTILBERT_LAYER,
                         {"heads": "n_heads", "hidden": "dim", "layers": "n_layers", "activation": "activation"},
                         token_types=False),
    "roberta": Family("RobertaForQuestionAnswering", ("input_ids", "attention_mask"), 2,
                      "roberta.", "encoder.layer.{i}.", _BERT_LAYER, _BERT_KEYS),
    "electra": Family("ElectraForQuestionAnswering", ("input_ids", "attention_mask", "token_type_ids"), 0,
                      "electra.", "encoder.layer.{i}.", _BERT_LAYER, _BERT_KEYS, projection="embeddings_project"),
    # RoBERTa's layout and module names, another vocabulary
    "xlm-roberta": Family("XLMRobertaForQuestionAnswering", ("input_ids", "attention_mask"), 2,
                          "roberta.", "encoder.layer.{i}.", _BERT_LAYER, _BERT_KEYS),
    "camembert": Family("CamembertForQuestionAnswering", ("input_ids", "attention_mask"), 2,
                        "roberta.", "encoder.layer.{i}.", _BERT_LAYER, _BERT_KEYS),
    "albert": Family("AlbertForQuestionAnswering", ("input_ids", "attention_mask", "token_type_ids"), 0,
                     "albert.", "encoder.albert_layer_groups.{i}.albert_layers.0.", _ALBERT_LAYER, _BERT_KEYS,
                     projection="encoder.embedding_hidden_mapping_in", layer_groups=True),
}


def supported_list() -> str:
    """The supported span models, for messages: 'BertForQuestionAnswering (bert), ...'."""
    return ", ".join(f"{f.architecture} ({t})" for t, f in FAMILIES.items())


def family_of(config: Mapping[str, Any], where: str = "this checkpoint", *, span_head: bool = True) -> Family:
    """The family of a span checkpoint's config.json; UnsupportedCheckpointError for another model
    type or (``span_head``) a config whose architectures do not name the span head."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in FAMILIES:
        raise UnsupportedCheckpointError(
            f"{where}: model_type {model_type!r} ({', '.join(map(str, archs)) or 'no architectures'}) is not one the native "
            f"encoder computes (it computes {supported_list()}); other span models run on ONNX Runtime from the bundle of "
            "python -m export MODEL_DIR --out BUNDLE")
    fam = FAMILIES[model_type]
    if span_head and fam.architecture not in archs:
        raise UnsupportedCheckpointError(
            f"{where}: {', '.join(map(str, archs)) or 'a model with no architectures entry'} has no span head "
            f"(no start/end logits); a fine-tuned {fam.architecture} checkpoint is needed "
            "(fine-tune one with: python -m export finetune ...)")
    return fam


def _checkpoint_name(name: str) -> str:
    """A parameter's current name: old BERT checkpoints call LayerNorm's weight/bias gamma/beta
    (transformers renames them the same way when it loads them)."""
    if name.endswith("LayerNorm.gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[: -len("beta")] + "bias"
    return name


def native_weights(state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
    """(encoder config, float32 weights) of a span checkpoint for the native encoder.

    ``state`` maps the checkpoint's parameter names to arrays (any float dtype), ``config`` is its
    config.json (its model_type names the family; the span head is checked by its tensors). Raises UnsupportedCheckpointError for what the encoder does not compute (another
    activation, relative position embeddings, a missing or misshapen tensor)."""
    fam = family_of(config, span_head=False)
    heads, hidden, num_layers = fam.dims(config)
    if min(heads, hidden, num_layers) < 1:
        raise UnsupportedCheckpointError(f"config.json gives {heads} heads, hidden size {hidden}, {num_layers} layers")
    act = config.get(fam.config_keys["activation"], "gelu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedCheckpointError(f"the native encoder computes GELU ({', '.join(SUPPORTED_ACTIVATIONS)}) only; "
                                         f"this model uses {act!r}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedCheckpointError(
            f"the native encoder needs absolute position embeddings, not {config['position_embedding_type']!r}")
    arrays = {_checkpoint_name(k): v for k, v in state.items()}

    def take(name: str) -> np.ndarray:
        if name not in arrays:
            raise UnsupportedCheckpointError(f"the native encoder expected parameter {name!r} in this {fam.architecture}")
        return np.ascontiguousarray(arrays[name], dtype=np.float32)

    emb = fam.prefix + "embeddings."
    w: dict[str, np.ndarray] = {
        "embeddings.word": take(emb + "word_embeddings.weight"),
        "embeddings.position": take(emb + "position_embeddings.weight"),
        "embeddings.norm.weight": take(emb + "LayerNorm.weight"),
        "embeddings.norm.bias": take(emb + "LayerNorm.bias"),
    }
    if fam.token_types:
        w["embeddings.token_type"] = take(emb + "token_type_embeddings.weight")
    if fam.projection is not None and fam.prefix + fam.projection + ".weight" in arrays:
        w["embeddings.project.weight"] = take(fam.prefix + fam.projection + ".weight")
        w["embeddings.project.bias"] = take(fam.prefix + fam.projection + ".bias")
    names = fam.layer_tensors
    groups = 0
    if fam.layer_groups:
        groups = int(config.get("num_hidden_groups", 1))
        if int(config.get("inner_group_num", 1)) != 1 or not 1 <= groups <= num_layers:
            raise UnsupportedCheckpointError(
                f"the native encoder maps ALBERT layer groups of one layer each (inner_group_num 1, 1 <= num_hidden_groups <= "
                f"num_hidden_layers); this config has inner_group_num {config.get('inner_group_num')}, {groups} groups")
    for i in range(num_layers):
        # ALBERT: layer i runs group int(i / (layers / groups)) (transformers' AlbertTransformer)
        p = fam.prefix + fam.layer.format(i=int(i / (num_layers / groups)) if groups else i)
        w[f"layers.{i}.qkv.weight"] = np.concatenate([take(p + names[x] + ".weight") for x in "qkv"], axis=0)
        w[f"layers.{i}.qkv.bias"] = np.concatenate([take(p + names[x] + ".bias") for x in "qkv"], axis=0)
        for ours in LAYER_TENSORS[3:]:
            w[f"layers.{i}.{ours}.weight"] = take(p + names[ours] + ".weight")
            w[f"layers.{i}.{ours}.bias"] = take(p + names[ours] + ".bias")
    w["qa.weight"] = take("qa_outputs.weight")
    w["qa.bias"] = take("qa_outputs.bias")
    if w["qa.weight"].shape != (2, hidden):
        raise UnsupportedCheckpointError(f"the span head qa_outputs.weight is {w['qa.weight'].shape}, not (2, {hidden}): "
                                         "it does not give 2 logits per token (start, end)")

    encoder = EncoderConfig(
        vocab_size=int(w["embeddings.word"].shape[0]),
        max_positions=int(w["embeddings.position"].shape[0]),
        type_vocab_size=int(w["embeddings.token_type"].shape[0]) if "embeddings.token_type" in w else 0,
        embedding_size=int(w["embeddings.word"].shape[1]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        intermediate_size=int(w["layers.0.ffn_in.weight"].shape[0]),
        position_offset=fam.position_offset,
        # DistilBERT's LayerNorms use 1e-12 without saying so in its config
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        activation=SUPPORTED_ACTIVATIONS[act],
    )
    if encoder.embedding_size != hidden and "embeddings.project.weight" not in w:
        raise UnsupportedCheckpointError(f"embedding size {encoder.embedding_size} != hidden size {hidden} without a projection")
    return encoder, w


def write_npz(weights: Mapping[str, np.ndarray], path: Any) -> None:
    """The weights as a plain ``.npz`` (no pickle), the native artifact's file."""
    with open(path, "wb") as f:
        np.savez(f, **weights)
