"""FP16 ONNX for GPU backends (ONNX Runtime CUDA): inputs/outputs and the span head stay fp32."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.samples import EncodedBatch

FP16_ATOL = 0.05  # logits are O(1-10); fp16 keeps ~3 significant digits
FP16_RTOL = 1e-3  # ... so larger logits get 0.1 % of the largest one (two fp16 rounding steps)


def convert_fp16(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Convert the optimized fp32 graph to fp16, keeping graph I/O and the span head in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    from export.quantize import span_head_nodes

    model = OnnxModel(onnx.load(str(src)))
    head = span_head_nodes(model.model)
    if not head:
        raise ExportError(f"{src}: span head MatMul (weight [hidden, 2]) not found")
    # The fused LayerNorm/Attention kernels accumulate in fp32 internally on CUDA; the span head
    # (hidden -> 2) is kept in fp32 so the logits the decoder ranks are not rounded to fp16.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.convert_float_to_float16(keep_io_types=True, node_block_list=head, op_block_list=list(DEFAULT_OP_BLOCK_LIST))
    model.save_model_to_file(str(dst))
    return {"keep_io_types": True, "fp32_nodes": head, "op_block_list": "onnxruntime default"}


def verify_fp16(reference: list[tuple[np.ndarray, np.ndarray]], path: str | Path, batches: list[EncodedBatch]) -> dict[str, Any]:
    """Check an fp16 graph on ONNX Runtime CPU against the PyTorch logits (raises on failure):
    within FP16_ATOL, or FP16_RTOL of the largest reference logit where that is more."""
    from export.onnx import ort_session, verify_against

    largest = max(float(np.max(np.abs(logits[b.feeds["attention_mask"].astype(bool)])))
                  for pair, b in zip(reference, batches) for logits in pair)
    atol = max(FP16_ATOL, FP16_RTOL * largest)
    return verify_against(reference, ort_session(path), batches, atol=atol, min_span_agreement=0.9, label=f"{Path(path).name}")


def convert_fp16_for_tensorrt(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """FP16 standard-op graph for strongly typed TensorRT: fp16 everywhere except Cast-wrapped
    fp32 islands for LayerNormalization and Softmax (FP16 LayerNorm overflows), graph I/O and
    the span head."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from export.quantize import span_head_nodes

    model = onnx.load(str(src))
    head = span_head_nodes(model)
    if not head:
        raise ExportError(f"{src}: span head MatMul (weight [hidden, 2]) not found")
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | {"LayerNormalization", "Softmax"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked, node_block_list=head)
    onnx.save(model16, str(dst))
    return {"keep_io_types": True, "fp32_ops": ["LayerNormalization", "Softmax"], "fp32_nodes": head,
            "target": "tensorrt strong typing (weak typing: FP16 flag + fp32 constraints on the same layers)"}
