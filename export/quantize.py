"""INT8 quantization of the optimized fp32 graph for CPU inference (ONNX Runtime, VNNI path).

Two recipes, chosen per bundle by ``--int8`` (the default was chosen by measurement on SQuAD v1.1
dev; see README "INT8 accuracy"):

- ``dynamic``: weights int8 per channel, activations quantized at run time per tensor
  (MatMul -> DynamicQuantizeMatMul, Attention -> QAttention). No calibration data needed.
- ``static``: QDQ with weights int8 per channel and activations uint8 with ranges calibrated on
  real SQuAD train questions; the span head stays fp32.

``reduce_range`` (7-bit weights) is switched on automatically on x86 CPUs without VNNI, where
the u8s8 multiply-add can saturate; it is recorded in the manifest.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.progress import Progress
from export.samples import EncodedBatch

RECIPES = ("dynamic", "static")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class QuantConfig:
    """One INT8 recipe: how weights and activations are quantized and what stays fp32."""

    recipe: str = "dynamic"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: decide from the CPU (no VNNI on x86 -> True)
    op_types: tuple[str, ...] = ("MatMul", "Attention")
    keep_head_fp32: bool = True  # the span head (hidden -> 2 logits) is tiny and sets every answer
    calibration: str = "minmax"  # static only
    percentile: float = 99.999  # static + percentile only
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ExportError(f"unknown INT8 recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.calibration not in CALIBRATION_METHODS:
            raise ExportError(f"unknown calibration method {self.calibration!r}; choose one of {', '.join(CALIBRATION_METHODS)}")


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has an 8-bit dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX);
    None when it cannot be told (not Linux x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_reduce_range(cfg: QuantConfig) -> bool:
    """The reduce_range to use: the config's, else True only on x86 without VNNI."""
    if cfg.reduce_range is not None:
        return cfg.reduce_range
    return cpu_has_vnni() is False


def span_head_nodes(model: Any) -> list[str]:
    """Names of the MatMul/Gemm nodes of the span head: weight of shape [hidden, 2]."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and any(len(shapes.get(i, ())) == 2 and shapes[i][-1] == 2 for i in node.input[1:]):
            found.append(node.name)
    return found


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silence the quantizer's chatter (root-logger warnings, Python warnings, and the histogram
    calibrators' print() per sample) while it runs; the progress bar goes to stderr."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


class _Reader:
    """CalibrationDataReader over encoded batches (one forward pass each).

    Supports ORT's strided calibration (``__len__`` + ``set_range``): the histogram calibrators
    stack a chunk's outputs, so variable-length samples must be fed one chunk at a time, which
    also bounds their memory.
    """

    def __init__(self, batches: list[EncodedBatch], names: list[str], progress: Progress | None = None) -> None:
        self._feeds = [{n: b.feeds[n] for n in names} for b in batches]
        self._it = iter(self._feeds)
        self._bar = (progress or Progress(quiet=True)).counter(len(self._feeds), "calibration")

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self) -> dict[str, Any] | None:
        item = next(self._it, None)
        if item is not None:
            self._bar.update()
        return item

    def close(self) -> None:
        self._bar.close()


def quantize(src: str | Path, dst: str | Path, cfg: QuantConfig, *, calibration: list[EncodedBatch] | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Write the INT8 model of ``src`` (an optimized fp32 ONNX graph) to ``dst``; return its manifest info."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    model = onnx.load(str(src))
    if cfg.recipe == "static":
        # The histogram calibrators pick tensors by their inferred types; the fused com.microsoft
        # ops are only understood by ORT's symbolic shape inference.
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with _quiet_quantizer():
            model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    exclude = list(cfg.exclude_nodes)
    head = span_head_nodes(model)
    if cfg.keep_head_fp32:
        if not head:
            raise ExportError(f"{src}: span head MatMul (weight [hidden, 2]) not found; cannot keep it in fp32")
        exclude += head
    reduce_range = resolve_reduce_range(cfg)
    # ORT 1.32's quantizer cannot infer types through the com.microsoft fused ops without this.
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}
    info: dict[str, Any] = {**asdict(cfg), "reduce_range": reduce_range, "excluded_nodes": exclude, "cpu_vnni": cpu_has_vnni()}
    info["op_types"] = list(cfg.op_types)
    info["exclude_nodes"] = list(cfg.exclude_nodes)
    with _quiet_quantizer():
        if cfg.recipe == "dynamic":
            for k in ("calibration", "percentile"):
                info.pop(k)
            quantize_dynamic(
                model, str(dst), op_types_to_quantize=list(cfg.op_types), per_channel=cfg.per_channel,
                reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options=extra,
            )
            info.update(activations="uint8 dynamic (per tensor, run time)", weights="int8 symmetric" + (" per channel" if cfg.per_channel else ""))
        else:
            if not calibration:
                raise ExportError("static INT8 needs calibration data (--calibration-data / --calibration-samples > 0)")
            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[cfg.calibration]
            if cfg.calibration == "percentile":
                extra["CalibPercentile"] = cfg.percentile
            if cfg.calibration != "minmax":
                extra["CalibStridedMinMax"] = 1  # one sample per collect: variable lengths, bounded memory
            names = [i.name for i in model.graph.input]
            reader = _Reader(calibration, names, progress)
            quantize_static(
                model, str(dst), reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=[t for t in cfg.op_types if t != "Attention"], per_channel=cfg.per_channel,
                reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, calibrate_method=method, extra_options=extra,
            )
            reader.close()
            info.update(activations="uint8 static (calibrated)", weights="int8 symmetric" + (" per channel" if cfg.per_channel else ""),
                        calibration_batches=len(calibration))
    return info


def quantize_for_tensorrt(src: str | Path, dst: str | Path, *, calibration: list[EncodedBatch], progress: Progress | None = None) -> dict[str, Any]:
    """QDQ INT8 graph for TensorRT's explicit quantization, from the unfused fp32 graph.

    TensorRT takes int8 only as symmetric (zero point 0) signed values: activations and weights
    are QInt8 symmetric, weights per output channel; only MatMuls with constant weights get Q/DQ
    (the attention score products and LayerNorm/Softmax stay in higher precision), and the span
    head stays fp32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ExportError("the TensorRT INT8 graph needs calibration data (--calibration-samples > 0)")
    model = onnx.load(str(src))
    head = span_head_nodes(model)
    if not head:
        raise ExportError(f"{src}: span head MatMul (weight [hidden, 2]) not found")
    names = [i.name for i in model.graph.input]
    reader = _Reader(calibration, names, progress)
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "DefaultTensorType": onnx.TensorProto.FLOAT}
    with _quiet_quantizer():
        quantize_static(
            model, str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            per_channel=True, reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=head, calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
        )
    reader.close()
    return {"recipe": "static-qdq-s8s8", "activations": "int8 symmetric static (calibrated, minmax)",
            "weights": "int8 symmetric per output channel", "op_types": ["MatMul"], "excluded_nodes": head,
            "calibration_batches": len(calibration), "target": "tensorrt explicit quantization"}
