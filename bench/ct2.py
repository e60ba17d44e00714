"""The CTranslate2 peers: the checkpoint's encoder converted by CTranslate2, a NumPy QA head, a plain NumPy span decode.

What a user who picks CTranslate2 for fast CPU transformer inference writes for extractive QA
(CTranslate2 runs encoders but has no question-answering head or pipeline): convert the
checkpoint's encoder once with ``ctranslate2.converters.TransformersConverter`` (int8 weights for
the int8 peer), load it as ``ctranslate2.Encoder(compute_type=...)``, tokenize with the
checkpoint's fast tokenizer into 384-token windows with a 128-token stride, run the windows
through the encoder, apply the QA head (``qa_outputs``, a [2, hidden] matrix) to the last hidden
state with NumPy, and pick the best span the way the Hugging Face course does: the 20 best starts
and ends of each window, spans inside the context of at most max_answer_len tokens, the highest
start + end logit over all windows. Nothing of SpanRT is used.
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.base import Prediction, System, SystemUnavailable

CT2_HINT = 'pip install "spanrt[bench]"  (CTranslate2 wheels: x86-64 and aarch64 Linux, macOS, Windows)'
COMPUTE_TYPES = {"int8": "int8", "fp32": "float32"}  # the peer's precision -> CTranslate2's compute_type
QA_HEAD_FILE = "qa_head.npz"
N_BEST = 20  # candidate starts and ends per window (the Hugging Face course's n_best)


def _version() -> str:
    try:
        return importlib.metadata.version("ctranslate2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemUnavailable(f"CTranslate2 is not installed. Install it with: {CT2_HINT}") from exc


def check_compute_type(precision: str) -> str:
    """CTranslate2's compute type for ``precision``; SystemUnavailable when this CPU build lacks it."""
    try:
        import ctranslate2
    except ImportError as exc:
        raise SystemUnavailable(f"CTranslate2 cannot be imported ({exc}). Install it with: {CT2_HINT}") from exc
    compute_type = COMPUTE_TYPES[precision]
    supported = ctranslate2.get_supported_compute_types("cpu")
    if compute_type not in supported:
        raise SystemUnavailable(f"CTranslate2 {ctranslate2.__version__} has no {compute_type} on this CPU "
                                f"(supported here: {', '.join(sorted(supported))})")
    return compute_type


def ct2_model(checkpoint: Path, cache_root: Path, precision: str) -> Path:
    """Convert ``checkpoint``'s encoder with CTranslate2's converter into the cache (once); returns the model folder.

    Cached by checkpoint sha256 and CTranslate2 version, like the Optimum exports. The folder also
    holds the QA head's weights (qa_head.npz), which the converter leaves out.
    """
    from bench.peers import _atomic_build
    from engine.default_model import checkpoint_sha256

    version = _version()
    check_compute_type(precision)
    target = (cache_root / "bench" / "ctranslate2" / f"{checkpoint.name}-{checkpoint_sha256(checkpoint)[:16]}-ctranslate2-{version}"
              / precision)
    if not (target / "model.bin").is_file() or not (target / QA_HEAD_FILE).is_file():
        _atomic_build(target, lambda tmp: _convert(checkpoint, tmp, precision))
    return target


def _convert(checkpoint: Path, out: Path, precision: str) -> None:
    import ctranslate2.converters

    converter = ctranslate2.converters.TransformersConverter(str(checkpoint))
    # the converter refuses an existing folder unless forced; `out` is a fresh temporary one
    converter.convert(str(out), quantization="int8" if precision == "int8" else None, force=True)
    weight, bias = _qa_head(checkpoint)
    np.savez(out / QA_HEAD_FILE, weight=weight, bias=bias)


def _qa_head(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's ``qa_outputs`` layer: weight [2, hidden], bias [2] (fp32)."""
    from safetensors.numpy import load_file

    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise SystemUnavailable(f"{checkpoint} has no model.safetensors to read the QA head (qa_outputs) from")
    tensors = load_file(str(path))
    names = [k for k in tensors if k.endswith("qa_outputs.weight")]
    if len(names) != 1:
        raise SystemUnavailable(f"{path} has {len(names)} qa_outputs.weight tensors, expected one (a question-answering checkpoint)")
    bias = names[0][: -len("weight")] + "bias"
    return tensors[names[0]].astype(np.float32), tensors[bias].astype(np.float32)


def best_span(start: np.ndarray, end: np.ndarray, sequence_ids: list[int | None], max_answer_len: int,
              n_best: int = N_BEST) -> tuple[float, int, int] | None:
    """(start + end logit, i, j) of the best context span among the ``n_best`` best starts and ends of one window
    (the Hugging Face course's post-processing); None when no pair of them makes a span."""
    best: tuple[float, int, int] | None = None
    ends = np.argsort(end)[::-1][:n_best]
    for i in np.argsort(start)[::-1][:n_best]:
        if sequence_ids[i] != 1:
            continue
        for j in ends:
            if sequence_ids[j] != 1 or j < i or j - i + 1 > max_answer_len:
                continue
            score = float(start[i] + end[j])
            if best is None or score > best[0]:
                best = (score, int(i), int(j))
    return best


class CTranslate2System(System):
    """``ctranslate2.Encoder`` on the converted encoder, the QA head in NumPy, a plain NumPy span decode."""

    encoder: Any = None
    tokenizer: Any = None
    token_types: bool = False
    head_weight_t: np.ndarray | None = None
    head_bias: np.ndarray | None = None

    def import_libraries(self) -> None:
        try:
            import ctranslate2  # noqa: F401
            import transformers
        except ImportError as exc:
            raise SystemUnavailable(f"the CTranslate2 peer needs ctranslate2 and transformers ({exc.name!r} is missing): {CT2_HINT}") from exc
        transformers.logging.set_verbosity_error()

    def load(self) -> dict[str, Any]:
        import ctranslate2
        from transformers import AutoConfig, AutoTokenizer

        if self.spec.device != "cpu":
            raise SystemUnavailable(f"the bench runs the CTranslate2 peers on CPU only, not {self.spec.device}")
        model_dir, checkpoint = self.artifacts.model_dir, self.artifacts.checkpoint
        if model_dir is None or checkpoint is None:
            raise SystemUnavailable("the CTranslate2 model was not prepared")
        compute_type = check_compute_type(self.spec.precision)
        self.encoder = ctranslate2.Encoder(str(model_dir), device="cpu", compute_type=compute_type,
                                           intra_threads=self.threads, inter_threads=1)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if not self.tokenizer.is_fast:
            raise SystemUnavailable(f"{checkpoint}'s tokenizer has no fast version (offsets and overflowing windows need one)")
        self.token_types = AutoConfig.from_pretrained(checkpoint).model_type == "bert"  # BERT has segment embeddings
        head = np.load(Path(model_dir) / QA_HEAD_FILE)
        self.head_weight_t = np.ascontiguousarray(head["weight"].T)  # [hidden, 2]
        self.head_bias = head["bias"]
        return {"backend": "ctranslate2", "precision": self.spec.precision, "device": "cpu", "compute_type": compute_type,
                "ctranslate2": ctranslate2.__version__, "threads": self.threads, "model": str(model_dir),
                "decode": f"NumPy: {N_BEST} best starts x ends per window, best start+end logit over the windows"}

    def answer(self, questions: list[str], contexts: list[str], batch_size: int) -> list[Prediction]:
        s = self.settings
        t0 = time.perf_counter()
        enc = self.tokenizer(questions, contexts, truncation="only_second", max_length=s.max_seq_len, stride=s.doc_stride,
                             return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
        ids = enc["input_ids"]
        types = enc["token_type_ids"] if self.token_types else None
        t1 = time.perf_counter()
        hidden = np.asarray(self.encoder.forward_batch(ids, token_type_ids=types).last_hidden_state)
        logits = hidden @ self.head_weight_t + self.head_bias  # [windows, longest window, 2]
        t2 = time.perf_counter()
        best: list[tuple[float, int, int] | None] = [None] * len(questions)
        null = [float("inf")] * len(questions)
        for w, q in enumerate(enc["overflow_to_sample_mapping"]):
            seq_ids = enc.sequence_ids(w)
            n = len(seq_ids)
            start, end = logits[w, :n, 0], logits[w, :n, 1]
            null[q] = min(null[q], float(start[0] + end[0]))
            span = best_span(start, end, seq_ids, s.max_answer_len)
            if span is not None and (best[q] is None or span[0] > best[q][0]):
                offsets = enc["offset_mapping"][w]
                best[q] = (span[0], offsets[span[1]][0], offsets[span[2]][1])
        preds = []
        for q, b in enumerate(best):
            if b is None or (s.handle_impossible_answer and null[q] > b[0]):
                preds.append(Prediction(text="", start=0, end=0, score=null[q]))
            else:
                preds.append(Prediction(text=contexts[q][b[1] : b[2]], start=int(b[1]), end=int(b[2]), score=b[0]))
        t3 = time.perf_counter()
        st = self._stage_s
        st["tokenize"] += t1 - t0
        st["model"] += t2 - t1
        st["decode"] += t3 - t2
        return preds

    def close(self) -> None:
        self.encoder = None
