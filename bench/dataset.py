"""The questions a run asks: a SQuAD-format file (v1.1 or v2.0, detected) and a fixed sample of it."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.squad_eval import is_v2
from export.squad_data import SquadExample, load_squad, read_squad_json

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "squad" / "dev-v1.1.json.gz"
SAMPLE_SEED = 20240611


@dataclass(frozen=True)
class Questions:
    """A sample of one SQuAD file: the examples asked, the JSON the scorer needs, where it came from."""

    path: Path
    sha256: str
    version: str  # "1.1" or "2.0"
    examples: tuple[SquadExample, ...]
    dataset_json: dict[str, Any]
    total_in_file: int

    @property
    def v2(self) -> bool:
        """True when the file is scored with SQuAD v2.0 rules (unanswerable questions)."""
        return self.version == "2.0"


def load_questions(path: str | Path = DEFAULT_DATA, *, limit: int | None = None, seed: int = SAMPLE_SEED) -> Questions:
    """Read a SQuAD file and keep a fixed random sample of ``limit`` questions (all when None), in file order.

    The sample depends only on the file and ``limit``, so every system and every run asks the same questions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    dataset_json = read_squad_json(path)
    if not isinstance(dataset_json, dict) or "data" not in dataset_json:
        raise ValueError(f"{path} is not a SQuAD-format file (no top-level 'data' list)")
    examples = load_squad(path)
    if not examples:
        raise ValueError(f"{path} has no questions")
    total = len(examples)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be positive, got {limit}")
        if limit < total:
            keep = sorted(random.Random(seed).sample(range(total), limit))
            examples = [examples[i] for i in keep]
    return Questions(path=path, sha256=sha, version="2.0" if is_v2(dataset_json) else "1.1",
                     examples=tuple(examples), dataset_json=dataset_json, total_in_file=total)


def subset_json(dataset_json: dict[str, Any], qids: set[str]) -> dict[str, Any]:
    """The dataset restricted to ``qids`` (so v1.1 scores are over the asked questions, not the whole file)."""
    data = []
    for article in dataset_json["data"]:
        paras = []
        for para in article["paragraphs"]:
            qas = [qa for qa in para["qas"] if qa["id"] in qids]
            if qas:
                paras.append({**para, "qas": qas})
        if paras:
            data.append({**article, "paragraphs": paras})
    return {**dataset_json, "data": data}
