"""From decoded spans to answers: window positions -> character offsets, word alignment, merging
across windows, top-k de-duplication and the null (impossible) answer.

Scores are probabilities as in the Hugging Face pipeline: p_start(i) * p_end(j), each a softmax
over the window's context tokens plus [CLS]. Each window is normalised on its own, so scores
compare across windows. Candidates with the same text (case-insensitive, as the pipeline does)
are merged: within a window their probabilities add up (different token spans that snap to the
same words are the same answer), across windows the larger one is kept (the same span seen by
two overlapping windows is one event, not two; the pipeline adds those too, which favours answers
in the overlap).
"""

from __future__ import annotations

import heapq
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import BundleError


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer: ``context[start:end] == text``; ``score`` is a probability in [0, 1].

    The impossible (null) answer of ``handle_impossible=True`` has ``text == ""``,
    ``start == end == 0`` and ``impossible=True``, as in the Hugging Face pipeline.
    ``warnings`` holds what was changed on the way (a truncated question).
    """

    text: str
    start: int
    end: int
    score: float
    backend: str = ""
    precision: str = ""
    impossible: bool = False
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face question-answering pipeline's result: score, start, end, answer."""
        return {"score": self.score, "start": self.start, "end": self.end, "answer": self.text}


@dataclass
class Candidates:
    """The span candidates of one example's windows (one array entry per window, best first), in
    context-token coordinates."""

    start: list[np.ndarray] = field(default_factory=list)
    end: list[np.ndarray] = field(default_factory=list)
    prob: list[np.ndarray] = field(default_factory=list)
    null_prob: float = math.inf  # the smallest p_start[CLS] * p_end[CLS] over the windows

    def add(self, start: np.ndarray, end: np.ndarray, prob: np.ndarray, null_prob: float | None) -> None:
        """Record one window's valid candidates (best first) and its null probability."""
        self.start.append(start)
        self.end.append(end)
        self.prob.append(prob)
        if null_prob is not None and null_prob < self.null_prob:
            self.null_prob = null_prob


def collect(
    candidates: list[Candidates],
    example_of_window: np.ndarray,
    window_start: np.ndarray,
    windows: np.ndarray,
    context_pos: np.ndarray,
    spans: np.ndarray,
    scores: np.ndarray,
    start_lse: np.ndarray,
    end_lse: np.ndarray,
    null_scores: np.ndarray | None,
) -> None:
    """Turn one batch's decoder output into per-example candidates.

    ``windows`` are the batch rows' window ids, ``context_pos`` each row's position of its first
    context token; ``spans``/``scores`` come from engine.decode.span_search (-1 / -inf unfilled).
    """
    norm = (start_lse + end_lse).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: refused just below
        probs = np.exp(scores.astype(np.float64) - norm[:, None])
        nulls = np.exp(null_scores.astype(np.float64) - norm).tolist() if null_scores is not None else None
    shift = (window_start[windows] - context_pos)[:, None]
    tok_start = spans[:, :, 0] + shift
    tok_end = spans[:, :, 1] + shift
    valid = spans[:, :, 0] >= 0
    # The backend boundary checks host logits (engine.backends.base.check_logits); logits decoded
    # on a GPU are checked here, where they became probabilities: a score is always finite.
    if not np.isfinite(probs[valid]).all() or (nulls is not None and not np.isfinite(nulls).all()):
        raise BundleError("the model's logits gave a non-finite answer score (NaN or infinite logits at the context "
                          "tokens or [CLS]). Fix: export the bundle again (python -m export), or check the model file")
    for r, w in enumerate(windows.tolist()):
        keep = valid[r]
        candidates[example_of_window[w]].add(
            tok_start[r, keep], tok_end[r, keep], probs[r, keep], nulls[r] if nulls is not None else None)


_ZERO_WIDTH_JOINERS = ("\u200c", "\u200d")  # ZWNJ, ZWJ: they belong to the character before them


def _hangul_kind(ch: str) -> str:
    """The Hangul syllable type of UAX #29 (L, V, T, LV, LVT), or "" for other characters."""
    cp = ord(ch)
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return "L"
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return "V"
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return "T"
    if 0xAC00 <= cp <= 0xD7A3:
        return "LV" if (cp - 0xAC00) % 28 == 0 else "LVT"
    return ""


_HANGUL_JOINS = {"L": ("L", "V", "LV", "LVT"), "V": ("V", "T"), "LV": ("V", "T"), "T": ("T",), "LVT": ("T",)}


def joins_previous(prev: str, ch: str) -> bool:
    """True when ``ch`` belongs to the same user-perceived character as ``prev`` (the grapheme
    cluster rules of UAX #29 that matter for answer ends): combining marks (an NFD accent, an Indic
    vowel sign or virama), zero-width joiners, emoji skin-tone modifiers, the pictograph after a
    ZWJ, and conjoining Hangul jamo."""
    if ch < "\u0300":  # below the combining marks: never joins (the fast path of ASCII/Latin-1 text)
        return False
    if ch in _ZERO_WIDTH_JOINERS or unicodedata.category(ch) in ("Mn", "Mc", "Me") or "\U0001F3FB" <= ch <= "\U0001F3FF":
        return True
    if prev == "\u200d":
        return unicodedata.category(ch) == "So"
    kind = _hangul_kind(prev)
    return bool(kind) and _hangul_kind(ch) in _HANGUL_JOINS[kind]


def whole_characters(text: str, a: int, z: int) -> tuple[int, int]:
    """[a, z) widened to whole user-perceived characters: a tokenizer that drops accents (BERT's
    uncased normalizer on NFD text: "Jose" + U+0301) gives offsets that stop before the mark."""
    n = len(text)
    while z < n and joins_previous(text[z - 1], text[z]):
        z += 1
    while 0 < a < n and joins_previous(text[a - 1], text[a]):
        a -= 1
    return a, z


def _merge_window(best: dict[str, tuple[float, int, int]], text: str, starts: list[int], ends: list[int],
                  probs: list[float]) -> None:
    """Merge one window's candidates (best first) into ``best``: same text adds up inside the
    window, and across windows the larger score (then the earlier position) is kept."""
    mine: dict[str, list[Any]] = {}
    for a, z, p in zip(starts, ends, probs):
        if z <= a:
            continue  # a token without characters cannot be an answer
        a, z = whole_characters(text, a, z)
        key = text[a:z].lower()
        hit = mine.get(key)
        if hit is None:
            mine[key] = [p, a, z]  # the window's best candidate of this text keeps its place
        else:
            hit[0] += p
    for key, (p, a, z) in mine.items():
        old = best.get(key)
        if old is None or p > old[0] or (p == old[0] and (a, z) < (old[1], old[2])):
            best[key] = (p, a, z)


def finalize(
    cand: Candidates,
    text: str,
    char_start: np.ndarray,
    char_end: np.ndarray,
    warnings: tuple[str, ...],
    *,
    top_k: int,
    handle_impossible: bool,
    null_threshold: float,
    backend: str,
    precision: str,
) -> list[Answer]:
    """The best ``top_k`` answers of one example, best first (fewer when fewer distinct ones exist).

    ``text`` is its context and ``char_start``/``char_end`` the [start, end) characters each context
    token points at (its whole word's with align_to_words); ``warnings`` go on every answer.
    """
    best: dict[str, tuple[float, int, int]] = {}  # key -> (score, start, end)
    if cand.start:
        # Windows in order of their total candidate probability, which bounds any answer they
        # can give: once top_k answers beat the next window's total, no later window can matter
        # (the answer is exact; a 1 MB context stops after a few of its thousands of windows).
        totals = np.asarray([p.sum() for p in cand.prob])
        order = np.argsort(-totals, kind="stable").tolist()
        check_at = 1
        for n, w in enumerate(order):
            if n == check_at:
                check_at *= 2
                if len(best) >= top_k and heapq.nlargest(top_k, (v[0] for v in best.values()))[-1] > totals[w]:
                    break
            _merge_window(best, text, char_start[cand.start[w]].tolist(), char_end[cand.end[w]].tolist(), cand.prob[w].tolist())
    ranked = sorted(best.values(), key=lambda c: (-c[0], c[1], c[2]))
    answers = [Answer(text[a:z], a, z, p, backend, precision, False, warnings) for p, a, z in ranked[:top_k]]
    if handle_impossible and math.isfinite(cand.null_prob):
        null = Answer("", 0, 0, cand.null_prob, backend, precision, True, warnings)
        # The null answer ranks with its probability minus the threshold, after spans on ties.
        at = sum(1 for a in answers if a.score >= cand.null_prob - null_threshold)
        if at < top_k:
            answers.insert(at, null)
            answers = answers[:top_k]
    return answers
