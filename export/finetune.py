"""Fine-tune a BERT-family encoder into a span (extractive QA) model on SQuAD.

The recipe: ``[CLS] question [SEP] context [SEP]`` windows with a doc stride, a linear span head
giving each token a start and an end logit, loss = NLL(start) + NLL(end) over the window's real
tokens; a window that does not contain the answer points both targets at [CLS]. On CPU, bf16
autocast and attention-probability dropout 0 make a step ~3x faster (measured; see the model card).

Checkpoints (``--save-every`` steps) hold model, optimizer, scheduler and RNG state, so
``--resume`` continues a run exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.options import DEFAULTS
from export.squad_data import SquadExample, load_squad

log = logging.getLogger("spanrt.finetune")


@dataclass
class FinetuneConfig:
    """Every knob of a training run; written beside the checkpoints so a run can be resumed."""

    model_dir: str
    train_files: list[str]
    out_dir: str
    max_seq_len: int = 256
    doc_stride: int = 128
    max_question_len: int = DEFAULTS.max_question_len  # as the runtime truncates questions
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 42
    device: str = "cpu"
    bf16: bool = True
    attention_dropout: float = 0.0
    pad_multiple: int = 64
    save_every: int = 250
    keep_checkpoints: int = 2
    threads: int = 0


@dataclass
class Feature:
    input_ids: np.ndarray
    token_type_ids: np.ndarray
    start: int
    end: int


def build_features(examples: list[SquadExample], tokenizer: Any, cfg: FinetuneConfig) -> list[Feature]:
    """Tokenize examples into doc-stride windows with start/end token targets."""
    feats: list[Feature] = []
    chunk = 2000
    for lo in range(0, len(examples), chunk):
        batch = [e for e in examples[lo : lo + chunk] if e.answers]
        questions = [_truncate_question(e.question.lstrip(), tokenizer, cfg.max_question_len) for e in batch]
        enc = tokenizer(
            questions,
            [e.context for e in batch],
            truncation="only_second",
            max_length=cfg.max_seq_len,
            stride=cfg.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        for i, sample_idx in enumerate(enc["overflow_to_sample_mapping"]):
            ex = batch[sample_idx]
            offsets = enc["offset_mapping"][i]
            seq_ids = enc.sequence_ids(i)
            a_start = ex.answer_starts[0]
            a_end = a_start + len(ex.answers[0])
            ctx = [k for k, s in enumerate(seq_ids) if s == 1]
            s_tok = e_tok = 0
            if ctx and offsets[ctx[0]][0] <= a_start and offsets[ctx[-1]][1] >= a_end:
                s_tok = next(k for k in ctx if offsets[k][1] > a_start)
                e_tok = next(k for k in reversed(ctx) if offsets[k][0] < a_end)
                if e_tok < s_tok:
                    s_tok = e_tok = 0
            feats.append(
                Feature(
                    input_ids=np.asarray(enc["input_ids"][i], dtype=np.int32),
                    token_type_ids=np.asarray(enc["token_type_ids"][i], dtype=np.int8),
                    start=s_tok,
                    end=e_tok,
                )
            )
        log.info("tokenized %d/%d examples -> %d windows", min(lo + chunk, len(examples)), len(examples), len(feats))
    return feats


def _truncate_question(question: str, tokenizer: Any, limit: int) -> str:
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= limit:
        return question
    return question[: enc["offset_mapping"][limit - 1][1]]


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then sort within mega-chunks of 50 batches by length, then shuffle the batches."""
    order = rng.permutation(len(lengths))
    mega = batch_size * 50
    batches: list[np.ndarray] = []
    for lo in range(0, len(order), mega):
        part = order[lo : lo + mega]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[k : k + batch_size] for k in range(0, len(part), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def collate(feats: list[Feature], idx: np.ndarray, pad_multiple: int, max_len: int) -> dict[str, Any]:
    import torch

    longest = max(len(feats[i].input_ids) for i in idx)
    width = min(max_len, int(math.ceil(longest / pad_multiple) * pad_multiple))
    ids = np.zeros((len(idx), width), dtype=np.int64)
    tt = np.zeros_like(ids)
    am = np.zeros_like(ids)
    for r, i in enumerate(idx):
        n = len(feats[i].input_ids)
        ids[r, :n] = feats[i].input_ids
        tt[r, :n] = feats[i].token_type_ids
        am[r, :n] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(tt),
        "attention_mask": torch.from_numpy(am),
        "start": torch.tensor([feats[i].start for i in idx]),
        "end": torch.tensor([feats[i].end for i in idx]),
    }


def span_loss(start_logits: Any, end_logits: Any, attention_mask: Any, start: Any, end: Any) -> Any:
    """NLL(start) + NLL(end) over the window's real tokens (padding excluded), in float32."""
    import torch

    neg = torch.finfo(torch.float32).min
    pad = attention_mask == 0
    s = start_logits.float().masked_fill(pad, neg)
    e = end_logits.float().masked_fill(pad, neg)
    return torch.nn.functional.cross_entropy(s, start) + torch.nn.functional.cross_entropy(e, end)


def _load_model(cfg: FinetuneConfig) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer

    mcfg = AutoConfig.from_pretrained(cfg.model_dir)
    mcfg.attention_probs_dropout_prob = cfg.attention_dropout
    if hasattr(mcfg, "attention_dropout"):  # DistilBERT's name for it
        mcfg.attention_dropout = cfg.attention_dropout
    model = AutoModelForQuestionAnswering.from_pretrained(cfg.model_dir, config=mcfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir, use_fast=True)
    return model, tokenizer


def train(cfg: FinetuneConfig, *, resume: bool = False) -> Path:
    """Run (or resume) a fine-tuning run; returns the folder of the final model."""
    import torch
    from tqdm import tqdm

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out / "train.log")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    ckpt = _latest_checkpoint(out) if resume else None
    if ckpt is not None:
        saved = json.loads((out / "finetune_config.json").read_text())
        for key in ("model_dir", "train_files", "max_seq_len", "doc_stride", "batch_size", "grad_accum", "seed", "epochs", "max_steps", "learning_rate"):
            if saved[key] != getattr(cfg, key):
                raise ValueError(f"--resume: {key} differs from the run being resumed ({saved[key]!r} vs {getattr(cfg, key)!r})")
    (out / "finetune_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log.info("config: %s", json.dumps(asdict(cfg)))

    model, tokenizer = _load_model(cfg)
    examples: list[SquadExample] = []
    for f in cfg.train_files:
        examples.extend(load_squad(f))
    log.info("loaded %d training questions from %s", len(examples), cfg.train_files)
    t0 = time.time()
    feats = build_features(examples, tokenizer, cfg)
    lengths = np.array([len(f.input_ids) for f in feats])
    log.info("%d windows (%.1f%% without the answer), mean length %.1f, tokenized in %.0fs",
             len(feats), 100 * np.mean([f.start == 0 for f in feats]), lengths.mean(), time.time() - t0)

    steps_per_epoch = math.ceil(len(feats) / cfg.batch_size) // cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps > 0 else int(steps_per_epoch * cfg.epochs)
    warmup = int(total * cfg.warmup_ratio)
    device = torch.device(cfg.device)
    model.to(device)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    step = 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, step)

    model.train()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    bar = tqdm(total=total, initial=step, desc="finetune", mininterval=20, dynamic_ncols=False, ncols=110)
    ema_loss: float | None = None
    seen_windows = 0
    t_start = time.time()
    while step < total:
        epoch = (step * cfg.grad_accum) // max(1, math.ceil(len(feats) / cfg.batch_size))
        batches = length_grouped_batches(lengths, cfg.batch_size, np.random.default_rng(cfg.seed + epoch))
        first = (step * cfg.grad_accum) % len(batches)
        micro = 0
        for b_idx in range(first, len(batches)):
            batch = collate(feats, batches[b_idx], cfg.pad_multiple, cfg.max_seq_len)
            with autocast:
                outp = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    token_type_ids=batch["token_type_ids"].to(device),
                )
            loss = span_loss(outp.start_logits, outp.end_logits, batch["attention_mask"].to(device),
                             batch["start"].to(device), batch["end"].to(device))
            (loss / cfg.grad_accum).backward()
            seen_windows += len(batches[b_idx])
            micro += 1
            if micro % cfg.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            lv = float(loss.detach())
            ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
            rate = seen_windows / (time.time() - t_start)
            bar.set_postfix(loss=f"{ema_loss:.3f}", win_s=f"{rate:.1f}", lr=f"{sched.get_last_lr()[0]:.2e}", ep=epoch, refresh=False)
            bar.update(1)
            if step % 50 == 0:
                log.info("step %d/%d epoch %d loss %.4f windows/s %.1f lr %.3e", step, total, epoch, ema_loss, rate, sched.get_last_lr()[0])
            if step % cfg.save_every == 0 or step == total:
                _save_checkpoint(out, step, model, opt, sched, cfg.keep_checkpoints)
            if step >= total:
                break
    bar.close()
    final = out / "final"
    _save_model(final, model, tokenizer)
    log.info("done: %d steps in %.1f min; final model in %s", total, (time.time() - t_start) / 60, final)
    return final


def _save_model(path: Path, model: Any, tokenizer: Any) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.config.attention_probs_dropout_prob = 0.1  # training-only setting; inference ignores dropout
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _save_checkpoint(out: Path, step: int, model: Any, opt: Any, sched: Any, keep: int) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "step": step},
               tmp / "trainer_state.pt")
    final = out / f"checkpoint-{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log.info("saved %s", final)
    for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)


def _latest_checkpoint(out: Path) -> Path | None:
    cks = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return cks[-1] if cks else None


def _setup_logging(path: Path) -> None:
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
