"""What an ONNX file holds, read straight from its protobuf bytes: operator types and the element
types of its initializers, so a bundle can check that its "int8" file is a quantized graph and its
"fp32" file is not (the runtime must not need the onnx package).

Only the few fields needed are decoded (ModelProto.graph -> GraphProto.node / .initializer ->
NodeProto.op_type, TensorProto.data_type); everything else, the weights' bytes included, is
skipped by its length, over a memory map, so a 90 MB model costs a few milliseconds.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

# TensorProto.DataType values
FLOAT, FLOAT16, INT8, UINT8 = 1, 10, 3, 2

# field numbers (onnx.proto)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_OP_TYPE = 4
_TENSOR_DATA_TYPE = 2

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class NotOnnxError(ValueError):
    """The bytes are not a readable ONNX model (truncated, another format, or damaged)."""


@dataclass(frozen=True)
class GraphSummary:
    """The operator types of a graph's top level and the element types of its initializers."""

    op_types: frozenset[str]
    initializer_types: frozenset[int]

    @property
    def quantized_ops(self) -> frozenset[str]:
        """The operators that compute in or convert to 8-bit integers (dynamic, static or QDQ)."""
        return frozenset(op for op in self.op_types if is_quantized_op(op))

    @property
    def has_float16(self) -> bool:
        """True when weights are stored as float16."""
        return FLOAT16 in self.initializer_types


def is_quantized_op(op_type: str) -> bool:
    """QuantizeLinear, DynamicQuantizeMatMul, MatMulInteger, QLinear*, QAttention, QGemm, ..."""
    return ("quantize" in op_type.lower() or "Integer" in op_type or op_type.startswith("QLinear")
            or op_type in ("QAttention", "QGemm", "QEmbedLayerNormalization", "QOrderedAttention", "QOrderedMatMul"))


def _varint(buf: memoryview | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotOnnxError(f"a varint runs past its message at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview | mmap.mmap, pos: int, end: int):  # noqa: ANN202 - a private generator
    """(field number, wire type, value or (start, stop) of a length-delimited field) in [pos, end)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise NotOnnxError(f"field number 0 at byte {pos}")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise NotOnnxError(f"field {number} ({size} bytes) runs past its message at byte {pos}")
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:
            raise NotOnnxError(f"wire type {wire} (groups or garbage) at byte {pos}")
    if pos != end:
        raise NotOnnxError("a fixed-size field runs past its message")


def _summarize(buf: memoryview | mmap.mmap) -> GraphSummary:
    graph = None
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire == _LEN:
            graph = value
    if graph is None:
        raise NotOnnxError("no graph in the model")
    ops: set[str] = set()
    types: set[int] = set()
    for number, wire, value in _fields(buf, *graph):
        if wire != _LEN:
            continue
        if number == _GRAPH_NODE:
            for n2, w2, v2 in _fields(buf, *value):
                if n2 == _NODE_OP_TYPE and w2 == _LEN:
                    try:
                        ops.add(bytes(buf[v2[0]:v2[1]]).decode("utf-8"))
                    except UnicodeDecodeError:
                        raise NotOnnxError("an operator name is not UTF-8") from None
        elif number == _GRAPH_INITIALIZER:
            for n2, w2, v2 in _fields(buf, *value):
                if n2 == _TENSOR_DATA_TYPE and w2 == _VARINT:
                    types.add(v2)
                    break
    if not ops:
        raise NotOnnxError("the graph has no operators")
    return GraphSummary(op_types=frozenset(ops), initializer_types=frozenset(types))


def summarize(path: str | Path) -> GraphSummary:
    """The summary of the ONNX model at ``path``; NotOnnxError when it cannot be one, OSError when
    it cannot be read."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise NotOnnxError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _summarize(buf)
