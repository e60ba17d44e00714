"""The whole export: checkpoint -> verified ONNX -> optimized -> INT8 / FP16 -> (TensorRT) -> bundle.

Every graph is checked against PyTorch on real SQuAD train questions before it is kept; any
failure raises and leaves no bundle behind (the writer's temporary folder is removed).
"""

from __future__ import annotations

import importlib.metadata
import platform
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.manifest import Manifest
from engine.native_bundle import DEFAULT_MAX_SEQ_LEN
from export.bundle import BundleWriter
from export.errors import ExportError, UnsupportedModelError
from export.progress import Progress
from export.quantize import QuantConfig
from export.samples import EncodedBatch, Pair, encode_pairs, fits, load_pairs

ORT_PRECISIONS = ("fp32", "int8", "fp16")
TRT_PRECISIONS = ("fp16", "int8")
FP32_ATOL = 1e-4  # max abs logit difference allowed between ONNX Runtime fp32 and PyTorch
NATIVE_FP32_ATOL = 1e-3  # the same for the native encoder's fp32 (its own GEMM and exp: ~1e-5 relative)
VERIFY_PAIRS = 32  # pairs kept aside for verification (never used for calibration)


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``python -m export MODEL_DIR --out BUNDLE_DIR`` can be told."""

    precisions: tuple[str, ...] = ("fp32", "int8")
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    opset: int = 17
    calibration_data: str | None = None  # None: the shipped SQuAD-train sample
    calibration_samples: int = 256
    int8: QuantConfig = field(default_factory=QuantConfig)
    min_int8_span_agreement: float = 0.5  # guard against a broken INT8 graph (accuracy is measured by the bench)
    tensorrt: tuple[str, ...] = ()  # plans to build now (needs tensorrt and a GPU)
    tensorrt_onnx: tuple[str, ...] = ("fp16",)  # TensorRT input graphs to ship, for build-trt on the target GPU
    native: bool = True  # write the native encoder's float32 weights (engine backend "native")
    accuracy: dict[str, Any] | None = None  # measured figures to record (e.g. from a model card), by precision
    force: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in ORT_PRECISIONS]
        if bad or not self.precisions:
            raise ExportError(f"unknown ONNX precision(s) {bad or '(none)'}; choose from {', '.join(ORT_PRECISIONS)}")
        for name, values in (("--tensorrt", self.tensorrt), ("--tensorrt-onnx", self.tensorrt_onnx)):
            bad = [p for p in values if p not in TRT_PRECISIONS]
            if bad:
                raise ExportError(f"unknown {name} precision(s) {bad}; choose from {', '.join(TRT_PRECISIONS)}")
        if self.max_seq_len < 32:
            raise ExportError(f"--max-seq-len {self.max_seq_len} is too short for question + context (minimum 32)")
        if self.calibration_samples < 0:
            raise ExportError("--calibration-samples must be >= 0")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("spanrt", "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _save_tokenizer(model_dir: Path, dst: Path, vocab_rows: int) -> dict[str, Any]:
    """Write the fast tokenizer as tokenizer.json (padding and truncation off: the runtime sets them)."""
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise UnsupportedModelError(f"{model_dir}: no fast (Rust) tokenizer could be built; the runtime needs tokenizer.json")
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(dst))
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > vocab_rows:
        raise UnsupportedModelError(f"{model_dir}: tokenizer has {size} tokens but the model embeds only {vocab_rows}")
    info: dict[str, Any] = {"vocab_size": size}
    for role in ("cls", "sep", "pad"):
        token = getattr(tok, f"{role}_token", None)
        tid = getattr(tok, f"{role}_token_id", None)
        if token is None or tid is None:
            raise UnsupportedModelError(f"{model_dir}: tokenizer has no {role} token; a span model needs [CLS]/[SEP]/[PAD]-style tokens")
        info[f"{role}_token"], info[f"{role}_token_id"] = str(token), int(tid)
    lower = getattr(tok, "do_lower_case", None)
    info["do_lower_case"] = bool(lower) if lower is not None else None
    return info


def _verification_batches(tokenizer: Any, pairs: list[Pair], max_seq_len: int, input_names: tuple[str, ...], pad_id: int) -> list[EncodedBatch]:
    """Batches at several lengths and batch sizes: (1, 64), (4, 128), (8, L) padded to L, (3, natural length)."""
    lengths = sorted({min(64, max_seq_len), min(128, max_seq_len), max_seq_len})
    plan = [(1, lengths[0], True), (4, lengths[min(1, len(lengths) - 1)], True), (8, max_seq_len, True), (3, max_seq_len, False)]
    batches, i = [], 0
    for b, s, pad_full in plan:
        chosen = []
        while len(chosen) < b:
            if i >= len(pairs):
                raise ExportError("not enough verification pairs whose question fits the window")
            if fits(tokenizer, pairs[i], s):
                chosen.append(pairs[i])
            i += 1
        batches.append(encode_pairs(tokenizer, chosen, seq_len=s, input_names=input_names, pad_token_id=pad_id, pad_to=s if pad_full else None))
    return batches


def export_bundle(model_dir: str | Path, out: str | Path, opts: ExportOptions | None = None) -> Path:
    """Export a fine-tuned span checkpoint to a verified bundle at ``out``; returns its path."""
    from export import onnx as onnx_export

    opts = opts or ExportOptions()
    progress = Progress(quiet=opts.quiet)
    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    spec = onnx_export.inspect_checkpoint(model_dir)
    if opts.max_seq_len > spec.max_positions:
        raise UnsupportedModelError(f"--max-seq-len {opts.max_seq_len} exceeds the model's {spec.max_positions} positions")
    if opts.tensorrt:
        from export import tensorrt as trt_export

        trt_export.require_tensorrt()  # fail before the slow steps, not after

    with BundleWriter(out, force=opts.force) as w:
        with progress.step("load checkpoint"):
            tok_info = _save_tokenizer(model_dir, w.path("tokenizer.json"), spec.vocab_size)
            model = onnx_export.load_model(spec)
            weights_sha = onnx_export.weights_sha256(model_dir)
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(w.path("tokenizer.json")))
        pad_id = tok_info["pad_token_id"]

        pool = load_pairs(opts.calibration_data)
        random.Random(0).shuffle(pool)
        verify_pool, calib_pool = pool[:VERIFY_PAIRS], pool[VERIFY_PAIRS:]
        batches = _verification_batches(tokenizer, verify_pool, opts.max_seq_len, spec.input_names, pad_id)
        with progress.step("PyTorch reference logits"):
            reference = [onnx_export.torch_logits(model, b) for b in batches]

        verification: dict[str, Any] = {"fp32_atol": FP32_ATOL, "pairs": sum(b.shape[0] for b in batches),
                                        "shapes": [list(b.shape) for b in batches], "data": str(opts.calibration_data or "shipped SQuAD v1.1 train sample")}
        raw = w.path("model.raw.fp32.onnx")  # unfused standard ops; the TensorRT graphs derive from it, then it goes
        with progress.step("export ONNX (TorchScript tracer)"):
            onnx_export.export_onnx(model, spec, raw, opset=opts.opset)
        with progress.step("verify ONNX fp32 vs PyTorch"):
            verification["onnx_fp32"] = onnx_export.verify_against(
                reference, onnx_export.ort_session(raw), batches, atol=FP32_ATOL, min_span_agreement=1.0, label="ONNX fp32")
        native_record: dict[str, Any] = {"written": False, "reason": "left out by --no-native"}
        if opts.native:
            try:
                if spec.family.not_native is not None:
                    raise UnsupportedModelError(spec.family.not_native)
                with progress.step("native encoder weights"):
                    # the mapping refuses what the encoder does not compute (ALBERT's gelu_new) before writing
                    verification["native"] = _write_native(w, model, spec, reference, batches, opts)
                native_record = {"written": True}
            except UnsupportedModelError as e:
                native_record["reason"] = f"{spec.model_type}: {e}"
                progress.log(f"[export] native encoder weights not written: {native_record['reason']}")
        del model  # free the PyTorch copy before quantization

        fused = w.path("model.fp32.onnx")
        with progress.step("optimize (ONNX Runtime transformer fusions)"):
            fusions = onnx_export.optimize_onnx(raw, fused, spec)
        with progress.step("verify optimized fp32 vs PyTorch"):
            verification["onnx_fp32_optimized"] = onnx_export.verify_against(
                reference, onnx_export.ort_session(fused), batches, atol=FP32_ATOL, min_span_agreement=1.0, label="optimized ONNX fp32")
        expected = {"Attention": spec.num_layers} if spec.family.attention_fuses else {}
        incomplete = {k: fusions.get(k, 0) for k, n in expected.items() if fusions.get(k, 0) != n}
        graph = {"optimizer": f"onnxruntime.transformers {spec.family.optimizer} fusions" if spec.family.optimizer
                 else "none: plain traced graph (ONNX Runtime's transformer optimizer does not know this family)"}

        calib: list[EncodedBatch] = []
        needs_calib = ("int8" in opts.precisions and opts.int8.recipe == "static") or "int8" in opts.tensorrt_onnx or "int8" in opts.tensorrt
        if needs_calib:
            if opts.calibration_samples == 0:
                raise ExportError("static INT8 needs --calibration-samples > 0")
            if opts.calibration_samples > len(calib_pool):
                raise ExportError(f"--calibration-samples {opts.calibration_samples} > the {len(calib_pool)} pairs available "
                                  f"(after {VERIFY_PAIRS} kept for verification); pass a larger --calibration-data file")
            calib = [encode_pairs(tokenizer, [p], seq_len=opts.max_seq_len, input_names=spec.input_names, pad_token_id=pad_id)
                     for p in calib_pool[: opts.calibration_samples]]

        if "fp32" in opts.precisions:
            w.add_artifact("model.fp32.onnx", format="onnx", precision="fp32", optimized=bool(spec.family.optimizer), **graph,
                           fusions=fusions, fusions_incomplete=incomplete or None, opset=opts.opset)

        if "int8" in opts.precisions:
            from export.quantize import quantize

            with progress.step(f"quantize INT8 ({opts.int8.recipe}{', %d calibration samples' % len(calib) if opts.int8.recipe == 'static' else ''})"):
                qinfo = quantize(fused, w.path("model.int8.onnx"), opts.int8, calibration=calib, progress=progress)
            with progress.step("verify INT8 vs PyTorch"):
                verification["onnx_int8"] = onnx_export.verify_against(
                    reference, onnx_export.ort_session(w.path("model.int8.onnx")), batches, atol=None,
                    min_span_agreement=opts.min_int8_span_agreement, label="ONNX int8")
            w.add_artifact("model.int8.onnx", format="onnx", precision="int8", optimized=bool(spec.family.optimizer), **graph,
                           quantization=qinfo, opset=opts.opset)

        if "fp16" in opts.precisions:
            from export.fp16 import convert_fp16, verify_fp16

            with progress.step("convert FP16 (GPU fusions: SkipLayerNormalization too)"):
                gpu_fused = w.path("model.gpu.fp32.onnx")
                onnx_export.optimize_onnx(raw, gpu_fused, spec, skip_layer_norm=True)
                finfo = convert_fp16(gpu_fused, w.path("model.fp16.onnx"))
                gpu_fused.unlink()
            with progress.step("verify FP16 vs PyTorch"):
                verification["onnx_fp16"] = verify_fp16(reference, w.path("model.fp16.onnx"), batches)
            w.add_artifact("model.fp16.onnx", format="onnx", precision="fp16", optimized=bool(spec.family.optimizer), **graph,
                           conversion=finfo, opset=opts.opset)

        trt_inputs = set(opts.tensorrt_onnx) | set(opts.tensorrt)
        if "fp16" in trt_inputs:
            from export.fp16 import convert_fp16_for_tensorrt, verify_fp16

            with progress.step("convert FP16 graph for TensorRT"):
                tinfo16 = convert_fp16_for_tensorrt(raw, w.path("model.trt.fp16.onnx"))
            with progress.step("verify TensorRT FP16 graph (ONNX Runtime CPU) vs PyTorch"):
                verification["onnx_trt_fp16"] = verify_fp16(reference, w.path("model.trt.fp16.onnx"), batches)
            w.add_artifact("model.trt.fp16.onnx", format="onnx-trt", precision="fp16", optimized=False, conversion=tinfo16,
                           opset=opts.opset, used_for=["tensorrt fp16"])
        if "int8" in trt_inputs:
            from export.quantize import quantize_for_tensorrt

            with progress.step(f"quantize INT8 QDQ for TensorRT ({len(calib)} calibration samples)"):
                tinfo = quantize_for_tensorrt(raw, w.path("model.trt.int8.onnx"), calibration=calib, progress=progress)
            with progress.step("verify TensorRT INT8 QDQ graph (ONNX Runtime CPU) vs PyTorch"):
                verification["onnx_trt_int8"] = onnx_export.verify_against(
                    reference, onnx_export.ort_session(w.path("model.trt.int8.onnx")), batches, atol=None,
                    min_span_agreement=opts.min_int8_span_agreement, label="TensorRT INT8 QDQ graph")
            w.add_artifact("model.trt.int8.onnx", format="onnx-trt", precision="int8", optimized=False, quantization=tinfo, opset=opts.opset,
                           used_for=["tensorrt int8"])
        raw.unlink()
        if "fp32" not in opts.precisions:
            fused.unlink()

        if opts.tensorrt:
            from export import tensorrt as trt_export

            with progress.step(f"build TensorRT plans ({', '.join(opts.tensorrt)})"):
                for precision in opts.tensorrt:
                    trt_export.build_into(w, precision, max_seq_len=opts.max_seq_len, input_names=spec.input_names)

        progress.timings["total"] = round(time.perf_counter() - t_start, 3)
        manifest = Manifest(
            model_type=spec.model_type,
            architecture=spec.architecture,
            source={"path": str(model_dir.resolve()), "weights_sha256": weights_sha,
                    "weights": [f.name for f in onnx_export.weight_files(model_dir)]},
            max_seq_len=opts.max_seq_len,
            vocab_size=tok_info["vocab_size"],
            model_vocab_size=spec.vocab_size,
            max_positions=spec.max_positions,
            do_lower_case=tok_info["do_lower_case"],
            inputs=spec.input_names,
            outputs=onnx_export.OUTPUT_NAMES,
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_heads,
            native_encoder=native_record,
            tokenizer=w.tokenizer_entry("tokenizer.json", tokenizer, tok_info),
            versions=_versions(),
            verification=verification,
            export={"options": _options_record(opts), "seconds": progress.timings},
            accuracy=opts.accuracy or None,
        )
        path = w.commit(manifest)
    progress.log(f"[export] bundle written to {path} in {time.perf_counter() - t_start:.1f}s")
    return path


def _write_native(w: BundleWriter, model: Any, spec: Any, reference: list[Any], batches: list[EncodedBatch],
                  opts: ExportOptions) -> dict[str, Any]:
    """Write the native encoder's weights as an artifact and check its INT8, BF16 (where this CPU
    computes it) and FP32 logits against PyTorch like the ONNX graphs, on this CPU's best path (else
    say why it was not checked). FP32 must stay within NATIVE_FP32_ATOL and give the same best spans."""
    from engine.backends.base import default_threads
    from engine.backends.native import FORMAT, choose_isa, import_encoder
    from engine.errors import BackendUnavailableError
    from engine.native_weights import EncoderConfig
    from export.native import NATIVE_FILE, write_native
    from export.onnx import verify_against

    config, weights = write_native(model, spec, w.path(NATIVE_FILE))
    entry = w.add_artifact(NATIVE_FILE, format=FORMAT, precision="fp32", encoder=config.to_json(), computes=["int8", "bf16", "fp32"])
    try:
        module = import_encoder()
        isa = choose_isa(module)
    except BackendUnavailableError as e:
        return {"checked": False, "reason": str(e)}
    checked_config = EncoderConfig.from_json(entry.details["encoder"], root=w.tmp).to_json()  # as the backend reads the entry
    figures: dict[str, Any] = {"checked": True, "isa": isa}
    for precision in module.isa_precisions(isa):
        enc = module.Encoder(checked_config, weights, precision, default_threads(), isa)
        exact = precision == "fp32"
        figures[precision] = verify_against(reference, _EncoderSession(enc), batches, atol=NATIVE_FP32_ATOL if exact else None,
                                            min_span_agreement=1.0 if exact else opts.min_int8_span_agreement,
                                            label=f"native {precision} encoder ({isa})")
    return figures


class _EncoderSession:
    """The native encoder behind the session.run interface the export's verification calls."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        start, end = self.encoder.forward(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))
        return [start, end]


def _options_record(opts: ExportOptions) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("quiet")
    d.pop("force")
    return d
