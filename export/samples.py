"""Real question/context pairs for calibration and verification, tokenized like the runtime does.

The shipped sample (``export/data/calibration-squad-train.jsonl.gz``) holds 512 pairs drawn from
the SQuAD v1.1 TRAIN set (never dev: calibrating on the evaluation data would flatter the INT8
figures). ``--calibration-data`` accepts that JSONL format or any SQuAD-format JSON file.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError

SHIPPED_SAMPLE = Path(__file__).resolve().parent / "data" / "calibration-squad-train.jsonl.gz"


@dataclass(frozen=True)
class Pair:
    """One question over one context."""

    question: str
    context: str


def load_pairs(path: str | Path | None = None, *, limit: int | None = None, seed: int = 0) -> list[Pair]:
    """Question/context pairs from the shipped sample, a ``.jsonl[.gz]`` file or a SQuAD JSON file.

    With ``limit``, a deterministic random subset (``seed``) of that size.
    """
    p = Path(path) if path is not None else SHIPPED_SAMPLE
    if not p.is_file():
        raise ExportError(f"calibration data {p} not found; pass --calibration-data with a SQuAD-format train file")
    name = p.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener: Any = gzip.open if name.endswith(".gz") else open
            with opener(p, "rt", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            pairs = [Pair(str(r["question"]), str(r["context"])) for r in rows]
        else:
            from export.squad_data import load_squad

            pairs = [Pair(e.question, e.context) for e in load_squad(p)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"calibration data {p}: unreadable ({type(e).__name__}: {e}); expected SQuAD JSON or JSONL with question/context") from None
    pairs = [q for q in pairs if q.question.strip() and q.context.strip()]
    if not pairs:
        raise ExportError(f"calibration data {p} holds no question/context pairs")
    if limit is not None and limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs


@dataclass(frozen=True)
class EncodedBatch:
    """Model inputs (int64, [batch, seq]) by ONNX input name, plus the mask of context tokens."""

    feeds: dict[str, np.ndarray]
    context_mask: np.ndarray  # bool [batch, seq]: tokens a span may use

    @property
    def shape(self) -> tuple[int, int]:
        """(batch, sequence length)."""
        b, s = self.feeds["input_ids"].shape
        return int(b), int(s)


def encode_pairs(tokenizer: Any, pairs: list[Pair], *, seq_len: int | None, input_names: tuple[str, ...],
                 pad_token_id: int, pad_to: int | None = None) -> EncodedBatch:
    """Encode ``[CLS] question [SEP] context [SEP]`` windows (first window only) as one padded batch.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the bundle's tokenizer.json). Contexts are cut to
    ``seq_len`` tokens; the batch is padded to ``pad_to`` (default: its longest row).
    """
    tokenizer.no_padding()
    if seq_len is not None:
        tokenizer.enable_truncation(max_length=seq_len, strategy="only_second")
    else:
        tokenizer.no_truncation()
    try:
        encs = tokenizer.encode_batch([(p.question, p.context) for p in pairs])
    finally:
        tokenizer.no_truncation()
    width = max(len(e.ids) for e in encs) if pad_to is None else pad_to
    b = len(encs)
    ids = np.full((b, width), pad_token_id, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    types = np.zeros((b, width), dtype=np.int64)
    ctx = np.zeros((b, width), dtype=bool)
    for i, e in enumerate(encs):
        n = len(e.ids)
        if n > width:
            raise ExportError(f"internal: encoded length {n} exceeds the batch width {width}")
        ids[i, :n] = e.ids
        mask[i, :n] = 1
        types[i, :n] = e.type_ids
        ctx[i, :n] = [s == 1 for s in e.sequence_ids]
    all_feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return EncodedBatch(feeds={n: all_feeds[n] for n in input_names}, context_mask=ctx)


def fits(tokenizer: Any, pair: Pair, seq_len: int) -> bool:
    """Whether the question leaves at least half of a ``seq_len`` window to the context."""
    tokenizer.no_truncation()
    return len(tokenizer.encode(pair.question).ids) + 4 <= seq_len // 2
