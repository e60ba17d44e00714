"""PyTorch: the reference backend (CPU or CUDA, FP32 or FP16), running the bundle's source checkpoint.

It loads the Hugging Face checkpoint the bundle was exported from (manifest ``source.path``,
safetensors only, never a pickle) with transformers, so it needs the export extra:
``pip install "spanrt[export]"``. It exists to check the exported models against their origin, not
for speed. ``torch.set_num_threads`` is process-wide: the last torch backend created sets it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.base import Consume, CPUBackend, T, default_threads
from engine.bundle import Bundle, sha256_file
from engine.errors import BackendUnavailableError, BundleError

PRECISIONS = ("fp32", "fp16")
EXPORT_HINT = 'pip install "spanrt[export]" (on CPU-only machines: pip install torch==2.13.0 first)'


def import_torch() -> tuple[Any, Any]:
    """torch and transformers, or BackendUnavailableError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BackendUnavailableError(f"the torch backend needs torch and transformers ({e}); install them with: {EXPORT_HINT}") from e
    return torch, transformers


def source_checkpoint(bundle: Bundle) -> Path:
    """The checkpoint folder the bundle was exported from (absolute, or relative to the bundle)."""
    source = bundle.manifest.source
    path = source.get("path") if isinstance(source, dict) else None
    if not isinstance(path, str) or not path:
        raise BackendUnavailableError(f"bundle {bundle.root}: the manifest records no source checkpoint path, which the torch backend loads")
    p = Path(path)
    p = p if p.is_absolute() else bundle.root / p
    weights = sorted(p.glob("model.safetensors")) or sorted(p.glob("model-*-of-*.safetensors"))
    if not (p / "config.json").is_file() or not weights:
        raise BackendUnavailableError(
            f"the torch backend loads the bundle's source checkpoint {p}, which has no config.json + safetensors weights here "
            "(pickled .bin weights are never loaded): copy the checkpoint there, or use an ONNX backend")
    expected = source.get("weights_sha256") if isinstance(source, dict) else None
    if isinstance(expected, str) and expected:
        if len(weights) == 1:
            actual = sha256_file(weights[0])
        else:
            actual = hashlib.sha256("".join(f"{f.name} {sha256_file(f)}\n" for f in weights).encode()).hexdigest()
        if actual != expected:
            raise BundleError(f"bundle {bundle.root}: source checkpoint {p} changed since the export (weights sha256 "
                              f"{actual[:16]}..., manifest {expected[:16]}...). Fix: export the bundle again from it")
    return p


def _check_cuda() -> None:
    torch, _ = import_torch()
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"backend 'torch-cuda' needs a CUDA build of torch and a GPU (torch {torch.__version__} sees none)")


class TorchBackend(CPUBackend):
    """transformers' *ForQuestionAnswering on torch, in inference mode, on the CPU (with the same
    cache-bound cost per token as ONNX Runtime there) or, as TorchCUDA, on a GPU."""

    name = "torch"
    FORMAT = None  # the source checkpoint, not a bundle artifact
    PRECISIONS = PRECISIONS
    PROBES = (import_torch,)
    OPTIONS = ("threads", "device_id")

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None, device_id: int = 0) -> None:
        device = self.device
        torch, transformers = import_torch()
        precision = precision or PRECISIONS[0]
        if precision not in PRECISIONS:
            raise BackendUnavailableError(f"the torch backend runs {' or '.join(PRECISIONS)}, not {precision}")
        if device == "cuda":
            _check_cuda()
        checkpoint = source_checkpoint(bundle)
        self.threads = threads or default_threads()
        if device == "cpu":
            torch.set_num_threads(self.threads)
        self._device = torch.device("cuda", device_id) if device == "cuda" else torch.device("cpu")
        try:
            model = transformers.AutoModelForQuestionAnswering.from_pretrained(
                checkpoint, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {bundle.root}: source checkpoint {checkpoint} cannot be loaded ({e})") from e
        # float32 whatever dtype the weights are stored in (as the export loads them)
        model = model.float().eval()
        if precision == "fp16":
            model.half()
        self.model = model.to(self._device)
        self._torch = torch
        self.precision = precision
        self.input_names = bundle.input_names
        self.input_dtypes = {n: np.dtype(np.int64) for n in bundle.input_names}
        self.details = {"checkpoint": str(checkpoint), "torch": torch.__version__, "device": str(self._device),
                        "threads": self.threads if device == "cpu" else None}

    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Forward pass in inference mode; logits go on as NumPy (CPU) or CUDA tensors."""
        torch = self._torch
        with torch.inference_mode():
            inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self._device) for k, v in feeds.items()}
            out = self.model(**inputs)
            start, end = out.start_logits.contiguous(), out.end_logits.contiguous()
            if self.device == "cpu":
                return consume(start.numpy(), end.numpy(), None)
            stream = torch.cuda.current_stream(self._device).cuda_stream
            return consume(start, end, stream)

    def to_device(self, array: np.ndarray) -> Any:
        """The mask as a tensor on this backend's device."""
        if self.device == "cpu":
            return array
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self._device)

    def close(self) -> None:
        """Drop the model."""
        self.model = None


class TorchCUDA(TorchBackend):
    """The torch reference on an NVIDIA GPU (no batch budget beyond max_batch_size, as the GPU backends)."""

    name = "torch-cuda"
    device = "cuda"
    max_batch_tokens = None
    call_cost_tokens = 0
    PROBES = (import_torch, _check_cuda)
