"""Batching windows: sort by length, cut into batches of at most max_batch_size, pad each to its
own longest window (never to max_seq_len), and build the model inputs and the context mask.

Sorting by length keeps padding small: SQuAD windows range from ~60 to 384 tokens, and padding a
batch of them to 384 wastes over half of the model's work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.preprocess import Example, Template


@dataclass(frozen=True)
class WindowTable:
    """Every window of a group of examples, as parallel arrays (one entry per window)."""

    example: np.ndarray  # int64, index into the examples
    start: np.ndarray  # int64, first context token
    stop: np.ndarray  # int64, one past the last context token
    length: np.ndarray  # int64, tokens in the window, special tokens included

    @classmethod
    def from_examples(cls, examples: Sequence[Example], template: Template) -> WindowTable:
        """Flatten the examples' windows, in example order."""
        counts = [len(e.window_starts) for e in examples]
        example = np.repeat(np.arange(len(examples), dtype=np.int64), counts)
        start = np.concatenate([e.window_starts for e in examples])
        stop = np.concatenate([e.window_stops for e in examples])
        head = np.repeat(np.asarray([e.context_pos for e in examples], dtype=np.int64), counts)
        length = head + (stop - start) + len(template.suffix)
        return cls(example=example, start=start, stop=stop, length=length)

    def __len__(self) -> int:
        return len(self.example)


def plan_batches(lengths: np.ndarray, max_batch_size: int, max_batch_tokens: int | None = None,
                 call_cost_tokens: int = 0) -> list[np.ndarray]:
    """Window indices per batch: longest first (the allocator sees its peak once), so every batch
    holds windows of similar length; each batch has at most ``max_batch_size`` windows and, when
    ``max_batch_tokens`` is given, at most that many padded tokens (windows x its longest window;
    a single window longer than the budget still gets a batch of its own).

    With ``call_cost_tokens`` > 0 the cut points are chosen to minimise the modelled cost of the
    whole call, sum over batches of (call_cost_tokens + padded tokens): a model call has a fixed
    cost worth about that many tokens, so two windows share a batch when the padding it costs is
    smaller than the call it saves (dynamic programming over the length-sorted windows). With 0,
    batches are filled greedily up to the limits.

    The token budget is what keeps a CPU fast: past ~1,000 tokens per batch the activations leave
    the caches and the cost per token rises (measured in docs/runtime.md), so 32 windows of 384
    tokens cost more per token than one window alone.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
    if call_cost_tokens < 0:
        raise ValueError(f"call_cost_tokens must be >= 0, got {call_cost_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    n = len(order)
    if call_cost_tokens > 0 and n > 1:
        return [order[a:b] for a, b in _optimal_cuts(lengths[order], max_batch_size, max_batch_tokens, call_cost_tokens)]
    if max_batch_tokens is None:
        return [order[i : i + max_batch_size] for i in range(0, n, max_batch_size)]
    batches: list[np.ndarray] = []
    i = 0
    while i < n:
        longest = int(lengths[order[i]])  # sorted: the first window of a batch is its longest
        size = min(max_batch_size, max(1, max_batch_tokens // max(longest, 1)), n - i)
        batches.append(order[i : i + size])
        i += size
    return batches


def _optimal_cuts(sorted_lengths: np.ndarray, max_batch_size: int, max_batch_tokens: int | None,
                  call_cost: int) -> list[tuple[int, int]]:
    """[a, b) ranges of the descending ``sorted_lengths`` minimising sum(call_cost + (b - a) * L[a])
    under the size and token limits (a batch of one window is always allowed)."""
    n = len(sorted_lengths)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    prev = np.zeros(n + 1, dtype=np.int64)
    lengths = sorted_lengths.astype(np.float64)
    budget = np.inf if max_batch_tokens is None else float(max_batch_tokens)
    for j in range(1, n + 1):
        lo = max(0, j - max_batch_size)
        starts = np.arange(lo, j)
        padded = (j - starts) * lengths[lo:j]
        cost = best[lo:j] + call_cost + padded
        cost[(padded > budget) & (starts != j - 1)] = np.inf
        k = int(np.argmin(cost))
        best[j], prev[j] = cost[k], lo + k
    cuts = []
    j = n
    while j > 0:
        cuts.append((int(prev[j]), j))
        j = int(prev[j])
    return cuts[::-1]


@dataclass(frozen=True)
class Batch:
    """Model inputs for one batch plus what decoding needs to map positions back."""

    input_ids: np.ndarray  # [B, S]
    attention_mask: np.ndarray  # [B, S]
    token_type_ids: np.ndarray  # [B, S]
    context_mask: np.ndarray  # bool [B, S], True on context tokens (answer candidates)

    @classmethod
    def of_ids(cls, input_ids: np.ndarray) -> Batch:
        """A batch of unpadded windows with these ids (segment 0, every token a context token): for
        timing and warming up a backend at a shape, not for answers."""
        return cls(input_ids=input_ids, attention_mask=np.ones_like(input_ids),
                   token_type_ids=np.zeros_like(input_ids), context_mask=np.ones(input_ids.shape, dtype=bool))

    def feeds(self, input_names: Sequence[str], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
        """The inputs by the model's names, in the dtypes the model declares."""
        arrays = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "token_type_ids": self.token_type_ids}
        return {name: arrays[name].astype(dtypes.get(name, np.int64), copy=False) for name in input_names}


def build_batch(
    examples: Sequence[Example], table: WindowTable, windows: np.ndarray, template: Template, pad_token_id: int,
    pad_multiple: int = 1, max_len: int | None = None,
) -> Batch:
    """Pad the given windows to the longest of them (rounded up to ``pad_multiple``, but not past
    ``max_len``) and fill ids, types, attention and context mask."""
    b = len(windows)
    longest = s = int(table.length[windows].max())
    if pad_multiple > 1:
        s = -(-longest // pad_multiple) * pad_multiple
        if max_len is not None:
            s = max(min(s, max_len), longest)
    input_ids = np.full((b, s), pad_token_id, dtype=np.int64)
    types = np.zeros((b, s), dtype=np.int64)
    attention = np.zeros((b, s), dtype=np.int64)
    cmask = np.zeros((b, s), dtype=bool)
    suffix, suffix_types, ctype = template.suffix, template.suffix_types, template.context_type
    for r, w in enumerate(windows.tolist()):
        ex = examples[table.example[w]]
        c0 = ex.context_pos
        a, z = int(table.start[w]), int(table.stop[w])
        c1 = c0 + z - a
        end = c1 + len(suffix)
        input_ids[r, :c0] = ex.head_ids
        input_ids[r, c0:c1] = ex.context.ids[a:z]
        input_ids[r, c1:end] = suffix
        types[r, :c0] = ex.head_types
        types[r, c0:c1] = ctype
        types[r, c1:end] = suffix_types
        attention[r, :end] = 1
        cmask[r, c0:c1] = True
    return Batch(input_ids=input_ids, attention_mask=attention, token_type_ids=types, context_mask=cmask)
