"""SpanRT's own encoder on the CPU: INT8 (the default), BF16 or FP32, on every CPU.

The encoder is C++ (kernels/encoder/, module ``engine._encoder``): linear layers in INT8 (per-token
dynamic activation scales, per-channel weight scales, exact int32 sums), BF16 (where the CPU
computes bf16 natively) or FP32; LayerNorm/GELU/residuals in fp32. It reads the bundle's ``native``
artifact: the checkpoint's float32 weights under one naming (engine/native_weights.py), packed for
the chosen instruction-set path when the backend opens.

The path is chosen at run time from what the CPU reports, best first: ``amx`` (Intel Xeon Sapphire
Rapids and newer), ``avx512_bf16`` (AVX-512 VNNI + BF16: AMD Zen 4/5, Intel Cooper Lake),
``avx512_vnni`` (Intel Cascade Lake, Ice Lake), ``avx2_vnni`` (AVX-VNNI: Intel Alder Lake and later
client chips, AMD Zen 5), ``avx2`` (Intel Haswell and newer, AMD Zen 1-3), ``neon_i8mm`` (AArch64
with smmla: Graviton 3/4), ``neon`` (AArch64 with sdot: Graviton 2, Jetson Orin) or ``generic`` C++. A cap, as oneDNN's ONEDNN_MAX_CPU_ISA: the ``cpu_isa`` option or the
environment variable ``SPANRT_CPU_ISA`` names the highest path to use (tests run every lower path on
one machine).

Padding costs nothing: the windows of a batch are packed token after token, the linear layers run
on real tokens only and attention runs per window on its own length. A window's logits are
therefore the same whatever else is in its batch (bit for bit, on every path), unlike ONNX
Runtime's INT8 model, whose dynamic activation scales are per batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.backends.base import Availability, BackendOptions, Consume, CPUBackend, T, default_threads, require_artifact
from engine.bundle import Bundle
from engine.errors import BackendUnavailableError, BundleError, InvalidInputError
from engine.native_weights import EncoderConfig

NAME = "native"
FORMAT = "native"  # the bundle artifact: float32 weights (.npz) + the encoder config in the manifest
PRECISIONS = ("int8", "bf16", "fp32")
ISA_ENV = "SPANRT_CPU_ISA"
# Paths "auto" uses: measured faster than ONNX Runtime's CPU provider at the same precision
# (README, "The native encoder on every CPU"). The generic C++ path is correct, not tuned: "auto"
# leaves it to ONNX Runtime, and backend="native" still runs it.
AUTO_ISAS = ("amx", "avx512_bf16", "avx512_vnni", "avx2_vnni", "avx2", "neon_i8mm", "neon")
BUILD_HINT = ("reinstall spanrt with a C++17 compiler that knows this CPU's instruction sets (x86-64: GCC 11+ or Clang 12+; "
              "AArch64: -march=armv8.2-a+dotprod+i8mm, GCC 10+); SPANRT_ENCODER=ON makes the build fail loudly instead of leaving it out")


def import_encoder() -> Any:
    """The engine._encoder module (importable on every CPU), or BackendUnavailableError."""
    try:
        from engine import _encoder
    except ImportError as e:
        raise BackendUnavailableError(f"backend 'native': the encoder module engine._encoder was not built ({e}); {BUILD_HINT}") from e
    return _encoder


def choose_isa(module: Any, cap: str | None = None) -> str:
    """The path to run: the best this CPU runs, at most ``cap`` (else $SPANRT_CPU_ISA).

    InvalidInputError for an unknown name; BackendUnavailableError for a path this CPU cannot run."""
    source = "cpu_isa"
    if cap is None:
        cap, source = os.environ.get(ISA_ENV) or None, ISA_ENV
    status = dict(module.isa_status())  # path -> "" or why it cannot run, best first
    known = list(status)
    if cap is None:
        return next(isa for isa, why in status.items() if not why)  # generic always runs
    if cap not in status:
        raise InvalidInputError(f"{source}={cap!r} is not an instruction-set path of the native encoder; this build knows "
                                f"{', '.join(known)} (best first)")
    if status[cap]:
        raise BackendUnavailableError(f"backend 'native': {source}={cap!r} cannot run on this CPU: {status[cap]}")
    return cap


def auto_skip_reason(cap: str | None = None) -> str | None:
    """Why "auto" should not use the native encoder here (None: use it)."""
    return _slower_than_onnxruntime(choose_isa(import_encoder(), cap))


def _slower_than_onnxruntime(isa: str) -> str | None:
    if isa not in AUTO_ISAS:
        return (f"the {isa} path (portable C++, no vector instruction set this build tunes for) is slower than ONNX Runtime; "
                "backend='native' runs it on request")
    return None


class NativeCPU(CPUBackend):
    """The native encoder on the bundle's float32 weights: INT8, BF16 or FP32 on this CPU's best path."""

    name = NAME
    FORMAT = FORMAT
    PRECISIONS = PRECISIONS
    COMPUTED_FROM = "fp32"  # INT8, BF16 or FP32 computed from the bundle's float32 weights
    # Its INT8 and FP32 are the fastest CPU models of those precisions here; its BF16 is slower
    # than OpenVINO's in batches.
    AUTO_PRECISIONS = ("int8", "fp32")
    AUTO_NOTE = "ask for backend='native' explicitly"
    OPTIONS = ("threads", "cpu_isa")

    @classmethod
    def available(cls, bundle: Bundle, options: BackendOptions, *, auto: bool = False) -> Availability:
        """Whether the encoder module was built and runs the path ``options.cpu_isa`` caps it to
        (an unknown path name is an InvalidInputError); with ``auto``, also whether that path is
        one "auto" uses (AUTO_ISAS). A bundle whose export wrote no native weights says why."""
        record = bundle.manifest.native_encoder  # the export's word on why it wrote no weights
        if not bundle.precisions(FORMAT) and isinstance(record, dict) and record.get("reason"):
            return Availability(f"backend 'native' needs the fp32 native model, but bundle {bundle.root} has no native "
                                f"encoder weights: {record['reason']}")
        try:
            isa = choose_isa(import_encoder(), options.cpu_isa)
        except BackendUnavailableError as e:
            return Availability(str(e))
        return Availability(_slower_than_onnxruntime(isa) if auto else None)

    def __init__(self, bundle: Bundle, precision: str | None = None, *, threads: int | None = None, cpu_isa: str | None = None) -> None:
        precision = precision or PRECISIONS[0]
        if precision not in PRECISIONS:
            raise BackendUnavailableError(f"backend 'native' runs {', '.join(PRECISIONS)}, not {precision}: "
                                          "use backend='onnxruntime-cuda' or 'tensorrt' for fp16 on a GPU")
        artifact = require_artifact(bundle, FORMAT, "fp32", self.name)
        if "attention_mask" not in bundle.input_names:  # the encoder finds each window's length in it
            raise BundleError(f"bundle {bundle.root}: the native backend needs an attention_mask input, the manifest lists "
                              f"{bundle.input_names}. Fix: export the bundle again with python -m export")
        config = EncoderConfig.from_json(artifact.info.get("encoder"), root=bundle.root)
        module = import_encoder()
        isa = choose_isa(module, cpu_isa)
        if precision not in module.isa_precisions(isa):
            raise BackendUnavailableError(f"backend 'native' computes {', '.join(module.isa_precisions(isa))} on the {isa} path of "
                                          f"this CPU, not {precision}" +
                                          (" (bf16 needs AVX-512 BF16 or AMX)" if precision == "bf16" else ""))
        try:
            with np.load(artifact.path, allow_pickle=False) as data:
                weights = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {bundle.root}: {artifact.path.name} is not a readable .npz ({e}). "
                              f"Fix: export the bundle again with python -m export") from e
        self.threads = threads or default_threads()
        try:
            self.encoder = module.Encoder(config.to_json(), weights, precision, self.threads, isa)
        except ValueError as e:
            raise BundleError(f"bundle {bundle.root}: {artifact.path.name}: {e}. Fix: export the bundle again with python -m export") from e
        except RuntimeError as e:
            raise BackendUnavailableError(f"backend 'native': {e}") from e
        del weights
        self.precision = precision
        self.isa = str(self.encoder.isa)
        self.input_names = bundle.input_names
        self.input_dtypes = {n: np.dtype(np.int64) for n in self.input_names}
        self.details = {"encoder": f"spanrt native ({self.isa})", "isa": self.isa, "file": artifact.path.name, "threads": self.threads,
                        "linear_layers": self.encoder.linear_layers, "attention": self.encoder.attention,
                        "cpu_features": [k for k, v in module.cpu_features().items() if v is True],
                        "padding_computed": False,
                        "max_batch_tokens": self.max_batch_tokens, "call_cost_tokens": self.call_cost_tokens,
                        "config": config.to_json()}

    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Run the encoder (GIL released; concurrent calls take turns) and pass the host logits on."""
        start, end = self.encoder.forward(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))
        return consume(start, end, None)

    def close(self) -> None:
        """Drop the encoder and its packed weights."""
        self.encoder = None
