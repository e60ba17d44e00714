"""Hugging Face span checkpoint -> ONNX: inspect, load, trace, verify against PyTorch, optimize.

Supported heads (``SUPPORTED``): BERT (and BERT-architecture checkpoints such as SpanBERT and
MiniLM), DistilBERT, RoBERTa, ELECTRA, XLM-RoBERTa, CamemBERT, ALBERT, MPNet, DeBERTa-v2 (DeBERTa-v3,
mDeBERTa) and ModernBERT ``*ForQuestionAnswering``. The graph has dynamic batch and sequence axes,
inputs named as the model needs them and outputs ``start_logits`` / ``end_logits``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.manifest import OUTPUT_NAMES
from export.errors import ExportError, UnsupportedModelError, VerificationError
from export.samples import EncodedBatch

MAX_ANSWER_TOKENS = 30  # span length limit used by the span comparisons below


@dataclass(frozen=True)
class Family:
    """What the export knows about one model_type: its span head class, inputs and graph treatment."""

    architecture: str
    input_names: tuple[str, ...]
    position_offset: int  # positions the embedding table reserves (RoBERTa: padding_idx + 1)
    # ONNX Runtime transformer-optimizer fusions that fit the family's graph ("bert": Attention,
    # LayerNorm, GELU, embeddings), or None: the exported graph is kept as traced (plain graph;
    # ONNX Runtime still applies its own graph optimizations when it loads it).
    optimizer: str | None
    attention_fuses: bool  # whether the optimizer's Attention fusion matches each layer
    # Why SpanRT's native encoder cannot compute this family (None: it can); the export writes
    # no native artifact then and records this reason in the manifest.
    not_native: str | None = None
    head: str = "qa_outputs"  # the span head's module: a Linear(hidden, 2)


_BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_ROBERTA_INPUTS = ("input_ids", "attention_mask")

SUPPORTED: dict[str, Family] = {
    "bert": Family("BertForQuestionAnswering", _BERT_INPUTS, 0, "bert", True),
    "distilbert": Family("DistilBertForQuestionAnswering", _ROBERTA_INPUTS, 0, "bert", True),
    "roberta": Family("RobertaForQuestionAnswering", _ROBERTA_INPUTS, 2, "bert", True),
    "electra": Family("ElectraForQuestionAnswering", _BERT_INPUTS, 0, "bert", True),
    "xlm-roberta": Family("XLMRobertaForQuestionAnswering", _ROBERTA_INPUTS, 2, "bert", True),
    "camembert": Family("CamembertForQuestionAnswering", _ROBERTA_INPUTS, 2, "bert", True),
    "albert": Family("AlbertForQuestionAnswering", _BERT_INPUTS, 0, "bert", True),
    "mpnet": Family("MPNetForQuestionAnswering", _ROBERTA_INPUTS, 2, "bert", False,
                     "MPNet adds a bucketed relative position bias to every layer's attention scores, "
                     "which the native encoder does not compute; it runs on ONNX Runtime"),
    "deberta-v2": Family("DebertaV2ForQuestionAnswering", _BERT_INPUTS, 0, "bert", False,
                          "DeBERTa's disentangled (content-to-position) attention is not computed by the native encoder; "
                          "it runs on ONNX Runtime"),
    "modernbert": Family("ModernBertForQuestionAnswering", _ROBERTA_INPUTS, 0, None, False,
                          "ModernBERT (rotary positions, GeGLU, pre-LayerNorm, alternating local/global attention) is not "
                          "computed by the native encoder; it runs on ONNX Runtime", head="classifier"),
}


@dataclass(frozen=True)
class ModelSpec:
    """What the export needs to know about a checkpoint, read from its config.json."""

    model_dir: Path
    model_type: str
    architecture: str
    input_names: tuple[str, ...]
    num_heads: int
    hidden_size: int
    num_layers: int
    vocab_size: int  # rows of the word-embedding table
    max_positions: int  # longest sequence the position embeddings allow
    config: dict[str, Any]

    @property
    def family(self) -> Family:
        """The family entry of this checkpoint's model_type."""
        return SUPPORTED[self.model_type]


def _supported_list() -> str:
    return ", ".join(f"{f.architecture} ({t})" for t, f in SUPPORTED.items())


def inspect_checkpoint(model_dir: str | Path) -> ModelSpec:
    """Read and check a checkpoint folder's config: a supported architecture with a span head."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{d}: no config.json; pass a Hugging Face model folder (config, weights, tokenizer)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, the int digit limit
        raise ExportError(f"{cfg_path}: unreadable ({str(e)[:200] or 'nested too deeply'})") from None
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"{cfg_path}: a model config is a JSON object, this one is a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UnsupportedModelError(f"{cfg_path}: 'architectures' should be a list of class names, got {str(archs)[:80]}")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"{d}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not supported; "
            f"supported span models: {_supported_list()}"
        )
    fam = SUPPORTED[model_type]
    if fam.architecture not in archs:
        raise UnsupportedModelError(
            f"{d}: {', '.join(archs) or 'a model with no architectures entry'} has no span head "
            f"(no start/end logits); export needs a fine-tuned {fam.architecture} checkpoint "
            "(fine-tune one with: python -m export finetune ...)"
        )
    keys = (("n_heads", "dim", "n_layers") if model_type == "distilbert" else
            ("num_attention_heads", "hidden_size", "num_hidden_layers")) + ("vocab_size", "max_position_embeddings")
    sizes = [cfg.get(k) for k in keys]
    bad = [k for k, v in zip(keys, sizes) if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 1 << 31]
    if bad:
        raise UnsupportedModelError(f"{cfg_path}: lacks the model sizes {', '.join(bad)} (positive integers), or they are "
                                    "malformed; pass the checkpoint's own config.json")
    heads, hidden, layers, vocab, positions = sizes
    inputs = fam.input_names
    if cfg.get("type_vocab_size", 1) == 0:  # DeBERTa-v3: no token type embeddings, the input goes unused
        inputs = tuple(n for n in inputs if n != "token_type_ids")
    return ModelSpec(
        model_dir=d, model_type=model_type, architecture=fam.architecture, input_names=inputs,
        num_heads=heads, hidden_size=hidden, num_layers=layers, vocab_size=vocab,
        max_positions=positions - fam.position_offset, config=cfg,
    )


def weight_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files (safetensors preferred, as transformers loads them)."""
    d = Path(model_dir)
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin"):
        found = sorted(d.glob(pattern))
        if found:
            return found
    raise ExportError(f"{d}: no weights (model.safetensors or pytorch_model.bin)")


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of the weights: of the file itself, or of the 'name sha256' lines of all shards."""
    from engine.native_bundle import weights_sha256 as files_sha256

    return files_sha256(weight_files(model_dir))


def load_model(spec: ModelSpec) -> Any:
    """The PyTorch span model in float32 eval mode, with eager attention (the pattern ORT fuses).

    Refuses a checkpoint whose span head weights are missing (transformers would initialise them
    randomly and the export would produce a model that answers at random).
    """
    import torch
    import transformers

    cls = getattr(transformers, spec.architecture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(
            str(spec.model_dir), attn_implementation="eager", output_loading_info=True, local_files_only=True
        )
    head_name = spec.family.head
    missing = [k for k in info.get("missing_keys", []) if k.split(".")[0] == head_name]
    if missing:
        raise UnsupportedModelError(
            f"{spec.model_dir}: the span head weights ({', '.join(sorted(missing))}) are not in the checkpoint; "
            "it is a base encoder, not a fine-tuned span model (fine-tune it first: python -m export finetune ...)"
        )
    head = getattr(model, head_name, None)
    if head is None or getattr(head, "out_features", None) != 2:
        raise UnsupportedModelError(f"{spec.model_dir}: the span head does not give 2 logits per token (start, end)")
    # transformers 5 loads in the checkpoint's dtype ("auto"); the export and its checks run in fp32.
    model = model.to(torch.float32).eval()
    return model


def export_onnx(model: Any, spec: ModelSpec, path: str | Path, *, opset: int = 17) -> None:
    """Trace the model to ONNX with dynamic batch and sequence axes (TorchScript exporter)."""
    import torch

    class SpanHead(torch.nn.Module):
        def __init__(self, inner: Any, names: tuple[str, ...]) -> None:
            super().__init__()
            self.inner, self.names = inner, names

        def forward(self, *inputs: Any) -> tuple[Any, Any]:
            out = self.inner(**dict(zip(self.names, inputs)), return_dict=True)
            return out.start_logits, out.end_logits

    # Batch 2, length 17: distinct, non-trivial sizes so no axis is specialised to a constant.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(spec.vocab_size, 1000), (2, 17), generator=gen)
    dummy = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    dummy["attention_mask"][1, 12:] = 0
    args = tuple(dummy[n] for n in spec.input_names)
    axes = {n: {0: "batch", 1: "sequence"} for n in (*spec.input_names, *OUTPUT_NAMES)}
    wrapper = SpanHead(model, spec.input_names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns about its own deprecation and about traced constants
        # (the mask arithmetic); parity checks below are what proves the trace right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, args, str(path), input_names=list(spec.input_names), output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path))


def best_spans(start: np.ndarray, end: np.ndarray, context_mask: np.ndarray, max_len: int = MAX_ANSWER_TOKENS) -> np.ndarray:
    """Per row, the (start, end) maximising start+end logits over context tokens, end-start < max_len.

    A reference used only to compare two sets of logits; ties go to the smallest start, then end.
    """
    out = np.zeros((start.shape[0], 2), dtype=np.int64)
    s_len = start.shape[1]
    band = np.triu(np.ones((s_len, s_len), dtype=bool)) & ~np.triu(np.ones((s_len, s_len), dtype=bool), k=max_len)
    for r in range(start.shape[0]):
        ok = band & context_mask[r][:, None] & context_mask[r][None, :]
        if not ok.any():
            continue
        scores = np.where(ok, start[r].astype(np.float64)[:, None] + end[r].astype(np.float64)[None, :], -np.inf)
        i = int(np.argmax(scores))  # first maximum in row-major order: smallest start, then end
        out[r] = divmod(i, s_len)
    return out


def compare_logits(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], batch: EncodedBatch,
                   *, tie_tolerance: float) -> dict[str, Any]:
    """Max abs logit difference over real tokens and best-span agreement of two outputs on a batch.

    Two different best spans whose reference scores differ by at most ``tie_tolerance`` count as
    a tie (the reference itself cannot tell them apart), not as a disagreement.
    """
    valid = batch.feeds["attention_mask"].astype(bool)
    diff = max(float(np.max(np.abs(r - g)[valid])) for r, g in zip(ref, got))
    ref_spans = best_spans(*ref, batch.context_mask)
    got_spans = best_spans(*got, batch.context_mask)
    same = ties = 0
    for row, (a, b) in enumerate(zip(ref_spans, got_spans)):
        if (a == b).all():
            same += 1
            continue
        score_a = float(ref[0][row, a[0]]) + float(ref[1][row, a[1]])
        score_b = float(ref[0][row, b[0]]) + float(ref[1][row, b[1]])
        if abs(score_a - score_b) <= tie_tolerance:
            ties += 1
    b, s = batch.shape
    return {"batch": b, "seq": s, "max_abs_diff": diff, "same_span": same, "tied_span": ties, "rows": b,
            "finite": bool(all(np.isfinite(g[valid]).all() for g in got))}


def torch_logits(model: Any, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of the PyTorch model on a batch, as float32 NumPy arrays."""
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.feeds.items()}, return_dict=True)
    return out.start_logits.float().numpy(), out.end_logits.float().numpy()


def ort_session(path: str | Path, *, threads: int = 0, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    """An ONNX Runtime session with the graph optimizations the runtime uses on that provider
    (on the CPU: all but SkipLayerNormFusion, engine.backends.CPU_DISABLED_OPTIMIZERS)."""
    import onnxruntime as ort

    from engine.backends import CPU_DISABLED_OPTIMIZERS

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    disabled = list(CPU_DISABLED_OPTIMIZERS) if providers[0] == "CPUExecutionProvider" else None
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers), disabled_optimizers=disabled)


def ort_logits(session: Any, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of an ONNX Runtime session on a batch, as float32."""
    start, end = session.run(list(OUTPUT_NAMES), batch.feeds)
    return np.asarray(start, dtype=np.float32), np.asarray(end, dtype=np.float32)


def verify_against(reference: list[tuple[np.ndarray, np.ndarray]], session: Any, batches: list[EncodedBatch], *,
                   atol: float | None, min_span_agreement: float, label: str) -> dict[str, Any]:
    """Run ``session`` on ``batches`` and compare with ``reference`` logits; raise on failure.

    ``atol`` bounds the max abs logit difference (None: recorded, not enforced); the share of rows
    with the same best span (ties included) must reach ``min_span_agreement``.
    """
    cases = []
    for ref, batch in zip(reference, batches):
        cases.append(compare_logits(ref, ort_logits(session, batch), batch, tie_tolerance=2 * (atol or 0.0)))
    rows = sum(c["rows"] for c in cases)
    agree = sum(c["same_span"] + c["tied_span"] for c in cases)
    figures = {
        "max_abs_diff": max(c["max_abs_diff"] for c in cases),
        "span_agreement": agree / rows,
        "rows": rows,
        "cases": cases,
    }
    if atol is not None:
        figures["atol"] = atol
    problems = []
    if not all(c["finite"] for c in cases):
        problems.append("non-finite logits")
    if atol is not None and figures["max_abs_diff"] > atol:
        problems.append(f"max abs logit difference {figures['max_abs_diff']:.3g} > {atol:g}")
    if figures["span_agreement"] < min_span_agreement:
        problems.append(f"same best span on {agree}/{rows} rows (need {min_span_agreement:.0%})")
    if problems:
        shapes = ", ".join(f"{c['batch']}x{c['seq']}" for c in cases)
        raise VerificationError(f"{label} failed verification on batches {shapes}: {'; '.join(problems)}; no bundle was written")
    return figures


def optimize_onnx(src: str | Path, dst: str | Path, spec: ModelSpec, *, skip_layer_norm: bool = False) -> dict[str, int]:
    """Fuse attention, LayerNorm, GELU and embeddings with ONNX Runtime's transformer optimizer,
    where it knows the family (``Family.optimizer``); else write the traced graph unchanged.

    Returns the fused-operator counts ({} for a plain graph). The families it knows use the 'bert'
    fusions (ORT's and Optimum's mapping: they are BERT-shaped encoders; on DeBERTa's and MPNet's
    graphs only some fusions match, see ``Family.attention_fuses``). ``skip_layer_norm``
    fuses residual Add + LayerNormalization into SkipLayerNormalization: right for GPUs, wrong for
    the CPU graphs (fp32, int8), where ONNX Runtime 1.32's SkipLayerNormalization kernel is slower
    than the two ops it replaces (see engine/backends/_ort.py for the figures).
    """
    import onnx

    if spec.family.optimizer is None:
        onnx.save(onnx.load(str(src)), str(dst))
        return {}
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions(spec.family.optimizer)
    opts.enable_gelu_approximation = False  # exact erf GELU: keeps parity with PyTorch
    opts.enable_skip_layer_norm = skip_layer_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(
            str(src), model_type=spec.family.optimizer, num_heads=spec.num_heads, hidden_size=spec.hidden_size,
            optimization_options=opts, opt_level=0, use_gpu=False,
        )
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(dst))
    return stats
