"""Bundles for the runtime tests, built locally in milliseconds (no download, no torch).

``lookup_bundle`` writes a real SpanRT bundle whose ONNX "model" is a table lookup: the start and
end logits of a token are fixed numbers chosen per token id. Planting a high start and end logit
on the tokens of a phrase makes that phrase the answer wherever it occurs, which turns window,
offset, merge and null-answer logic into exact, predictable checks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from engine.default_model import CHECKPOINT_DIR

TOKENIZER_JSON = CHECKPOINT_DIR / "tokenizer.json"  # MiniLM / BERT uncased WordPiece, 30522 tokens
VOCAB_SIZE = 30522
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_JSON))
    tok.no_truncation()
    tok.no_padding()
    return tok


def token_ids(text: str) -> list[int]:
    """Ids of ``text`` under the bundles' tokenizer, without special tokens."""
    return _tokenizer().encode(text, add_special_tokens=False).ids


def lookup_tables(*, start: dict[int, float] | None = None, end: dict[int, float] | None = None,
                  seed: int = 0, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-token start/end logits: small seeded noise plus the planted values."""
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(VOCAB_SIZE) * noise).astype(np.float32)
    e = (rng.standard_normal(VOCAB_SIZE) * noise).astype(np.float32)
    for tid, v in (start or {}).items():
        s[tid] = v
    for tid, v in (end or {}).items():
        e[tid] = v
    return s, e


def write_lookup_onnx(path: Path, start_table: np.ndarray, end_table: np.ndarray, *, logits_dtype: str = "float32",
                      quantized: bool = False) -> None:
    """An ONNX graph: start_logits = start_table[input_ids], end_logits = end_table[input_ids].

    ``quantized`` adds an exact zero that passes through QuantizeLinear/DequantizeLinear, so the
    graph is an int8 graph to the bundle loader and its logits stay the same numbers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ftype = TensorProto.FLOAT if logits_dtype == "float32" else TensorProto.FLOAT16
    np_type = np.float32 if logits_dtype == "float32" else np.float16
    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info(n, ftype, dims) for n in ("start_logits", "end_logits")]
    inits = [numpy_helper.from_array(start_table.astype(np_type), "start_table"),
             numpy_helper.from_array(end_table.astype(np_type), "end_table")]
    # The mask and type inputs take part (so the graph uses every input it declares): a padded
    # position's logit gets -10000 added, as a real model's would be meaningless there.
    nodes = [
        helper.make_node("Gather", ["start_table", "input_ids"], ["s_raw"], axis=0),
        helper.make_node("Gather", ["end_table", "input_ids"], ["e_raw"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=ftype),
        helper.make_node("Cast", ["token_type_ids"], ["types_f"], to=ftype),
        helper.make_node("Sub", ["mask_f", "one"], ["mask_pen0"]),
        helper.make_node("Mul", ["mask_pen0", "big"], ["mask_pen"]),
        helper.make_node("Mul", ["types_f", "zero"], ["types_zero"]),
        helper.make_node("Add", ["mask_pen", "types_zero"], ["pen_raw" if quantized else "pen"]),
    ]
    outputs_nodes = [helper.make_node("Add", ["s_raw", "pen"], ["start_logits"]),
                     helper.make_node("Add", ["e_raw", "pen"], ["end_logits"])]
    inits += [numpy_helper.from_array(np.array(v, dtype=np_type), n) for n, v in (("one", 1.0), ("big", 10000.0), ("zero", 0.0))]
    if quantized:
        inits += [numpy_helper.from_array(np.array(1.0, np.float32), "q_scale"), numpy_helper.from_array(np.array(0, np.int8), "q_zero")]
        nodes += [helper.make_node("Cast", ["zero"], ["zero32"], to=TensorProto.FLOAT),
                  helper.make_node("QuantizeLinear", ["zero32", "q_scale", "q_zero"], ["zero_q"]),
                  helper.make_node("DequantizeLinear", ["zero_q", "q_scale", "q_zero"], ["zero_dq"]),
                  helper.make_node("Cast", ["zero_dq"], ["zero_back"], to=ftype),
                  helper.make_node("Add", ["pen_raw", "zero_back"], ["pen"])]
    nodes += outputs_nodes
    graph = helper.make_graph(nodes, "lookup_span_model", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def lookup_bundle(root: Path, *, start: dict[int, float] | None = None, end: dict[int, float] | None = None,
                  precisions: tuple[str, ...] = ("fp32",), max_seq_len: int = 64, seed: int = 0, noise: float = 0.5) -> Path:
    """A bundle folder at ``root`` holding the lookup model once per precision (the same numbers:
    a bundle that claims int8 lets the tests see which file a backend picked)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TOKENIZER_JSON, root / "tokenizer.json")
    s, e = lookup_tables(start=start, end=end, seed=seed, noise=noise)
    artifacts = []
    for p in precisions:
        name = f"model.{p}.onnx"
        write_lookup_onnx(root / name, s, e, logits_dtype="float16" if p == "fp16" else "float32", quantized=p == "int8")
        artifacts.append({"path": name, "format": "onnx", "precision": p, "sha256": _sha(root / name)})
    manifest = {
        "format": "spanrt-bundle", "format_version": 1, "model_type": "bert", "architecture": "BertForQuestionAnswering",
        "source": {"path": str(root / "no-checkpoint")}, "max_seq_len": max_seq_len, "vocab_size": VOCAB_SIZE,
        "do_lower_case": True, "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "outputs": ["start_logits", "end_logits"],
        "tokenizer": {"path": "tokenizer.json", "sha256": _sha(root / "tokenizer.json"), "cls_token": "[CLS]",
                      "cls_token_id": CLS_ID, "sep_token": "[SEP]", "sep_token_id": SEP_ID, "pad_token": "[PAD]",
                      "pad_token_id": PAD_ID},
        "artifacts": artifacts,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def planted(phrase: str, value: float = 12.0) -> dict[str, dict[int, float]]:
    """start/end tables that make ``phrase`` (its first and last token) the answer."""
    ids = token_ids(phrase)
    return {"start": {ids[0]: value}, "end": {ids[-1]: value}}
