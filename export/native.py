"""The native encoder's weights: the checkpoint's tensors under one naming for every family.

The runtime's ``native`` backend (engine/backends/native.py, kernels/encoder_cpu.cpp) runs a
post-LayerNorm BERT-shaped encoder; BERT (MiniLM, SpanBERT), RoBERTa, ELECTRA and DistilBERT
checkpoints all are one, under different parameter names. This module renames them (names in
kernels/include/spanrt/encoder.h), concatenates query/key/value into one matrix, and writes a
float32 ``.npz`` (plain arrays, loaded without pickle) plus the config the manifest records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.errors import UnsupportedModelError
from export.onnx import SUPPORTED, ModelSpec

NATIVE_FILE = "model.native.npz"
SUPPORTED_ACTIVATIONS = ("gelu",)  # the exact (erf) GELU; the encoder computes no other


def _layer_names(model_type: str) -> dict[str, str]:
    if model_type == "distilbert":
        return {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "attn_out": "attention.out_lin",
                "attn_norm": "sa_layer_norm", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2", "ffn_norm": "output_layer_norm"}
    return {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm", "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}


def native_weights(model: Any, spec: ModelSpec) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, weights) of a loaded span model (export.onnx.load_model) for the native encoder.

    Raises UnsupportedModelError for what the encoder does not compute (another activation,
    relative position embeddings, pre-LayerNorm variants)."""
    cfg = spec.config
    mt = spec.model_type
    act = cfg.get("activation" if mt == "distilbert" else "hidden_act", "gelu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"the native encoder computes the exact GELU only; this model uses {act!r}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"the native encoder needs absolute position embeddings, not {cfg['position_embedding_type']!r}")
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    prefix = {"bert": "bert.", "roberta": "roberta.", "electra": "electra.", "distilbert": "distilbert."}[mt]
    emb = prefix + "embeddings."

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise UnsupportedModelError(f"the native encoder expected parameter {name!r} in this {spec.architecture}")
        return np.ascontiguousarray(state[name], dtype=np.float32)

    w: dict[str, np.ndarray] = {
        "embeddings.word": take(emb + "word_embeddings.weight"),
        "embeddings.position": take(emb + "position_embeddings.weight"),
        "embeddings.norm.weight": take(emb + "LayerNorm.weight"),
        "embeddings.norm.bias": take(emb + "LayerNorm.bias"),
    }
    if mt != "distilbert":
        w["embeddings.token_type"] = take(emb + "token_type_embeddings.weight")
    if mt == "electra" and prefix + "embeddings_project.weight" in state:
        w["embeddings.project.weight"] = take(prefix + "embeddings_project.weight")
        w["embeddings.project.bias"] = take(prefix + "embeddings_project.bias")
    names = _layer_names(mt)
    layer_prefix = prefix + ("transformer.layer." if mt == "distilbert" else "encoder.layer.")
    for i in range(spec.num_layers):
        p = f"{layer_prefix}{i}."
        w[f"layers.{i}.qkv.weight"] = np.concatenate([take(p + names[x] + ".weight") for x in "qkv"], axis=0)
        w[f"layers.{i}.qkv.bias"] = np.concatenate([take(p + names[x] + ".bias") for x in "qkv"], axis=0)
        for ours in ("attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm"):
            w[f"layers.{i}.{ours}.weight"] = take(p + names[ours] + ".weight")
            w[f"layers.{i}.{ours}.bias"] = take(p + names[ours] + ".bias")
    w["qa.weight"] = take("qa_outputs.weight")
    w["qa.bias"] = take("qa_outputs.bias")

    hidden = spec.hidden_size
    config = {
        "vocab_size": int(w["embeddings.word"].shape[0]),
        "max_positions": int(w["embeddings.position"].shape[0]),
        "type_vocab_size": int(w["embeddings.token_type"].shape[0]) if "embeddings.token_type" in w else 0,
        "embedding_size": int(w["embeddings.word"].shape[1]),
        "hidden_size": hidden,
        "num_layers": spec.num_layers,
        "num_heads": spec.num_heads,
        "intermediate_size": int(w["layers.0.ffn_in.weight"].shape[0]),
        "position_offset": SUPPORTED[mt].position_offset,
        # DistilBERT's LayerNorms use 1e-12 without saying so in its config
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
        "activation": "gelu",
    }
    if config["embedding_size"] != hidden and "embeddings.project.weight" not in w:
        raise UnsupportedModelError(f"embedding size {config['embedding_size']} != hidden size {hidden} without a projection")
    return config, w


def write_native(model: Any, spec: ModelSpec, path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Write the native encoder's weights to ``path`` (.npz); returns (config, weights) as written."""
    config, weights = native_weights(model, spec)
    with open(path, "wb") as f:
        np.savez(f, **weights)
    return config, weights
