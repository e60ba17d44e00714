"""SpanRT's own encoder on the CPU: INT8 (the default) or BF16 on Intel AMX, or FP32.

The encoder is C++ (kernels/encoder_cpu.cpp, module ``engine._encoder``): linear layers on AMX
tiles in INT8 (per-token dynamic activation scales, per-channel weight scales, int32 sums) or
BF16, attention in BF16 with an fp32 softmax, LayerNorm/GELU/residuals in fp32; or everything in
FP32 with AVX-512 FMA (PyTorch's logits to ~1e-5). It reads the
bundle's ``native`` artifact: the checkpoint's float32 weights under one naming (export/native.py),
packed into tile layouts when the backend opens.

Padding costs nothing: the windows of a batch are packed token after token, the linear layers run
on real tokens only and attention runs per window on its own length. A window's logits are
therefore the same whatever else is in its batch (bit for bit), unlike ONNX Runtime's INT8 model,
whose dynamic activation scales are per batch.

Needs a CPU with AMX and AVX-512 BF16 (Intel Xeon Sapphire Rapids or newer) and Linux's permission
for the AMX tile state: ``engine._kernels.amx_status()`` checks both before the AVX-512 module is
imported; anywhere else this backend raises BackendUnavailableError and ``auto`` moves on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.base import (
    CPU_CALL_COST_TOKENS,
    CPU_MAX_BATCH_TOKENS,
    Backend,
    Consume,
    T,
    default_threads,
    require_artifact,
)
from engine.bundle import Bundle
from engine.errors import BackendUnavailableError, BundleError

NAME = "native"
FORMAT = "native"  # the bundle artifact: float32 weights (.npz) + the encoder config in the manifest
PRECISIONS = ("int8", "bf16", "fp32")
LINEAR_LAYERS = {"int8": "int8 on AMX (per-token activation, per-channel weight scales)", "bf16": "bf16 on AMX",
                 "fp32": "fp32, AVX-512 FMA"}
CONFIG_KEYS = ("vocab_size", "max_positions", "type_vocab_size", "embedding_size", "hidden_size", "num_layers", "num_heads",
               "intermediate_size", "position_offset", "layer_norm_eps")
BUILD_HINT = ("reinstall spanrt on an x86-64 machine with a compiler that has -mamx-int8 (GCC 11+, Clang 12+) "
              "(SPANRT_ENCODER=ON makes the build fail loudly instead of leaving it out)")


def amx_status() -> tuple[bool, str]:
    """(ok, reason): whether this CPU and OS can run the native encoder (no AVX-512 code runs)."""
    from engine import _kernels

    ok, reason = _kernels.amx_status()
    return bool(ok), str(reason)


def import_encoder() -> Any:
    """The engine._encoder module, after checking the CPU; else BackendUnavailableError."""
    ok, reason = amx_status()
    if not ok:
        raise BackendUnavailableError(f"backend 'native' needs Intel AMX and AVX-512 BF16: {reason}")
    try:
        from engine import _encoder
    except ImportError as e:
        raise BackendUnavailableError(f"backend 'native': the encoder module engine._encoder was not built ({e}); {BUILD_HINT}") from e
    return _encoder


def encoder_config(root: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder config recorded in the manifest's native artifact entry of bundle ``root`` (checked)."""
    cfg = info.get("encoder")
    fix = f"export the bundle again: python -m export MODEL_DIR --out {root} --force"
    if not isinstance(cfg, dict) or any(k not in cfg for k in CONFIG_KEYS):
        raise BundleError(f"bundle {root}: the native artifact's 'encoder' config is missing or lacks {CONFIG_KEYS}. Fix: {fix}")
    if cfg.get("activation", "gelu") != "gelu":
        raise BundleError(f"bundle {root}: the native encoder computes GELU only, the manifest says {cfg.get('activation')!r}")
    return {k: cfg[k] for k in CONFIG_KEYS}


class NativeCPU(Backend):
    """The native encoder on the bundle's float32 weights: INT8 or BF16 on AMX, or FP32."""

    name = NAME
    device = "cpu"
    max_batch_tokens = CPU_MAX_BATCH_TOKENS
    call_cost_tokens = CPU_CALL_COST_TOKENS

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None) -> None:
        precision = precision or "int8"
        if precision not in PRECISIONS:
            raise BackendUnavailableError(f"backend 'native' runs {', '.join(PRECISIONS)}, not {precision}: "
                                          "use backend='onnxruntime-cuda' or 'tensorrt' for fp16 on a GPU")
        artifact = require_artifact(bundle, FORMAT, "fp32", self.name)
        if "attention_mask" not in bundle.input_names:  # the encoder finds each window's length in it
            raise BundleError(f"bundle {bundle.root}: the native backend needs an attention_mask input, the manifest lists "
                              f"{bundle.input_names}. Fix: export the bundle again with python -m export")
        config = encoder_config(bundle.root, artifact.info)
        module = import_encoder()  # after the bundle checks: the CPU check, then the AVX-512 module
        try:
            with np.load(artifact.path, allow_pickle=False) as data:
                weights = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {bundle.root}: {artifact.path.name} is not a readable .npz ({e}). "
                              f"Fix: export the bundle again with python -m export") from e
        self.threads = threads or default_threads()
        try:
            self.encoder = module.Encoder(config, weights, precision, self.threads)
        except ValueError as e:
            raise BundleError(f"bundle {bundle.root}: {artifact.path.name}: {e}. Fix: export the bundle again with python -m export") from e
        del weights
        self.precision = precision
        self.input_names = bundle.input_names
        self.input_dtypes = {n: np.dtype(np.int64) for n in self.input_names}
        self.details = {"encoder": "spanrt native (AVX-512)" if precision == "fp32" else "spanrt native (AMX)", "file": artifact.path.name, "threads": self.threads,
                        "linear_layers": LINEAR_LAYERS[precision], "attention": "fp32" if precision == "fp32" else "bf16, fp32 softmax",
                        "padding_computed": False,
                        "max_batch_tokens": self.max_batch_tokens, "call_cost_tokens": self.call_cost_tokens,
                        "config": config}

    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Run the encoder (GIL released; concurrent calls take turns) and pass the host logits on."""
        start, end = self.encoder.forward(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))
        return consume(start, end, None)

    def close(self) -> None:
        """Drop the encoder and its packed weights."""
        self.encoder = None
