"""Official SQuAD scoring, v1.1 and v2.0 rules, as `python -m bench score`.

Re-implements, line for line in behaviour, the official evaluate-v1.1.py and evaluate-v2.0.py
(rajpurkar/SQuAD-explorer): answer normalisation (lower case, punctuation, articles, white
space), token F1, the max over gold answers, and for v2.0 the empty-answer rules and the
HasAns/NoAns splits (no-answer probability threshold not used: every prediction is taken as
given, as the official script does without --na-prob-file).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import string
import sys
from pathlib import Path
from typing import Any

from export.squad_data import read_squad_json

_PUNCT = set(string.punctuation)
_ARTICLES_V1 = re.compile(r"\b(a|an|the)\b")
_ARTICLES_V2 = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str, *, v2: bool = False) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official rule)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = (_ARTICLES_V2 if v2 else _ARTICLES_V1).sub(" ", s)
    return " ".join(s.split())


def exact_match_v1(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _token_f1(pred: list[str], gold: list[str]) -> float:
    """Harmonic mean of token precision and recall over the multiset overlap (both scripts' core)."""
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_v1(prediction: str, ground_truth: str) -> float:
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _tokens_v2(s: str) -> list[str]:
    return normalize_answer(s, v2=True).split() if s else []


def exact_match_v2(gold: str, pred: str) -> int:
    return int(normalize_answer(gold, v2=True) == normalize_answer(pred, v2=True))


def f1_v2(gold: str, pred: str) -> float:
    g, p = _tokens_v2(gold), _tokens_v2(pred)
    if not g or not p:
        return float(g == p)  # both empty: 1, one empty: 0
    return _token_f1(p, g)


def is_v2(dataset_json: dict[str, Any]) -> bool:
    """A file is scored with v2.0 rules when it says so or has is_impossible questions."""
    if str(dataset_json.get("version", "")).startswith("v2") or str(dataset_json.get("version", "")) == "2.0":
        return True
    return any("is_impossible" in qa for art in dataset_json["data"] for p in art["paragraphs"] for qa in p["qas"])


def evaluate_v1(dataset: list[dict[str, Any]], predictions: dict[str, str]) -> dict[str, float]:
    """evaluate-v1.1.py: unanswered questions count as 0 over all questions."""
    f1 = em = total = 0.0
    for article in dataset:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                golds = [a["text"] for a in qa["answers"]]
                pred = predictions[qa["id"]]
                em += max(exact_match_v1(pred, g) for g in golds)
                f1 += max(f1_v1(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": int(total)}


def evaluate_v2(dataset: list[dict[str, Any]], predictions: dict[str, str]) -> dict[str, float]:
    """evaluate-v2.0.py without a no-answer probability file: totals over predicted questions."""
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    has_ans: dict[str, bool] = {}
    for article in dataset:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                qid = qa["id"]
                has_ans[qid] = bool(qa["answers"])
                golds = [a["text"] for a in qa["answers"] if normalize_answer(a["text"], v2=True)] or [""]
                if qid not in predictions:
                    continue
                pred = predictions[qid]
                exact[qid] = max(exact_match_v2(g, pred) for g in golds)
                f1[qid] = max(f1_v2(g, pred) for g in golds)
    out: dict[str, float] = _summary(exact, f1, list(exact))
    has = [q for q in exact if has_ans[q]]
    no = [q for q in exact if not has_ans[q]]
    if has:
        out.update({f"HasAns_{k}": v for k, v in _summary(exact, f1, has).items()})
    if no:
        out.update({f"NoAns_{k}": v for k, v in _summary(exact, f1, no).items()})
    return out


def _summary(exact: dict[str, int], f1: dict[str, float], qids: list[str]) -> dict[str, float]:
    n = len(qids)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "total": 0}
    return {"exact_match": 100.0 * sum(exact[q] for q in qids) / n, "f1": 100.0 * sum(f1[q] for q in qids) / n, "total": n}


def score(dataset_json: dict[str, Any], predictions: dict[str, str]) -> dict[str, float]:
    """Score predictions ({question id: answer text}) with the rules the file's version calls for."""
    if is_v2(dataset_json):
        return {"version": "2.0", **evaluate_v2(dataset_json["data"], predictions)}
    return {"version": "1.1", **evaluate_v1(dataset_json["data"], predictions)}


class ScoreInputError(ValueError):
    """A data or predictions file that cannot be scored; the message names the file and the problem."""


def _read_json(path: Path, what: str) -> Any:
    """The JSON document of ``path`` (``.gz`` decompressed), or a ScoreInputError saying why not."""
    if path.is_dir():
        raise ScoreInputError(f"{path}: is a folder; pass the {what} file")
    try:
        return read_squad_json(path)
    except FileNotFoundError:
        raise ScoreInputError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ScoreInputError(f"{path}: not UTF-8 text (UTF-16 or binary?); save the {what} as UTF-8 JSON") from None
    except (json.JSONDecodeError, RecursionError) as e:
        detail = "empty file" if isinstance(e, json.JSONDecodeError) and not e.doc.strip() else str(e) or "nested too deeply"
        raise ScoreInputError(f"{path}: not valid JSON ({detail})") from None
    except (OSError, EOFError, ValueError) as e:  # unreadable, a damaged .gz, an integer beyond the digit limit
        raise ScoreInputError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def check_squad(dataset_json: Any, path: Path | str = "data") -> None:
    """A SQuAD document: {"data": [{"paragraphs": [{"qas": [{"id": str, "answers": [{"text": str}]}]}]}]}."""
    def bad(where: str, expected: str) -> ScoreInputError:
        return ScoreInputError(f"{path}: not a SQuAD file: {where} should be {expected}")

    if not isinstance(dataset_json, dict) or not isinstance(dataset_json.get("data"), list):
        raise bad("the top level", 'an object with a "data" list of articles')
    for i, article in enumerate(dataset_json["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise bad(f"data[{i}]", 'an article with a "paragraphs" list')
        for j, para in enumerate(article["paragraphs"]):
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                raise bad(f"data[{i}].paragraphs[{j}]", 'a paragraph with a "qas" list')
            for k, qa in enumerate(para["qas"]):
                where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("id"), str) or not isinstance(qa.get("answers"), list):
                    raise bad(where, 'a question with a string "id" and an "answers" list')
                if not all(isinstance(a, dict) and isinstance(a.get("text"), str) for a in qa["answers"]):
                    raise bad(f"{where}.answers", 'a list of {"text": str} objects')


def check_predictions(predictions: Any, path: Path | str = "predictions") -> dict[str, str]:
    """{question id: answer text}, every value a string (an empty string is a no-answer)."""
    if not isinstance(predictions, dict):
        raise ScoreInputError(f"{path}: expected a JSON object {{question id: answer text}}, got a {type(predictions).__name__}")
    for qid, text in predictions.items():
        if not isinstance(text, str):
            raise ScoreInputError(f"{path}: the prediction for {qid!r} is {type(text).__name__} {str(text)[:40]}, not a string "
                                  "(answer text; \"\" for no answer)")
    return predictions


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench score", description="Official SQuAD v1.1/v2.0 scoring.")
    p.add_argument("--data", required=True, type=Path, help="SQuAD-format dev file (v1.1 or v2.0, detected)")
    p.add_argument("--predictions", required=True, type=Path, help="JSON object {question id: answer text}")
    args = p.parse_args(argv)
    try:
        dataset_json = _read_json(args.data, "data")
        check_squad(dataset_json, args.data)
        predictions = check_predictions(_read_json(args.predictions, "predictions"), args.predictions)
        known = {qa["id"] for art in dataset_json["data"] for para in art["paragraphs"] for qa in para["qas"]}
        unknown = [q for q in predictions if q not in known]
        if not known:
            raise ScoreInputError(f"{args.data}: has no questions")
        if predictions and len(unknown) == len(predictions):
            raise ScoreInputError(f"none of the {len(predictions)} prediction ids is in {args.data} (e.g. {unknown[0]!r}): "
                                  "predictions for another data file?")
        if not predictions:
            raise ScoreInputError(f"{args.predictions}: holds no predictions")
    except ScoreInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if unknown:
        print(f"warning: {len(unknown)} of {len(predictions)} prediction ids are not in {args.data} (e.g. {unknown[0]!r}); "
              "they are not scored", file=sys.stderr)
    json.dump(score(dataset_json, predictions), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
