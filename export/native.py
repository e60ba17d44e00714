"""The native encoder's weights from a loaded PyTorch span model: its state dict as NumPy arrays
through the runtime's own name mapping (engine/native_weights.py, one table for every family),
written as a float32 ``.npz`` (plain arrays, loaded without pickle) plus the encoder's config
(engine.native_weights.EncoderConfig), which the manifest records. The runtime builds the same
file from a checkpoint's safetensors without PyTorch (engine/native_bundle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UnsupportedCheckpointError
from engine.native_weights import NATIVE_FILE, EncoderConfig, write_npz  # noqa: F401 - NATIVE_FILE re-exported for the pipeline
from engine.native_weights import native_weights as _native_weights
from export.errors import UnsupportedModelError
from export.onnx import ModelSpec


def native_weights(model: Any, spec: ModelSpec) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
    """(config, weights) of a loaded span model (export.onnx.load_model) for the native encoder.

    Raises UnsupportedModelError for what the encoder does not compute (another activation,
    relative position embeddings, pre-LayerNorm variants)."""
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    try:
        return _native_weights(state, spec.config)
    except UnsupportedCheckpointError as e:
        raise UnsupportedModelError(str(e)) from None


def write_native(model: Any, spec: ModelSpec, path: str | Path) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
    """Write the native encoder's weights to ``path`` (.npz); returns (config, weights) as written."""
    config, weights = native_weights(model, spec)
    write_npz(weights, path)
    return config, weights
