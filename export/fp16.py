"""FP16 ONNX for GPU backends (ONNX Runtime CUDA): inputs/outputs and the span head stay fp32."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.samples import EncodedBatch

FP16_ATOL = 0.05  # logits are O(1-10); fp16 keeps ~3 significant digits


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
    """Check the fp16 graph on ONNX Runtime CPU when its kernels exist there; otherwise say so."""
    from export.onnx import ort_session, verify_against

    try:
        session = ort_session(path)
    except Exception as e:  # noqa: BLE001 - ORT raises plain RuntimeError subclasses for missing kernels
        return {"verified": False, "reason": f"ONNX Runtime CPU cannot run this fp16 graph ({type(e).__name__}); verify on the GPU"}
    figures = verify_against(reference, session, batches, atol=FP16_ATOL, min_span_agreement=0.9, label="ONNX fp16")
    figures["verified"] = True
    return figures
