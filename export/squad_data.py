"""Reading SQuAD-format JSON files (v1.1 and v2.0) into flat question records."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SquadExample:
    """One question over one context, with its gold answers (empty for v2.0 impossible)."""

    qid: str
    question: str
    context: str
    answers: tuple[str, ...] = field(default_factory=tuple)
    answer_starts: tuple[int, ...] = field(default_factory=tuple)
    is_impossible: bool = False


def read_squad_json(path: str | Path) -> dict:
    """The parsed SQuAD JSON document; ``.gz`` files are decompressed on the fly."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def load_squad(path: str | Path) -> list[SquadExample]:
    """Flatten a SQuAD JSON file (optionally gzipped) into examples, in file order."""
    data = read_squad_json(path)["data"]
    out: list[SquadExample] = []
    for article in data:
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                answers = qa.get("answers", [])
                out.append(
                    SquadExample(
                        qid=qa["id"],
                        question=qa["question"],
                        context=context,
                        answers=tuple(a["text"] for a in answers),
                        answer_starts=tuple(int(a["answer_start"]) for a in answers),
                        is_impossible=bool(qa.get("is_impossible", False)) or not answers,
                    )
                )
    return out
